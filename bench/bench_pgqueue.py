"""The PostgreSQL queue beside a bare SKIP LOCKED loop, pgqueuer, and the spool backends.

    python bench/bench_pgqueue.py                                  # everything, 1/2/4 workers
    python bench/bench_pgqueue.py --messages 50000 --workers 1,2,4 --only replay-pg,bare

Every mode drains N queued 1 KiB, one-recipient messages with W worker
processes on one private PostgreSQL (TempPostgres, same machine; fsync off
unless --fsync) and prints messages/s, the median of --runs runs:

* ``bare``: the ceiling: a table of (id, payload) and, per worker, nothing
  but ``UPDATE ... WHERE id IN (SELECT ... FOR UPDATE SKIP LOCKED LIMIT n)
  RETURNING`` then ``DELETE ... WHERE id = ANY(...)`` (our own loop);
* ``pgqueuer``: the pgqueuer library (when installed) with a job function
  that does nothing: the claim/complete cost of a published SKIP LOCKED
  job queue;
* ``core``: :class:`PgQueue` claim + record(done), no delivery: our schema's
  cost per message;
* ``replay-pg``: ``lmtpfast replay --queue postgresql://...`` workers
  delivering into ``smtp-sink -L`` (end to end, the issue's figure);
* ``replay-sqlite`` / ``replay-dir``: the embedded store and the directory
  spool of one host, the same messages into the same sink, W replays.

The wall-clock time runs from the moment every worker is connected (a byte
on its stdin) to the last worker's exit; queue filling is not counted.
CPU seconds per 1,000 messages are split between PostgreSQL (the
postmaster's children, reaped) and the workers (``wait4``), to show where
it saturates on a 2-core machine.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BODY = b"From: bench@example.org\r\nSubject: bench\r\n\r\n" + b"x" * (1024 - 48) + b"\r\n"
BATCH = 256


# -- workers (run as child processes: ``bench_pgqueue.py --worker MODE DSN``) ----------


async def _bare_worker(dsn: str) -> int:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    _ready()
    n = 0
    while True:
        rows = await conn.fetch(
            "UPDATE bare_job SET locked_at = now() WHERE id IN (SELECT id FROM bare_job "
            "WHERE locked_at IS NULL ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED) "
            "RETURNING id, payload", BATCH)
        if not rows:
            break
        await conn.execute("DELETE FROM bare_job WHERE id = ANY($1::bigint[])",
                           [r[0] for r in rows])
        n += len(rows)
    await conn.close()
    return n


async def _core_worker(dsn: str) -> int:
    from lmtpfast.spool._pgqueue import PgQueue
    from lmtpfast.spool._queue import Update

    n = 0
    async with PgQueue(dsn) as q:
        await q.status()  # connected
        _ready()
        due = time.time() + 1
        while True:
            batch = await q.claim(BATCH, due=due)
            await q.record([Update(e, "done") for e in batch.entries])
            n += len(batch.entries)
            if batch.exhausted:
                break
    return n


async def _pgqueuer_worker(dsn: str, total: int) -> int:
    import asyncpg
    from pgqueuer import QueueManager
    from pgqueuer.db import AsyncpgDriver
    from pgqueuer.queries import Queries
    from pgqueuer.types import QueueExecutionMode

    conn = await asyncpg.connect(dsn)
    qm = QueueManager(Queries(AsyncpgDriver(conn)))
    done = 0

    @qm.entrypoint("bench")
    async def job(_: Any) -> None:
        nonlocal done
        done += 1

    _ready()
    # drain: returns once the queue is empty and the jobs in hand are finished.
    await qm.run(batch_size=BATCH, mode=QueueExecutionMode.drain)
    await conn.close()
    return done


def _ready() -> None:
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    sys.stdin.read(1)  # the go signal


def worker_main(mode: str, dsn: str, total: int) -> None:
    if mode == "bare":
        n = asyncio.run(_bare_worker(dsn))
    elif mode == "core":
        n = asyncio.run(_core_worker(dsn))
    elif mode == "pgqueuer":
        n = asyncio.run(_pgqueuer_worker(dsn, total))
    else:
        raise SystemExit(f"unknown worker mode {mode}")
    print(f"done {n}", flush=True)


# -- filling -----------------------------------------------------------------------------


async def fill(mode: str, dsn: str, n: int, spool: Path | None) -> None:
    import asyncpg

    if mode == "bare":
        conn = await asyncpg.connect(dsn)
        await conn.execute("DROP TABLE IF EXISTS bare_job; CREATE TABLE bare_job "
                           "(id bigserial PRIMARY KEY, locked_at timestamptz, payload bytea)")
        await conn.copy_records_to_table("bare_job", records=[(BODY,)] * n,
                                         columns=["payload"])
        await conn.execute("VACUUM ANALYZE bare_job")
        await conn.close()
    elif mode == "pgqueuer":
        from pgqueuer.db import AsyncpgDriver
        from pgqueuer.queries import Queries

        conn = await asyncpg.connect(dsn)
        q = Queries(AsyncpgDriver(conn))
        if not await conn.fetchval("SELECT to_regclass('pgqueuer') IS NOT NULL"):
            await q.install()
        for start in range(0, n, 5000):
            k = min(5000, n - start)
            await q.enqueue(["bench"] * k, [BODY] * k, [0] * k)
        await conn.execute("VACUUM ANALYZE pgqueuer")
        await conn.close()
    elif mode in ("core", "replay-pg"):
        from lmtpfast.spool import new_envelope
        from lmtpfast.spool._pgqueue import PgQueue
        from lmtpfast.spool._queue import NewMessage

        async with PgQueue(dsn, create=True) as q:
            await q.delete(__import__("lmtpfast.spool._queue", fromlist=["ALL"]).Selection(
                states=("queued", "held", "failed", "quarantined")))
            env = new_envelope("bench@example.org", ["user@example.com"], arrival=time.time())
            for start in range(0, n, 1000):
                k = min(1000, n - start)
                await q.enqueue_many([NewMessage(env, BODY) for _ in range(k)], durable=False)
        conn = await asyncpg.connect(dsn)
        await conn.execute("VACUUM ANALYZE lmtpfast.msg, lmtpfast.rcpt, lmtpfast.body")
        await conn.close()
    else:
        assert spool is not None
        from lmtpfast.spool import new_envelope
        from lmtpfast.spool._queue import NewMessage

        if mode == "replay-dir":
            from lmtpfast.spool import Spool

            sp = Spool(spool, create=True)
            for _ in range(n):
                sp.enqueue(BODY, "bench@example.org", ["user@example.com"], fsync=False)
            sp.sync()
        else:
            from lmtpfast.spool._sqlite import SQLiteStore

            env = new_envelope("bench@example.org", ["user@example.com"])
            with SQLiteStore(spool, create=True) as st:
                for start in range(0, n, 1000):
                    k = min(1000, n - start)
                    st.enqueue_many([NewMessage(env, BODY) for _ in range(k)], durable=False)


# -- measuring ---------------------------------------------------------------------------


def _pg_cpu(pid: int) -> float:
    """CPU seconds of the postmaster and every child it reaped or still runs."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    total += sum(int(x) for x in fields[11:15]) / tick
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        try:
            with open(f"/proc/{child}/stat") as f:
                cf = f.read().rsplit(")", 1)[1].split()
            total += sum(int(x) for x in cf[11:13]) / tick
        except OSError:
            pass
    return total


async def _left(where: str) -> int:
    from lmtpfast.spool import open_queue

    async with open_queue(where) as q:
        st = await q.status()
        return st.queued + st.held + st.failed + st.quarantined


async def _act(where: str, action: str) -> int:
    from lmtpfast.spool import Selection, open_queue

    async with open_queue(where) as q:
        state = "queued" if action == "hold" else "held"
        res = await getattr(q, action)(Selection(states=(state,)))
        return len(res.done)


def _proc_cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:13]) / os.sysconf("SC_CLK_TCK")


def _busy(mode: str, where: str, pg_unix: str) -> bool:
    """Anything left? For PostgreSQL one psql over the unix socket (no TCP log-in, no
    count of the whole table): the poll must not cost the queue what it measures."""
    if mode != "replay-pg":
        return bool(asyncio.run(_left(where)))
    out = subprocess.run(["/usr/lib/postgresql/15/bin/psql", "-XAtq", pg_unix, "-c",
                          "SELECT EXISTS (SELECT 1 FROM lmtpfast.msg)"],
                         capture_output=True, text=True, check=True, timeout=60).stdout
    return out.strip() == "t"


def run_replay(mode: str, workers: int, where: str, n: int, pg_pid: int, sink: str,
               pg_unix: str) -> tuple[float, float, float]:
    """Replays in --watch mode wait on a held queue; the clock starts at the release.

    So process start-up and queue filling are outside the measured time, as
    for the gated modes (the release is inside: one statement per 500 entries,
    one rename per entry for the directory spool); the end is the first poll
    (every 0.2 s) that finds the queue empty.
    """
    asyncio.run(_act(where, "hold"))
    cmd = [sys.executable, "-m", "lmtpfast", "replay", where, "--server", sink, "--watch",
           "--interval", "0.02", "-q", "--concurrency", "256", "--connections", "8"]
    procs = [subprocess.Popen(cmd, stdin=subprocess.DEVNULL) for _ in range(workers)]
    try:
        time.sleep(3.0)  # start-up (a bench pause, not a synchronisation in a test)
        cpu0 = [_proc_cpu(p.pid) for p in procs]
        pg0 = _pg_cpu(pg_pid)
        start = time.perf_counter()
        asyncio.run(_act(where, "release"))
        deadline = time.monotonic() + 600
        while _busy(mode, where, pg_unix):
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                raise SystemExit(f"{mode}: the queue did not drain")
            time.sleep(0.2)  # a cheap poll: it costs the queue too
        elapsed = time.perf_counter() - start
        worker_cpu = sum(_proc_cpu(p.pid) - c for p, c in zip(procs, cpu0, strict=True))
        pg_cpu = _pg_cpu(pg_pid) - pg0
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(60)
    return elapsed, pg_cpu, worker_cpu


def run_once(mode: str, workers: int, dsn: str, n: int, pg_pid: int, sink: str,
             spool: Path | None, unix: str = "") -> tuple[float, float, float]:
    """(seconds, PostgreSQL CPU s, worker CPU s) for draining n messages."""
    asyncio.run(fill(mode, dsn, n, spool))
    if mode.startswith("replay-"):
        where = dsn if mode == "replay-pg" else (
            f"dir:{spool}" if mode == "replay-dir" else str(spool))
        return run_replay(mode, workers, where, n, pg_pid, sink, unix)
    env = {**os.environ}
    cmds = []
    where = dsn if mode == "replay-pg" else (
        f"dir:{spool}" if mode == "replay-dir" else str(spool))
    for _ in range(workers):
        if mode in ("bare", "core", "pgqueuer"):
            cmds.append([sys.executable, __file__, "--worker", mode, dsn, str(n)])
        else:
            cmds.append([sys.executable, "-m", "lmtpfast", "replay", where, "--server", sink,
                         "--once", "-q", "--concurrency", "256", "--connections", "8"])
    procs = [subprocess.Popen(c, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
             for c in cmds]
    gated = mode in ("bare", "core", "pgqueuer")
    if gated:
        for p in procs:
            assert p.stdout is not None
            line = p.stdout.readline()
            if line.strip() != b"ready":
                raise SystemExit(f"worker did not start: {line!r}")
    cpu0 = _pg_cpu(pg_pid)
    start = time.perf_counter()
    for p in procs:
        assert p.stdin is not None
        if gated:
            p.stdin.write(b"g")
        p.stdin.close()
    worker_cpu = 0.0
    for p in procs:
        _, status, usage = os.wait4(p.pid, 0)
        worker_cpu += usage.ru_utime + usage.ru_stime
        code = os.waitstatus_to_exitcode(status)
        # 75 from a replay: another worker still held entries when its pass ended.
        if code != 0 and not (code == 75 and not gated):
            raise SystemExit(f"{mode}: a worker failed ({code})")
    elapsed = time.perf_counter() - start
    if not gated:
        left = asyncio.run(_left(where))
        if left:
            raise SystemExit(f"{mode}: {left} messages left queued after the workers ended")
    time.sleep(0.2)  # let the postmaster reap the backends (bench only)
    return elapsed, _pg_cpu(pg_pid) - cpu0, worker_cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=20000)
    ap.add_argument("--workers", default="1,2,4")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--only", default="bare,pgqueuer,core,replay-pg,replay-sqlite,replay-dir")
    ap.add_argument("--fsync", action="store_true", help="PostgreSQL with fsync on")
    ap.add_argument("--worker", nargs=3, metavar=("MODE", "DSN", "N"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker_main(args.worker[0], args.worker[1], int(args.worker[2]))
        return

    from lmtpfast._testing.postfix import SmtpSink
    from lmtpfast._testing.postgres import TempPostgres

    modes = [m for m in args.only.split(",") if m]
    if "pgqueuer" in modes:
        try:
            import pgqueuer  # noqa: F401
        except ImportError:
            print("pgqueuer not installed: skipped (pip install pgqueuer)")
            modes.remove("pgqueuer")
    counts = [int(w) for w in args.workers.split(",")]
    print(f"== {args.messages} messages of 1 KiB, 1 recipient; PostgreSQL 15 (fsync "
          f"{'on' if args.fsync else 'off'}) and smtp-sink -L on this machine "
          f"({os.cpu_count()} CPUs); median of {args.runs} runs; load average "
          f"{os.getloadavg()[0]:.1f} at start")
    base = Path(tempfile.mkdtemp(prefix="bench-pgq-"))
    settings = {"max_connections": "200", "shared_buffers": "256MB",
                "max_wal_size": "4GB", "checkpoint_timeout": "30min"}
    rows = []
    with TempPostgres(fsync=args.fsync, settings=settings) as pg, SmtpSink() as sink:
        pg.start()
        sink.start()
        pid = int((pg.data_dir / "postmaster.pid").read_text().split()[0])
        for mode in modes:
            for w in counts:
                results = []
                for r in range(args.runs):
                    spool = base / f"{mode}-{w}-{r}"
                    if spool.exists():
                        shutil.rmtree(spool)
                    results.append(run_once(mode, w, pg.dsn, args.messages, pid,
                                            sink.destination, spool, pg.unix_dsn))
                secs = statistics.median(x[0] for x in results)
                pgc = statistics.median(x[1] for x in results)
                wc = statistics.median(x[2] for x in results)
                rate = args.messages / secs
                rows.append((mode, w, rate, pgc, wc))
                print(f"{mode:14} workers={w}  {rate:9,.0f} msg/s  ({secs:6.2f}s)  CPU per "
                      f"1,000 msgs: PostgreSQL {1000 * pgc / args.messages:6.3f}s, workers "
                      f"{1000 * wc / args.messages:6.3f}s", flush=True)
    shutil.rmtree(base, ignore_errors=True)
    ceiling = {w: r for m, w, r, _, _ in rows if m == "bare"}
    if ceiling:
        print("== ratios to the bare SKIP LOCKED loop with the same number of workers")
        for m, w, r, _, _ in rows:
            if m != "bare" and w in ceiling:
                print(f"{m:14} workers={w}  {r / ceiling[w]:5.2f}x")


if __name__ == "__main__":
    main()
