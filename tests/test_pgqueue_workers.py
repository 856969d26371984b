"""Many ``lmtpfast replay`` workers on one PostgreSQL queue: two "hosts", kill -9, a restart.

Real peers only: a private PostgreSQL, ``smtp-sink -L`` (capturing every
transaction) and Dovecot; the workers are ``python -m lmtpfast replay --watch``
processes. Every delivery is counted where it arrived (the sink's dumps,
Dovecot's maildirs), by Message-ID and recipient, and checked against what
was queued: nothing lost, re-deliveries no more than what the killed workers
held, each re-delivery flagged ``possibly duplicated`` by the worker that
made it. CI-sized; ``bench/crash_pgqueue.py`` runs the full size.
"""

from __future__ import annotations

import asyncio
import collections
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from lmtpfast._testing.dovecot import TempDovecot
from lmtpfast._testing.netns import NetNamespaces
from lmtpfast._testing.postfix import SmtpSink, split_capture
from lmtpfast._testing.postgres import TempPostgres
from lmtpfast.spool import new_envelope
from lmtpfast.spool._pgqueue import PgQueue, init_queue
from lmtpfast.spool._queue import NewMessage

pytestmark = pytest.mark.peers

_MSGID = re.compile(rb"^Message-ID: <m(\d+)@test>", re.M | re.I)
_FLAGGED = re.compile(r"^(\d+) (\S+): delivered: .*\(possibly duplicated\)$")
_DELIVERED = re.compile(r"^(\d+) (\S+): delivered: ")


def message(i: int) -> bytes:
    return (f"From: s@example.org\r\nSubject: m{i}\r\nMessage-ID: <m{i}@test>\r\n\r\n"
            f"body {i}\r\n").encode()


def recipients(i: int) -> list[str]:
    """Most to the sink; some also to Dovecot; some to a destination down at first."""
    if i % 7 == 3:
        return [f"r{i}@later.test"]
    if i % 5 == 0:
        return [f"r{i}@sink.test", "bob@mbox.test"]
    return [f"r{i}@sink.test"]


async def _enqueue(dsn: str, first: int, n: int) -> list[str]:
    async with PgQueue(dsn, create=True) as q:
        return await q.enqueue_many([NewMessage(new_envelope("s@example.org", recipients(i)),
                                                message(i)) for i in range(first, first + n)])


def enqueue(dsn: str, first: int, n: int) -> dict[str, int]:
    """Queue messages first..first+n-1; entry id -> message number."""
    ids = asyncio.run(_enqueue(dsn, first, n))
    return {id: first + k for k, id in enumerate(ids)}


def wait_for(what: str, cond: Callable[[], bool], timeout: float = 120.0) -> None:
    """A bounded wait on a condition of the peers (checked every 50 ms)."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def deliveries(sinks: list[SmtpSink], dovecot: TempDovecot) -> collections.Counter[
        tuple[int, str]]:
    """(message number, recipient) -> how many times it arrived."""
    got: collections.Counter[tuple[int, str]] = collections.Counter()
    for sink in sinks:
        for dump in sink.captures():
            meta, msg = split_capture(dump)
            m = _MSGID.search(msg)
            assert m is not None, msg[:200]
            for rcpt in meta.get("X-Rcpt-Args", []):
                got[int(m[1]), rcpt.split()[0].strip("<>")] += 1
    for msg in dovecot.messages("bob"):
        m = _MSGID.search(msg)
        assert m is not None
        got[int(m[1]), "bob@mbox.test"] += 1
    return got


def write_config(path: Path, sink: SmtpSink, later: SmtpSink, dovecot: TempDovecot) -> Path:
    path.write_text(
        f'default = "lmtp:{sink.destination}"\n'
        "[transport_map]\n"
        f'"mbox.test" = "lmtp:{dovecot.destination_unix}"\n'
        f'"later.test" = "lmtp:{later.destination}"\n'
        "[defaults.pool]\nconnect_backoff = 0\n")
    return path


def worker_cmd(dsn: str, config: Path) -> list[str]:
    return [sys.executable, "-m", "lmtpfast", "replay", dsn, "--config", str(config),
            "--watch", "--interval", "0.1", "--min-backoff", "0.3", "--max-backoff", "0.6",
            "--concurrency", "24", "-v", "--no-progress", "--loop", "asyncio"]


def worker_env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


def remaining(pg: TempPostgres, db: str) -> int:
    """Recipients still queued (0 also when the schema is not there yet)."""
    out = pg.psql("SELECT count(*) FROM lmtpfast.rcpt WHERE state = 0", database=db)
    return int(out.strip())


def check(expected: dict[str, int], got: collections.Counter[tuple[int, str]],
          logs: list[Path]) -> tuple[int, set[tuple[str, str]]]:
    """Nothing lost, nothing unexpected; returns (re-deliveries, flagged (id, rcpt))."""
    wanted = {(n, r) for n in expected.values() for r in recipients(n)}
    lost = sorted(k for k in wanted if got[k] == 0)
    assert not lost, f"{len(lost)} recipients never delivered: {lost[:10]}"
    assert set(got) == wanted, f"unexpected deliveries: {sorted(set(got) - wanted)[:10]}"
    flagged = set()
    for log in logs:
        for line in log.read_text(errors="replace").splitlines():
            m = _FLAGGED.match(line)
            if m:
                flagged.add((m[1], m[2]))
    return sum(c - 1 for c in got.values()), flagged


class Workers:
    """Replay worker processes, their logs, and kill -9."""

    def __init__(self, tmp: Path, cmd: list[str]) -> None:
        self.tmp, self.cmd = tmp, cmd
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: list[Path] = []

    def spawn(self) -> subprocess.Popen[bytes]:
        log = self.tmp / f"worker{len(self.logs)}.log"
        self.logs.append(log)
        with open(log, "wb") as f:
            proc = subprocess.Popen(self.cmd, stdout=f, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=worker_env())
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(30)


@pytest.fixture
def peers(tmp_path: Path, smtp_sink: Callable[..., SmtpSink],
          dovecot_factory: Callable[..., TempDovecot]
          ) -> Iterator[tuple[SmtpSink, SmtpSink, TempDovecot, Path]]:
    sink = smtp_sink(capture=True)
    later = SmtpSink(capture=True)  # started in the middle of the drain
    dovecot = dovecot_factory()
    try:
        yield sink, later, dovecot, write_config(tmp_path / "lmtpfast.toml", sink, later,
                                                 dovecot)
    finally:
        later.close()


def test_kill_9_random_workers_while_three_drain(
        postgres_factory: Callable[..., TempPostgres], peers: tuple[SmtpSink, SmtpSink,
                                                                    TempDovecot, Path],
        tmp_path: Path) -> None:
    """3 workers drain; a random one is killed 6 times (and replaced): 0 lost, dups bounded."""
    sink, later, dovecot, config = peers
    pg = postgres_factory()
    pg.create_user("q", "qpw")
    pg.create_database("mail", owner="q")
    dsn = pg.dsn_for("q", "qpw", "mail")
    expected = enqueue(dsn, 0, 700)
    total = remaining(pg, "mail")
    # Takeover at once after a kill (the test moves the dead worker's expiry itself).
    workers = Workers(tmp_path, worker_cmd(dsn + "?restart_grace=0", config))
    rng = random.Random(15)
    in_flight = 0
    kills = 6
    try:
        for _ in range(3):
            workers.spawn()
        for k in range(kills):
            target = total - (k + 1) * total // (kills + 2)
            def progressed(t: int = target) -> bool:
                return remaining(pg, "mail") <= t

            wait_for(f"progress before kill {k + 1}", progressed)
            victim = rng.choice([p for p in workers.procs if p.poll() is None])
            victim.kill()
            victim.wait(30)
            who = f"%:{victim.pid}:%"
            # What the dead worker held (it can change nothing now): the bound on re-deliveries.
            in_flight += int(pg.psql(
                "SELECT count(*) FROM lmtpfast.rcpt r JOIN lmtpfast.msg m ON m.id = r.msg_id "
                f"WHERE m.worker LIKE '{who}' AND m.lease IS NOT NULL AND r.state = 0",
                database="mail").strip())
            # The lease length passing, on the database's clock.
            pg.psql("UPDATE lmtpfast.msg SET lease_expires = now() - interval '1 hour' "
                    f"WHERE worker LIKE '{who}' AND lease IS NOT NULL", database="mail")
            workers.spawn()
            if k == kills // 2:
                later.start()  # the destination that tempfailed comes up: retried, delivered
        wait_for("the queue to drain", lambda: int(pg.psql(
            "SELECT count(*) FROM lmtpfast.msg", database="mail").strip()) == 0)
    finally:
        workers.stop()
    got = deliveries([sink, later], dovecot)
    dups, flagged = check(expected, got, workers.logs)
    assert in_flight > 0  # the kills hit workers with mail in hand
    assert dups <= in_flight, (dups, in_flight)
    by_number = {n: id for id, n in expected.items()}
    unflagged = [(n, r) for (n, r), c in got.items() if c > 1
                 and (by_number[n], r) not in flagged]
    assert not unflagged, f"re-delivered without the flag: {unflagged[:10]}"
    print(f"\nkills={kills} in_flight={in_flight} re-deliveries={dups} "
          f"flagged={len(flagged)}")


def test_workers_in_two_network_namespaces_and_a_postgresql_restart(
        netns: Callable[..., NetNamespaces], postgres_factory: Callable[..., TempPostgres],
        peers: tuple[SmtpSink, SmtpSink, TempDovecot, Path], tmp_path: Path) -> None:
    """PostgreSQL on host "db", one worker on host "a" and one on "b"; PostgreSQL restarts
    mid-drain. The sink and Dovecot listen on unix sockets, reachable from every namespace."""
    sink, later, dovecot, config = peers
    later.start()
    net = netns(["db", "a", "b"])
    pg = postgres_factory(host=net.address("db"), netns=net.namespace("db"))
    pg.create_user("q", "qpw")
    pg.create_database("mail", owner="q")
    dsn = pg.dsn_for("q", "qpw", "mail")  # TCP to the db namespace's address
    local = pg.dsn_for("q", database="mail", unix=True)  # this test's own way in
    asyncio.run(init_queue(local))  # the schema, before the workers look
    cmd = worker_cmd(dsn, config)
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    procs = []
    try:
        for host, log in zip(("a", "b"), logs, strict=True):
            with open(log, "wb") as f:
                procs.append(net.popen(host, cmd, stdout=f, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, env=worker_env()))
        # Both hosts connected before any mail is queued, so both take part.
        hosts = {net.address("a"), net.address("b")}
        wait_for("both workers connected", lambda: hosts <= set(pg.psql(
            "SELECT host(client_addr) FROM pg_stat_activity WHERE application_name = "
            "'lmtpfast'").split()))
        expected = enqueue(local, 0, 400)
        wait_for("some progress", lambda: remaining(pg, "mail") < 400)
        pg.stop("fast")  # open sessions are ended: the workers see the outage
        pg.start()
        expected |= enqueue(local, 400, 200)  # claimed only by workers that reconnected
        wait_for("the queue to drain", lambda: int(pg.psql(
            "SELECT count(*) FROM lmtpfast.msg", database="mail").strip()) == 0)
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(30)
    got = deliveries([sink, later], dovecot)
    dups, _ = check(expected, got, logs)
    assert dups == 0  # the restart grace: the living workers wrote their outcomes first
    for log in logs:
        assert any(_DELIVERED.match(line) for line in log.read_text().splitlines()), log
