"""``lmtpfast send``: deliver one message and print one line per recipient."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from lmtpfast import (
    ConfigurationError,
    ConnectError,
    ContentError,
    LMTPError,
    LocalProtocolError,
    RecipientResult,
    ReplyError,
    Timeouts,
    connect,
    parse_destination,
)

from . import _exit, _run, _security

__all__ = ["register", "run"]


def register(sub: Any) -> None:
    p = sub.add_parser(
        "send",
        help="deliver one message",
        description="Deliver one message over LMTP and print one line per recipient. "
        "Exit status: 0 all delivered, 75 any recipient not finally decided (try again), "
        "65 every undelivered recipient permanently refused, 64 bad usage, 66 unreadable input.",
    )
    p.add_argument("--server", required=True, metavar="DEST",
                   help="unix:/path, host, host:port, [ipv6]:port, inet:host:port")
    p.add_argument("--from", dest="sender", required=True, metavar="ADDR",
                   help="envelope sender ('' for the null sender)")
    p.add_argument("--rcpt", dest="recipients", action="append", required=True, metavar="ADDR",
                   help="envelope recipient (repeat for more)")
    p.add_argument("file", nargs="?", default="-", help="message file, or - for standard input")
    p.add_argument("--lhlo-name", metavar="NAME", help="name to give in LHLO (default: host name)")
    p.add_argument("--no-pipelining", action="store_true", help="send one command at a time")
    p.add_argument("--timeout-scale", type=float, default=1.0, metavar="F",
                   help="multiply every Postfix default timeout by F")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    _security.add_arguments(p)
    p.set_defaults(func=run)


def _read_message(name: str) -> bytes:
    if name == "-":
        return sys.stdin.buffer.read()
    with open(name, "rb") as f:
        return f.read()


def print_results(results: list[RecipientResult], as_json: bool) -> None:
    if as_json:
        import msgspec

        sys.stdout.write(msgspec.json.encode(results).decode() + "\n")
        return
    for r in results:
        print(r.line())


def run(args: argparse.Namespace) -> int:
    try:
        dest = parse_destination(args.server)
    except ConfigurationError as exc:
        print(f"lmtpfast send: --server: {exc}", file=sys.stderr)
        return _exit.EX_USAGE
    try:
        message = _read_message(args.file)
    except OSError as exc:
        print(f"lmtpfast send: cannot read {args.file}: {exc.strerror or exc}", file=sys.stderr)
        return _exit.EX_NOINPUT
    try:
        timeouts = Timeouts.scaled(args.timeout_scale)
    except ConfigurationError as exc:
        print(f"lmtpfast send: --timeout-scale: {exc}", file=sys.stderr)
        return _exit.EX_USAGE
    try:
        tls, auth = _security.policies(args, dest)
    except ConfigurationError as exc:
        print(f"lmtpfast send: {exc}", file=sys.stderr)
        return _exit.EX_CONFIG if exc.source else _exit.EX_USAGE

    async def deliver() -> list[RecipientResult]:
        conn = await connect(dest, lhlo_name=args.lhlo_name, timeouts=timeouts,
                             pipelining=not args.no_pipelining, tls=tls, auth=auth)
        try:
            return await conn.send(args.sender, args.recipients, message)
        finally:
            await conn.quit()

    try:
        results = _run.run(deliver())
    except ContentError as exc:
        print(f"lmtpfast send: {exc}", file=sys.stderr)
        return _exit.EX_DATAERR
    except LocalProtocolError as exc:
        print(f"lmtpfast send: {exc}", file=sys.stderr)
        return _exit.EX_USAGE
    except ReplyError as exc:
        print(f"lmtpfast send: {dest}: {exc}", file=sys.stderr)
        return _exit.EX_TEMPFAIL
    except (ConnectError, LMTPError, OSError) as exc:
        print(f"lmtpfast send: {dest}: {exc}", file=sys.stderr)
        return _exit.EX_TEMPFAIL
    print_results(results, args.json)
    return _exit.status_for(results)
