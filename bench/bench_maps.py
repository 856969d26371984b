"""Map lookup speed: cached lookups; uncached pgsql lookups batched vs one query per key vs
postmap.

    python bench/bench_maps.py [--keys N] [--runs R] [--loop uvloop|asyncio]

Starts a private PostgreSQL (lmtpfast._testing.postgres) with a table of N
addresses and a Postfix ``pgsql:`` .cf file for it, then measures, in one run:

* cached: ``CachedMap.lookup_cached`` (the router's synchronous fast path) and
  ``lookup_many`` on a warm cache (keys/s, one process);
* routing from a warm cache: ``Router.route_cached`` with a pgsql transport map;
* uncached pgsql, batched (a 1,000-recipient message = 1,000 keys per
  ``lookup_many``; lmtpfast's ``unnest .. LATERAL`` statement, 500 keys each),
  and one query per key (``lmtpfast_batch = no``, 4 pooled connections);
* Postfix's ``postmap -q - pgsql:FILE`` over the same keys (one query per key,
  one connection): the peer, measured in the same run.

Figures are medians of R runs; ratios are against postmap.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lmtpfast import CacheSettings, Router, loop_factory, open_map  # noqa: E402
from lmtpfast._testing.postgres import TempPostgres  # noqa: E402


def _run(coro, loop: str):  # type: ignore[no-untyped-def]
    factory = loop_factory() if loop == "uvloop" else None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(coro)


async def cached(cf: str, keys: list[str]) -> tuple[float, float, float]:
    m = open_map(f"pgsql:{cf}", cache=CacheSettings(size=len(keys) * 2))
    await m.lookup_many(keys)  # warm
    n = 0
    get = m.lookup_cached
    start = time.perf_counter()
    for _ in range(5):
        for k in keys:
            get(k)
            n += 1
    sync_rate = n / (time.perf_counter() - start)
    start = time.perf_counter()
    for i in range(0, len(keys), 1000):
        await m.lookup_many(keys[i : i + 1000])
    async_rate = len(keys) / (time.perf_counter() - start)
    router = Router(transport_maps=[m], destinations={"lmtp": None})
    route = router.route_cached
    assert route(keys[0]) is not None
    start = time.perf_counter()
    for k in keys:
        route(k)
    route_rate = len(keys) / (time.perf_counter() - start)
    await m.aclose()
    return sync_rate, async_rate, route_rate


async def uncached(cf: str, keys: list[str], batch: int) -> float:
    m = open_map(f"pgsql:{cf}", cache=None)
    await m.lookup_many(keys[:10])  # connect
    start = time.perf_counter()
    for i in range(0, len(keys), batch):
        got = await m.lookup_many(keys[i : i + batch])
        assert all(isinstance(v, list) for v in got.values())
    rate = len(keys) / (time.perf_counter() - start)
    await m.aclose()
    return rate


def postmap(cf: str, keys: list[str]) -> float:
    data = "\n".join(keys) + "\n"
    start = time.perf_counter()
    p = subprocess.run(["postmap", "-q", "-", f"pgsql:{cf}"], input=data, capture_output=True,
                       text=True, check=True)
    rate = len(keys) / (time.perf_counter() - start)
    assert p.stdout.count("\n") == len(keys), p.stderr[-500:]
    return rate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--keys", type=int, default=20_000)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lmtpfast-bench-maps-"))
    keys = [f"user{i}@example.com" for i in range(args.keys)]
    with TempPostgres() as pg:
        pg.create_user("bench", "bench-pw")
        pg.create_database("maps", owner="bench")
        pg.psql("CREATE TABLE transport (k text PRIMARY KEY, v text);"
                f"INSERT INTO transport SELECT 'user' || g || '@example.com', "
                f"'lmtp:inet:10.0.' || (g % 250) || '.1:24' FROM generate_series(0, "
                f"{args.keys - 1}) g; ALTER TABLE transport OWNER TO bench; ANALYZE transport;",
                database="maps")
        head = (f"hosts = inet:127.0.0.1:{pg.port}\nuser = bench\npassword = bench-pw\n"
                "dbname = maps\nquery = SELECT v FROM transport WHERE k='%s'\n")
        cf = work / "transport.cf"
        cf.write_text(head)
        cf_each = work / "each.cf"
        cf_each.write_text(head + "lmtpfast_batch = no\n")
        print(f"{args.keys} keys, local PostgreSQL 15 over TCP 127.0.0.1, loop {args.loop}, "
              f"median of {args.runs} runs\n")
        rows: dict[str, list[float]] = {}
        for _ in range(args.runs):
            s, a, r = _run(cached(str(cf), keys), args.loop)
            rows.setdefault("cached: lookup_cached (sync fast path)", []).append(s)
            rows.setdefault("cached: lookup_many, 1,000 keys per call", []).append(a)
            rows.setdefault("cached: Router.route_cached (pgsql transport map)", []).append(r)
            rows.setdefault("uncached pgsql, batched (1,000 keys per call)", []).append(
                _run(uncached(str(cf), keys, 1000), args.loop))
            rows.setdefault("uncached pgsql, one query per key (4 connections)", []).append(
                _run(uncached(str(cf_each), keys, 1000), args.loop))
            if shutil.which("postmap"):
                rows.setdefault("postmap -q - (Postfix 3.7, one query per key)", []).append(
                    postmap(str(cf), keys))
        base = statistics.median(rows.get("postmap -q - (Postfix 3.7, one query per key)", [0]))
        print(f"{'what':<52} {'keys/s':>12} {'vs postmap':>10}")
        for name, values in rows.items():
            med = statistics.median(values)
            ratio = f"{med / base:>9.1f}x" if base else ""
            print(f"{name:<52} {med:>12,.0f} {ratio}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
