"""``lmtpfast sink``: run the LMTP sink from the command line.

Exit status: 0 after a clean stop (SIGINT, SIGTERM or ``--duration``),
64 (EX_USAGE) for a bad option or fault spec, 71 (EX_OSERR) when it cannot
listen (or give its unix sockets the owner and mode asked for).

Unix sockets are 0666 by default, whatever the umask, so that Postfix's
lmtp(8) (user ``postfix``) can connect to a sink started as root;
``--socket-mode`` and ``--socket-owner`` choose otherwise (docs/postfix.md).
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

from . import _input
from ._options import add_loop, add_quiet, positive_float

__all__ = ["DEFAULT_LISTEN", "register", "run"]

#: Unprivileged, loopback only, and easy to remember next to LMTP's port 24.
DEFAULT_LISTEN = "127.0.0.1:2400"

#: Postfix's lmtp(8) runs as user ``postfix`` and needs write permission on a
#: unix socket to connect; a socket made by root under umask 022 is 0755.
DEFAULT_SOCKET_MODE = 0o666

EX_OK = 0
EX_USAGE = 64
EX_OSERR = 71


def _octal_mode(text: str) -> int:
    try:
        mode = int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an octal mode: {text!r} (e.g. 0666, 0660)") from None
    if not 0 <= mode <= 0o777:
        raise argparse.ArgumentTypeError(f"mode {text!r} is not between 0000 and 0777")
    return mode


def _owner(spec: str) -> tuple[int, int]:
    """``USER[:GROUP]`` -> (uid, gid); the group defaults to the user's (-1: unchanged)."""
    import grp
    import pwd

    user, _, group = spec.partition(":")
    try:
        pw = pwd.getpwnam(user) if user else None
        uid = pw.pw_uid if pw is not None else -1
        gid = grp.getgrnam(group).gr_gid if group else (pw.pw_gid if pw is not None else -1)
    except KeyError as exc:
        raise ConfigurationError(f"no such user or group: {exc.args[0]}",
                                 source="--socket-owner") from None
    return uid, gid


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
        type=_input.parse_size,
        default=DEFAULT_MAX_SIZE,
        help=f"largest message in bytes (k, m, g suffixes), 0 = no limit "
        f"(default {DEFAULT_MAX_SIZE})",
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
    p.add_argument(
        "--socket-mode",
        metavar="MODE",
        type=_octal_mode,
        default=DEFAULT_SOCKET_MODE,
        help="permissions of unix sockets, octal (default 0666: any local user, Postfix's "
        "lmtp(8) as user postfix included, may connect, whatever the umask)",
    )
    p.add_argument(
        "--socket-owner",
        metavar="USER[:GROUP]",
        help="owner of unix sockets (as root), e.g. postfix:postfix with --socket-mode 0600",
    )
    p.add_argument("--duration", metavar="S", type=positive_float,
                   help="stop by itself after S seconds")
    p.add_argument(
        "--ready-file",
        metavar="FILE",
        help="once listening, write the real destinations to FILE (one a line)",
    )
    add_loop(p)
    add_quiet(p, "do not print the counters on exit")
    p.set_defaults(func=run)


def _fail(status: int, message: str) -> int:
    print(f"lmtpfast sink: {message}", file=sys.stderr)
    return status


def run(args: argparse.Namespace) -> int:
    """Run the sink until SIGINT/SIGTERM or ``--duration``; return the exit status."""
    try:
        sink = _build(args)
        args.socket_ids = None if args.socket_owner is None else _owner(args.socket_owner)
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
            f"cannot hide {', '.join(sorted(unknown))}: "
            f"offered are {', '.join(DEFAULT_EXTENSIONS)}",
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
    try:
        _set_socket_modes(sink, args.socket_mode, args.socket_ids)
    except OSError as exc:
        await sink.stop()
        return _fail(EX_OSERR, f"cannot set the socket's owner or mode: {exc}")
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


def _set_socket_modes(sink: Sink, mode: int, ids: tuple[int, int] | None) -> None:
    # Before the ready file is written and the sink says it listens, so a
    # client that waits for either finds the socket usable.
    for dest in sink.destinations:
        if dest.startswith("unix:"):
            path = dest[5:]
            if ids is not None:
                os.chown(path, *ids)
            os.chmod(path, mode)


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
