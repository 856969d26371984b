"""Options shared by several subcommands, defined once so they mean the same everywhere.

``tests/test_cli_flags.py`` walks every subcommand's parser and holds them to
it: an option string used by two subcommands has the same destination,
action, type, choices and metavar in both, and every option has a help text.
The shared meanings (docs/operations.md, "Options"):

* ``--json``: machine-readable output, as JSON on standard output instead of
  text (``replay``/``run``: the report; ``--report FILE`` writes it to a file);
* ``-q``/``--quiet``: say less: only problems (what that leaves is in each
  help text);
* ``--config FILE``: the agent configuration (lmtpfast.toml);
* ``--server DEST``: one LMTP server instead of a configuration; the TLS and
  SASL options (``_security``) go with it wherever it connects;
* ``--loop``, ``--timeout-scale``, the ``--log-*`` options (``_log``).
"""

from __future__ import annotations

import argparse
import re
from typing import Any

__all__ = [
    "DESTINATION_HELP",
    "add_config",
    "add_json",
    "add_loop",
    "add_quiet",
    "add_server",
    "add_timeout_scale",
    "parse_duration",
    "positive_float",
    "positive_int",
]

DESTINATION_HELP = "unix:/path, host, host:port, [ipv6]:port, inet:host:port"


def parse_duration(text: str) -> float:
    """``300``, ``300s``, ``5m``, ``4h``, ``5d``, ``1w`` → seconds (Postfix time units)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", text)
    if m is None:
        raise argparse.ArgumentTypeError(f"bad duration {text!r} (e.g. 300, 300s, 5m, 4h, 5d)")
    scale = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[m[2]]
    return float(m[1]) * scale


def positive_int(text: str) -> int:
    """A whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {text}")
    return value


def positive_float(text: str) -> float:
    """A number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def add_json(p: Any, what: str) -> None:
    """``--json``: *what* as JSON on standard output instead of text."""
    p.add_argument("--json", action="store_true",
                   help=f"machine-readable output: {what} as JSON on standard output")


def add_quiet(p: Any, what: str) -> None:
    """``-q``/``--quiet``: say less (*what* it leaves)."""
    p.add_argument("-q", "--quiet", action="store_true", help=what)


def add_config(p: Any, what: str = "agent configuration (lmtpfast.toml)", *,
               required: bool = False) -> None:
    p.add_argument("--config", metavar="FILE", required=required, help=what)


def add_server(p: Any, *, required: bool = False, extra: str = "") -> None:
    p.add_argument("--server", metavar="DEST", required=required,
                   help=f"the LMTP server: {DESTINATION_HELP}{extra}")


def add_loop(p: Any) -> None:
    p.add_argument("--loop", choices=("auto", "uvloop", "asyncio"), default="auto",
                   help="event loop (default: uvloop when installed)")


def add_timeout_scale(p: Any, default: float = 1.0, extra: str = "") -> None:
    p.add_argument("--timeout-scale", type=float, default=default, metavar="F",
                   help=f"multiply every Postfix default timeout by F (default {default:g})"
                   f"{extra}")


def add_pace(p: Any) -> None:
    """replay's and run's shared knobs: how much is in flight, and when to retry."""
    p.add_argument("--concurrency", type=positive_int, default=64, metavar="N",
                   help="messages in flight at once (default 64)")
    p.add_argument("--connections", type=positive_int, default=8, metavar="N",
                   help="--server: connections to it at most (default 8)")
    p.add_argument("--min-backoff", type=parse_duration, default=300.0, metavar="T",
                   help="first retry delay, doubled each attempt (default 300s)")
    p.add_argument("--max-backoff", type=parse_duration, default=4000.0, metavar="T",
                   help="longest retry delay (default 4000s)")
    p.add_argument("--max-queue-lifetime", type=parse_duration, default=5 * 86400.0,
                   metavar="T", help="give up on temporary failures of messages this old "
                   "(default 5d)")
