"""`lmtpfast replay` as operators run it (issue 10, items 20, 21 and the replay rows of 23).

Item 20: a configuration that can route nothing is refused (exit 78) before
anything is delivered; a recipient that finds no route under a valid
configuration is deferred, unless ``no_route = "bounce"``.
Item 21: an interrupted replay exits 75 while messages are still queued;
SIGHUP does not stop ``--watch``.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import pytest

from lmtpfast import Agent, ConfigurationError, load_config
from lmtpfast.server import FaultPlan, Sink
from lmtpfast.spool import Spool, decode_envelope

ROOT = Path(__file__).resolve().parent.parent


def message(tag: str) -> bytes:
    return (f"From: s@example.org\r\nSubject: {tag}\r\nMessage-ID: <{tag}@cli.test>\r\n\r\n"
            "hello\r\n").encode()


async def lmtpfast(*args: str, stdin: bytes = b"") -> tuple[int, str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "lmtpfast", *args, env=env, stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(stdin), 60)
    assert proc.returncode is not None
    assert "Traceback" not in err.decode(), err.decode()
    return proc.returncode, out.decode(), err.decode()


# -- item 20: routing nothing, and a recipient without a route ------------------------------


@pytest.mark.parametrize("text", [
    "",                                                           # an empty file
    '[transports.lmtp1]\ndestination = "unix:/tmp/x"\n',          # transports, no route
    'transport_map = {}\n',                                       # an empty map, no default
])
async def test_a_config_that_routes_nothing_is_refused_before_delivery(tmp_path: Path,
                                                                      text: str) -> None:
    cfg = tmp_path / "lmtpfast.toml"
    cfg.write_text(text)
    with pytest.raises(ConfigurationError, match="routes nothing"):
        Agent.from_config(cfg)
    spool = Spool(tmp_path / "spool", create=True)
    spool.enqueue(message("r"), "s@example.org", ["alice@example.com"])
    status, _out, err = await lmtpfast("replay", str(spool.path), "--config", str(cfg), "-q")
    assert status == 78, err
    assert "routes nothing" in err and str(cfg) in err
    assert len(os.listdir(spool.path / "incoming")) == 1  # untouched
    assert os.listdir(spool.path / "failed") == []


def test_python_agent_without_any_route_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="routes nothing"):
        Agent(transports={"lmtp1": {"destination": "unix:/tmp/x"}})
    Agent(transport_map={"example.com": "lmtp:unix:/tmp/x"})  # a map alone routes
    Agent(default="lmtp:unix:/tmp/x")


async def test_unroutable_recipient_defers_under_a_valid_config(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", create=True)
    id = spool.enqueue(message("u"), "s@example.org", ["alice@example.com", "zed@elsewhere.org"])
    async with Sink(f"unix:{tmp_path}/lmtp", collect=True) as sink:
        cfg = tmp_path / "lmtpfast.toml"
        cfg.write_text(f'transport_map = {{ "example.com" = "lmtp:{sink.destinations[0]}" }}\n')
        # The directory spool as it is: its deferred/ envelope is what is checked.
        status, out, err = await lmtpfast("replay", f"dir:{spool.path}", "--config", str(cfg),
                                          "-v")
        assert [m.recipients for m in sink.messages] == [["alice@example.com"]]
    assert status == 75, err
    assert "zed@elsewhere.org: deferred: 451 4.4.4 no route for zed@elsewhere.org" in out
    env = decode_envelope((spool.path / "deferred" / id).read_bytes())
    assert [(r.address, r.state) for r in env.recipients] == [("zed@elsewhere.org", "queued")]
    assert os.listdir(spool.path / "failed") == []


async def test_no_route_bounce_switch_makes_it_permanent(tmp_path: Path) -> None:
    cfg = tmp_path / "lmtpfast.toml"
    cfg.write_text('no_route = "bounce"\ntransport_map = { "example.com" = "lmtp:unix:/x" }\n')
    assert load_config(cfg).no_route == "bounce"
    agent = Agent.from_config(cfg)
    (r,) = await agent.deliver(message("b"), sender="s@example.org", recipients=["z@other.org"])
    assert (r.status, r.code, r.enhanced, r.stage) == ("permanent", 554, "5.4.4", "route")
    await agent.close()
    cfg.write_text('no_route = "maybe"\ndefault = "lmtp:unix:/x"\n')
    with pytest.raises(ConfigurationError, match="no_route"):
        load_config(cfg)


# -- item 21: signals --------------------------------------------------------------------------


async def _start_replay(spool: Spool, dest: str, *extra: str) -> asyncio.subprocess.Process:
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "lmtpfast", "replay", str(spool.path), "--server", dest,
        "--no-progress", "-v", *extra, env=env, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)


async def _line(stream: asyncio.StreamReader | None, needle: str) -> str:
    assert stream is not None

    async def loop() -> str:
        while True:
            line = (await stream.readline()).decode()
            assert line, f"stream ended before {needle!r}"
            if needle in line:
                return line
    return await asyncio.wait_for(loop(), 30)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_interrupted_once_replay_exits_75_with_messages_left(tmp_path: Path,
                                                                  sig: signal.Signals) -> None:
    spool = Spool(tmp_path / "spool", create=True)
    for i in range(50):
        spool.enqueue(message(f"i{i}"), "s@example.org", ["alice@example.com"])
    # Each delivery takes a while, so the pass is far from done when the signal comes.
    plan = FaultPlan.parse(["dot=delay:0.2,proceed"])
    async with Sink(f"unix:{tmp_path}/lmtp", faults=plan) as sink:
        proc = await _start_replay(spool, sink.destinations[0], "--once", "--concurrency", "1")
        await _line(proc.stdout, ": delivered:")
        proc.send_signal(sig)
        _out, err = await asyncio.wait_for(proc.communicate(), 60)
    from lmtpfast.spool import SQLiteStore

    with SQLiteStore(spool.path) as store:  # the directory spool was converted into it
        left = store.status().queued
    assert 0 < left < 50
    assert proc.returncode == 75, err.decode()
    assert "Traceback" not in err.decode()


async def test_sighup_does_not_stop_watch(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", create=True)
    spool.enqueue(message("h0"), "s@example.org", ["carol@example.com"])
    plan = FaultPlan.parse(["dot:carol@*=452 4.2.2 Mailbox full"])
    async with Sink(f"unix:{tmp_path}/lmtp", collect=True, faults=plan) as sink:
        proc = await _start_replay(spool, sink.destinations[0], "--watch", "--interval", "0.05")
        await _line(proc.stdout, "carol@example.com: deferred:")
        proc.send_signal(signal.SIGHUP)
        await _line(proc.stderr, "SIGHUP")
        # Still watching: a message queued now is delivered.
        spool.enqueue(message("h1"), "s@example.org", ["alice@example.com"])
        await _line(proc.stdout, "alice@example.com: delivered:")
        assert proc.returncode is None
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 75, err.decode()  # carol is still queued
