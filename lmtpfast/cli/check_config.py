"""``lmtpfast check-config FILE``: validate a configuration and its maps without delivering.

Reads the TOML file the way ``run`` and ``replay --config`` do (a file with a
``[proxy]`` table the way ``lmtpfast proxy`` does, that table included), builds the
agent (so a configuration that routes nothing is refused, as at start-up),
then checks every map it uses the way ``lmtpfast map check`` does (unknown
``.cf`` parameters, malformed lines). Nothing connects anywhere. Prints one
line per problem, ``FILE:LINE: problem`` where the line is known. Exit
status: 0 all is well, 78 otherwise (meant for an operator's CI and for
``ExecStartPre=`` in the systemd unit).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from lmtpfast import Agent, AgentConfig, ConfigurationError, load_config

from . import _exit
from ._options import add_json, add_quiet

__all__ = ["register", "run"]


def register(sub: Any) -> None:
    p = sub.add_parser(
        "check-config", help="validate a configuration file and its maps (exit 0 or 78)",
        description="Validate an lmtpfast.toml and every map it names, without delivering or "
        "connecting: syntax, fields, destinations, routes, map files and .cf parameters. "
        "Prints FILE:LINE: problem for each problem. Exit status 0 when all is well, 78 "
        "otherwise.")
    p.add_argument("file", metavar="FILE", help="the configuration (lmtpfast.toml)")
    add_quiet(p, "print problems only")
    add_json(p, "{file, ok, problems: [{source, line, problem}]}")
    p.set_defaults(func=run)


def _load(path: str) -> AgentConfig:
    """The agent's configuration; a proxy's file (with a ``[proxy]`` table) is read as
    ``lmtpfast proxy`` reads it, so that table is checked too."""
    import tomllib

    try:
        with open(path, "rb") as f:
            proxy = "proxy" in tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError):
        proxy = False  # load_config says what is wrong, with the line
    if proxy:
        from lmtpfast.server import load_proxy_config

        return load_proxy_config(path)[1]
    return load_config(path)


def run(args: argparse.Namespace) -> int:
    problems: list[dict[str, Any]] = []
    summary = ""
    if not os.path.isfile(args.file):
        problems.append({"source": args.file, "line": None,
                         "problem": "no such file" if not os.path.exists(args.file)
                         else "not a regular file"})
    else:
        try:
            config = _load(args.file)
            agent = Agent(config=config)
        except ConfigurationError as exc:
            problems.append({"source": exc.source or args.file, "line": exc.line,
                             "problem": str(exc) if not exc.source else
                             (f"[{exc.field}] " if exc.field else "") + exc.problem})
        else:
            maps = agent.maps()
            for m in maps:
                for w in getattr(m, "warnings", ()):
                    problems.append({"source": m.mapname, "line": getattr(w, "line", None),
                                     "problem": str(w)})
            summary = (f"{len(config.transports)} transport"
                       f"{'s' if len(config.transports) != 1 else ''}, {len(maps)} map"
                       f"{'s' if len(maps) != 1 else ''}")
    if args.json:
        import json

        print(json.dumps({"file": args.file, "ok": not problems, "problems": problems}))
    else:
        for p in problems:
            where = p["source"] + (f":{p['line']}" if p["line"] is not None else "")
            print(f"{where}: {p['problem']}", file=sys.stdout)
        if not problems and not args.quiet:
            print(f"{args.file}: ok ({summary})")
    return _exit.EX_CONFIG if problems else _exit.EX_OK
