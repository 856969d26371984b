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
