"""The full-size crash test of the PostgreSQL queue (issue 15): kill -9 while 3 workers drain.

    python bench/crash_pgqueue.py                          # 50,000 messages, 100 kills
    python bench/crash_pgqueue.py --messages 5000 --kills 20 --restart

The CI-sized run is ``tests/test_pgqueue_workers.py``; this one uses the same
pieces (peers, routing, counting) at the size the issue asks for: W
``lmtpfast replay --watch`` workers drain N messages (most to ``smtp-sink -L``,
one in five also to Dovecot, one in seven to a destination that is down
until half the kills are done, so those tempfail and are retried). A random
worker is killed with SIGKILL each time the queue has shrunk by N/(K+2)
recipients, and replaced. ``--restart`` also restarts PostgreSQL (fast
shutdown) at the middle kill. At the end every delivery is counted where it
arrived and checked: nothing lost, re-deliveries <= the recipients the killed
workers held, each re-delivery flagged. Prints the counts; exits 1 on a
violation.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lmtpfast._testing.dovecot import TempDovecot
from lmtpfast._testing.postfix import SmtpSink
from lmtpfast._testing.postgres import TempPostgres
from tests.test_pgqueue_workers import (
    Workers,
    check,
    deliveries,
    enqueue,
    remaining,
    wait_for,
    worker_cmd,
    write_config,
)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=50000)
    ap.add_argument("--kills", type=int, default=100)
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--restart", action="store_true", help="restart PostgreSQL mid-drain")
    ap.add_argument("--seed", type=int, default=15)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="crash-pgq-"))
    rng = random.Random(args.seed)
    started = time.monotonic()
    with TempPostgres() as pg, SmtpSink(capture=True) as sink, \
            SmtpSink(capture=True) as later, TempDovecot() as dovecot:
        pg.start()
        sink.start()
        dovecot.start()
        pg.create_user("q", "qpw")
        pg.create_database("mail", owner="q")
        dsn = pg.dsn_for("q", "qpw", "mail")
        expected: dict[str, int] = {}
        for first in range(0, args.messages, 5000):
            expected |= enqueue(dsn, first, min(5000, args.messages - first))
        total = remaining(pg, "mail")
        config = write_config(tmp / "lmtpfast.toml", sink, later, dovecot)
        workers = Workers(tmp, worker_cmd(dsn + "?restart_grace=0", config))
        in_flight = 0
        try:
            for _ in range(args.workers):
                workers.spawn()
            for k in range(args.kills):
                target = total - (k + 1) * total // (args.kills + 2)

                def progressed(t: int = target) -> bool:
                    return remaining(pg, "mail") <= t

                wait_for(f"progress before kill {k + 1}", progressed, timeout=600)
                victim = rng.choice([p for p in workers.procs if p.poll() is None])
                victim.kill()
                victim.wait(30)
                who = f"%:{victim.pid}:%"
                in_flight += int(pg.psql(
                    "SELECT count(*) FROM lmtpfast.rcpt r JOIN lmtpfast.msg m ON "
                    f"m.id = r.msg_id WHERE m.worker LIKE '{who}' AND m.lease IS NOT NULL "
                    "AND r.state = 0", database="mail").strip())
                pg.psql("UPDATE lmtpfast.msg SET lease_expires = now() - interval '1 hour' "
                        f"WHERE worker LIKE '{who}' AND lease IS NOT NULL", database="mail")
                workers.spawn()
                if k == args.kills // 2:
                    later.start()
                    if args.restart:
                        pg.stop("fast")
                        pg.start()
            wait_for("the queue to drain", lambda: int(pg.psql(
                "SELECT count(*) FROM lmtpfast.msg", database="mail").strip()) == 0,
                timeout=1800)
        finally:
            workers.stop()
        got = deliveries([sink, later], dovecot)
    ok = True
    try:
        dups, flagged = check(expected, got, workers.logs)
    except AssertionError as exc:
        print(f"VIOLATION: {exc}")
        return 1
    by_number = {n: id for id, n in expected.items()}
    unflagged = [k for k, c in got.items() if c > 1 and (by_number[k[0]], k[1]) not in flagged]
    if dups > in_flight or unflagged:
        ok = False
    print(f"messages={args.messages} recipients={sum(got.values()) - dups} "
          f"workers={args.workers} kills={args.kills} restart={args.restart} "
          f"in_flight_at_kills={in_flight} re_deliveries={dups} unflagged={len(unflagged)} "
          f"lost=0 seconds={time.monotonic() - started:.0f} -> {'OK' if ok else 'VIOLATION'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
