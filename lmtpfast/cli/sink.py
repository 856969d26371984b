"""``lmtpfast sink``: run the LMTP sink from the command line.

Exit status: 0 after a clean stop (SIGINT, SIGTERM or ``--duration``),
64 (EX_USAGE) for a bad option or fault spec, 71 (EX_OSERR) when it cannot
listen.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Callable
from typing import TextIO

import msgspec

from lmtpfast import ConfigurationError
from lmtpfast.server import DEFAULT_EXTENSIONS, DEFAULT_MAX_SIZE, FaultPlan, Sink, SinkStats

__all__ = ["DEFAULT_LISTEN", "register", "run"]

#: Unprivileged, loopback only, and easy to remember next to LMTP's port 24.
DEFAULT_LISTEN = "127.0.0.1:2400"

EX_OK = 0
EX_USAGE = 64
EX_OSERR = 71


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``sink`` subcommand to the ``lmtpfast`` parser."""
    p = subparsers.add_parser(
        "sink",
        help="run a fast LMTP server that discards or stores mail, with fault injection",
        description=(
            "A fast LMTP (RFC 2033) server for tests and benchmarks. It accepts every "
            "recipient and discards messages unless --maildir is given; --fault makes it "
            "misbehave on purpose. Counters are printed on exit (SIGINT/SIGTERM/--duration)."
        ),
        epilog=(
            "fault specs: COMMAND[@nth=N:rate=P:seed=N:times=N][:PATTERN]=ACTION, e.g. "
            "'rcpt:bob@*=550 5.1.1 No such user', 'dot:*@example.org=452 4.2.2 Over quota', "
            "'data=disconnect', 'mail@rate=0.01:seed=1=421 4.3.2 Going away', 'lhlo=stall', "
            "'greeting=delay:2', 'dot@nth=2=short:1:stall'. See docs/sink.md."
        ),
    )
    p.add_argument(
        "--listen",
        metavar="DEST",
        action="append",
        help=(
            "where to listen (repeatable): unix:/path, 127.0.0.1:PORT, [::1]:PORT, "
            f"inet:host:port; port 0 picks one (default {DEFAULT_LISTEN})"
        ),
    )
    p.add_argument("--maildir", metavar="DIR", help="store messages in DIR/<local part>/new/")
    p.add_argument(
        "--received",
        action="store_true",
        help="prepend Return-Path and Delivered-To headers to stored messages",
    )
    p.add_argument("--hostname", default="lmtpfast-sink", help="name in the greeting and LHLO")
    p.add_argument(
        "--hide",
        metavar="EXT",
        action="append",
        default=[],
        help=f"do not offer this extension (repeatable; one of {', '.join(DEFAULT_EXTENSIONS)})",
    )
    p.add_argument(
        "--advertise",
        metavar="KEYWORD",
        action="append",
        default=[],
        help="add an LHLO line the sink does not honour, e.g. STARTTLS (a fault; repeatable)",
    )
    p.add_argument(
        "--max-size",
        metavar="N",
        type=int,
        default=DEFAULT_MAX_SIZE,
        help=f"largest message in bytes, 0 = no limit (default {DEFAULT_MAX_SIZE})",
    )
    p.add_argument(
        "--fault", metavar="SPEC", action="append", default=[], help="inject a fault (repeatable)"
    )
    p.add_argument("--stats-json", metavar="FILE", help="write the counters as JSON on exit")
    p.add_argument(
        "--max-connections",
        metavar="N",
        type=int,
        default=0,
        help="refuse connections beyond N with 421 (default 0 = no limit)",
    )
    p.add_argument("--duration", metavar="S", type=float, help="stop by itself after S seconds")
    p.add_argument(
        "--ready-file",
        metavar="FILE",
        help="once listening, write the real destinations to FILE (one a line)",
    )
    p.add_argument(
        "--loop",
        choices=("auto", "uvloop", "asyncio"),
        default="auto",
        help="event loop (default: uvloop when installed)",
    )
    p.add_argument("--quiet", action="store_true", help="do not print the counters on exit")
    p.set_defaults(func=run)


def _fail(status: int, message: str) -> int:
    print(f"lmtpfast sink: {message}", file=sys.stderr)
    return status


def run(args: argparse.Namespace) -> int:
    """Run the sink until SIGINT/SIGTERM or ``--duration``; return the exit status."""
    try:
        sink = _build(args)
    except ConfigurationError as exc:
        return _fail(EX_USAGE, str(exc))
    factory = _loop_factory(args.loop)
    if isinstance(factory, str):
        return _fail(EX_USAGE, factory)
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(_serve(sink, args))


def _build(args: argparse.Namespace) -> Sink:
    known = {e.upper() for e in DEFAULT_EXTENSIONS}
    hidden = {h.upper() for h in args.hide}
    unknown = hidden - known
    if unknown:
        raise ConfigurationError(
            f"cannot hide {', '.join(sorted(unknown))}: offered are {', '.join(DEFAULT_EXTENSIONS)}",
            source="--hide",
        )
    if args.duration is not None and not args.duration > 0:
        raise ConfigurationError("must be a number of seconds > 0", source="--duration")
    plan = FaultPlan.parse(args.fault, advertise=args.advertise)
    return Sink(
        args.listen or [DEFAULT_LISTEN],
        maildir=args.maildir,
        hostname=args.hostname,
        extensions=[e for e in DEFAULT_EXTENSIONS if e not in hidden],
        max_size=args.max_size,
        faults=plan,
        max_connections=args.max_connections,
        received_headers=args.received,
    )


def _loop_factory(which: str) -> Callable[[], asyncio.AbstractEventLoop] | str | None:
    if which == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        return "uvloop is not installed" if which == "uvloop" else None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


async def _serve(sink: Sink, args: argparse.Namespace) -> int:
    try:
        await sink.start()
    except OSError as exc:
        return _fail(EX_OSERR, f"cannot listen: {exc}")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    try:
        if args.ready_file:
            _write_atomic(args.ready_file, "".join(d + "\n" for d in sink.destinations).encode())
        if not args.quiet:
            print(f"lmtpfast sink listening on {' '.join(sink.destinations)}", file=sys.stderr)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), args.duration)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)
        await sink.stop()
    if not args.quiet:
        print_stats(sink.stats, sys.stdout)
    if args.stats_json:
        try:
            _write_atomic(args.stats_json, msgspec.json.encode(sink.stats) + b"\n")
        except OSError as exc:
            return _fail(EX_OSERR, f"cannot write {args.stats_json}: {exc}")
    return EX_OK


def print_stats(stats: SinkStats, out: TextIO) -> None:
    """The counters, one ``name: value`` a line."""
    for field in stats.__struct_fields__:
        value = getattr(stats, field)
        if isinstance(value, dict):
            value = " ".join(f"{k}={v}" for k, v in sorted(value.items())) or "-"
        print(f"{field}: {value}", file=out)


def _write_atomic(path: str, data: bytes) -> None:
    # Readers poll for the file: they must never see it half written.
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
