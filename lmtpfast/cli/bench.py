"""``lmtpfast bench``: a pipelined LMTP load generator (like smtp-source, but pipelined)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

import msgspec

from lmtpfast import ConfigurationError, LMTPError, parse_destination

from . import _exit, _run
from ._loadgen import BenchConfig, format_report, run_bench
from ._options import add_json, add_server, positive_float, positive_int

__all__ = ["register", "run"]


def _progress_line() -> Callable[[int, float], None]:
    """A live ``N messages, R msg/s`` line on the terminal (stderr), rewritten in place."""
    last = [0, 0.0]

    def show(done: int, elapsed: float) -> None:
        rate = (done - last[0]) / max(elapsed - last[1], 1e-9)
        last[:] = [done, elapsed]
        sys.stderr.write(f"\r{done:>10,} messages  {rate:>10,.0f} msg/s  {elapsed:6.1f}s ")
        sys.stderr.flush()

    return show


def register(sub: Any) -> None:
    p = sub.add_parser("bench", help="generate LMTP load and report rates and latency",
                       description="Deliver generated messages as fast as the server takes "
                       "them, over several pipelined connections, and report messages/s, "
                       "recipients/s, MB/s, latency percentiles, outcomes and client CPU.")
    add_server(p, required=True)
    limit = p.add_mutually_exclusive_group()
    limit.add_argument("--messages", type=positive_int, default=None, metavar="N",
                       help="messages to send (default 10000)")
    limit.add_argument("--duration", type=positive_float, default=None, metavar="S",
                       help="send for S seconds instead")
    p.add_argument("--connections", type=positive_int, default=8, metavar="N",
                   help="connections to the server (default 8)")
    p.add_argument("--window", type=positive_int, default=32, metavar="W",
                   help="transactions in flight per connection (default 32)")
    p.add_argument("--recipients", type=positive_int, default=1, metavar="R",
                   help="recipients per message (default 1)")
    p.add_argument("--recipient-pattern", default="user{n}@example.com", metavar="PAT",
                   help="recipient addresses; {n} is 1..R (default user{n}@example.com)")
    p.add_argument("--from", dest="sender", default="bench@example.org", metavar="ADDR",
                   help="envelope sender (default bench@example.org)")
    body = p.add_mutually_exclusive_group()
    body.add_argument("--size", type=positive_int, default=1024, metavar="BYTES",
                      help="generated message size (default 1024)")
    body.add_argument("--message", metavar="FILE", help="send this message file instead")
    p.add_argument("--rate", type=positive_float, default=None, metavar="MSG/S",
                   help="limit the total message rate")
    p.add_argument("--pipelining", choices=("auto", "off"), default="auto",
                   help="PIPELINING when advertised (auto), or one command at a time (off)")
    p.add_argument("--chunking", choices=("auto", "on", "off"), default="auto",
                   help="BDAT (RFC 3030): when advertised (auto), required (on) or never (off)")
    add_json(p, "the report")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        parse_destination(args.server)
        if "{n}" not in args.recipient_pattern and args.recipients > 1:
            raise ConfigurationError("--recipient-pattern needs {n} when --recipients > 1")
        args.recipient_pattern.format(n=1)
    except (ConfigurationError, KeyError, IndexError, ValueError) as exc:
        print(f"lmtpfast bench: {exc}", file=sys.stderr)
        return _exit.EX_USAGE
    message = None
    if args.message:
        try:
            with open(args.message, "rb") as f:
                message = f.read()
        except OSError as exc:
            print(f"lmtpfast bench: cannot read {args.message}: {exc.strerror or exc}",
                  file=sys.stderr)
            return _exit.EX_NOINPUT
    config = BenchConfig(
        server=args.server,
        messages=args.messages if args.duration is None else None,
        duration=args.duration,
        connections=args.connections,
        window=args.window,
        recipients=args.recipients,
        recipient_pattern=args.recipient_pattern,
        sender=args.sender,
        size=args.size,
        message=message,
        pipelining=args.pipelining == "auto",
        chunking=args.chunking,
        rate=args.rate,
    )
    if config.messages is None and config.duration is None:
        config = msgspec.structs.replace(config, messages=10_000)
    try:
        report = _run.run(run_bench(config, progress=_progress_line() if sys.stderr.isatty()
                                     and not args.json else None))
    except ConfigurationError as exc:
        print(f"lmtpfast bench: {exc}", file=sys.stderr)
        return _exit.EX_UNAVAILABLE
    except (LMTPError, OSError) as exc:
        print(f"lmtpfast bench: {args.server}: {exc}", file=sys.stderr)
        return _exit.EX_TEMPFAIL
    if sys.stderr.isatty() and not args.json:
        sys.stderr.write("\n")
    if args.json:
        sys.stdout.write(msgspec.json.encode(report).decode() + "\n")
    else:
        print("\n".join(format_report(report)))
    return _exit.EX_OK if not report.errors else _exit.EX_TEMPFAIL
