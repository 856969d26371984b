"""The pool on its own: reuse order, waiters, cancellation, probes, expiry, closing, loop ownership.

Against the lmtpfast sink in the test's own loop (fault injection where
needed), on both engines; time is an injected clock wherever it matters. The
agent-level and real-server tests are in test_agent.py.
"""

from __future__ import annotations

import asyncio

import pytest

from lmtpfast import ConnectError, Delivery, Pool, PoolClosed, PoolSettings
from lmtpfast.server import FaultPlan, Sink

MSG = b"Subject: pool\r\n\r\nbody\r\n"


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def delivery(rcpt: str = "a@example.com") -> Delivery:
    return Delivery.build(MSG, sender="s@example.org", recipients=[rcpt])


async def send(pool: Pool, rcpt: str = "a@example.com") -> bool:
    async with pool.acquire() as conn:
        (r,) = await conn.send(delivery(rcpt))
    return r.delivered


async def test_lifo_reuse_and_borrowing(engine: str) -> None:
    async with (Sink("127.0.0.1:0") as sink,
                Pool(sink.destinations[0], PoolSettings(max_connections=3),
                     engine=engine) as pool):
        async with pool.acquire() as a:
            assert a.engine.name == engine
            async with pool.connection() as b:  # the old name still works
                assert a is not b
            assert pool.idle_connections == 1  # b is back, a is still out
        # a went back last: it is reused first (the warmest connection)
        async with pool.acquire() as c:
            assert c is a
            assert (await c.noop()).code == 250
        assert pool.idle_connections == 2
        with pytest.raises(RuntimeError):
            async with pool.acquire():
                raise RuntimeError("the borrower failed")
        # a connection whose borrower raised is not reused
        assert pool.idle_connections == 1 and pool.stats.connections_closed == 1
        # await + release works as async with does
        conn = await pool.acquire()
        (r,) = await conn.send(delivery())
        pool.release(conn)
        assert r.delivered and pool.stats.transactions == 1
        with pytest.raises(ValueError):
            pool.release(conn)  # not out: it is idle again


async def test_cancelled_waiter_does_not_leak_its_turn(engine: str) -> None:
    async with Sink("127.0.0.1:0") as sink:
        pool = Pool(sink.destinations[0], PoolSettings(max_connections=1, pipeline_depth=1),
                    engine=engine)
        async with pool.acquire():
            waiter = asyncio.ensure_future(send(pool, "a@example.com"))
            second = asyncio.ensure_future(send(pool, "b@example.com"))
            while len(pool._waiters) < 2:  # both queued for the one connection
                await asyncio.sleep(0)
            waiter.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiter
        # the freed connection skips the cancelled waiter and serves the next one
        assert await asyncio.wait_for(second, 5)
        assert pool.size == 1 and pool.stats.connections_opened == 1
        await pool.close()
        assert pool.size == 0


async def test_probe_replaces_a_connection_that_fails_it(engine: str) -> None:
    plan = FaultPlan.parse(["noop=disconnect"])
    async with Sink("127.0.0.1:0", faults=plan) as sink:
        async with Pool(sink.destinations[0], PoolSettings(probe="noop"), engine=engine) as pool:
            first = await send(pool, "a@example.com")
            second = await send(pool, "b@example.com")
            stats = pool.stats
        assert first and second
        assert (stats.connections_opened, stats.dead_idle) == (2, 1)


async def test_closed_pool_refuses_and_belongs_to_one_loop() -> None:
    async with Sink("127.0.0.1:0") as sink:
        pool = Pool(sink.destinations[0])
        assert await send(pool)
        await pool.close()
        assert pool.closed and pool.stats.connections_closed == 1
        with pytest.raises(PoolClosed):
            await pool.acquire()
        assert pool.acquire_nowait() is None

    other = Pool("127.0.0.1:1")
    await other.close()  # never used: nothing to do

    used = Pool("unix:/nonexistent/lmtp")
    with pytest.raises(ConnectError):
        await pool_acquire(used)  # binds this loop
    result: list[BaseException] = []

    def elsewhere() -> None:
        try:
            asyncio.run(pool_acquire(used))
        except BaseException as exc:
            result.append(exc)

    await asyncio.get_running_loop().run_in_executor(None, elsewhere)
    assert isinstance(result[0], RuntimeError)


async def pool_acquire(pool: Pool) -> None:
    conn = await pool.acquire()
    pool.release(conn)


async def test_retired_connections_free_their_slot_only_when_closed(engine: str) -> None:
    async with Sink("127.0.0.1:0") as sink:
        settings = PoolSettings(max_connections=2, max_transactions=1)
        async with Pool(sink.destinations[0], settings, engine=engine) as pool:
            batches = await asyncio.gather(*(send(pool, f"a{i}@example.com") for i in range(20)))
            assert all(batches)
            # one transaction per connection: 20 connections, never more than 2 at once
            assert pool.stats.connections_opened == 20
        assert sink.stats.connections_peak <= 2
        assert pool.stats.peak_connections <= 2


async def test_idle_timeout_and_reuse_time_limit_on_an_injected_clock(engine: str) -> None:
    clock = Clock()
    async with Sink("127.0.0.1:0") as sink:
        settings = PoolSettings(idle_timeout=10, reuse_time_limit=100)
        async with Pool(sink.destinations[0], settings, engine=engine, clock=clock) as pool:
            a, b = await pool.acquire(), await pool.acquire()
            pool.release(a)
            clock.now += 5
            pool.release(b)
            assert pool.sweep() == 0 and pool.idle_connections == 2
            clock.now += 5  # a has been idle for 10 s, b for 5 s
            assert pool.sweep() == 1 and pool.idle_connections == 1
            c = await pool.acquire()
            assert c is b
            clock.now += 95  # b opened 105 s ago: past reuse_time_limit
            pool.release(c)
            assert pool.idle_connections == 0  # not kept
            assert pool.stats.connections_closed == 2
            d = await pool.acquire()
            assert d is not b and pool.stats.connections_opened == 3
            pool.release(d)


async def test_expire_connections_retires_every_open_one(engine: str) -> None:
    async with Sink("127.0.0.1:0") as sink, Pool(sink.destinations[0], engine=engine) as pool:
        busy = await pool.acquire()
        idle = await pool.acquire()
        pool.release(idle)
        pool.expire_connections()
        assert pool.idle_connections == 0  # the idle one is closed at once
        fresh = await pool.acquire()
        assert fresh is not busy and fresh is not idle
        pool.release(busy)  # closed when it comes back, not kept
        pool.release(fresh)
        assert pool.idle_connections == 1
        assert pool.stats.connections_opened == 3 and pool.stats.connections_closed == 2


async def test_connect_backoff_on_an_injected_clock() -> None:
    clock = Clock()
    pool = Pool("unix:/nonexistent/lmtp", PoolSettings(connect_backoff=30), clock=clock)
    for _ in range(3):
        with pytest.raises(ConnectError):
            await pool.acquire()
    assert pool.stats.connect_failures == 1  # the others got the failure at once
    clock.now += 31
    with pytest.raises(ConnectError):
        await pool.acquire()
    assert pool.stats.connect_failures == 2
    await pool.close()


async def test_pipelines_only_at_the_connection_limit(engine: str) -> None:
    async with Sink("127.0.0.1:0") as sink:
        settings = PoolSettings(max_connections=2, pipeline_depth=3)
        async with Pool(sink.destinations[0], settings, engine=engine) as pool:
            held = [await pool.acquire() for _ in range(6)]
            assert len({id(c) for c in held}) == 2  # two connections, three callers each
            assert pool.stats.peak_pipelined == 3
            assert pool.acquire_nowait() is None  # full: the next caller would wait
            results = await asyncio.gather(*(c.send(delivery(f"r{i}@example.com"))
                                             for i, c in enumerate(held)))
            for c in held:
                pool.release(c)
            assert all(r[0].delivered for r in results)
            assert pool.stats.transactions == 6
