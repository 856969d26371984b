"""The PostgreSQL queue against a real PostgreSQL (TempPostgres): interface, leases, outages.

Lease expiry is driven by moving ``lease_expires`` into the past with SQL (the
database's clock is the lease clock): no test waits for time to pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any

import pytest

from lmtpfast import Agent, Shaper, ShapingSettings
from lmtpfast._testing._procs import free_tcp_port
from lmtpfast._testing.fixtures import PgDatabase
from lmtpfast._testing.postgres import TempPostgres
from lmtpfast.server import Handler, Server, SessionConfig
from lmtpfast.spool import Spool, new_envelope
from lmtpfast.spool._format import Reason
from lmtpfast.spool._pgqueue import (
    SCHEMA_VERSION,
    PgQueue,
    PgShapingState,
    init_queue,
    redact_dsn,
)
from lmtpfast.spool._queue import (
    NewMessage,
    QueueError,
    QueueWriteError,
    Selection,
    Update,
    open_queue,
)

pytestmark = pytest.mark.peers


def msg(i: int, size: int = 300) -> bytes:
    return (f"Subject: m{i}\r\nMessage-ID: <m{i}@test>\r\n\r\n").encode() + b"x" * size + b"\r\n"


def new(i: int, *rcpts: str, **opts: object) -> NewMessage:
    env = new_envelope("s@example.org", list(rcpts or [f"u{i}@example.com"]), **opts)  # type: ignore[arg-type]
    return NewMessage(env, msg(i))


@pytest.fixture
def postgres_db(postgres_module_db: PgDatabase) -> PgDatabase:
    """The module's database with no queue schema: each test starts empty."""
    return fresh_schema(postgres_module_db)


def fresh_schema(db: PgDatabase) -> PgDatabase:
    """*db* without the queue schema (and a running server): each test starts empty."""
    if not db.server.running:
        db.server.start()
    db.psql("DROP SCHEMA IF EXISTS lmtpfast CASCADE;")
    return db


def pgq(db: PgDatabase) -> PgQueue:
    """A queue on a fresh database, its schema made at first use."""
    return PgQueue(db.dsn, create=True, restart_grace=0)


def expire_leases(db: PgDatabase) -> None:
    """What the passing of a lease length does: every lease is past its expiry."""
    db.psql("UPDATE lmtpfast.msg SET lease_expires = now() - interval '1 hour' "
            "WHERE lease IS NOT NULL")


async def drain(q: PgQueue, due: float | None = None) -> list[str]:
    due = time.time() if due is None else due
    got = []
    while True:
        batch = await q.claim(7, due=due)
        got += [e.id for e in batch.entries]
        await q.record([Update(e, "done") for e in batch.entries])
        if batch.exhausted:
            return got


# -- schema ------------------------------------------------------------------------------


async def test_a_database_without_the_schema_says_run_init(postgres_db: PgDatabase) -> None:
    async with PgQueue(postgres_db.dsn) as q:
        with pytest.raises(QueueError, match="queue init") as info:
            await q.status()
        assert not isinstance(info.value, QueueWriteError)  # config: not a transient outage
    assert await init_queue(postgres_db.dsn) == (0, SCHEMA_VERSION)
    assert await init_queue(postgres_db.dsn) == (SCHEMA_VERSION, SCHEMA_VERSION)  # idempotent
    assert postgres_db.psql("SELECT value FROM lmtpfast.meta WHERE key = 'schema_version'"
                            ).strip() == str(SCHEMA_VERSION)
    async with PgQueue(postgres_db.dsn) as q:
        assert (await q.status()).queued == 0
    postgres_db.psql("UPDATE lmtpfast.meta SET value = '999' WHERE key = 'schema_version'")
    async with PgQueue(postgres_db.dsn) as q:
        with pytest.raises(QueueError, match="newer than this lmtpfast"):
            await q.status()


async def test_passwords_never_shown(postgres_db: PgDatabase) -> None:
    assert postgres_db.password not in redact_dsn(postgres_db.dsn)
    assert redact_dsn("postgresql://u@h/db?password=sec&sslmode=require") == (
        "postgresql://u@h/db?password=***&sslmode=require")
    q = open_queue(postgres_db.dsn)
    assert isinstance(q, PgQueue)
    assert postgres_db.password not in repr(q) and postgres_db.password not in q.location
    bad = postgres_db.dsn.replace(postgres_db.password, "wrong-" + postgres_db.password)
    async with PgQueue(bad) as q2:
        with pytest.raises(QueueError) as info:
            await q2.status()
    assert postgres_db.password not in str(info.value)
    assert not isinstance(info.value, QueueWriteError)  # a wrong password is config
    await q.close()


# -- the interface ---------------------------------------------------------------------


async def test_enqueue_claim_record_cycle(postgres_db: PgDatabase) -> None:
    async with pgq(postgres_db) as q:
        ids = await q.enqueue_many([new(i) for i in range(40)])
        assert len(set(ids)) == 40
        due = time.time()
        batch = await q.claim(10, due=due)
        assert len(batch.entries) == 10 and not batch.exhausted
        first = batch.entries[0]
        n = int(first.envelope.recipients[0].address[1:].split("@")[0])
        assert bytes(first.content) == msg(n)
        ups = [Update(e, "done") for e in batch.entries[:5]]
        later = due + 3600
        for e in batch.entries[5:]:
            e.envelope.recipients[0].last = Reason(code=451, enhanced="4.3.0", text="later")
            e.envelope.recipients[0].attempts = 1
            e.envelope.attempts = 1
            ups.append(Update(e, "defer", next_attempt=later))
        assert await q.record(ups) == ["ok"] * 10
        assert len(await drain(q, due)) == 30
        st = await q.status(due=due)
        assert (st.queued, st.not_due) == (5, 5) and st.next_due == pytest.approx(later)
        batch = await q.claim(50, due=later + 1)
        assert len(batch.entries) == 5 and batch.exhausted
        e = batch.entries[0]
        r = e.envelope.recipients[0]
        assert e.envelope.attempts == 1 and r.attempts == 1 and r.last is not None
        assert (r.last.code, r.last.enhanced, r.last.text) == (451, "4.3.0", "later")
        assert not e.suspect and not r.possibly_delivered
        await q.record([Update(x, "done") for x in batch.entries])
        assert (await q.status()).queued == 0
        # Nothing left behind in any table.
        assert await q._run("t", lambda c: c.fetchval(
            "SELECT (SELECT count(*) FROM lmtpfast.rcpt) + (SELECT count(*) FROM lmtpfast.body)"),
            write=False) == 0


async def test_recipients_are_rows_and_delivered_ones_leave(postgres_db: PgDatabase) -> None:
    async with pgq(postgres_db) as q:
        [id] = await q.enqueue_many([new(0, "a@x.example", "b@x.example", "c@x.example",
                                         notify=("SUCCESS", "FAILURE"), orcpt=[None, "rfc822;b@o",
                                                                               None])])
        [e] = (await q.claim(5, due=time.time())).entries
        assert [r.notify for r in e.envelope.recipients] == [("SUCCESS", "FAILURE")] * 3
        assert e.envelope.recipients[1].orcpt == "rfc822;b@o"
        env = e.envelope
        env.recipients = [r for r in env.recipients if r.address != "a@x.example"]
        env.delivered = 1
        env.recipients[0].state = "failed"
        env.recipients[0].last = Reason(code=550, enhanced="5.1.1", text="no such user")
        env.recipients[1].last = Reason(code=452, enhanced="4.2.2", text="full")
        assert await q.record([Update(e, "defer", next_attempt=time.time() - 1)]) == ["ok"]
        rows = postgres_db.psql(f"SELECT address, state, last_code FROM lmtpfast.rcpt "
                                f"WHERE msg_id = {id} ORDER BY idx")
        assert rows.split() == ["b@x.example|1|550", "c@x.example|0|452"]
        [i] = [i async for i in q.entries(Selection(code="452"))]
        assert i.id == id and i.envelope is not None and i.envelope.delivered == 1


async def test_operators_leave_entries_being_delivered_alone(postgres_db: PgDatabase) -> None:
    async with pgq(postgres_db) as q:
        ids = await q.enqueue_many([new(0), new(1)])
        [e0, e1] = (await q.claim(2, due=time.time())).entries
        reason = Reason(code=554, text="operator")
        assert (await q.bounce(Selection(ids=tuple(ids)), reason)).busy == sorted(ids, key=int)
        assert (await q.retry(Selection(ids=(e0.id,)))).busy == [e0.id]
        assert (await q.hold(Selection(ids=(e1.id,)))).busy == [e1.id]
        # Delete wins over a running delivery: the worker finds the entry gone.
        assert (await q.delete(Selection(ids=(e0.id,)))).done == [e0.id]
        assert await q.record([Update(e0, "done"), Update(e1, "done")]) == ["gone", "ok"]


async def test_bad_entries_are_quarantined_at_claim(postgres_db: PgDatabase) -> None:
    async with pgq(postgres_db) as q:
        ids = await q.enqueue_many([new(0), new(1)])
        postgres_db.psql(f"UPDATE lmtpfast.rcpt SET address = 'bad address<>' "
                         f"WHERE msg_id = {ids[0]}")
        batch = await q.claim(5, due=time.time())
        assert [e.id for e in batch.entries] == [ids[1]]
        assert [i for i, _ in batch.quarantined] == [ids[0]]
        info = await q.show(ids[0])
        assert info is not None and info.state == "quarantined" and info.reason


# -- leases across workers ---------------------------------------------------------------


async def test_claims_are_exclusive_between_workers(postgres_db: PgDatabase) -> None:
    async with PgQueue(postgres_db.dsn, create=True) as q1, PgQueue(postgres_db.dsn) as q2:
        await q1.enqueue_many([new(i) for i in range(300)])
        due = time.time()
        seen: list[str] = []

        async def worker(q: PgQueue) -> None:
            while True:
                batch = await q.claim(16, due=due)
                seen.extend(e.id for e in batch.entries)
                assert await q.record([Update(e, "done") for e in batch.entries]) == (
                    ["ok"] * len(batch.entries))
                if batch.exhausted:
                    return

        await asyncio.gather(worker(q1), worker(q2), worker(q1), worker(q2))
        assert len(seen) == 300 and len(set(seen)) == 300


async def test_an_expired_lease_is_taken_over_fenced_and_flagged(postgres_db: PgDatabase
                                                                 ) -> None:
    async with PgQueue(postgres_db.dsn, create=True, restart_grace=0) as q1, \
            PgQueue(postgres_db.dsn, restart_grace=0) as q2:
        await q1.enqueue_many([new(0, "a@x.example", "b@x.example")])
        [e1] = (await q1.claim(1, due=time.time())).entries
        assert not (await q2.claim(1, due=time.time())).entries  # leased: not claimable
        expire_leases(postgres_db)
        [e2] = (await q2.claim(1, due=time.time())).entries
        assert e2.id == e1.id and e2.suspect
        assert all(r.possibly_delivered for r in e2.envelope.recipients)
        # The first worker's outcome is refused: its lease was taken over.
        assert await q1.record([Update(e1, "done")]) == ["lost"]
        assert await q2.record([Update(e2, "done")]) == ["ok"]
        assert (await q1.status()).queued == 0


async def test_renewal_keeps_a_lease(postgres_db: PgDatabase) -> None:
    async with PgQueue(postgres_db.dsn, create=True, restart_grace=0) as q1, \
            PgQueue(postgres_db.dsn, restart_grace=0) as q2:
        await q1.enqueue_many([new(0)])
        [e1] = (await q1.claim(1, due=time.time())).entries
        expire_leases(postgres_db)
        assert await q1.renew() == 1
        assert not (await q2.claim(1, due=time.time())).entries
        assert await q1.record([Update(e1, "done")]) == ["ok"]


async def test_close_gives_back_unrecorded_claims_flagged(postgres_db: PgDatabase) -> None:
    async with PgQueue(postgres_db.dsn, create=True) as q1:
        await q1.enqueue_many([new(0)])
        assert len((await q1.claim(1, due=time.time())).entries) == 1
    async with PgQueue(postgres_db.dsn) as q2:
        [e] = (await q2.claim(1, due=time.time())).entries  # free at once, no expiry needed
        assert e.suspect and e.envelope.recipients[0].possibly_delivered


async def test_a_killed_worker_process_frees_its_entries_flagged(postgres_db: PgDatabase,
                                                                 tmp_path: Path) -> None:
    """A real process claims and is killed with SIGKILL (no close): the lease expires."""
    import subprocess
    import sys

    async with PgQueue(postgres_db.dsn, create=True, restart_grace=0) as q:
        ids = await q.enqueue_many([new(i) for i in range(10)])
        script = (
            "import asyncio, sys, time\n"
            "from lmtpfast.spool._pgqueue import PgQueue\n"
            "async def main():\n"
            "    q = PgQueue(sys.argv[1])\n"
            "    b = await q.claim(4, due=time.time())\n"
            "    print(' '.join(e.id for e in b.entries), flush=True)\n"
            "    await asyncio.Event().wait()\n"
            "asyncio.run(main())\n")
        proc = subprocess.Popen([sys.executable, "-c", script, postgres_db.dsn],
                                stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None
            taken = proc.stdout.readline().split()
        finally:
            proc.kill()
            proc.wait(30)
        assert len(taken) == 4
        due = time.time()
        got = (await q.claim(10, due=due)).entries
        assert {e.id for e in got} == set(ids) - set(taken)
        await q.record([Update(e, "done") for e in got])
        expire_leases(postgres_db)
        await q.begin_pass(due=due)  # a new pass walks the queue from its start
        back = (await q.claim(10, due=due)).entries
        assert sorted(e.id for e in back) == sorted(taken)
        assert all(e.suspect and e.envelope.recipients[0].possibly_delivered for e in back)


# -- outages ---------------------------------------------------------------------------


async def test_a_database_outage_defers_and_nothing_is_lost(postgres_factory: object) -> None:
    """PostgreSQL stops with outcomes pending: they are refused (kept), then written.

    After the restart no expired lease is taken over within the grace period,
    so the living worker writes its outcomes and nothing is delivered again.
    """
    pg: TempPostgres = postgres_factory()  # type: ignore[operator]
    async with PgQueue(pg.dsn, create=True, lease=3600) as q, \
            PgQueue(pg.dsn, lease=3600) as other:
        ids = await q.enqueue_many([new(i) for i in range(20)])
        batch = await q.claim(20, due=time.time())
        assert len(batch.entries) == 20
        pg.stop("immediate")
        with pytest.raises(QueueWriteError) as info:
            await q.record([Update(e, "done") for e in batch.entries])
        assert info.value.pending is None  # nothing of that call was applied
        with pytest.raises(QueueWriteError):
            await q.claim(5, due=time.time())
        with pytest.raises(QueueWriteError):
            await q.enqueue_many([new(99)])
        pg.start()
        pg.psql("UPDATE lmtpfast.msg SET lease_expires = now() - interval '1 hour'")
        # Within the grace after the restart, the other worker takes nothing over.
        q._down_until = other._down_until = 0.0
        assert not (await other.claim(20, due=time.time())).entries
        statuses = await q.record([Update(e, "done") for e in batch.entries])
        assert statuses == ["ok"] * 20
        st = await q.status()
        assert st.queued == 0
    del ids


async def test_a_lost_reply_to_an_applied_write_is_not_reported_twice(
        postgres_db: PgDatabase) -> None:
    """The commit happened but the reply was lost: the retry sees its own effect, 'ok'."""
    async with pgq(postgres_db) as q:
        await q.enqueue_many([new(0), new(1)])
        a, b = (await q.claim(2, due=time.time())).entries
        # What the first try did before its reply was lost:
        await q._run("t", lambda c: c.execute(q._RELEASE, [b.lease.row], [b.lease.token]))
        await q._run("t", lambda c: c.fetch(q._DONE, [a.lease.row], [a.lease.token]))
        q._ambiguous.update({(a.lease.row, a.lease.token), (b.lease.row, b.lease.token)})
        assert await q.record([Update(a, "done"), Update(b, "release")]) == ["ok", "ok"]


# -- migration -------------------------------------------------------------------------


async def test_import_a_directory_spool_idempotently(
        postgres_db: PgDatabase, tmp_path: Path) -> None:
    async with pgq(postgres_db) as q:
        spool = Spool(tmp_path / "spool", create=True)
        for i in range(12):
            spool.enqueue(msg(i), "s@example.org", [f"u{i}@example.com", "z@example.com"])
        report = await q.import_dir(spool.path)
        assert report.imported == 12
        assert not any((spool.path / "incoming").iterdir())
        again = await q.import_dir(spool.path)
        assert (again.imported, again.already) == (0, 0)
        got = [i async for i in q.entries()]
        assert len(got) == 12
        assert all(i.envelope is not None and len(i.envelope.recipients) == 2 for i in got)
        bodies = {await q.content(i.id) for i in got}
        assert bodies == {msg(i) for i in range(12)}


def test_url_options_are_ours_and_removed() -> None:
    q = PgQueue("postgresql://u:pw@h:5/db?lease=12&sslmode=require&restart_grace=0")
    assert (q.lease, q.restart_grace) == (12.0, 0.0)
    assert q._dsn == "postgresql://u:pw@h:5/db?sslmode=require"
    assert "pw" not in q.location
    with pytest.raises(QueueError, match="lease"):
        PgQueue("postgresql://h/db?lease=abc")
    with pytest.raises(QueueError, match="lease"):
        PgQueue("postgresql://h/db?lease=0.5")


async def test_migrations_are_versioned_and_applied_once(postgres_db: PgDatabase) -> None:
    assert await init_queue(postgres_db.dsn) == (0, SCHEMA_VERSION)
    # A queue made by the first release (version 1, no shaping tables) is migrated.
    postgres_db.psql("DROP TABLE lmtpfast.dest, lmtpfast.dest_slot; "
                     "DROP FUNCTION lmtpfast.acquire_slot; DROP INDEX lmtpfast.msg_due_id; "
                     "CREATE INDEX msg_due ON lmtpfast.msg (next_attempt) WHERE state = 0; "
                     "UPDATE lmtpfast.meta SET value = '1' WHERE key = 'schema_version';")
    async with PgQueue(postgres_db.dsn) as q:
        with pytest.raises(QueueError, match="version 1, this lmtpfast needs"):
            await q.status()
    assert await init_queue(postgres_db.dsn) == (1, SCHEMA_VERSION)
    assert postgres_db.psql("SELECT count(*) FROM lmtpfast.dest").strip() == "0"
    assert postgres_db.psql("SELECT count(*) FROM lmtpfast.dest_slot").strip() == "0"
    assert postgres_db.psql("SELECT count(*) FROM pg_indexes WHERE schemaname = 'lmtpfast' "
                            "AND indexname = 'msg_due'").strip() == "0"


async def test_a_dead_destination_is_dead_for_every_worker(postgres_db: PgDatabase) -> None:
    async with pgq(postgres_db) as qa, PgQueue(postgres_db.dsn) as qb:
        await qa.status()  # the schema
        a, b = PgShapingState(qa), PgShapingState(qb)
        until = time.monotonic() + 60
        a.mark_dead("lmtp:unix:/dead", until, "connect refused")
        await a.sync()
        await b.sync()
        assert b.dead_until("lmtp:unix:/dead") == pytest.approx(until, abs=0.5)
        assert b.reason("lmtp:unix:/dead") == "connect refused"
        assert b.dead_until("lmtp:unix:/alive") == 0.0
        b.revive("lmtp:unix:/dead")  # b's probe got through
        await b.sync()
        await a.sync()
        assert a.dead_until("lmtp:unix:/dead") == 0.0
        await a.close()
        await b.close()


# -- shaping limits shared by every worker (issue 15 item 6) ---------------------------


class Overlap(Handler):
    """Counts the transactions in flight (MAIL to final reply) and the most at once.

    Each transaction is held until another overlaps it or ``hold`` seconds
    pass, so an overlap the limits allowed is seen, not missed by luck.
    """

    def __init__(self, hold: float) -> None:
        self.hold = hold
        self.inflight = self.peak = self.done = 0
        self.overlapped = asyncio.Event()

    def mail(self, session: Any, sender: bytes, params: list[bytes], default: bytes) -> None:
        self.inflight += 1
        self.peak = max(self.peak, self.inflight)
        if self.inflight > 1:
            self.overlapped.set()

    def end_of_content(self, session: Any, envelope: Any) -> Any:
        finish = asyncio.get_running_loop().create_task(self._finish())
        return [finish, *[None] * (len(envelope.recipients) - 1)]

    async def _finish(self) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.overlapped.wait(), self.hold)
        self.inflight -= 1
        self.done += 1


async def _two_workers_deliver(db: PgDatabase, server: Server, shared: bool, n: int,
                               **shaping: Any) -> list[Any]:
    qa, qb = pgq(db), PgQueue(db.dsn, worker="b")
    await qa.status()  # the schema
    states = [PgShapingState(qa), PgShapingState(qb)] if shared else [None, None]
    agents = [Agent.for_server(server.destinations[0], shaping_state=st, pipeline_depth=1,
                               **shaping) for st in states]
    try:
        async with agents[0], agents[1]:
            results = await asyncio.gather(*(
                agents[i % 2].deliver(b"Subject: s\r\n\r\nn=%d\r\n" % i, sender="s@example.org",
                                      recipients=[f"u{i}@example.org"]) for i in range(n)))
    finally:
        for st in states:
            if st is not None:
                await st.close()
        await qa.close()
        await qb.close()
    return [r for (r,) in results]


async def test_a_concurrency_limit_holds_across_workers(postgres_db: PgDatabase,
                                                        tmp_path: Path) -> None:
    # Two workers (each its own agent, shaper, pool and PgShapingState), limit 1:
    # the server never sees two transactions at once, and all are delivered.
    h = Overlap(hold=0.02)
    async with Server(f"unix:{tmp_path}/s", h, SessionConfig()) as server:
        results = await _two_workers_deliver(postgres_db, server, True, 16,
                                             concurrency_limit=1, initial_concurrency=1)
    assert all(r.delivered for r in results)
    assert h.done == 16 and h.peak == 1
    assert postgres_db.psql("SELECT count(*) FROM lmtpfast.dest_slot").strip() == "0"
    # The same with each worker's own (in-memory) state: the limit is per worker, and
    # the counting server does see the overlap (this test can fail).
    h = Overlap(hold=5.0)
    async with Server(f"unix:{tmp_path}/t", h, SessionConfig()) as server:
        results = await _two_workers_deliver(postgres_db, server, False, 4,
                                             concurrency_limit=1, initial_concurrency=1)
    assert all(r.delivered for r in results)
    assert h.peak == 2


async def test_a_dead_workers_slot_is_freed_after_its_lease(postgres_db: PgDatabase) -> None:
    async with pgq(postgres_db) as qa, PgQueue(postgres_db.dsn, worker="b") as qb:
        await qa.status()
        a, b = PgShapingState(qa), PgShapingState(qb)
        got = await a.acquire_slot("lmtp:unix:/d", 1, -1.0)
        assert got is not None
        assert await b.acquire_slot("lmtp:unix:/d", 1, -1.0) is None  # full
        assert await b.acquire_slot("lmtp:unix:/other", 1, -1.0) is not None
        # a dies holding it (never releases, never renews): once its lease has passed,
        # the slot is free for b.
        postgres_db.psql("UPDATE lmtpfast.dest_slot SET expires = now() - interval '1 hour' "
                         f"WHERE token = {got[0]}")
        again = await b.acquire_slot("lmtp:unix:/d", 1, -1.0)
        assert again is not None
        assert postgres_db.psql("SELECT worker FROM lmtpfast.dest_slot WHERE destination = "
                                "'lmtp:unix:/d'").strip() == "b"
        # A live holder's lease is renewed by its background task.
        b._renewed -= qb.lease
        await b._renew()
        assert postgres_db.psql(
            "SELECT count(*) FROM lmtpfast.dest_slot WHERE expires > now() + "
            f"interval '{qb.lease - 5} seconds'").strip() == "2"
        b.release_slot("lmtp:unix:/d", again[0], 0.0)
        await b.close()  # writes the release, gives back what it still holds
        assert postgres_db.psql("SELECT count(*) FROM lmtpfast.dest_slot").strip() == "0"
        await a.close()


async def test_rates_are_shared_by_the_workers(postgres_db: PgDatabase) -> None:
    async with pgq(postgres_db) as qa, PgQueue(postgres_db.dsn, worker="b") as qb:
        await qa.status()
        a, b = PgShapingState(qa), PgShapingState(qb)
        # message_rate: starts 100 s apart whichever worker asks (the waits count the
        # starts reserved before; no clock is watched).
        waits = []
        for st in (a, b, a, b, a, b):
            got = await st.acquire_slot("lmtp:unix:/r", 0, 100.0)
            assert got is not None and got[0] not in a._held
            waits.append(round(got[1] / 100))
        assert waits == [0, 1, 2, 3, 4, 5]
        # rate_delay: the next start, by anyone, that long after the previous end.
        got = await a.acquire_slot("lmtp:unix:/d", 1, 0.0)
        assert got is not None and got[1] == 0.0
        a.release_slot("lmtp:unix:/d", got[0], 100.0)
        assert a._releaser is not None
        await a._releaser
        got = await b.acquire_slot("lmtp:unix:/d", 1, 0.0)
        assert got is not None and round(got[1] / 100) == 1
        # Through two shapers in virtual time: the second start waits for the first's.
        slept: list[float] = []

        async def sleep(s: float) -> None:
            slept.append(s)

        shapers = [Shaper(st, sleep=sleep).destination(
            "lmtp:unix:/s", ShapingSettings(message_rate=0.01)) for st in (a, b)]
        for d in shapers:
            ticket = await d.admit()
            assert ticket is not None
            d.done(ticket, "ok")
        assert [round(s / 100) for s in slept] == [1]
        await a.close()
        await b.close()


async def test_a_database_failure_defers_never_exceeds(tmp_path: Path) -> None:
    # The shared state cannot be reached: the transaction is deferred (451, nothing
    # delivered, the server never sees it), never sent past a limit nobody checked.
    h = Overlap(hold=0.0)
    q = PgQueue(f"postgresql://nobody@127.0.0.1:{free_tcp_port()}/x", connect_timeout=2)
    state = PgShapingState(q)
    async with Server(f"unix:{tmp_path}/s", h, SessionConfig()) as server, Agent.for_server(
            server.destinations[0], shaping_state=state, concurrency_limit=1) as agent:
        (r,) = await agent.deliver(b"Subject: s\r\n\r\nx\r\n", sender="s@example.org",
                                   recipients=["u@example.org"])
    await state.close()
    await q.close()
    assert not r.delivered and r.code == 451 and "shaping state unavailable" in r.text
    assert h.done == 0 and h.peak == 0
