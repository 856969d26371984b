"""The ``lmtpfast`` command line.

Each subcommand lives in its own module with ``register(subparsers)``; its
``run(args)`` returns a sysexits status, because MTAs run delivery programs and
defer (75) or bounce on what they return.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import TYPE_CHECKING, Any

from lmtpfast import ConfigurationError

from . import _exit

if TYPE_CHECKING:
    import argparse
    from collections.abc import Sequence

__all__ = ["main"]

# Subcommand modules, in the order --help lists them.
_SUBCOMMANDS = ("send", "replay", "run", "enqueue", "queue", "check-config", "probe", "map",
                "bench", "sink", "proxy")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser of every subcommand, or of ``only`` that one (a start-up cost MTAs pay)."""
    from ._parser import Parser

    parser = Parser(
        prog="lmtpfast",
        description="Fast, correct LMTP delivery. Commands: send (one message); enqueue, "
        "replay and run (queue mail, deliver the queue once or as a daemon); queue (manage "
        "it); check-config; probe (a server); map (query a lookup table); proxy (an LMTP "
        "front end routing to back ends); bench and sink (load and a test server). "
        "`lmtpfast COMMAND --help` says more about each.",
    )
    from lmtpfast import __version__

    parser.add_argument("--version", action="version", version=f"lmtpfast {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
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
    words = sys.argv[1:] if argv is None else list(argv)
    args: Any = None
    if words[:1] == ["send"]:
        # Once per message under an MTA: a plain command line needs no argparse
        # (anything else, help and mistakes included, goes through it below).
        from .send import fast_args

        args = fast_args(words[1:])
    if args is None:
        parser = build_parser(_chosen(words))
        args = parser.parse_args(words)
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
