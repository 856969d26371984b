"""`lmtpfast send` starts lean: one message, no event loop, nothing it does not use.

An MTA runs ``lmtpfast send`` once per message (Postfix pipe(8), procmail,
Exim's pipe transport), so what it imports is most of what it costs (issue 12
item 4; figures in docs/performance.md, bench/bench_send.py). These tests
check the property, not a time: the set of modules a real ``send`` imports
leaves out the event loop, TLS, the agent, configuration, maps, the spool, the
server and the other subcommands; and the blocking session it runs on
behaves as the asyncio one (content streamed in chunks, stage time limits).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from lmtpfast.server import DEFAULT_EXTENSIONS, FaultPlan, Sink

ROOT = Path(__file__).resolve().parent.parent
MESSAGE = b"Subject: startup\r\n\r\nhello\r\n"

#: Never imported by a plain-text `send` (a module or any of its submodules).
HEAVY = (
    "asyncio", "uvloop", "ssl", "_ssl", "email", "rich", "tomllib", "logging", "hashlib",
    "concurrent", "subprocess", "dataclasses",
    # socket (enum, selectors: the blocking session uses _socket), shutil (argparse's
    # terminal width), base64 (SASL only), shlex (command: destinations only).
    "socket", "selectors", "shutil", "base64", "shlex",
    # a plain command line is parsed without argparse (cli.send.fast_args)
    "argparse", "gettext",
    "lmtpfast._agent", "lmtpfast._sync", "lmtpfast._pool", "lmtpfast._protocol",
    "lmtpfast._config", "lmtpfast._routing", "lmtpfast._maps", "lmtpfast._shaping",
    "lmtpfast._loop", "lmtpfast.spool", "lmtpfast.server", "lmtpfast.compat",
    "lmtpfast._testing",
)
#: The subcommands other than send.
OTHER_COMMANDS = tuple(
    f"lmtpfast.cli.{p.stem}" for p in (ROOT / "lmtpfast" / "cli").glob("*.py")
    if not p.stem.startswith("_") and p.stem != "send")


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT))


#: Runs ``python -m lmtpfast`` and writes sys.modules at exit (after main() returned).
_DUMP = """
import atexit, os, runpy, sys
_before = set(sys.modules)  # what the interpreter and site (.pth files) imported
def _dump():
    with open(os.environ["LMTPFAST_MODULES_OUT"], "w") as f:
        f.write("\\n".join(sorted(set(sys.modules) - _before)))
atexit.register(_dump)
sys.argv = ["lmtpfast", *sys.argv[1:]]
runpy.run_module("lmtpfast", run_name="__main__", alter_sys=True)
"""


def _imported(*args: str, stdin: bytes = MESSAGE) -> tuple[subprocess.CompletedProcess[bytes],
                                                            set[str]]:
    """Run ``python -m lmtpfast ARGS``; the process and the modules it imported (at exit).

    Those the interpreter had before (site's ``.pth`` files here import more
    than a user's venv does) are not counted.

    sys.modules, not ``-X importtime``: the latter misses what importlib
    imports (the lazy facade, the subcommand modules).
    """
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "modules"
        proc = subprocess.run([sys.executable, "-c", _DUMP, *args], input=stdin,
                              capture_output=True, env=dict(_env(), LMTPFAST_MODULES_OUT=str(out)),
                              timeout=60)
        names = set(out.read_text().split()) if out.exists() else set()
    assert "lmtpfast" in names, proc.stderr.decode()[-2000:]
    return proc, names


def _heavy(names: set[str]) -> list[str]:
    bad = HEAVY + OTHER_COMMANDS
    return sorted(n for n in names if any(n == b or n.startswith(b + ".") for b in bad))


@pytest.mark.postfix
def test_send_imports_only_what_it_needs(smtp_sink) -> None:  # type: ignore[no-untyped-def]
    sink = smtp_sink()
    proc, names = _imported("send", "--server", sink.destination, "--from", "a@example.org",
                            "--rcpt", "b@example.org", "-")
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    assert proc.stdout.decode().startswith("2."), proc.stdout
    assert not _heavy(names), _heavy(names)
    # It did run the compiled engine and the blocking session (not a stub).
    assert {"lmtpfast._blocking", "lmtpfast._session", "lmtpfast.cli.send"} <= names


def test_a_failed_send_imports_no_more(tmp_path: Path) -> None:
    """Refused before connecting, or the server missing: still nothing heavy."""
    proc, names = _imported("send", "--server", f"unix:{tmp_path}/none", "--from",
                            "a@example.org", "--rcpt", "b@example.org", "-")
    assert proc.returncode == 75, proc.stderr.decode()[-2000:]
    assert proc.stdout.decode().startswith("4."), proc.stdout
    assert not _heavy(names), _heavy(names)


def test_help_still_builds_every_command() -> None:
    proc, names = _imported("--help", stdin=b"")
    assert proc.returncode == 0
    assert set(OTHER_COMMANDS) <= names  # the full parser: every subcommand's module


async def _send(*args: str, stdin: bytes) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "lmtpfast", "send", *args, env=_env(),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(stdin), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def _big_message() -> bytes:
    # Over STREAM_THRESHOLD (1 MiB): written in chunks; lines that need dot-stuffing.
    line = b".dotted line " + b"x" * 60 + b"\r\n"
    return b"Subject: big\r\n\r\n" + line * (3 * 1024 * 1024 // len(line)) + b"end\r\n"


@pytest.mark.parametrize("variant", ["bdat", "bdat-one-by-one", "data"])
async def test_send_streams_a_large_message(variant: str) -> None:
    extensions = [e for e in DEFAULT_EXTENSIONS if variant != "data" or e != "CHUNKING"]
    message = _big_message()
    async with Sink("127.0.0.1:0", collect=True, extensions=extensions) as sink:
        extra = ["--no-pipelining"] if variant == "bdat-one-by-one" else []
        code, out, err = await _send("--server", sink.destinations[0], "--from", "a@example.org",
                                     "--rcpt", "b@example.org", *extra, "-", stdin=message)
        assert code == 0, err
        assert out.startswith("2."), out
        assert [m.content for m in sink.messages] == [message]


async def test_send_stage_time_limit_defers() -> None:
    """A server that never answers MAIL: the stage's limit, then 75 (try again), 4.x.x first."""
    plan = FaultPlan.parse(["mail=stall"])
    async with Sink("127.0.0.1:0", faults=plan) as sink:
        code, out, err = await _send("--server", sink.destinations[0], "--from", "a@example.org",
                                     "--rcpt", "b@example.org", "--timeout-scale", "0.002", "-",
                                     stdin=MESSAGE)
    assert code == 75, (out, err)
    assert out.startswith("4."), out
    assert "timed out" in out + err


@pytest.mark.parametrize("engine", ["c", "python"])
async def test_connect_sync_is_connect_without_a_loop(engine: str) -> None:
    """The blocking session: two transactions on one connection, refusals per recipient."""
    import lmtpfast

    plan = FaultPlan.parse(["rcpt:bad@*=550 5.1.1 No such user"])
    async with Sink("127.0.0.1:0", faults=plan, collect=True) as sink:
        dest = sink.destinations[0]

        def use() -> tuple[list[list[lmtpfast.RecipientResult]], bool]:
            with lmtpfast.connect_sync(dest, engine=engine) as conn:
                assert conn.capabilities.pipelining and conn.engine.name == engine
                assert conn.noop().code == 250
                first = conn.send("a@example.org", ["ok@x.example", "bad@x.example"], MESSAGE)
                second = conn.send("a@example.org", ["ok2@x.example"], MESSAGE)
                usable = conn.usable
            return [first, second], usable and not conn.usable

        (first, second), closed_after = await asyncio.to_thread(use)
    assert [(r.code, r.enhanced) for r in first] == [(250, "2.0.0"), (550, "5.1.1")]
    assert [r.code for r in second] == [250]
    assert closed_after  # leaving the with block said QUIT and closed
    assert [m.recipients for m in sink.messages] == [["ok@x.example"], ["ok2@x.example"]]


def test_connect_sync_refuses_a_command_destination() -> None:
    import lmtpfast

    with pytest.raises(lmtpfast.ConfigurationError, match=r"needs connect\(\)"):
        lmtpfast.connect_sync("command:/bin/true")


# -- the command line without argparse (cli.send.fast_args) ------------------------------

def _send_parser():  # type: ignore[no-untyped-def]
    from lmtpfast.cli import build_parser

    parser = build_parser("send")
    sub = next(a for a in parser._actions if a.dest == "command")
    return parser, sub.choices["send"]


def test_fast_path_knows_every_send_option() -> None:
    """The fast path's table is the argparse parser's options, kinds and defaults."""
    from lmtpfast.cli import _input, send

    _, p = _send_parser()
    seen = set()
    for action in p._actions:
        if not action.option_strings or action.dest == "help":
            continue
        for opt in action.option_strings:
            assert opt in send._OPTIONS, f"{opt} is not in cli/send.py's _OPTIONS"
            seen.add(opt)
            dest, kind = send._OPTIONS[opt]
            assert dest == action.dest, opt
            if action.const is True and action.nargs == 0:
                assert kind == "flag", opt
            elif type(action).__name__ == "_AppendAction":
                assert kind == "append", opt
            elif action.choices is not None:
                assert kind == tuple(action.choices), opt
            elif action.type is float:
                assert kind == "float", opt
            elif action.type is _input.parse_size:
                assert kind == "size", opt
            else:
                assert kind == "str" and action.type is None, opt
            default = send._DEFAULTS.get(dest, False if kind == "flag" else None)
            assert action.default == default, opt
    assert seen == set(send._OPTIONS)


@pytest.mark.parametrize("argv", [
    ["--server", "unix:/x", "--from", "a@b", "--rcpt", "c@d"],
    ["--server=unix:/x", "--from=", "--rcpt=c@d", "--rcpt", "e@f", "msg"],
    ["msg", "--server", "h:24", "--from", "a@b", "--rcpt", "c@d", "--json", "--no-pipelining"],
    ["--server", "h", "--from", "a@b", "--rcpt", "c@d", "-", "--timeout-scale", "0.5",
     "--max-size", "10m", "--tls", "encrypt", "--tls-no-verify", "--ca-file", "ca.pem",
     "--notify", "SUCCESS,FAILURE", "--ret", "HDRS", "--envid", "x", "--orcpt", "o@p",
     "--lhlo-name", "me", "--sasl-user", "u", "--sasl-password-file", "pw",
     "--sasl-mechanisms", "PLAIN", "--sasl-allow-plaintext", "--cert-file", "c",
     "--key-file", "k", "--tls-server-name", "n", "--sasl-password-map", "m"],
    ["--server", "h", "--from", "a@b", "--rcpt", "c@d", "--max-size", " 64 kB "],
])
def test_fast_path_parses_as_argparse_does(argv: list[str]) -> None:
    from lmtpfast.cli import send

    parser, _ = _send_parser()
    fast = send.fast_args(argv)
    assert fast is not None
    assert vars(fast) == vars(parser.parse_args(["send", *argv]))


@pytest.mark.parametrize("argv", [
    ["--help"], ["-h"],
    ["--serv", "unix:/x", "--from", "a@b", "--rcpt", "c@d"],  # an abbreviation
    ["--server", "unix:/x", "--from", "a@b"],  # --rcpt missing
    ["--server", "unix:/x", "--from", "a@b", "--rcpt", "c@d", "m1", "m2"],
    ["--server", "unix:/x", "--from", "--rcpt", "c@d"],  # --from's value missing
    ["--server", "unix:/x", "--from", "a@b", "--rcpt", "c@d", "--tls", "sometimes"],
    ["--server", "unix:/x", "--from", "a@b", "--rcpt", "c@d", "--max-size", "big"],
    ["--server", "unix:/x", "--from", "a@b", "--rcpt", "c@d", "--timeout-scale", "-1"],
    ["--server", "unix:/x", "--from", "a@b", "--rcpt", "c@d", "--json=yes"],
    ["--server", "unix:/x", "--from", "a@b", "--rcpt", "c@d", "--", "m"],
])
def test_fast_path_leaves_the_rest_to_argparse(argv: list[str]) -> None:
    from lmtpfast.cli import send

    assert send.fast_args(argv) is None
