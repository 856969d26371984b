"""The delivery agent against real back ends: two Dovecot instances and Postfix's smtp-sink.

Every async test runs on asyncio and on uvloop (tests/conftest.py).
"""

from __future__ import annotations

import asyncio
import os
import re
import select
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from lmtpfast import Agent, ContentError, LocalProtocolError, PoolSettings, Timeouts, Transport

MSG = b"From: s@example.org\r\nSubject: agent\r\n\r\nHello.\r\n"
_RECEIVED_ID = re.compile(rb"\r\n\tid ([^\r\n]+)\r\n")

D1_USERS = ("u1", "u2", "u3", "u4", "u5", "u6")


def transaction_ids(dovecot, users) -> list[bytes]:  # type: ignore[no-untyped-def]
    """The LMTP transaction id Dovecot wrote into each user's one message."""
    ids = []
    for user in users:
        stored = dovecot.messages(user)
        assert len(stored) == 1, (user, len(stored))
        m = _RECEIVED_ID.search(stored[0])
        assert m is not None, stored[0][:400]
        ids.append(m.group(1))
    return ids


def lmtp_workers(dovecot) -> list[int]:  # type: ignore[no-untyped-def]
    """PIDs of the instance's lmtp worker processes (they hold the client connections)."""
    master = dovecot._proc.pid
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            comm = Path(f"/proc/{entry}/comm").read_text().strip()
            if comm == "lmtp" and os.getsid(int(entry)) == master:
                pids.append(int(entry))
        except OSError:
            continue
    return pids


async def until(cond: Callable[[], object], limit: float = 30.0) -> None:
    """Yield to the loop until ``cond()`` holds; ``limit`` only guards against a hang."""
    deadline = asyncio.get_running_loop().time() + limit
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "condition never held"
        await asyncio.sleep(0)


class Clock:
    """A clock the test moves by hand (the agent's pools age connections by it)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def kill_workers(dovecot) -> int:  # type: ignore[no-untyped-def]
    """SIGKILL the workers and wait until each has exited (a pidfd turns readable then)."""
    fds = []
    for pid in lmtp_workers(dovecot):
        try:
            fds.append(os.pidfd_open(pid))
        except ProcessLookupError:
            continue
        os.kill(pid, signal.SIGKILL)
    for fd in fds:
        ready, _, _ = select.select([fd], [], [], 10)
        os.close(fd)
        assert ready, "a killed lmtp worker did not exit"
    return len(fds)


# -- routing over two back ends ---------------------------------------------------------

async def test_two_backends_one_transaction_each(dovecot, dovecot_factory, tmp_path: Path) -> None:
    d1 = dovecot_factory(users=D1_USERS)  # back end 1: domain1.name
    d2 = dovecot  # back end 2: domain2.name (alice, bob, carol, dave)
    (tmp_path / "transport").write_text(
        "# the seed's syntax, with the test's socket paths\n"
        f"domain1.name lmtp1:unix:{d1.unix_path}\n"
        f"domain2.name lmtp2:{d2.destination_tcp}\n"
        f"boss@domain3.name lmtp2:{d2.destination_tcp}\n"  # one address, not the domain
        "closed.name error:5.1.2 no such domain here\n"
    )
    (tmp_path / "virtual").write_text("mlist@example.org carol@domain2.name\n")
    (tmp_path / "lmtpfast.toml").write_text(
        'lhlo_name = "front.example"\ntransport_map = "transport"\nvirtual_map = "virtual"\n'
        "[transports.lmtp1]\n[transports.lmtp2]\n"
    )
    recipients = [
        "u1@domain1.name", "alice@domain2.name", "u2@domain1.name", "u3@domain1.name",
        "nosuch@domain1.name", "bob@domain2.name", "u4@domain1.name", "nowhere@else.name",
        "mlist@example.org", "u5@domain1.name", "x@closed.name", "boss@domain3.name",
    ]
    async with Agent.from_config(tmp_path / "lmtpfast.toml") as agent:
        results = await agent.deliver(MSG, sender="s@example.org", recipients=recipients)
        stats = agent.stats
    assert [r.address for r in results] == recipients  # input order, input addresses
    by = dict(zip(recipients, results, strict=True))
    d1_dest, d2_dest = f"unix:{d1.unix_path}", d2.destination_tcp
    for rcpt in ("u1", "u2", "u3", "u4", "u5"):
        r = by[f"{rcpt}@domain1.name"]
        assert (r.status, r.code, r.stage, r.destination) == ("delivered", 250, "final", d1_dest)
    r = by["nosuch@domain1.name"]
    assert (r.status, r.code, r.enhanced, r.stage, r.destination) == (
        "permanent", 550, "5.1.1", "rcpt", d1_dest)
    for rcpt in ("alice@domain2.name", "bob@domain2.name", "mlist@example.org"):
        assert by[rcpt].delivered and by[rcpt].destination == d2_dest, by[rcpt]
    # boss@domain3.name is routed by its full address; dovecot has no "boss"
    assert by["boss@domain3.name"].code == 550 and by["boss@domain3.name"].destination == d2_dest
    r = by["nowhere@else.name"]
    # No route under a valid config is our failure: it defers (issue 10 item 20).
    assert (r.status, r.stage, r.destination, r.enhanced) == ("transient", "route", None, "4.4.4")
    assert "no route" in r.text
    r = by["x@closed.name"]
    assert (r.status, r.code, r.enhanced, r.text) == (
        "permanent", 550, "5.1.2", "no such domain here")

    # One transaction per back end: Dovecot gives every copy of one
    # transaction the same id (a second transaction would be "<id>:T2").
    ids = transaction_ids(d1, ("u1", "u2", "u3", "u4", "u5"))
    assert len(set(ids)) == 1 and b":T" not in ids[0]
    assert d1.messages("u6") == []
    ids2 = transaction_ids(d2, ("alice", "bob", "carol"))
    assert len(set(ids2)) == 1
    assert "saved mail to INBOX" in d1.log_text()
    # boss@domain3.name shared lmtp2's transaction: 2 transactions, 2 connections
    assert (stats.transactions, stats.connections_opened, stats.pools) == (2, 2, 2)


async def test_recipient_limit_splits_and_duplicates_go_once(smtp_sink) -> None:
    sink = smtp_sink(capture=True)
    rcpts = [f"r{i}@example.com" for i in range(5)]
    async with Agent.for_server(sink.destination, recipient_limit=2) as agent:
        results = await agent.deliver(MSG, sender="s@example.org",
                                      recipients=[*rcpts, "R0@example.com", rcpts[1]])
    assert all(r.delivered for r in results)
    assert [r.address for r in results] == [*rcpts, "R0@example.com", rcpts[1]]
    # 6 distinct addresses (rcpts[1] twice is sent once), 2 per transaction: 3 transactions
    from lmtpfast._testing.postfix import split_capture

    sent = [split_capture(d)[0]["X-Rcpt-Args"] for d in sink.captures()]
    assert sorted(len(s) for s in sent) == [2, 2, 2]
    assert sorted(a for s in sent for a in s) == sorted(
        f"<{a}>" for a in [*rcpts, "R0@example.com"])


# -- failures as data ----------------------------------------------------------------------

async def test_connect_failure_is_transient_per_recipient(tmp_path: Path) -> None:
    missing = f"unix:{tmp_path}/no-such-socket"
    async with Agent.for_server(missing, max_connections=3) as agent:
        batches = await asyncio.gather(*(
            agent.deliver(MSG, sender="s@example.org", recipients=["a@x.example", "b@x.example"])
            for _ in range(20)))
        # the first failures mark the destination down for connect_backoff:
        # the other callers get the same failure without trying again
        assert 1 <= agent.stats.connect_failures <= 3
    for results in batches:
        assert [r.status for r in results] == ["transient", "transient"]
        assert all(r.stage == "connect" and r.local and r.destination == missing
                   and r.enhanced == "4.4.1" for r in results)


async def test_unresponsive_backend_fails_fast_not_one_timeout_per_caller() -> None:
    from lmtpfast.server import FaultPlan, Sink

    async with Sink("127.0.0.1:0", faults=FaultPlan.parse(["greeting=stall"])) as sink:
        dest = sink.destinations[0]
        # The pools' clock stands still: the back-off never runs out during the test.
        agent = Agent.for_server(dest, max_connections=2, timeouts=Timeouts(greeting=0.3),
                                 clock=lambda: 1000.0)
        batches = await asyncio.gather(*(
            agent.deliver(MSG, sender="s@example.org", recipients=[f"a{i}@example.com"])
            for i in range(200)))
        await agent.close()
    assert all(b[0].transient and b[0].stage == "greeting" for b in batches), batches[0]
    # Without the back-off each caller would wait for its own connect (200
    # failures, 100 rounds of 0.3 s); with it the first two failures answer all.
    assert agent.stats.connect_failures == 2


async def test_local_errors_raise(smtp_sink) -> None:
    sink = smtp_sink()
    async with Agent.for_server(sink.destination) as agent:
        with pytest.raises(ContentError):
            await agent.deliver(b"a\0b", sender="s@example.org", recipients=["a@x.example"])
        with pytest.raises(LocalProtocolError):
            await agent.deliver(MSG, sender="bad sender", recipients=["a@x.example"])
        with pytest.raises(TypeError):
            await agent.deliver(MSG, sender="s@x.example", recipients="a@x.example")
        # a bad recipient is data, the others are delivered
        results = await agent.deliver(MSG, sender="s@x.example",
                                      recipients=["a@x.example", "b <b@x.example>"])
        assert [r.code for r in results] == [250, 501]
        assert results[1].stage == "local" and results[1].permanent
    with pytest.raises(RuntimeError, match="closed"):
        await agent.deliver(MSG, sender="s@x.example", recipients=["a@x.example"])


# -- the pool under load, restarts and dead connections ----------------------------------

async def test_concurrency_limit_holds_under_2000_deliveries() -> None:
    from lmtpfast.server import Sink

    limit = 7
    # The sink refuses (421) any connection beyond the limit: exceeding it would fail deliveries.
    async with Sink("127.0.0.1:0", max_connections=limit) as sink:
        dest = sink.destinations[0]
        async with Agent.for_server(dest, max_connections=limit) as agent:
            batches = await asyncio.gather(*(
                agent.deliver(MSG, sender=f"s{i}@example.org",
                              recipients=[f"a{i}@example.com", f"b{i}@example.com"])
                for i in range(2000)))
            stats = agent.stats
        assert all(r.delivered for batch in batches for r in batch)
        assert sink.stats.connections_peak <= limit
        assert sink.stats.connections_refused == 0
        assert sink.stats.transactions == 2000
        assert stats.transactions == 2000 and stats.peak_connections <= limit
        assert stats.connections_opened == limit  # every slot used, none wasted


async def test_pipelining_on_one_connection_at_the_limit(smtp_sink) -> None:
    sink = smtp_sink()
    async with Agent.for_server(sink.destination, max_connections=1, pipeline_depth=8) as agent:
        batches = await asyncio.gather(*(
            agent.deliver(MSG, sender="s@example.org", recipients=[f"a{i}@example.com"])
            for i in range(200)))
        assert agent.stats.connections_opened == 1
        assert agent.stats.peak_pipelined == 8
    assert all(b[0].delivered for b in batches)


async def test_refused_transaction_does_not_fail_the_next_pipelined_one(dovecot) -> None:
    # Dovecot offers CHUNKING. A transaction whose only recipient is refused
    # must not leave the server's MAIL open for the next caller's transaction
    # on the same connection ("503 5.5.0 MAIL already given" would bounce bob).
    async with Agent.for_server(dovecot.destination_unix, max_connections=1,
                                pipeline_depth=4) as agent:
        await agent.deliver(MSG, sender="s@example.org", recipients=["alice@example.com"])
        for _ in range(3):
            ghost, bob = await asyncio.gather(
                agent.deliver(MSG, sender="s@example.org", recipients=["ghost@example.com"]),
                agent.deliver(MSG, sender="s@example.org", recipients=["bob@example.com"]))
            assert ghost[0].code == 550 and ghost[0].stage == "rcpt"
            assert bob[0].delivered, bob[0]
    assert len(dovecot.messages("bob")) == 3


async def test_client_bdat_refused_then_pipelined_transaction(dovecot) -> None:
    from lmtpfast._session import connect

    async with await connect(dovecot.destination_unix) as conn:
        ghost, bob = await asyncio.gather(
            conn.send("s@example.org", ["ghost@example.com"], MSG),
            conn.send("s@example.org", ["bob@example.com"], MSG))
    assert ghost[0].code == 550
    assert bob[0].delivered, bob[0]  # was: 503 5.5.0 MAIL already given (fixed in 4e41e6c)


async def test_callers_queued_during_connect_pipeline_at_once(smtp_sink) -> None:
    # 16 callers, 2 connections being opened: the 14 that queue meanwhile must
    # fill both pipelines as soon as the connections are up, not trickle in
    # one per finished transaction.
    sink = smtp_sink()
    async with Agent.for_server(sink.destination, max_connections=2, pipeline_depth=8) as agent:
        batches = await asyncio.gather(*(
            agent.deliver(MSG, sender="s@example.org", recipients=[f"a{i}@example.com"])
            for i in range(16)))
        stats = agent.stats
    assert all(b[0].delivered for b in batches)
    assert (stats.connections_opened, stats.peak_pipelined) == (2, 8)


async def test_backend_restart_costs_no_failed_delivery(dovecot_factory) -> None:
    dv = dovecot_factory()
    async with Agent.for_server(dv.destination_unix, max_connections=4) as agent:
        first = await asyncio.gather(*(
            agent.deliver(MSG, sender="s@example.org", recipients=["alice@example.com"])
            for _ in range(4)))
        assert agent.stats.connections_opened == 4
        dv.stop()  # blocks the loop: it cannot see the closes before the next delivery
        dv.start()
        second = await asyncio.gather(*(
            agent.deliver(MSG, sender="s@example.org", recipients=["bob@example.com"])
            for _ in range(4)))
        stats = agent.stats
    assert all(b[0].delivered for b in first + second), second
    assert stats.connections_opened >= 5  # the dead ones were replaced
    assert stats.retries + stats.dead_idle >= 1
    assert len(dv.messages("bob")) == 4


@pytest.mark.parametrize("notice", ["loop-saw-it", "race"])
async def test_idle_connections_killed_by_server_are_replaced(dovecot_factory, notice) -> None:
    dv = dovecot_factory()
    async with Agent.for_server(dv.destination_unix, max_connections=3) as agent:
        await asyncio.gather(*(
            agent.deliver(MSG, sender="s@example.org", recipients=["alice@example.com"])
            for _ in range(3)))
        assert agent.stats.connections_opened == 3
        assert kill_workers(dv) >= 1  # the server side of every idle connection dies
        results = []
        if notice == "loop-saw-it":
            # The loop reads the EOFs: the pool sees dead connections.
            (pool,) = agent.pools().values()
            await asyncio.wait_for(asyncio.gather(*(
                h.client.wait_closed() for h in pool._idle)), 30)
        else:
            # The EOFs are pending but unread: awaited directly (no new task, so
            # no trip through the loop first), the delivery takes a connection
            # that still looks usable, and its transaction fails before any reply.
            results.append(await agent.deliver(MSG, sender="s@example.org",
                                               recipients=["carol@example.com"]))
        results += await asyncio.gather(*(
            agent.deliver(MSG, sender="s@example.org", recipients=["carol@example.com"])
            for _ in range(3 - len(results))))
        stats = agent.stats
    assert all(r[0].delivered for r in results), results
    assert len(dv.messages("carol")) == 3
    assert stats.connections_opened >= 4
    if notice == "loop-saw-it":
        assert stats.dead_idle >= 1
    else:
        # Client.alive() polls the socket before reuse and usually catches the
        # unread EOF (dead_idle); if not, the transaction fails before any
        # reply and is retried.
        assert stats.retries + stats.dead_idle >= 1


async def test_reuse_limits_and_probe(smtp_sink) -> None:
    sink = smtp_sink()
    async with Agent.for_server(sink.destination, max_transactions=2, probe="rset") as agent:
        for _ in range(5):
            r = await agent.deliver(MSG, sender="s@example.org", recipients=["a@example.com"])
            assert r[0].delivered
        stats = agent.stats
    assert stats.connections_opened == 3  # 2 + 2 + 1 transactions
    assert stats.connections_reused == 2
    clock = Clock()
    async with Agent.for_server(sink.destination, reuse_time_limit=60, clock=clock) as agent:
        await agent.deliver(MSG, sender="s@example.org", recipients=["a@example.com"])
        clock.now += 59
        await agent.deliver(MSG, sender="s@example.org", recipients=["a@example.com"])
        assert agent.stats.connections_opened == 1  # still young enough
        clock.now += 1
        await agent.deliver(MSG, sender="s@example.org", recipients=["a@example.com"])
        assert agent.stats.connections_opened == 2


async def test_idle_connections_close_after_idle_timeout(smtp_sink) -> None:
    sink = smtp_sink()
    clock = Clock()
    async with Agent.for_server(sink.destination, idle_timeout=10, clock=clock) as agent:
        await asyncio.gather(*(
            agent.deliver(MSG, sender="s@example.org", recipients=["a@example.com"])
            for _ in range(3)))
        (pool,) = agent.pools().values()
        assert pool.idle_connections == 3
        clock.now += 9.9
        assert pool.sweep() == 0  # what the idle timer does when it fires
        clock.now += 0.1
        assert pool.sweep() == 3
        assert pool.idle_connections == 0 and agent.stats.connections_closed == 3
        await asyncio.gather(*pool._closing_tasks)
        assert pool.size == 0


async def test_close_waits_for_deliveries_in_flight(smtp_sink) -> None:
    sink = smtp_sink("-w", "1")  # the DATA reply comes after one second
    agent = Agent.for_server(sink.destination)
    await agent.deliver(MSG, sender="s@example.org", recipients=["a@example.com"])  # warm
    task = asyncio.ensure_future(
        agent.deliver(MSG, sender="s@example.org", recipients=["a@example.com"]))
    (pool,) = agent.pools().values()
    await until(lambda: pool.idle_connections == 0)  # the idle connection carries it now
    await agent.close()
    # close() waited for it: had it cut the delivery off, it would be transient.
    assert task.done() and task.result()[0].delivered


async def test_close_deadline_cuts_off(smtp_sink) -> None:
    sink = smtp_sink("-w", "30")
    agent = Agent.for_server(sink.destination, max_connections=1, pipeline_depth=1)
    tasks = [asyncio.ensure_future(
        agent.deliver(MSG, sender="s@example.org", recipients=[f"a{i}@example.com"]))
        for i in range(3)]  # one on the connection, two waiting for it
    await until(lambda: bool(agent.pools()))
    (pool,) = agent.pools().values()
    await until(lambda: pool.stats.connections_opened == 1 and len(pool._waiters) == 2)
    await agent.close(timeout=0.3)
    results = [t.result()[0] for t in tasks]
    assert all(r.transient and r.local for r in results), results


async def test_cancelled_delivery_never_returns_its_connection(smtp_sink) -> None:
    sink = smtp_sink("-w", "30")
    fast = smtp_sink()
    agent = Agent(transports={"slow": Transport(destination=sink.destination),
                              "fast": Transport(destination=fast.destination)},
                  transport_map={"slow.example": "slow:", "fast.example": "fast:"})
    async with agent:
        task = asyncio.ensure_future(
            agent.deliver(MSG, sender="s@example.org",
                          recipients=["a@slow.example", "b@fast.example"]))
        pools = agent.pools
        await until(lambda: len(pools()) == 2 and all(
            p.stats.connections_opened == 1 for p in pools().values()))
        # Connected, so the transaction went out in the same step (its DATA waits 30 s).
        slow_pool = next(p for (name, _), p in pools().items() if name == "slow")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # Its connection was dropped, not given back.
        assert slow_pool.idle_connections == 0 and slow_pool.stats.connections_closed == 1


async def test_timeouts_reach_the_connection(smtp_sink) -> None:
    # smtp-sink -w delays the DATA reply (-W rcpt:N would answer DATA before
    # the delayed RCPT, out of order); its earlier replies may wait with it.
    sink = smtp_sink("-w", "30")
    agent = Agent.for_server(sink.destination, timeouts=Timeouts(mail=0.3, rcpt=0.3, data=0.3),
                             pool=PoolSettings(max_connections=2))
    async with agent:
        results = await agent.deliver(MSG, sender="s@example.org", recipients=["a@example.com"])
        assert agent.stats.connections_closed == 1  # a timed-out connection is not kept
    assert results[0].transient and "timed out" in results[0].text
