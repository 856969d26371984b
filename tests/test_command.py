"""The command transport (issue 14 item 7): LMTP over a program's stdin and stdout.

The real peer is Dovecot's ``lmtp`` binary run standalone (``/usr/lib/dovecot/lmtp
-c CONF``, the private instance's config): multi-recipient delivery with an
unknown user, several transactions on one process, the program killed in the
middle of a transaction (by a relay that kills it at a point in the stream,
``lmtpfast._testing.cmdfault``), and the same destination through the agent,
the proxy and ``lmtpfast send``. Small Python programs stand in for programs
that cannot start, exit before greeting, stall, or will not exit.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import lmtpfast
from lmtpfast import Agent, ConfigurationError, ConnectError, connect, parse_destination
from lmtpfast._command import Program
from lmtpfast._testing import cmdfault

MSG = b"From: s@example.org\r\nSubject: command transport\r\n\r\nOne copy each.\r\n"
RCPTS = ["alice@example.com", "nosuchuser@example.com", "bob@example.com"]
FAULT = [sys.executable, cmdfault.__file__]


def _dovecot_lmtp(dv: Any) -> list[str]:
    return ["/usr/lib/dovecot/lmtp", "-c", str(dv.config_path)]


def _command(argv: list[str]) -> str:
    return "command:" + shlex.join(argv)


def _script(tmp_path: Path, name: str, body: str) -> list[str]:
    path = tmp_path / name
    path.write_text("import os, signal, sys, time\n" + body)
    return [sys.executable, str(path)]


def test_parse_and_write_back() -> None:
    d = parse_destination("command:/usr/lib/dovecot/lmtp -c '/etc/a b/dovecot.conf'")
    assert d.kind == "command" and d.is_local and not d.is_unix
    assert d.argv == ["/usr/lib/dovecot/lmtp", "-c", "/etc/a b/dovecot.conf"]
    assert parse_destination(str(d)) == d
    for bad in ("command:", "command:   ", "command:prog 'unclosed"):
        with pytest.raises(ConfigurationError, match="command"):
            parse_destination(bad)
    cfg = lmtpfast.config_from_dict({"default": "lmtp:", "transports": {"lmtp": {
        "destination": "command:/bin/prog -x"}}})
    assert cfg.transports["lmtp"].dest == parse_destination("command:/bin/prog -x")


async def test_a_program_that_cannot_start_or_exits_before_greeting(tmp_path: Path) -> None:
    with pytest.raises(ConnectError, match="cannot run"):
        await connect(f"command:{tmp_path}/no-such-program")
    argv = _script(tmp_path, "fatal.py", 'sys.stderr.write("Fatal: no config\\n"); sys.exit(89)')
    with pytest.raises(ConnectError, match="exit status 89: Fatal: no config"):
        await connect(_command(argv))
    # Through the agent: a connect failure, deferred (451 4.4.1), never a bounce.
    async with Agent.for_server(_command(argv)) as agent:
        [r] = await agent.deliver(MSG, sender="s@example.org", recipients=["a@example.com"])
    assert r.transient and (r.code, r.enhanced, r.stage) == (451, "4.4.1", "connect")
    assert "exit status 89" in r.text


async def test_a_stage_timeout_and_a_program_that_will_not_exit(tmp_path: Path,
                                                                caplog: Any) -> None:
    # Greets, then never answers LHLO: the LHLO stage timeout, the program reaped.
    mute = _script(tmp_path, "mute.py", 'sys.stdout.buffer.write(b"220 mute\\r\\n");'
                   "sys.stdout.flush()\nsys.stdin.buffer.read()\n")
    with pytest.raises(lmtpfast.ReadTimeout):
        await connect(_command(mute), timeouts=lmtpfast.Timeouts(lhlo=0.2))
    # Ignores both the end of its input and SIGTERM: SIGKILL ends it.
    stubborn = _script(tmp_path, "stubborn.py", "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                       'sys.stdout.buffer.write(b"220 ready\\r\\n"); sys.stdout.flush()\n'
                       "sys.stdin.buffer.read()\nwhile True: time.sleep(60)\n")
    program, sock = await Program.start(stubborn, "command:stubborn", grace=0.2)
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(60):  # it ignores SIGTERM from here on
        assert (await loop.sock_recv(sock, 100)).startswith(b"220")
    sock.close()
    caplog.set_level(logging.WARNING, "lmtpfast.command")
    assert await program.finish() == -signal.SIGKILL
    assert "sent SIGKILL" in caplog.text and "killed by SIGKILL" in caplog.text


@pytest.mark.dovecot
async def test_dovecot_lmtp_on_stdin_stdout(dovecot: Any, engine: str) -> None:
    dest = _command(_dovecot_lmtp(dovecot))
    async with await connect(dest, engine=engine) as c:
        assert c.pipelining and c.chunking
        program = c.program
        assert program is not None and program.returncode is None
        for _ in range(3):  # one process, several transactions
            results = await c.send("s@example.org", RCPTS, MSG)
            assert [(r.code, r.enhanced, r.stage) for r in results] == [
                (250, "2.0.0", "final"), (550, "5.1.1", "rcpt"), (250, "2.0.0", "final")]
            assert "nosuchuser" in results[1].text
    assert program.returncode == 0  # QUIT: it exited by itself, and was reaped
    assert len(dovecot.messages("alice")) == 3 and len(dovecot.messages("bob")) == 3


@pytest.mark.dovecot
async def test_through_the_agent_one_process_for_many_deliveries(dovecot: Any) -> None:
    async with Agent.for_server(_command(_dovecot_lmtp(dovecot)), max_connections=1) as agent:
        batches = await asyncio.gather(*(
            agent.deliver(MSG, sender="s@example.org", recipients=RCPTS) for _ in range(5)))
        stats = agent.stats
        [pool] = agent.pools().values()
    assert all([r.code for r in results] == [250, 550, 250] for results in batches)
    assert stats.connections_opened == 1  # five messages, one Dovecot process
    assert len(dovecot.messages("alice")) == 5 and len(dovecot.messages("bob")) == 5
    assert pool.closed


@pytest.mark.dovecot
async def test_killed_before_the_dot_nothing_is_stored_or_reported_delivered(
        dovecot: Any, engine: str) -> None:
    argv = [*FAULT, "--kill-before", "KILL-HERE", "--", *_dovecot_lmtp(dovecot)]
    async with Agent.for_server(_command(argv), engine=engine) as agent:
        results = await agent.deliver(MSG + b"KILL-HERE\r\nthe rest\r\n", sender="s@example.org",
                                      recipients=["alice@example.com", "bob@example.com"])
    # Lost after our final dot was written: transient, possibly delivered (it
    # is not: the program never read the dot, so nothing may be stored).
    assert all(r.transient and r.possibly_delivered for r in results), results
    assert dovecot.messages("alice") == [] and dovecot.messages("bob") == []


@pytest.mark.dovecot
async def test_killed_between_final_replies_only_the_given_reply_counts(
        dovecot: Any, engine: str) -> None:
    argv = [*FAULT, "--kill-after-reply", "250 2.0.0", "--", *_dovecot_lmtp(dovecot)]
    dest = _command(argv)
    async with await connect(dest, engine=engine) as c:
        program = c.program
        results = await c.send("s@example.org", ["alice@example.com", "bob@example.com"], MSG)
    assert program is not None and program.returncode == -signal.SIGKILL
    alice, bob = results
    assert alice.delivered and "Saved" in alice.text  # its own reply arrived
    assert bob.transient and bob.possibly_delivered  # Dovecot may have stored it: noted
    assert len(dovecot.messages("alice")) == 1
    assert len(dovecot.messages("bob")) <= 1
    # The next delivery runs a new program and is not affected.
    async with Agent.for_server(_command(_dovecot_lmtp(dovecot))) as agent:
        again = await agent.deliver(MSG, sender="s@example.org", recipients=["bob@example.com"])
    assert again[0].delivered


@pytest.mark.dovecot
async def test_the_proxy_and_send_deliver_through_a_command(dovecot: Any, tmp_path: Path) -> None:
    from lmtpfast.server import Proxy

    dest = _command(_dovecot_lmtp(dovecot))
    cfg = {"default": "mbox:", "transports": {"mbox": {"destination": dest}}}
    async with Proxy(cfg, listen=f"unix:{tmp_path}/proxy.sock") as p, \
            await connect(p.destinations[0]) as c:
        results = await c.send("s@example.org", RCPTS, MSG)
    assert [r.code for r in results] == [250, 550, 250]
    assert "Saved" in results[0].text  # Dovecot's own reply, relayed
    msg = tmp_path / "msg.eml"
    msg.write_bytes(MSG)
    env = {**os.environ, "PYTHONPATH": str(Path(lmtpfast.__file__).parent.parent)}
    done = await asyncio.to_thread(subprocess.run, [
        sys.executable, "-m", "lmtpfast", "send", "--server", dest, "--from", "s@example.org",
        "--rcpt", "carol@example.com", str(msg)], env=env, capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert len(dovecot.messages("carol")) == 1


@pytest.mark.dovecot
async def test_replay_delivers_a_spool_through_a_command(dovecot: Any, tmp_path: Path) -> None:
    from lmtpfast.spool import Spool

    spool = Spool(tmp_path / "spool", create=True)
    for i in range(4):
        spool.enqueue(MSG.replace(b"One", f"#{i}: one".encode()), "s@example.org", RCPTS)
    env = {**os.environ, "PYTHONPATH": str(Path(lmtpfast.__file__).parent.parent)}
    done = await asyncio.to_thread(subprocess.run, [
        # dir: the directory spool as it is (its counts are read below).
        sys.executable, "-m", "lmtpfast", "replay", f"dir:{spool.path}", "--server",
        _command(_dovecot_lmtp(dovecot)), "--once", "--no-progress", "-q"],
        env=env, capture_output=True, timeout=120)
    # 65: every undelivered recipient (the unknown user) refused for good; the
    # others stored once each, the queue empty.
    assert done.returncode == 65, done.stderr
    counts = spool.count()
    assert counts["incoming"] == counts["deferred"] == 0 and counts["failed"] == 4
    assert len(dovecot.messages("alice")) == 4 and len(dovecot.messages("bob")) == 4
