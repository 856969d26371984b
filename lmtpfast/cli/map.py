"""``lmtpfast map``: look keys up in a ``TYPE:NAME`` map, or check a map's files.

``lmtpfast map query MAPNAME KEY...`` prints what Postfix's ``postmap -q KEY
MAPNAME`` prints for the same map file and data: the value (several result
elements joined by commas) for one key; for several keys (or ``-``: keys
from standard input, one a line) ``key<TAB>value`` per found key, as
``postmap -q -`` does. Exit status 0 when something was found, 1 when
nothing was, 75 on a lookup failure (where ``postmap`` exits 1 with a
``fatal:`` line), 78 for a bad map name or file.

``lmtpfast map check MAPNAME...`` reads each map's files without looking
anything up: unknown ``.cf`` parameters (typos Postfix would silently
ignore), malformed values, duplicate or malformed lines in text maps. Exit
status 0 when all is well, 78 otherwise: meant for an operator's CI.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from lmtpfast import CacheSettings, ConfigurationError, MapError, open_map

from . import _exit, _run

__all__ = ["register", "run_check", "run_query"]

EX_NOTFOUND = 1  # postmap -q's status for "not found"


def register(sub: Any) -> None:
    p = sub.add_parser("map", help="query or check a TYPE:NAME lookup table (as postmap -q)",
                       description="Query or check Postfix-style lookup tables: texthash:, "
                       "hash:, cdb:, lmdb:, pgsql:, mysql:, ldap:, socketmap:, tcp:, static:, "
                       "inline:.")
    msub = p.add_subparsers(dest="map_command", metavar="ACTION", parser_class=type(p))
    q = msub.add_parser("query", help="look keys up (what postmap -q prints)",
                        description="Print the value of each KEY in MAPNAME. One key: the "
                        "value alone; several keys or '-' (keys from stdin): 'key<TAB>value' "
                        "for each key found. Exit 0 if any key was found, 1 if none, 75 on a "
                        "lookup failure, 78 for a bad map.")
    q.add_argument("mapname", metavar="MAPNAME", help="TYPE:NAME, e.g. pgsql:/etc/postfix/x.cf")
    q.add_argument("keys", metavar="KEY", nargs="+", help="a key, or - to read keys from stdin")
    q.set_defaults(func=run_query)
    c = msub.add_parser("check", help="validate map files without lookups (exit 78 on problems)",
                        description="Read each map's configuration and report unknown "
                        "parameters, malformed values and bad lines. Exit 0 if none, 78 "
                        "otherwise.")
    c.add_argument("mapnames", metavar="MAPNAME", nargs="+",
                   help="TYPE:NAME of each map to check, e.g. pgsql:/etc/postfix/x.cf")
    c.set_defaults(func=run_check)
    p.set_defaults(func=lambda args: _usage(p))


def _usage(p: argparse.ArgumentParser) -> int:
    p.print_usage(sys.stderr)
    return _exit.EX_USAGE


def _write(text: str) -> None:
    sys.stdout.buffer.write(text.encode("utf-8", "surrogateescape") + b"\n")


def run_query(args: argparse.Namespace) -> int:
    keys: list[str] = []
    stdin = False
    for key in args.keys:
        if key == "-":
            stdin = True
            keys.extend(line.rstrip("\r\n") for line in sys.stdin if line.strip())
        else:
            keys.append(key)
    try:
        m = open_map(args.mapname, cache=CacheSettings(size=0))
    except ConfigurationError as exc:
        print(f"lmtpfast map: {exc}", file=sys.stderr)
        return _exit.EX_CONFIG
    for w in m.warnings:
        print(f"lmtpfast map: warning: {w}", file=sys.stderr)

    async def lookup() -> dict[str, Any]:
        try:
            return await m.lookup_many(keys)
        finally:
            await m.aclose()

    results = _run.run(lookup()) if keys else {}
    found = failed = 0
    table = stdin or len(keys) > 1
    for key in keys:
        r = results[key]
        if isinstance(r, MapError):
            failed += 1
            print(f"lmtpfast map: lookup failure: {key}: {r}", file=sys.stderr)
        elif r is not None:
            found += 1
            value = ",".join(r)
            _write(f"{key}\t{value}" if table else value)
    sys.stdout.flush()
    if failed:
        return _exit.EX_TEMPFAIL
    return _exit.EX_OK if found else EX_NOTFOUND


def run_check(args: argparse.Namespace) -> int:
    status = _exit.EX_OK
    for name in args.mapnames:
        try:
            m = open_map(name, cache=None)
        except ConfigurationError as exc:
            print(f"{name}: error: {exc}")
            status = _exit.EX_CONFIG
            continue
        if m.warnings:
            status = _exit.EX_CONFIG
            for w in m.warnings:
                print(f"{name}: warning: {w}")
        else:
            print(f"{name}: ok")
        m.close_soon()
    return status
