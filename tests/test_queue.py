"""The queue interface, checked on every backend; the embedded store's own guarantees.

Conformance tests run on the embedded store (:class:`SQLiteQueue`), on the
directory spool (:class:`DirQueue`) and on the PostgreSQL queue (:class:`PgQueue`,
a real TempPostgres; its own tests are in ``test_pgqueue.py``); the store's leases,
journal, segments, damaged files and the conversion of a directory spool have their
own tests.
Workers that die are real processes killed with SIGKILL.
"""

from __future__ import annotations

import errno
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmtpfast._testing.fixtures import PgDatabase, require_peer
from lmtpfast.spool import Spool, new_envelope
from lmtpfast.spool._dirstore import DirQueue
from lmtpfast.spool._format import Reason
from lmtpfast.spool._pgqueue import PgQueue
from lmtpfast.spool._queue import (
    NewMessage,
    Queue,
    QueueCorrupt,
    QueueError,
    QueueWriteError,
    Selection,
    Update,
)
from lmtpfast.spool._sqlite import SQLiteQueue, SQLiteStore

BACKENDS = ["sqlite", "dir", "postgresql"]
#: The PostgreSQL database of the running test (set by the ``kind`` fixture).
_PG: dict[str, str] = {}


def msg(i: int, size: int = 300) -> bytes:
    return (f"Subject: m{i}\r\nMessage-ID: <m{i}@test>\r\n\r\n").encode() + b"x" * size + b"\r\n"


def new(i: int, *rcpts: str, size: int = 300, **opts: object) -> NewMessage:
    env = new_envelope("s@example.org", list(rcpts or [f"u{i}@example.com"]), **opts)  # type: ignore[arg-type]
    return NewMessage(env, msg(i, size))


def open_queue(kind: str, path: Path) -> Queue:
    if kind == "sqlite":
        return SQLiteQueue(path, create=True, segment_size=16 * 1024)
    if kind == "postgresql":
        # Every "path" of a test is the one database: two queues on it are two workers.
        return PgQueue(_PG["dsn"], create=True)
    return DirQueue(path, create=True)


@pytest.fixture(params=BACKENDS)
def kind(request: pytest.FixtureRequest) -> str:
    if request.param == "postgresql":
        require_peer("postgres")
        db: PgDatabase = request.getfixturevalue("postgres_module_db")
        if not db.server.running:
            db.server.start()
        db.psql("DROP SCHEMA IF EXISTS lmtpfast CASCADE;")  # each test starts empty
        _PG["dsn"] = db.dsn
    return str(request.param)


async def drain(q: Queue, due: float | None = None) -> list[str]:
    """Claim everything due and record it done; the ids, in claim order."""
    due = time.time() if due is None else due
    await q.begin_pass(due=due)
    got = []
    while True:
        batch = await q.claim(7, due=due)
        got += [e.id for e in batch.entries]
        await q.record([Update(e, "done") for e in batch.entries])
        if batch.exhausted:
            return got


# -- the interface, on every backend ------------------------------------------------------


async def test_enqueue_claim_record_cycle(kind: str, tmp_path: Path) -> None:
    async with open_queue(kind, tmp_path / "q") as q:
        ids = await q.enqueue_many([new(i) for i in range(40)])
        assert len(set(ids)) == 40
        due = time.time()
        await q.begin_pass(due=due)
        batch = await q.claim(10, due=due)
        assert len(batch.entries) == 10 and not batch.exhausted
        first = batch.entries[0]
        first_rcpt = first.envelope.recipients[0].address
        assert bytes(first.content) == msg(int(first_rcpt[1:].split("@")[0]))
        ups = [Update(e, "done") for e in batch.entries[:5]]
        later = due + 3600
        for e in batch.entries[5:]:
            e.envelope.recipients[0].last = Reason(code=451, enhanced="4.3.0", text="later")
            e.envelope.attempts = 1
            ups.append(Update(e, "defer", next_attempt=later))
        assert await q.record(ups) == ["ok"] * 10
        rest = await drain(q, due)
        assert len(rest) == 30
        st = await q.status(due=due)
        assert (st.queued, st.not_due) == (5, 5) and st.next_due == pytest.approx(later, abs=1)
        # Deferred entries come back with their state once due.
        await q.begin_pass(due=later + 1)
        batch = await q.claim(50, due=later + 1)
        assert len(batch.entries) == 5 and batch.exhausted
        e = batch.entries[0]
        assert e.envelope.attempts == 1 and e.envelope.recipients[0].last is not None
        assert e.envelope.recipients[0].last.code == 451
        assert bytes(e.content).startswith(b"Subject: m")
        await q.record([Update(x, "done") for x in batch.entries])
        assert (await q.status()).queued == 0


async def test_a_pass_tries_each_entry_once(kind: str, tmp_path: Path) -> None:
    """An entry deferred during a pass (next attempt after the pass's due time) waits."""
    async with open_queue(kind, tmp_path / "q") as q:
        await q.enqueue_many([new(i) for i in range(5)])
        due = time.time()
        await q.begin_pass(due=due)
        seen = 0
        while True:
            batch = await q.claim(2, due=due)
            seen += len(batch.entries)
            await q.record([Update(e, "defer", next_attempt=due + 0.001) for e in batch.entries])
            if batch.exhausted:
                break
        assert seen == 5


async def test_failed_and_quarantined_entries_are_kept_and_listed(kind: str, tmp_path: Path
                                                                  ) -> None:
    async with open_queue(kind, tmp_path / "q") as q:
        await q.enqueue_many([new(i) for i in range(3)])
        due = time.time()
        await q.begin_pass(due=due)
        batch = await q.claim(3, due=due)
        a, b, c = batch.entries
        a.envelope.recipients[0].state = "failed"
        a.envelope.recipients[0].last = Reason(code=550, enhanced="5.1.1", text="no such user")
        await q.record([Update(a, "failed"), Update(b, "quarantine", reason="looks wrong"),
                        Update(c, "release")])
        st = await q.status()
        assert (st.queued, st.failed, st.quarantined) == (1, 1, 1)
        failed = [i async for i in q.entries(Selection(states=("failed",)))]
        assert [i.id for i in failed] == [a.id]
        assert failed[0].envelope is not None
        assert failed[0].envelope.recipients[0].last is not None
        assert failed[0].envelope.recipients[0].last.code == 550
        [qi] = [i async for i in q.entries(Selection(states=("quarantined",)))]
        assert qi.id == b.id and qi.reason == "looks wrong"
        assert await q.content(a.id) == bytes(msg(0)) or (await q.content(a.id)).startswith(b"Sub")
        # requeue: the failed recipient is queued again, due now.
        res = await q.requeue(Selection(ids=(a.id,)))
        assert res.done == [a.id]
        ids = await drain(q)
        assert sorted(ids) == sorted([a.id, c.id])


async def test_operator_actions(kind: str, tmp_path: Path) -> None:
    async with open_queue(kind, tmp_path / "q") as q:
        ids = await q.enqueue_many([new(0, "a@one.example"), new(1, "b@two.example"),
                                    new(2, "c@two.example")])
        sel = Selection(domain="two.example")
        listed = [i.id async for i in q.entries(sel)]
        assert sorted(listed) == sorted(ids[1:])
        assert [i.id async for i in q.entries(Selection(recipient="A@ONE.*"))] == [ids[0]]
        res = await q.hold(sel)
        assert sorted(res.done) == sorted(ids[1:])
        assert (await q.status()).held == 2
        assert await drain(q) == [ids[0]]  # held entries are never claimed
        res = await q.release(Selection(ids=(ids[1],)))
        assert res.done == [ids[1]]
        assert await drain(q) == [ids[1]]
        res = await q.bounce(Selection(ids=(ids[2],)),
                             Reason(code=554, enhanced="5.0.0", text="bounced by the operator"))
        assert res.done == [ids[2]]
        info = await q.show(ids[2])
        assert info is not None and info.state == "failed" and info.envelope is not None
        assert info.envelope.recipients[0].state == "failed"
        res = await q.delete(Selection(ids=(ids[2], "nonexistent")))
        assert res.done == [ids[2]] and res.missing == ["nonexistent"]
        assert await q.show(ids[2]) is None
        st = await q.status()
        assert (st.queued, st.held, st.failed) == (0, 0, 0)


async def test_retry_makes_deferred_entries_due(kind: str, tmp_path: Path) -> None:
    async with open_queue(kind, tmp_path / "q") as q:
        await q.enqueue_many([new(0)])
        due = time.time()
        await q.begin_pass(due=due)
        [e] = (await q.claim(1, due=due)).entries
        e.envelope.attempts = 1
        await q.record([Update(e, "defer", next_attempt=due + 86400)])
        assert await drain(q) == []
        res = await q.retry(Selection(states=("queued",)))
        assert res.done == [e.id]
        assert await drain(q) == [e.id]


async def test_list_and_actions_agree_on_entries_being_delivered(kind: str, tmp_path: Path
                                                                 ) -> None:
    """An entry a worker holds is listed as claimed and every action says busy, on both layouts."""
    path = tmp_path / "q"
    async with open_queue(kind, path) as worker, open_queue(kind, path) as operator:
        ids = await worker.enqueue_many([new(i) for i in range(3)])
        due = time.time()
        await worker.begin_pass(due=due)
        [e] = (await worker.claim(1, due=due)).entries
        infos = {i.id: i async for i in operator.entries()}
        assert {i for i, info in infos.items() if info.claimed} == {e.id}
        shown = await operator.show(e.id)
        assert shown is not None and shown.claimed
        free = [i for i in ids if i != e.id]
        for action in (operator.retry, operator.hold):  # retry first: hold takes them
            res = await action(Selection(ids=tuple(ids)))
            assert res.busy == [e.id] and sorted(res.done) == sorted(free), action
        res = await operator.bounce(Selection(ids=(e.id,)), Reason(554, "5.0.0", "no", "local"))
        assert res.busy == [e.id]
        await worker.record([Update(e, "done")])
        assert not [i for i in [x async for x in operator.entries()] if i.claimed]


def test_a_dead_workers_entries_are_not_busy(tmp_path: Path) -> None:
    """Killed with its claims: listed as not claimed, and an action takes them back (suspect)."""
    path = tmp_path / "q"
    with SQLiteStore(path, create=True) as s:
        s.enqueue_many([new(i) for i in range(5)])
    held = _kill_worker_holding(path, 2)
    with SQLiteStore(path) as s:
        assert not any(i.claimed for i in s.iter_entries())
        res = s.hold(Selection(ids=tuple(held)))
        assert sorted(res.done) == sorted(held) and res.busy == []
        for i in s.iter_entries(Selection(ids=tuple(held))):
            assert i.state == "held" and i.suspect
    assert os.listdir(path / "workers") == []


async def test_claims_are_exclusive_between_two_queues(kind: str, tmp_path: Path) -> None:
    path = tmp_path / "q"
    async with open_queue(kind, path) as q1, open_queue(kind, path) as q2:
        await q1.enqueue_many([new(i) for i in range(30)])
        due = time.time()
        await q1.begin_pass(due=due)
        await q2.begin_pass(due=due)
        b1 = await q1.claim(20, due=due)
        b2 = await q2.claim(30, due=due)
        one, two = {e.id for e in b1.entries}, {e.id for e in b2.entries}
        assert not one & two and len(one | two) == 30
        await q1.record([Update(e, "done") for e in b1.entries])
        await q2.record([Update(e, "done") for e in b2.entries])
        assert (await q1.status()).queued == 0


async def test_big_message_is_streamed_not_copied(kind: str, tmp_path: Path) -> None:
    """Over 1 MiB a claimed message is a MessageFile (read a piece at a time), closed by record.

    Not on PostgreSQL: its queue keeps a message in a ``bytea`` and a claim
    reads it whole (docs/queue.md), so there the content is bytes.
    """
    from lmtpfast import MessageFile

    big = b"Subject: big\r\n\r\n" + (b"y" * 998 + b"\r\n") * 2000  # 2 MB
    middle = b"Subject: mid\r\n\r\n" + (b"y" * 998 + b"\r\n") * 400  # 400 KB: read whole
    async with open_queue(kind, tmp_path / "q") as q:
        news = []
        for n, data in (("big", big), ("mid", middle)):
            src = tmp_path / f"{n}.eml"
            src.write_bytes(data)
            news.append(NewMessage(new_envelope("s@example.org", [f"{n}@example.com"]), src))
        await q.enqueue_many(news)
        due = time.time()
        await q.begin_pass(due=due)
        entries = (await q.claim(2, due=due)).entries
        got = {e.envelope.recipients[0].address: e for e in entries}
        e, m = got["big@example.com"], got["mid@example.com"]
        assert len(e.content) == e.size == len(big) and bytes(e.content) == big
        assert isinstance(m.content, bytes | memoryview) and bytes(m.content) == middle
        if kind == "postgresql":
            assert isinstance(e.content, bytes)
            await q.record([Update(x, "done") for x in entries])
            return
        assert isinstance(e.content, MessageFile) and e.content[:14] == big[:14]
        fd = Path(f"/proc/self/fd/{e.content.fd}")
        opened = os.readlink(fd)
        await q.record([Update(x, "done") for x in entries])
        assert e.content == b"" and m.content == b""
        # The big one's file is closed (its descriptor gone, or reused by another file).
        assert not fd.exists() or os.readlink(fd).removesuffix(" (deleted)") != opened
    if kind == "sqlite":
        assert os.listdir(tmp_path / "q" / "data") == []


_CLAIM_WITH_FEW_FDS = """
import os, resource, sys, time
from lmtpfast.spool._queue import QueueWriteError
from lmtpfast.spool._sqlite import SQLiteStore
s = SQLiteStore(sys.argv[1])
due = time.time()
s.begin_pass(due=due)
# Room for a few more descriptors only: the big messages' files cannot all be open.
resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 3, 4096))
try:
    s.claim(10, due=due)
except QueueWriteError as exc:
    print("refused", exc.errno)
"""


def test_out_of_descriptors_at_a_claim_leaves_every_entry_queued(tmp_path: Path) -> None:
    """EMFILE while opening big messages' files is ours: a refused claim, never a quarantine."""
    path = tmp_path / "q"
    big = b"Subject: big\r\n\r\n" + (b"y" * 998 + b"\r\n") * 1100  # over 1 MiB: kept open
    with SQLiteStore(path, create=True) as s:
        s.enqueue_many([NewMessage(new_envelope("s@example.org", [f"u{i}@example.com"]), big)
                        for i in range(8)])
    out = subprocess.run([sys.executable, "-c", _CLAIM_WITH_FEW_FDS, str(path)],
                         capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["refused", str(errno.EMFILE)], out.stderr
    with SQLiteStore(path) as s:
        infos = list(s.iter_entries())
        assert [i.state for i in infos] == ["queued"] * 8
        assert not any(i.claimed for i in infos)
        due = time.time()
        s.begin_pass(due=due)
        batch = s.claim(10, due=due)
        assert len(batch.entries) == 8 and not batch.quarantined
        assert all(bytes(e.content) == big for e in batch.entries)
        s.record([Update(e, "done") for e in batch.entries])


# -- the embedded store -----------------------------------------------------------------------


def store_files(path: Path) -> dict[str, int]:
    out = {}
    for root, dirs, files in os.walk(path):
        for n in dirs + files:
            p = Path(root) / n
            out[str(p.relative_to(path))] = stat.S_IMODE(os.lstat(p).st_mode)
    return out


def test_store_is_private_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        with SQLiteStore(tmp_path / "q", create=True) as s:
            s.enqueue_many([new(i) for i in range(200)])  # a segment
            s.enqueue(b"y" * 200_000, "s@example.org", ["big@example.com"])  # a data file
            s.claim(1, due=time.time())  # a worker file
            modes = store_files(tmp_path / "q")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "q").st_mode) == 0o700
    assert any(k.startswith("seg/") for k in modes) and any(k.startswith("data/") for k in modes)
    assert any(k.startswith("workers/") for k in modes)
    bad = {k: oct(m) for k, m in modes.items() if m not in (0o700, 0o600)}
    assert not bad


def test_group_commit_writes_one_segment_for_many_messages(tmp_path: Path) -> None:
    with SQLiteStore(tmp_path / "q", create=True) as s:
        ids = s.enqueue_many([new(i) for i in range(1000)])
        assert ids == [str(i) for i in range(1, 1001)]
        assert len(os.listdir(tmp_path / "q" / "seg")) == 1
        # A single message goes into its row: no segment for it.
        s.enqueue(msg(5000), "s@example.org", ["x@example.com"])
        assert len(os.listdir(tmp_path / "q" / "seg")) == 1
    # Durable: another process sees all of them once enqueue_many returned.
    out = subprocess.run([sys.executable, "-c", (
        "import sqlite3,sys; c=sqlite3.connect(sys.argv[1]);"
        "print(c.execute('select count(*) from msg').fetchone()[0])"),
        str(tmp_path / "q" / "queue.db")], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "1001"


def test_segments_go_once_nothing_in_them_is_queued(tmp_path: Path) -> None:
    with SQLiteStore(tmp_path / "q", create=True, segment_size=8 * 1024) as s:
        s.enqueue_many([new(i) for i in range(300)])  # ~ 110 KB: several segments
        segs = os.listdir(tmp_path / "q" / "seg")
        assert len(segs) > 3
        due = time.time()
        s.begin_pass(due=due)
        batch = s.claim(300, due=due)
        # One deferred entry must not keep its segment alive: its content moves to its row.
        ups = [Update(e, "done") for e in batch.entries[1:]]
        ups.append(Update(batch.entries[0], "defer", next_attempt=due + 10))
        s.record(ups)
        # Only the segment this store still appends to is left (until it is sealed).
        assert os.listdir(tmp_path / "q" / "seg") == segs[-1:] or len(
            os.listdir(tmp_path / "q" / "seg")) == 1
        [e] = s.claim(1, due=due + 20).entries
        assert bytes(e.content) == msg(0)
        s.record([Update(e, "done")])
    assert os.listdir(tmp_path / "q" / "seg") == []


_WORKER = r"""
import sys, time
from lmtpfast.spool._sqlite import SQLiteStore
s = SQLiteStore(sys.argv[1])
due = time.time()
s.begin_pass(due=due)
b = s.claim(int(sys.argv[2]), due=due)
if sys.argv[3] == "stash":
    from lmtpfast.spool._queue import Update
    s.stash([Update(e, "done") for e in b.entries[:3]])
print(" ".join(e.id for e in b.entries), flush=True)
sys.stdin.read()   # until killed
"""


def _kill_worker_holding(path: Path, n: int, mode: str = "") -> list[str]:
    proc = subprocess.Popen([sys.executable, "-c", _WORKER, str(path), str(n), mode or "-"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        ids = proc.stdout.readline().split()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    return ids


def test_a_killed_workers_claims_come_back_suspect(tmp_path: Path) -> None:
    path = tmp_path / "q"
    with SQLiteStore(path, create=True) as s:
        s.enqueue_many([new(i) for i in range(20)])
    held = _kill_worker_holding(path, 8)
    assert len(held) == 8
    with SQLiteStore(path) as s:
        due = time.time()
        s.begin_pass(due=due)
        batch = s.claim(50, due=due)
        assert len(batch.entries) == 20
        suspect = {e.id for e in batch.entries if e.suspect}
        assert suspect == set(held)
        for e in batch.entries:
            assert e.envelope.recipients[0].possibly_delivered == (e.id in suspect)
        s.record([Update(e, "done") for e in batch.entries])
    assert os.listdir(path / "workers") == []


def test_a_stashed_outcome_is_applied_before_anyone_delivers_again(tmp_path: Path) -> None:
    path = tmp_path / "q"
    with SQLiteStore(path, create=True) as s:
        s.enqueue_many([new(i) for i in range(10)])
    held = _kill_worker_holding(path, 6, "stash")  # 3 "done" outcomes in its journal
    with SQLiteStore(path) as s:
        due = time.time()
        s.begin_pass(due=due)
        got = {e.id for e in s.claim(50, due=due).entries}
    assert got == {str(i) for i in range(1, 11)} - set(held[:3])


def test_a_dead_workers_journal_waits_while_the_disk_refuses(tmp_path: Path) -> None:
    """If the journal cannot be applied now, its entries stay out of reach (never re-sent)."""
    path = tmp_path / "q"
    with SQLiteStore(path, create=True) as s:
        s.enqueue_many([new(i) for i in range(10)])
    held = _kill_worker_holding(path, 6, "stash")
    with SQLiteStore(path) as s:
        real = s._write

        def refuse(what: str, fn: object, *, durable: bool = False) -> object:
            if what == "recover":
                raise QueueWriteError(28, "No space left on device")
            return real(what, fn, durable=durable)  # type: ignore[arg-type]

        s._write = refuse  # type: ignore[method-assign,assignment]
        due = time.time()
        s.begin_pass(due=due)
        got = {e.id for e in s.claim(50, due=due).entries}
        assert got.isdisjoint(held) and len(got) == 4
        s._write = real  # type: ignore[method-assign]
        s.record([Update(e, "release") for e in s.claim(0, due=due).entries])
    with SQLiteStore(path) as s:
        due = time.time()
        s.begin_pass(due=due)
        s._first_pass = False
        got = {e.id for e in s.claim(50, due=due).entries}
    assert got == {str(i) for i in range(1, 11)} - set(held[:3])


def test_outcome_of_an_entry_deleted_meanwhile_is_gone(tmp_path: Path) -> None:
    with SQLiteStore(tmp_path / "q", create=True) as s, SQLiteStore(tmp_path / "q") as op:
        s.enqueue_many([new(i) for i in range(200)])  # in a segment
        due = time.time()
        s.begin_pass(due=due)
        batch = s.claim(200, due=due)
        op.delete(Selection(ids=(batch.entries[0].id, batch.entries[1].id)))
        statuses = s.record([Update(e, "done") for e in batch.entries])
        assert statuses[:2] == ["gone", "gone"] and set(statuses[2:]) == {"ok"}
        # Counted once (the operator's delete released those two).
        assert s.db.execute("SELECT live FROM seg").fetchall() == [(0,)]
    assert os.listdir(tmp_path / "q" / "seg") == []


def test_corrupt_rows_and_files_are_quarantined(tmp_path: Path) -> None:
    path = tmp_path / "q"
    with SQLiteStore(path, create=True) as s:
        ids = s.enqueue_many([new(i) for i in range(200)])          # segment
        big = s.enqueue(b"y" * 300_000, "s@example.org", ["b@example.com"])  # data file
        inline = s.enqueue(msg(999), "s@example.org", ["c@example.com"])  # in its row
    db = sqlite3.connect(path / "queue.db")
    db.execute("UPDATE msg SET rcpts = x'7b7b7b' WHERE id = ?", (int(ids[0]),))
    db.execute("UPDATE msg SET sender = 'a b@x' WHERE id = ?", (int(ids[1]),))
    db.execute("UPDATE msg SET body = x'00' WHERE id = ?", (int(inline),))
    db.commit()
    db.close()
    # Damage one record in the segment, and replace the big message by a symlink.
    [seg] = os.listdir(path / "seg")
    off = sqlite3.connect(path / "queue.db").execute(
        "SELECT off FROM msg WHERE id = ?", (int(ids[2]),)).fetchone()[0]
    with open(path / "seg" / seg, "r+b") as f:
        f.seek(off + 100)
        f.write(b"DAMAGE")
    os.unlink(path / "data" / big)
    os.symlink("/etc/passwd", path / "data" / big)
    with SQLiteStore(path) as s:
        due = time.time()
        s.begin_pass(due=due)
        quarantined: dict[str, str] = {}
        delivered = 0
        while True:
            batch = s.claim(64, due=due)
            quarantined |= dict(batch.quarantined)
            delivered += len(batch.entries)
            for e in batch.entries:
                assert b"root:" not in bytes(e.content)
            s.record([Update(e, "done") for e in batch.entries])
            if batch.exhausted:
                break
        assert set(quarantined) == {ids[0], ids[1], ids[2], big, inline}
        assert "malformed recipients" in quarantined[ids[0]]
        assert "bad address" in quarantined[ids[1]]
        assert "damaged" in quarantined[ids[2]]
        assert "symbolic link" in quarantined[big]
        assert "damaged" in quarantined[inline]
        assert delivered == 197
        st = s.status()
        assert (st.queued, st.quarantined) == (0, 5)


def test_a_database_that_is_not_one_is_reported_not_a_traceback(tmp_path: Path) -> None:
    path = tmp_path / "q"
    with SQLiteStore(path, create=True) as s:
        s.enqueue_many([new(i) for i in range(10)])
    assert not (path / "queue.db-wal").exists()  # the last close checkpoints it away
    with open(path / "queue.db", "r+b") as f:
        f.write(b"this is not an SQLite database at all, sorry" * 100)
    with pytest.raises(QueueCorrupt, match="damaged"):
        SQLiteStore(path)
    assert isinstance(QueueCorrupt(), QueueError) and isinstance(QueueCorrupt(), OSError)


def test_symlinked_or_foreign_store_files_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "q"
    with SQLiteStore(path, create=True):
        pass
    os.rename(path / "queue.db", tmp_path / "elsewhere.db")
    os.symlink(tmp_path / "elsewhere.db", path / "queue.db")
    with pytest.raises(QueueError, match="not a regular file"):
        SQLiteStore(path)
    os.unlink(path / "queue.db")
    os.rename(tmp_path / "elsewhere.db", path / "queue.db")
    (path / "seg").rmdir()
    os.symlink(tmp_path, path / "seg")
    with pytest.raises(QueueError, match="seg/"):
        SQLiteStore(path)


def test_directory_spool_is_converted_without_loss_and_idempotently(tmp_path: Path) -> None:
    path = tmp_path / "spool"
    spool = Spool(path, create=True)
    fresh = [spool.enqueue(msg(i), "s@example.org", [f"u{i}@example.com"], envid=f"E{i}")
             for i in range(30)]
    # One deferred with history, one failed, one corrupt.
    claim = spool.claim("incoming", fresh[0])
    assert claim is not None
    claim.envelope.recipients[0].last = Reason(code=452, enhanced="4.2.2", text="full")
    claim.envelope.recipients[0].possibly_delivered = True
    claim.envelope.attempts = 2
    claim.save(next_attempt=time.time() + 500)
    claim.release()
    claim = spool.claim("incoming", fresh[1])
    assert claim is not None
    claim.envelope.recipients[0].state = "failed"
    claim.failed("gone for good\n")
    (path / "incoming" / fresh[2]).write_bytes(b"{truncated")
    # An older replay holds one entry: it is left for the next run.
    held = spool.claim("incoming", fresh[3])
    assert held is not None
    with SQLiteStore(path, create=True) as s:
        report = s.import_dir()
        assert (report.imported, report.failed, report.locked) == (27, 1, 1)
        assert [q for q, _ in report.quarantined] == [fresh[2]]
        held.release()
        report = s.import_dir()  # rerun: only what was left
        assert (report.imported, report.failed, report.locked) == (1, 0, 0)
        assert s.import_dir().imported == 0
        infos = {i.envelope.envid: i for i in s.iter_entries() if i.envelope}
        assert len(infos) == 29
        deferred = infos["E0"]
        assert deferred.envelope is not None and deferred.envelope.attempts == 2
        r = deferred.envelope.recipients[0]
        assert r.possibly_delivered and r.last is not None and r.last.code == 452
        assert infos["E1"].state == "failed"
        st = s.status()
        assert (st.queued, st.not_due, st.failed) == (28, 1, 1)
        due = time.time()
        got = []
        while True:
            b = s.claim(10, due=due)
            got += [bytes(e.content) for e in b.entries]
            s.record([Update(e, "done") for e in b.entries])
            if b.exhausted:
                break
    assert sorted(got) == sorted(msg(i) for i in range(3, 30))
    assert os.listdir(path / "incoming") == [] and os.listdir(path / "msg") == []


async def test_entries_iterates_in_chunks(tmp_path: Path) -> None:
    async with SQLiteQueue(tmp_path / "q", create=True) as q:
        await q.enqueue_many([new(i) for i in range(1203)])
        seen = [i.id async for i in q.entries()]
        assert seen == [str(i) for i in range(1, 1204)]


def test_salvage_of_a_database_that_is_not_one_rebuilds_every_message(tmp_path: Path) -> None:
    path = tmp_path / "q"
    with SQLiteStore(path, create=True) as s:
        ids = s.enqueue_many([new(i) for i in range(300)])                  # segments
        big = s.enqueue(b"y" * 300_000, "s@example.org", ["b@example.com"])  # a data file
    (path / "queue.db").write_bytes(b"garbage " * 4096)
    with pytest.raises(QueueCorrupt):
        SQLiteStore(path)
    report = SQLiteStore.salvage(path)
    assert (report.recovered, report.rebuilt) == (0, 301)
    assert any(m.startswith("quarantine/queue.db.damaged-") for m in report.moved)
    with SQLiteStore(path) as s:
        st = s.status()
        assert (st.queued, st.quarantined) == (0, 301)  # never sent again on its own
        assert s.content(ids[7]) == msg(7) and len(s.content(big)) == 300_000
        res = s.requeue(Selection(states=("quarantined",)))
        assert len(res.done) == 301
        due = time.time()
        got = []
        while True:
            b = s.claim(100, due=due)
            got += [e.id for e in b.entries if e.suspect]
            s.record([Update(e, "done") for e in b.entries])
            if b.exhausted:
                break
        assert sorted(got, key=int) == sorted([*ids, big], key=int)  # all flagged suspect


def test_salvage_of_a_damaged_page_keeps_what_it_can_read(tmp_path: Path) -> None:
    path = tmp_path / "q"
    with SQLiteStore(path, create=True) as s:
        ids = s.enqueue_many([new(i) for i in range(3000)])
    size = os.path.getsize(path / "queue.db")
    with open(path / "queue.db", "r+b") as f:
        for page in range(size // 4096 // 3, size // 4096 // 3 + 4):
            f.seek(page * 4096)
            f.write(os.urandom(4096))
    report = SQLiteStore.salvage(path)
    assert report.recovered + report.rebuilt == 3000
    assert report.recovered > 0
    with SQLiteStore(path) as s:
        st = s.status()
        assert st.queued + st.quarantined == 3000 and st.quarantined == report.rebuilt
        assert {i.id for i in s.iter_entries()} == set(ids)


def test_salvage_needs_the_store_to_itself(tmp_path: Path) -> None:
    with SQLiteStore(tmp_path / "q", create=True), pytest.raises(QueueError, match="in use"):
        SQLiteStore.salvage(tmp_path / "q")
