"""What the shared shaping limits cost per transaction (issue 15 item 6).

One private PostgreSQL (TempPostgres, same machine, fsync off, TCP on
127.0.0.1). Each transaction takes a slot of a shared concurrency limit
(``lmtpfast.acquire_slot``: one round trip) and gives it back (batched
releases: one statement per batch). Measured: wall-clock µs per
acquire+release, one after the other (the latency a transaction pays) and
with 64 in flight from 2 workers (the throughput: releases then batch),
with a limit that is often full (waiters poll) and one that never is.
Prints medians of ``--runs`` runs.

    PYTHONPATH=$PWD python3 bench/bench_pgshape.py [--n 2000] [--runs 5]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from lmtpfast._testing.postgres import TempPostgres
from lmtpfast.spool._pgqueue import PgQueue, PgShapingState


async def _sequential(state: PgShapingState, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        got = await state.acquire_slot("lmtp:unix:/bench", 100, -1.0)
        assert got is not None
        state.release_slot("lmtp:unix:/bench", got[0], 0.0)
        assert state._releaser is not None
        await state._releaser
    return (time.perf_counter() - t0) / n * 1e6


async def _concurrent(states: list[PgShapingState], n: int, inflight: int, limit: int
                      ) -> float:
    left = [n]

    async def one(state: PgShapingState) -> None:
        while left[0] > 0:
            left[0] -= 1
            got = None
            for _ in range(10_000):  # bounded: a full limit frees up within milliseconds
                got = await state.acquire_slot("lmtp:unix:/bench2", limit, -1.0)
                if got is not None:
                    break
                await asyncio.sleep(0.001)
            assert got is not None
            state.release_slot("lmtp:unix:/bench2", got[0], 0.0)

    t0 = time.perf_counter()
    await asyncio.gather(*(one(states[i % 2]) for i in range(inflight)))
    for st in states:
        if st._releaser is not None:
            await st._releaser
    return (time.perf_counter() - t0) / n * 1e6


async def main(dsn: str, n: int, runs: int) -> None:
    qa = PgQueue(dsn, create=True, pool_size=32, worker="a")
    qb = PgQueue(dsn, pool_size=32, worker="b")
    await qa.status()
    a, b = PgShapingState(qa), PgShapingState(qb)
    seq = [await _sequential(a, n) for _ in range(runs)]
    conc = [await _concurrent([a, b], n, 64, 64) for _ in range(runs)]
    free = [await _concurrent([a, b], n, 64, 1000) for _ in range(runs)]
    await a.close()
    await b.close()
    await qa.close()
    await qb.close()
    print(f"one at a time: {statistics.median(seq):.0f} us per acquire+release "
          f"(runs: {', '.join(f'{x:.0f}' for x in seq)})")
    for what, xs in (("limit 64 (often full: polls)", conc), ("limit 1000 (never full)", free)):
        print(f"64 in flight, 2 workers, {what}: {statistics.median(xs):.0f} us per "
              f"transaction (runs: {', '.join(f'{x:.0f}' for x in xs)})")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    with TempPostgres() as pg:
        asyncio.run(main(pg.dsn, args.n, args.runs))
