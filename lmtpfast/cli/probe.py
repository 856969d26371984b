"""``lmtpfast probe``: connect, show the greeting and capabilities, TLS and the
authenticated identity, time the round trips."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from lmtpfast import ConfigurationError, LMTPError, Timeouts, connect, parse_destination

from . import _exit, _run, _security

__all__ = ["register", "run"]


def register(sub: Any) -> None:
    p = sub.add_parser("probe", help="show a server's greeting, capabilities and latency",
                       description="Connect, print the greeting and LHLO capabilities, time "
                       "connect + greeting, LHLO and NOOP round trips, then QUIT. With "
                       "--tls the capabilities are those after STARTTLS, and the TLS version, "
                       "cipher and server certificate are shown; with SASL options, the "
                       "authenticated identity. "
                       "Exit status 0, or 75 if the server cannot be used.")
    p.add_argument("server", metavar="DEST", help="unix:/path, host, host:port, [ipv6]:port")
    p.add_argument("--lhlo-name", metavar="NAME", help="name to give in LHLO (default: host name)")
    p.add_argument("--count", type=int, default=5, metavar="N", help="NOOP round trips to time")
    p.add_argument("--timeout-scale", type=float, default=0.1, metavar="F",
                   help="multiply Postfix's default timeouts by F (default 0.1)")
    _security.add_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        dest = parse_destination(args.server)
        timeouts = Timeouts.scaled(args.timeout_scale)
    except ConfigurationError as exc:
        print(f"lmtpfast probe: {exc}", file=sys.stderr)
        return _exit.EX_USAGE
    if args.count < 0:
        print("lmtpfast probe: --count must not be negative", file=sys.stderr)
        return _exit.EX_USAGE
    try:
        tls, auth = _security.policies(args, dest)
    except ConfigurationError as exc:
        print(f"lmtpfast probe: {exc}", file=sys.stderr)
        return _exit.EX_CONFIG if exc.source else _exit.EX_USAGE

    async def probe() -> None:
        t0 = time.perf_counter()
        conn = await connect(dest, lhlo_name=args.lhlo_name, timeouts=timeouts, tls=tls,
                             auth=auth)
        t1 = time.perf_counter()
        try:
            print(f"server:       {dest}")
            print(f"greeting:     {conn.greeting.code} {conn.greeting.text}")
            print(f"lhlo:         {conn.lhlo_reply.lines[0] if conn.lhlo_reply.lines else ''}")
            for key, value in conn.capabilities.keywords.items():
                print(f"  capability: {key}{' ' + value if value else ''}")
            print(f"pipelining:   {'yes' if conn.pipelining else 'no'}")
            info = conn.tls
            if info is None:
                print(f"tls:          none (plain text; level {tls.level})")
            else:
                print(f"tls:          {info.version} {info.cipher} ({info.bits} bits)")
                state = "verified" if info.verified else "not verified"
                print(f"  peer:       {info.peer_subject or '?'} ({state}"
                      + (f", issuer {info.peer_issuer})" if info.peer_issuer else ")"))
                if info.peer_alt_names:
                    print(f"  names:      {' '.join(info.peer_alt_names)}")
                print(f"  sha256:     {info.fingerprint}")
            if conn.authenticated_as is not None:
                print(f"auth:         {conn.authenticated_as} ({conn.auth_mechanism})")
            elif auth is not None:
                print("auth:         none (the server offers no AUTH)")
            else:
                print("auth:         none")
            print(f"connect+greeting+lhlo: {(t1 - t0) * 1000:.2f} ms")
            rtts = []
            for _ in range(args.count):
                s = time.perf_counter()
                await conn.noop()
                rtts.append((time.perf_counter() - s) * 1000)
            if rtts:
                rtts.sort()
                median = rtts[len(rtts) // 2]
                print(f"NOOP round trip: min {rtts[0]:.3f} ms, median {median:.3f} ms, "
                      f"max {rtts[-1]:.3f} ms ({len(rtts)} samples)")
        finally:
            await conn.quit()

    try:
        _run.run(probe())
    except (LMTPError, OSError) as exc:
        print(f"lmtpfast probe: {dest}: {exc}", file=sys.stderr)
        return _exit.EX_TEMPFAIL
    return _exit.EX_OK
