"""Replay over the embedded store, against real peers: crashes, two replays, a full disk, damage.

* ``kill -9`` of ``lmtpfast replay`` at random moments while it drains a
  store into Dovecot and Postfix's ``smtp-sink -L`` (routed by domain):
  nothing lost, duplicates only for entries held at a kill (at most
  ``--concurrency`` per kill), and each duplicate reported
  ``possibly_duplicated`` by the run that delivered it again;
* two replays on one store deliver every recipient exactly once;
* a disk that fills between delivery and record (a real tmpfs): the outcome
  goes to the worker's journal, nothing is delivered twice, whatever later
  replays meet;
* damaged store files: reported and quarantined (or salvaged), never a
  traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import secrets
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lmtpfast import Agent, RecipientResult
from lmtpfast._testing.dovecot import TempDovecot
from lmtpfast._testing.fixtures import in_ci
from lmtpfast._testing.postfix import SmtpSink, split_capture
from lmtpfast.server import FaultPlan, Sink
from lmtpfast.spool import NewMessage, Observer, Replayer, RetryPolicy, new_envelope
from lmtpfast.spool._sqlite import SQLiteQueue, SQLiteStore
from tests.test_operations import config
from tests.test_spool_full_disk import _mount, fill

ROOT = Path(__file__).resolve().parent.parent
MSGID = re.compile(rb"^Message-ID: <([^>]+)@", re.M | re.I)
DOVE_USERS = ("alice", "bob", "carol", "dave")


def message(tag: str, size: int = 400) -> bytes:
    return (f"From: s@example.org\r\nSubject: {tag}\r\nMessage-ID: <{tag}@crash.test>\r\n\r\n"
            ).encode() + b"x" * size + f"\r\nEND {tag}\r\n".encode()


def env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT))


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "lmtpfast", *args]


def tag_of(data: bytes) -> str | None:
    """The tag of a *complete* message (its last line came), else None."""
    m = MSGID.search(data)
    if m is None:
        return None
    tag = m.group(1).decode()
    return tag if f"END {tag}".encode() in data else None


def delivered(dovecot: TempDovecot, sink: SmtpSink) -> Counter[tuple[str, str]]:
    """(tag, user) -> copies stored by Dovecot and by smtp-sink (whole messages only)."""
    got: Counter[tuple[str, str]] = Counter()
    for user in DOVE_USERS:
        for data in dovecot.messages(user):
            tag = tag_of(data)
            assert tag is not None, data[:200]
            got[(tag, user)] += 1
    for dump in sink.captures():
        try:
            meta, data = split_capture(dump)
        except ValueError:
            continue  # a transaction a kill cut short: smtp-sink never said 250
        tag = tag_of(data)
        if tag is None:
            continue
        for rcpt in meta.get("X-Rcpt-Args", []):
            got[(tag, rcpt.strip("<>").split(">")[0].split("@")[0])] += 1
    return got


def report_lines(folder: Path) -> list[dict[str, Any]]:
    """Every outcome of every report there, the partial ones of killed runs included."""
    out = []
    for p in sorted(folder.glob("*.json*")):
        for line in p.read_text(errors="replace").splitlines():
            line = line.strip().rstrip(",")
            if not line.startswith('{"id"'):
                continue
            with contextlib.suppress(json.JSONDecodeError):
                out.append(json.loads(line))
    return out


# -- kill -9 -----------------------------------------------------------------------------------

_CRASH_SIZE = int(os.environ.get("LMTPFAST_CRASH_MESSAGES", "3000"))


def test_kill_9_during_replay_of_a_store_loses_nothing_and_flags_duplicates(
        dovecot: TempDovecot, smtp_sink: Any, tmp_path: Path) -> None:
    rng = random.Random(int(os.environ.get("LMTPFAST_CRASH_SEED", secrets.randbits(32))))
    sink: SmtpSink = smtp_sink(capture=True)
    spool = tmp_path / "spool"
    expected: Counter[tuple[str, str]] = Counter()
    msgs = []
    for i in range(_CRASH_SIZE):
        tag = f"k{i}"
        users = rng.sample(DOVE_USERS, rng.choice((1, 1, 2)))
        rcpts = [f"{u}@dove.test" for u in users]
        if rng.random() < 0.5:
            rcpts.append(f"s{i}@sink.test")
            users.append(f"s{i}")
        for u in users:
            expected[(tag, u)] += 1
        msgs.append(NewMessage(new_envelope("s@example.org", rcpts), message(tag)))
    with SQLiteStore(spool, create=True) as store:
        ids = store.enqueue_many(msgs)
    tag_by_id = {id: f"k{i}" for i, id in enumerate(ids)}
    cfg = config(tmp_path, dovecot, sink)
    reports = tmp_path / "reports"
    reports.mkdir()
    concurrency, kills, runs = 16, 0, 0
    deadline = time.monotonic() + 300
    while True:
        runs += 1
        proc = subprocess.Popen(
            cli("replay", str(spool), "--config", str(cfg), "--once", "-q", "--concurrency",
                str(concurrency), "--min-backoff", "0", "--report", str(reports / f"r{runs}.json")),
            env=env(), stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if kills < 6:
            time.sleep(rng.uniform(0.2, 1.5))  # a random moment to kill at, not a wait
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                kills += 1
                continue
        _, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        assert b"Traceback" not in err, err.decode()
        with SQLiteStore(spool) as store:
            left = store.status().queued
        if proc.returncode == 0 and not left:
            break
        assert proc.returncode in (0, 75), err.decode()
        assert time.monotonic() < deadline, f"still {left} queued after {runs} runs"
    assert kills >= 3, "the replay was too quick to be killed: raise LMTPFAST_CRASH_MESSAGES"
    got = delivered(dovecot, sink)
    missing = set(expected) - set(got)
    assert not missing, f"{len(missing)} deliveries lost, e.g. {sorted(missing)[:5]}"
    assert set(got) == set(expected)
    dup_msgs = {tag for (tag, _), n in got.items() if n > 1}
    assert len(dup_msgs) <= kills * concurrency, f"{len(dup_msgs)} duplicated for {kills} kills"
    # Every duplicate was flagged by the run that delivered it again.
    flagged = {(tag_by_id[o["id"]], o["recipient"].split("@")[0]) for o in report_lines(reports)
               if o["outcome"] == "delivered" and o.get("possibly_duplicated")}
    unflagged = {k for k, n in got.items() if n > 1} - flagged
    assert not unflagged, f"duplicates not flagged: {sorted(unflagged)[:5]}"
    with SQLiteStore(spool) as store:
        st = store.status()
        assert (st.queued, st.failed, st.quarantined) == (0, 0, 0)
    assert os.listdir(spool / "seg") == [] and os.listdir(spool / "workers") == []
    print(f"\n{_CRASH_SIZE} messages, {sum(expected.values())} deliveries, {kills} kills, "
          f"{runs} runs, {len(dup_msgs)} messages duplicated (all flagged)")


# -- two replays -------------------------------------------------------------------------------


async def test_two_replays_on_one_store_never_deliver_twice(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    n = 1500
    with SQLiteStore(spool, create=True) as store:
        store.enqueue_many(NewMessage(new_envelope("s@example.org", ["a@example.com"]),
                                      message(f"c{i}")) for i in range(n))
    async with Sink(f"unix:{tmp_path}/lmtp", collect=True) as sink:
        procs = [await asyncio.create_subprocess_exec(
            *cli("replay", str(spool), "--server", sink.destinations[0], "--once", "-q",
                 "--concurrency", "8", "--report", str(tmp_path / f"r{k}.json")), env=env())
            for k in range(2)]
        codes = [await p.wait() for p in procs]
        got = Counter(tag_of(m.content) for m in sink.messages)
    assert set(codes) <= {0, 75}
    assert len(got) == n and set(got.values()) == {1}
    delivered_by = [json.loads((tmp_path / f"r{k}.json").read_text())["summary"]
                    ["recipients_delivered"] for k in range(2)]
    assert sum(delivered_by) == n
    with SQLiteStore(spool) as store:
        assert store.status().queued == 0


# -- a full disk -------------------------------------------------------------------------------


@pytest.fixture
def small_fs() -> Iterator[Path]:
    """A 16 MiB tmpfs of its own, unmounted at teardown."""
    if os.geteuid() != 0:
        if in_ci():
            pytest.fail("mounting a tmpfs needs root")
        pytest.skip("mounting a tmpfs needs root")
    where = Path(tempfile.mkdtemp(prefix="lmtpqfull-", dir="/tmp"))
    _mount("-t", "tmpfs", "-o", "size=16m,mode=0700", "tmpfs", str(where))
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False, timeout=30)
        where.rmdir()


class _FillAfterFirst:
    """The agent, but the spool's disk is filled to the last byte after the first delivery."""

    def __init__(self, agent: Agent, fs: Path) -> None:
        self.agent, self.fs, self.calls = agent, fs, 0
        self.filler: Path | None = None

    async def deliver(self, *args: Any, **kwargs: Any) -> list[RecipientResult]:
        results = await self.agent.deliver(*args, **kwargs)
        self.calls += 1
        if self.calls == 1:
            self.filler = fill(self.fs)
        return results

    async def close(self) -> None:
        await self.agent.close()


class _Errors(Observer):
    def __init__(self) -> None:
        self.errors: list[tuple[str, str]] = []
        self.backoffs: list[str] = []

    def error(self, id: str, problem: str) -> None:
        self.errors.append((id, problem))

    def backing_off(self, problem: str, delay: float) -> None:
        self.backoffs.append(problem)


async def _replay(spool: Path, deliverer: Any, **kw: Any) -> tuple[Any, _Errors]:
    obs = _Errors()
    q = SQLiteQueue(spool)
    try:
        totals = await Replayer(q, deliverer, concurrency=4, batch=1, observer=obs,
                                policy=RetryPolicy(min_backoff=3600),
                                spool_backoff=(0.01, 0.02), **kw).run()
    finally:
        await q.close()
    return totals, obs


async def test_a_full_disk_never_makes_a_store_deliver_twice(small_fs: Path) -> None:
    spool = small_fs / "spool"
    with SQLiteStore(spool, create=True) as store:
        store.enqueue_many([NewMessage(new_envelope("s@example.org", [
            "alice@example.com", "carol@example.com"]), message(f"p{i}")) for i in range(60)])
    plan = FaultPlan.parse(["dot:carol@*=452 4.2.2 Mailbox full"])
    async with Sink(f"unix:{small_fs.parent}/{small_fs.name}.sock", collect=True,
                    faults=plan) as sink:
        dest = sink.destinations[0]
        # 1. The disk fills after the first delivery: its outcome cannot be recorded.
        filler = _FillAfterFirst(Agent.for_server(dest), small_fs)
        totals, obs = await _replay(spool, filler)
        await filler.close()
        assert filler.calls >= 1 and obs.backoffs
        assert any("worker journal" in p for _, p in obs.errors), obs.errors
        assert totals.unrecorded == 0
        first = Counter(tag_of(m.content) for m in sink.messages)
        assert set(first.values()) == {1}
        # 2. Another replay while the disk is still full: nothing is delivered twice.
        agent = Agent.for_server(dest)
        totals, obs = await _replay(spool, agent)
        await agent.close()
        assert Counter(tag_of(m.content) for m in sink.messages) == first
        # 3. Room again: the journal is applied first, then the rest is delivered.
        assert filler.filler is not None
        filler.filler.unlink()
        agent = Agent.for_server(dest)
        totals, obs = await _replay(spool, agent)
        await agent.close()
        got = Counter((tag_of(m.content), r) for m in sink.messages for r in m.recipients)
    alice = {k: n for k, n in got.items() if k[1] == "alice@example.com"}
    assert len(alice) == 60 and set(alice.values()) == {1}  # each exactly once
    with SQLiteStore(spool) as store:
        st = store.status()
        assert (st.queued, st.not_due, st.claimed) == (60, 60, 0)  # carol, deferred
        for info in store.iter_entries():
            assert info.envelope is not None
            assert [r.address for r in info.envelope.recipients] == ["carol@example.com"]
    assert os.listdir(spool / "workers") == []


# -- damaged files, from the command line ------------------------------------------------------


def test_damaged_store_files_are_quarantined_or_salvaged_never_a_traceback(
        tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    with SQLiteStore(spool, create=True) as store:
        ids = store.enqueue_many([NewMessage(new_envelope("s@example.org", ["a@example.com"]),
                                             message(f"d{i}")) for i in range(300)])
        big = store.enqueue(b"Subject: big\r\n\r\n" + b"y" * 300_000, "s@example.org",
                            ["b@example.com"])
    db = sqlite3.connect(spool / "queue.db")
    off, seg = db.execute("SELECT off, seg FROM msg WHERE id = ?", (int(ids[5]),)).fetchone()
    db.execute("UPDATE msg SET rcpts = x'5b7b' WHERE id = ?", (int(ids[6]),))
    db.commit()
    db.close()
    with open(spool / "seg" / str(seg), "r+b") as f:
        f.seek(off + 60)
        f.write(b"\xff" * 8)
    (spool / "data" / big).unlink()
    os.symlink("/etc/passwd", spool / "data" / big)

    async def run() -> tuple[int, bytes, int]:
        async with Sink(f"unix:{tmp_path}/lmtp", collect=True) as sink:
            proc = await asyncio.create_subprocess_exec(
                *cli("replay", str(spool), "--server", sink.destinations[0], "--once",
                     "--report", str(tmp_path / "r.json")), env=env(),
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            _, err = await proc.communicate()
            assert proc.returncode is not None
            return proc.returncode, err, len(sink.messages)

    code, err, n = asyncio.run(run())
    assert b"Traceback" not in err, err.decode()
    assert code == 65 and n == 298
    quarantined = {o["id"]: o["text"] for o in json.loads((tmp_path / "r.json").read_text())
                   ["outcomes"] if o["outcome"] == "quarantined"}
    assert set(quarantined) == {ids[5], ids[6], big}
    assert "symbolic link" in quarantined[big]
    # The database itself destroyed: replay salvages it (the messages are quarantined, not lost).
    (spool / "queue.db").write_bytes(b"not a database " * 1000)
    for extra in ("-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            (spool / f"queue.db{extra}").unlink()
    code, err, n = asyncio.run(run())
    assert b"Traceback" not in err, err.decode()
    assert b"salvag" in err and code == 65 and n == 0
    assert any(p.name.startswith("queue.db.damaged-") for p in (spool / "quarantine").iterdir())
    out = subprocess.run(cli("queue", "list", str(spool), "--state", "quarantined", "--json"),
                         env=env(), capture_output=True, text=True)
    assert out.returncode == 0 and len(out.stdout.splitlines()) >= 3, out.stderr
