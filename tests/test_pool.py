"""The pool on its own: reuse order, waiters, cancellation, probes, closing, loop ownership.

Against the lmtpfast sink in the test's own loop (fault injection where
needed); the agent-level and real-server tests are in test_agent.py.
"""

from __future__ import annotations

import asyncio

import pytest

from lmtpfast import Pool, PoolClosed, PoolSettings
from lmtpfast.server import FaultPlan, Sink

MSG = b"Subject: pool\r\n\r\nbody\r\n"


async def test_lifo_reuse_and_borrowing() -> None:
    async with (Sink("127.0.0.1:0") as sink,
                Pool(sink.destinations[0], PoolSettings(max_connections=3)) as pool):
        async with pool.connection() as a:
            async with pool.connection() as b:
                assert a is not b
            assert pool.idle_connections == 1  # b is back, a is still out
        # a went back last: it is reused first (the warmest connection)
        async with pool.connection() as c:
            assert c is a
            assert (await c.noop()).code == 250
        assert pool.idle_connections == 2
        with pytest.raises(RuntimeError):
            async with pool.connection():
                raise RuntimeError("the borrower failed")
        # a connection whose borrower raised is not reused
        assert pool.idle_connections == 1 and pool.stats.connections_closed == 1
        results = await pool.deliver("s@example.org", ["a@example.com"], MSG)
        assert results[0].delivered and results[0].destination == sink.destinations[0]


async def test_cancelled_waiter_does_not_leak_its_turn() -> None:
    async with Sink("127.0.0.1:0") as sink:
        pool = Pool(sink.destinations[0], PoolSettings(max_connections=1, pipeline_depth=1))
        async with pool.connection():
            waiter = asyncio.ensure_future(pool.deliver("s@example.org", ["a@example.com"], MSG))
            second = asyncio.ensure_future(pool.deliver("s@example.org", ["b@example.com"], MSG))
            await asyncio.sleep(0.05)
            waiter.cancel()
            await asyncio.sleep(0)
        # the freed connection skips the cancelled waiter and serves the next one
        assert (await asyncio.wait_for(second, 5))[0].delivered
        assert waiter.cancelled()
        assert pool.size == 1 and pool.stats.connections_opened == 1
        await pool.close()
        assert pool.size == 0


async def test_probe_replaces_a_connection_that_fails_it() -> None:
    plan = FaultPlan.parse(["noop=disconnect"])
    async with Sink("127.0.0.1:0", faults=plan) as sink:
        async with Pool(sink.destinations[0], PoolSettings(probe="noop")) as pool:
            first = await pool.deliver("s@example.org", ["a@example.com"], MSG)
            second = await pool.deliver("s@example.org", ["b@example.com"], MSG)
            stats = pool.stats
        assert first[0].delivered and second[0].delivered
        assert (stats.connections_opened, stats.dead_idle) == (2, 1)


async def test_closed_pool_refuses_and_belongs_to_one_loop() -> None:
    async with Sink("127.0.0.1:0") as sink:
        pool = Pool(sink.destinations[0])
        await pool.deliver("s@example.org", ["a@example.com"], MSG)
        await pool.close()
        assert pool.closed and pool.stats.connections_closed == 1
        with pytest.raises(PoolClosed):
            await pool.deliver("s@example.org", ["a@example.com"], MSG)

    other = Pool("127.0.0.1:1")
    await other.close()  # never used: nothing to do

    used = Pool("unix:/nonexistent/lmtp")
    await used.deliver("s@example.org", ["a@example.com"], MSG)  # binds this loop
    result: list[BaseException] = []

    def elsewhere() -> None:
        try:
            asyncio.run(used.deliver("s@example.org", ["a@example.com"], MSG))
        except BaseException as exc:
            result.append(exc)

    await asyncio.get_running_loop().run_in_executor(None, elsewhere)
    assert isinstance(result[0], RuntimeError)


async def test_retired_connections_free_their_slot_only_when_closed() -> None:
    async with Sink("127.0.0.1:0") as sink:
        settings = PoolSettings(max_connections=2, max_transactions=1)
        async with Pool(sink.destinations[0], settings) as pool:
            batches = await asyncio.gather(*(
                pool.deliver("s@example.org", [f"a{i}@example.com"], MSG) for i in range(20)))
            assert all(b[0].delivered for b in batches)
            # one transaction per connection: 20 connections, never more than 2 at once
            assert pool.stats.connections_opened == 20
        assert sink.stats.connections_peak <= 2
        assert pool.stats.peak_connections <= 2
