"""The ``lmtpfast`` command line.

Each subcommand lives in its own module with ``register(subparsers)``; its
``run(args)`` returns a sysexits status, because MTAs run delivery programs and
defer (75) or bounce on what they return.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from lmtpfast import ConfigurationError

from . import _exit

__all__ = ["main"]

# Subcommand modules, in the order --help lists them.
_SUBCOMMANDS = ("send", "replay", "run", "enqueue", "queue", "check-config", "probe", "map",
                "bench", "sink", "proxy")


def _columns() -> int:
    """``shutil.get_terminal_size().columns``, without importing shutil.

    argparse makes a help formatter for every ``add_argument`` (to check the
    metavar), and the formatter asks shutil for the terminal's width: shutil
    (with bz2, lzma and fnmatch) was a tenth of a one-message ``lmtpfast
    send``'s start-up, for help that is never printed.
    """
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
        except (AttributeError, ValueError, OSError):
            columns = 0
    return columns or 80


class _Parser(argparse.ArgumentParser):
    """argparse that exits with EX_USAGE (64) instead of 2 on a usage error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        self.exit(_exit.EX_USAGE, f"{self.prog}: error: {message}\n")

    def _get_formatter(self) -> argparse.HelpFormatter:
        # The width argparse's formatter would take from shutil (less 2, as it does).
        return self.formatter_class(prog=self.prog, width=_columns() - 2)  # type: ignore[call-arg]


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser of every subcommand, or of ``only`` that one (a start-up cost MTAs pay)."""
    parser = _Parser(
        prog="lmtpfast",
        description="Fast, correct LMTP delivery. Commands: send (one message); enqueue, "
        "replay and run (queue mail, deliver the queue once or as a daemon); queue (manage "
        "it); check-config; probe (a server); map (query a lookup table); proxy (an LMTP "
        "front end routing to back ends); bench and sink (load and a test server). "
        "`lmtpfast COMMAND --help` says more about each.",
    )
    from lmtpfast import __version__

    parser.add_argument("--version", action="version", version=f"lmtpfast {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in (only,) if only else _SUBCOMMANDS:
        try:
            module = importlib.import_module(f"{__name__}.{name.replace('-', '_')}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name.replace('-', '_')}":
                raise
            continue  # a subcommand this checkout does not have yet
        module.register(sub)
    return parser


def _chosen(argv: Sequence[str]) -> str | None:
    """The subcommand named first on the command line, if it is one of ours.

    Only that one's module is imported: ``lmtpfast send`` runs once per
    message under an MTA and must not pay for replay, the daemon or the sink.
    Anything else (no command, ``--help``, a typo) builds the whole parser.
    """
    for arg in argv:
        if arg.startswith("-"):
            return None  # a top-level option first (--help, --version): the full parser
        return arg if arg in _SUBCOMMANDS else None
    return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser(_chosen(sys.argv[1:] if argv is None else argv))
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return _exit.EX_USAGE
    try:
        status: int = args.func(args)
    except ConfigurationError as exc:
        print(f"lmtpfast {args.command}: {exc}", file=sys.stderr)
        return _exit.EX_CONFIG
    except KeyboardInterrupt:
        print(f"lmtpfast {args.command}: interrupted", file=sys.stderr)
        return _exit.EX_TEMPFAIL
    except BrokenPipeError:
        # The reader went away (| head): not worth a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return _exit.EX_IOERR
    return status


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
