"""Replay against real peers: Dovecot, the lmtpfast sink (with faults), crash safety.

Async tests run on asyncio and uvloop (conftest); the crash test runs the CLI
in a subprocess with ``--loop`` set to each loop.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import secrets
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from lmtpfast import Agent
from lmtpfast._testing.dovecot import TempDovecot
from lmtpfast.server._faults import FaultPlan
from lmtpfast.server._sink import Sink
from lmtpfast.spool import Spool, decode_envelope
from lmtpfast.spool._replay import (
    Observer,
    Outcome,
    Replayer,
    RetryPolicy,
    exit_status,
)

MSGID = re.compile(rb"^Message-ID: <([^>]+)>", re.M | re.I)


def message(tag: str, size: int = 200) -> bytes:
    return (f"From: sender@example.org\r\nTo: you@example.com\r\nSubject: {tag}\r\n"
            f"Message-ID: <{tag}@lmtpfast.test>\r\n\r\n").encode() + b"x" * size + b"\r\n"


def msgid_of(data: bytes) -> str:
    m = MSGID.search(data)
    assert m is not None, data[:200]
    return m.group(1).decode().split("@")[0]


class Recorder(Observer):
    def __init__(self) -> None:
        self.outcomes: list[Outcome] = []
        self.quarantine: list[tuple[str, str]] = []

    def outcome(self, outcome: Outcome) -> None:
        self.outcomes.append(outcome)

    def quarantined(self, id: str, reason: str) -> None:
        self.quarantine.append((id, reason))

    def by_recipient(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for o in self.outcomes:
            out.setdefault(o.recipient, []).append(o.outcome)
        return out


def entries(spool: Spool, folder: str) -> list[str]:
    return sorted(os.listdir(spool.path / folder))


def sink_plan(*specs: str) -> FaultPlan:
    return FaultPlan.parse(specs)


async def replay(spool: Spool, server: str, *, policy: RetryPolicy | None = None,
                 engine: str | None = None, **kw: object) -> tuple[Recorder, object]:
    rec = Recorder()
    async with Agent.for_server(server, max_connections=4, engine=engine) as agent:
        r = Replayer(spool, agent, concurrency=16, observer=rec,
                     policy=policy or RetryPolicy(min_backoff=0), **kw)  # type: ignore[arg-type]
        totals = await r.run()
    return rec, totals


# -- mixed outcomes ------------------------------------------------------------------------


async def test_mixed_outcomes_into_dovecot(dovecot: TempDovecot, tmp_path: Path,
                                           engine: str) -> None:
    """Unknown users end in failed/ with reasons; a tempfailing mailbox stays queued, then works."""
    spool = Spool(tmp_path / "spool", create=True)
    dom = "example.com"
    ids = {
        "m1": spool.enqueue(message("m1"), "s@example.org", [f"alice@{dom}"]),
        "m2": spool.enqueue(message("m2"), "s@example.org", [f"zed@{dom}"]),
        "m3": spool.enqueue(message("m3"), "s@example.org", [f"alice@{dom}", f"zed@{dom}"]),
        "m4": spool.enqueue(message("m4"), "s@example.org", [f"carol@{dom}"]),
        "m5": spool.enqueue(message("m5"), "s@example.org",
                            [f"carol@{dom}", f"zed@{dom}", f"bob@{dom}"]),
    }
    # carol's mail folder cannot be made: Dovecot answers 451 4.2.0 after the dot.
    blocker = dovecot.mail_root / "carol"
    blocker.write_text("not a folder")
    try:
        rec, totals = await replay(spool, dovecot.destination_unix, engine=engine)
    finally:
        blocker.unlink()
    assert exit_status(totals) == 75  # type: ignore[arg-type]
    got = rec.by_recipient()
    assert got[f"alice@{dom}"] == ["delivered", "delivered"]
    assert got[f"zed@{dom}"] == ["failed"] * 3
    assert got[f"carol@{dom}"] == ["deferred", "deferred"]
    assert got[f"bob@{dom}"] == ["delivered"]
    assert entries(spool, "deferred") == sorted([ids["m4"], ids["m5"]])
    assert entries(spool, "failed") == sorted(
        f"{ids[m]}.{ext}" for m in ("m2", "m3") for ext in ("eml", "json", "txt"))
    reasons = (spool.path / "failed" / f"{ids['m3']}.txt").read_text()
    assert "<zed@example.com>: 550 5.1.1" in reasons and "alice" not in reasons
    m5 = decode_envelope((spool.path / "deferred" / ids["m5"]).read_bytes())
    assert [(r.address, r.state) for r in m5.recipients] == [
        (f"carol@{dom}", "queued"), (f"zed@{dom}", "failed")]
    assert m5.delivered == 1 and m5.recipients[0].last is not None
    assert m5.recipients[0].last.code == 451

    # The mailbox works again: the next pass delivers what was deferred.
    rec, totals = await replay(spool, dovecot.destination_unix, engine=engine)
    assert rec.by_recipient() == {f"carol@{dom}": ["delivered", "delivered"]}
    assert exit_status(totals) == 65  # type: ignore[arg-type]  # m5 ends in failed/ (zed)
    assert entries(spool, "deferred") == [] and entries(spool, "incoming") == []
    assert entries(spool, "msg") == []
    assert f"{ids['m5']}.txt" in entries(spool, "failed")
    stored = {u: sorted(msgid_of(m) for m in dovecot.messages(u))
              for u in ("alice", "bob", "carol")}
    assert stored == {"alice": ["m1", "m3"], "bob": ["m5"], "carol": ["m4", "m5"]}


async def test_tempfailed_recipients_succeed_on_a_later_pass(tmp_path: Path, engine: str) -> None:
    """A sink that tempfails bob three times and refuses nobody@: mixed outcomes in one back end."""
    spool = Spool(tmp_path / "spool", create=True)
    for i in range(10):
        spool.enqueue(message(f"t{i}"), "s@example.org", ["alice@example.com", "bob@example.com"])
    for i in range(2):
        spool.enqueue(message(f"u{i}"), "s@example.org", ["nobody@example.com"])
    plan = sink_plan("dot@times=3:bob@*=452 4.2.2 Mailbox full",
                     "rcpt:nobody@*=550 5.1.1 User unknown")
    async with Sink(f"unix:{tmp_path}/lmtp", faults=plan, collect=True) as sink:
        dest = sink.destinations[0]
        rec, totals = await replay(spool, dest, engine=engine)
        assert exit_status(totals) == 75  # type: ignore[arg-type]
        outcomes = Counter((o.recipient, o.outcome) for o in rec.outcomes)
        assert outcomes == {("alice@example.com", "delivered"): 10,
                            ("bob@example.com", "delivered"): 7,
                            ("bob@example.com", "deferred"): 3,
                            ("nobody@example.com", "failed"): 2}
        assert len(entries(spool, "deferred")) == 3
        assert len(entries(spool, "failed")) == 2 * 3
        rec, totals = await replay(spool, dest, engine=engine)
        assert exit_status(totals) == 0  # type: ignore[arg-type]
        assert Counter(o.outcome for o in rec.outcomes) == {"delivered": 3}
        got = Counter((msgid_of(m.content), r) for m in sink.messages for r in m.recipients)
    assert entries(spool, "deferred") == [] and entries(spool, "msg") == []
    assert set(got.values()) == {1}  # nobody got anything twice
    assert len(got) == 20


async def test_deferral_backoff_and_queue_lifetime(tmp_path: Path, engine: str) -> None:
    spool = Spool(tmp_path / "spool", create=True)
    now = time.time()
    clock = lambda: now  # noqa: E731 - replay's clock stands still: exact backoffs
    spool.enqueue(message("e1"), "s@example.org", ["carol@example.com", "alice@example.com"],
                  arrival=now - 100)
    plan = sink_plan("rcpt:carol@*=451 4.3.0 Try again later")
    async with Sink(f"unix:{tmp_path}/lmtp", faults=plan) as sink:
        dest = sink.destinations[0]
        policy = RetryPolicy(min_backoff=60, max_backoff=100, max_lifetime=1000)
        rec, totals = await replay(spool, dest, engine=engine, policy=policy, clock=clock)
        [deferred] = [o for o in rec.outcomes if o.outcome == "deferred"]
        assert deferred.next_attempt == now + 60
        # Not due yet: a pass does nothing and says it is still queued.
        rec, totals = await replay(spool, dest, engine=engine, policy=policy, clock=clock)
        assert rec.outcomes == [] and totals.not_due == 1  # type: ignore[attr-defined]
        assert exit_status(totals) == 75  # type: ignore[arg-type]
        # The second failure doubles the delay, up to max_backoff.
        rec, totals = await replay(spool, dest, engine=engine, policy=policy, flush=True,
                                   clock=clock)
        [deferred] = rec.outcomes
        assert deferred.next_attempt == now + 100
        # Older than the queue lifetime: the temporary failure becomes final.
        short = RetryPolicy(min_backoff=0, max_lifetime=50)
        bounces = tmp_path / "bounces"
        rec, totals = await replay(spool, dest, engine=engine, policy=short, flush=True,
                                   bounce_dir=bounces, clock=clock)
    [expired] = rec.outcomes
    assert expired.outcome == "expired" and "gave up" in expired.text
    assert exit_status(totals) == 65  # type: ignore[arg-type]
    [txt] = [n for n in entries(spool, "failed") if n.endswith(".txt")]
    assert "451 4.3.0 Try again later (gave up" in (spool.path / "failed" / txt).read_text()
    [bounce] = os.listdir(bounces)
    data = (bounces / bounce).read_bytes()
    assert b"Final-Recipient: rfc822; carol@example.com" in data and b"Status: 4.3.0" in data


async def test_lost_reply_after_dot_is_retried_and_flagged(tmp_path: Path, engine: str) -> None:
    """Connection lost after the final dot: retried, and reported as possibly duplicated."""
    spool = Spool(tmp_path / "spool", create=True)
    spool.enqueue(message("p1"), "s@example.org", ["alice@example.com"])
    async with Sink(f"unix:{tmp_path}/lmtp", faults=sink_plan("dot@times=1=disconnect")) as sink:
        dest = sink.destinations[0]
        rec, totals = await replay(spool, dest, engine=engine)
        [first] = rec.outcomes
        assert first.outcome == "deferred" and first.possibly_duplicated
        [id] = entries(spool, "deferred")
        env = decode_envelope((spool.path / "deferred" / id).read_bytes())
        assert env.recipients[0].possibly_delivered
        rec, totals = await replay(spool, dest, engine=engine)
    [second] = rec.outcomes
    assert second.outcome == "delivered" and second.possibly_duplicated
    assert totals.possibly_duplicated == 1  # type: ignore[attr-defined]


async def test_corrupt_entries_are_quarantined_and_replay_goes_on(tmp_path: Path,
                                                                 engine: str) -> None:
    spool = Spool(tmp_path / "spool", create=True)
    good = [spool.enqueue(message(f"g{i}"), "s@example.org", ["alice@example.com"])
            for i in range(5)]
    bad = [spool.enqueue(message(f"b{i}"), "s@example.org", ["alice@example.com"])
           for i in range(3)]
    env0 = spool.path / "incoming" / bad[0]
    env0.write_bytes(env0.read_bytes()[:20])  # truncated envelope
    env1 = spool.path / "incoming" / bad[1]
    env1.write_bytes(env1.read_bytes().replace(b"alice@example.com", b"alice @example.com"))
    (spool.path / "msg" / bad[2]).unlink()  # message file lost
    (spool.path / "msg" / bad[2]).mkdir()  # ... and something unreadable in its place
    async with Sink(f"unix:{tmp_path}/lmtp", collect=True) as sink:
        rec, totals = await replay(spool, sink.destinations[0], engine=engine)
        assert len(sink.messages) == 5
    assert sorted(i for i, _ in rec.quarantine) == sorted(bad)
    reasons = {i: r for i, r in rec.quarantine}
    assert "truncated" in reasons[bad[0]]
    assert "bad address" in reasons[bad[1]]
    assert "message file" in reasons[bad[2]]
    assert exit_status(totals) == 65  # type: ignore[arg-type]
    assert len(rec.outcomes) == 5 and all(o.outcome == "delivered" for o in rec.outcomes)
    assert entries(spool, "incoming") == [] and good
    for i in bad:
        assert (spool.path / "quarantine" / f"{i}.txt").read_text().strip() == reasons[i]


# -- several processes, crashes ----------------------------------------------------------------


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "lmtpfast", *args]


async def test_two_replays_on_one_spool_never_deliver_a_message_twice(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", create=True)
    n = 1500
    for i in range(n):
        spool.enqueue(message(f"c{i}"), "s@example.org", ["alice@example.com"], fsync=False)
    async with Sink(f"unix:{tmp_path}/lmtp", collect=True) as sink:
        dest = sink.destinations[0]
        procs = [
            await asyncio.create_subprocess_exec(
                *_cli("replay", str(spool.path), "--server", dest, "--once", "-q",
                      "--concurrency", "8", "--report", str(tmp_path / f"r{k}.json")))
            for k in range(2)
        ]
        codes = [await p.wait() for p in procs]
        got = Counter(msgid_of(m.content) for m in sink.messages)
    assert set(codes) <= {0, 75}  # 75: it met entries the other one held
    assert len(got) == n and set(got.values()) == {1}
    reports = [json.loads((tmp_path / f"r{k}.json").read_text()) for k in range(2)]
    delivered = [r["summary"]["recipients_delivered"] for r in reports]
    assert sum(delivered) == n
    assert entries(spool, "incoming") == [] and entries(spool, "msg") == []


# The 20,000 messages on the default loop (uvloop); fewer on asyncio's
# to keep the test under two minutes (Dovecot stores ~800 msg/s here).
# LMTPFAST_CRASH_MESSAGES sets both.
_CRASH_SIZE = os.environ.get("LMTPFAST_CRASH_MESSAGES")
CRASH_RUNS = [("uvloop", int(_CRASH_SIZE or 20000)), ("asyncio", int(_CRASH_SIZE or 5000))]


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("loop, count", CRASH_RUNS)
def test_kill_9_during_replay_into_dovecot_loses_nothing(dovecot: TempDovecot, tmp_path: Path,
                                                         loop: str, count: int) -> None:
    """kill -9 the replay at random moments, restart until the spool is empty, count maildirs.

    Every recipient is delivered at least once; duplicates only for messages
    that were in flight at a kill (at most --concurrency per kill).
    """
    rng = random.Random(int(os.environ.get("LMTPFAST_CRASH_SEED", secrets.randbits(32))))
    users = ("alice", "bob", "carol", "dave")
    spool = Spool(tmp_path / "spool", create=True)
    expected: Counter[tuple[str, str]] = Counter()
    for i in range(count):
        rcpts = rng.sample(users, rng.choice((1, 1, 1, 2, 3)))
        tag = f"k{i}"
        spool.enqueue(message(tag, 512), "s@example.org", [f"{u}@example.com" for u in rcpts],
                      fsync=False)
        for u in rcpts:
            expected[(tag, u)] += 1
    spool.sync()
    concurrency = 16
    kills = 0
    runs = 0
    # Below the test's own timeout, so a slow machine fails here with a count,
    # and the replay of a failed run never outlives it (it would deliver into
    # the next run's Dovecot).
    deadline = time.monotonic() + 540
    started = time.monotonic()
    proc: subprocess.Popen[bytes] | None = None
    try:
        while True:
            runs += 1
            proc = subprocess.Popen(
                # The directory spool as it is (tests/test_queue_replay.py does the store).
                _cli("replay", f"dir:{spool.path}", "--server", dovecot.destination_unix,
                     "--once", "-q", "--concurrency", str(concurrency), "--min-backoff", "0",
                     "--loop", loop),
                stdin=subprocess.DEVNULL)
            if kills < 8:
                time.sleep(rng.uniform(0.3, 3.0))
                if proc.poll() is None:
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
                    kills += 1
                    continue
            rc = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            left = os.listdir(spool.path / "incoming") + os.listdir(spool.path / "deferred")
            if rc == 0 and not left:
                break
            assert rc in (0, 75), f"replay exited {rc}"
            assert time.monotonic() < deadline, (
                f"spool not empty after {runs} runs: {len(left)} left")
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
    elapsed = time.monotonic() - started
    assert kills >= 3, "the replay was too quick to be killed: raise LMTPFAST_CRASH_MESSAGES"
    got: Counter[tuple[str, str]] = Counter()
    for u in users:
        for m in dovecot.messages(u):
            got[(msgid_of(m), u)] += 1
    missing = set(expected) - set(got)
    assert not missing, f"{len(missing)} deliveries lost, e.g. {sorted(missing)[:5]}"
    assert set(got) == set(expected)
    duplicated_messages = {tag for (tag, _), n in got.items() if n > 1}
    print(f"\n{loop}: {count} messages, {sum(expected.values())} deliveries, {kills} kills, "
          f"{runs} runs, {len(duplicated_messages)} messages duplicated, "
          f"{sum(got.values()) - len(got)} extra copies, {elapsed:.1f} s")
    assert len(duplicated_messages) <= kills * concurrency, (
        f"{len(duplicated_messages)} messages delivered twice for {kills} kills")
    assert entries(spool, "failed") == [] and entries(spool, "quarantine") == []
    # A kill between the envelope's removal and the message's leaves at most
    # one orphan message file per kill (sweep() removes them after an hour).
    assert len(entries(spool, "msg")) <= kills


# -- the command line -------------------------------------------------------------------------


def test_cli_usage_and_input_errors(tmp_path: Path) -> None:
    def run(*args: str) -> int:
        return subprocess.run(_cli(*args), capture_output=True).returncode

    spool = tmp_path / "spool"
    Spool(spool, create=True)
    assert run("replay", str(spool)) == 64
    assert run("replay", str(spool), "--server", "a:b:c") == 64
    assert run("replay", str(spool), "--server", "unix:/x", "--config", "y") == 64
    assert run("replay", str(tmp_path / "missing"), "--server", "unix:/x") == 66
    assert run("replay", str(spool), "--config", str(tmp_path / "missing.toml")) == 78
    # empty spool: nothing to do is success
    assert run("replay", str(spool), "--server", "unix:/nonexistent") == 0


async def test_cli_json_report_and_summary(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", create=True)
    spool.enqueue(message("j1"), "s@example.org", ["alice@example.com", "nobody@example.com"])
    spool.enqueue(message("j2"), "s@example.org", ["carol@example.com"])
    plan = sink_plan("rcpt:nobody@*=550 5.1.1 User unknown",
                     "dot:carol@*=452 4.2.2 Mailbox full")
    report = tmp_path / "report.json"
    async with Sink(f"unix:{tmp_path}/lmtp", faults=plan) as sink:
        proc = await asyncio.create_subprocess_exec(
            *_cli("replay", str(spool.path), "--server", sink.destinations[0], "--report",
                  str(report)),
            stdout=asyncio.subprocess.PIPE)
        out, _ = await proc.communicate()
    assert proc.returncode == 75
    text = out.decode()
    assert "recipients delivered" in text and "not delivered:" in text
    assert "nobody@example.com: failed: 550 5.1.1 User unknown" in text
    data = json.loads(report.read_text())
    assert data["exit_status"] == 75
    kinds = sorted((o["recipient"], o["outcome"]) for o in data["outcomes"])
    assert kinds == [("alice@example.com", "delivered"), ("carol@example.com", "deferred"),
                     ("nobody@example.com", "failed")]
    assert data["summary"]["messages_failed"] == 1 and data["summary"]["messages_deferred"] == 1
    assert data["outcomes"][0]["destination"].startswith("unix:")


def test_demo_runs_in_one_command() -> None:
    """`lmtpfast replay --demo`: the bundled spool into a faulty sink, mixed outcomes."""
    proc = subprocess.run(_cli("replay", "--demo"), capture_output=True, timeout=60)
    out = proc.stdout.decode()
    assert proc.returncode == 0, proc.stderr.decode()
    assert "alice@example.com: delivered: 250" in out
    assert "nobody@example.com: failed: 550 5.1.1" in out
    assert "carol@example.com: deferred: 452 4.2.2" in out
    assert "failed for good (kept)" in out


async def test_server_is_an_agent_with_one_route(tmp_path: Path, engine: str) -> None:
    """--server: pipelined connections to one server, destination filled, connect errors
    transient."""
    spool = Spool(tmp_path / "spool", create=True)
    for i in range(40):
        spool.enqueue(message(f"f{i}"), "s@example.org", ["alice@example.com", "bob@example.com"])
    async with Sink(f"unix:{tmp_path}/lmtp", collect=True) as sink:
        dest = sink.destinations[0]
        rec = Recorder()
        async with Agent.for_server(dest, max_connections=3, engine=engine) as agent:
            totals = await Replayer(spool, agent, concurrency=12, observer=rec).run()
            assert agent.stats.connections_opened <= 3
        assert len(sink.messages) == 40
    assert totals.recipients_delivered == 80 and exit_status(totals) == 0
    assert {o.destination for o in rec.outcomes} == {dest}
    spool.enqueue(message("none"), "", ["a@x.org"])
    rec, totals = await replay(spool, f"unix:{tmp_path}/nothing-here", engine=engine)
    (o,) = rec.outcomes
    assert (o.outcome, o.code, o.enhanced, o.stage, o.local) == (
        "deferred", 451, "4.4.1", "connect", True)
