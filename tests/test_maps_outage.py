"""The routing database goes down in the middle of a replay: 0 bounces, 0 lost, all delivered after.

A spool of 300 messages (900 recipients, 600 distinct users) is replayed
through an :class:`~lmtpfast.Agent` whose transport map and recipient map are
Postfix ``.cf`` maps on a real PostgreSQL (``pgsql:``) or slapd (``ldap:``),
into the in-process sink. After the 75th recipient outcome the database is
stopped (from the observer: no sleep, no timing). Recipients whose answers
are cached keep being delivered; the others get ``451 4.3.0`` and are
deferred. The database comes back, the deferred entries are replayed (retry
policy with no back-off), and then: the spool is empty, no entry failed,
every recipient reached the sink exactly once.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from lmtpfast import Agent
from lmtpfast._testing.fixtures import PgDatabase
from lmtpfast._testing.slapd import TempSlapd
from lmtpfast.server import Sink
from lmtpfast.spool import Observer, Outcome, Replayer, RetryPolicy, Spool

pytestmark = pytest.mark.maps

MESSAGES = 150
USERS = 300
STOP_AFTER = 75


def _message(i: int) -> bytes:
    return (f"From: s@example.org\r\nSubject: outage {i}\r\nMessage-ID: <o{i}@lmtpfast.test>"
            f"\r\n\r\nbody {i}\r\n").encode()


def _recipients(i: int) -> list[str]:
    return [f"u{(3 * i + k) % USERS}@example.com" for k in range(3)]


class StopMidway(Observer):
    """Stops the database once STOP_AFTER recipient outcomes have been seen."""

    def __init__(self, stop: Any) -> None:
        self.stop = stop
        self.outcomes: list[Outcome] = []
        self.stopped_at: int | None = None

    def outcome(self, outcome: Outcome) -> None:
        self.outcomes.append(outcome)
        if self.stopped_at is None and len(self.outcomes) >= STOP_AFTER:
            self.stopped_at = len(self.outcomes)
            self.stop()


async def _replay_through_outage(tmp_path: Path, agent: Agent, sink: Sink, stop: Any,
                                 start: Any) -> None:
    spool = Spool(tmp_path / "spool", create=True)
    for i in range(MESSAGES):
        spool.enqueue(_message(i), "s@example.org", _recipients(i))
    policy = RetryPolicy(min_backoff=0)
    observer = StopMidway(stop)
    async with agent:
        replayer = Replayer(spool, agent, concurrency=8, observer=observer, policy=policy)
        await replayer.run_pass()
        during = Counter(o.outcome for o in observer.outcomes)
        deferred = [o for o in observer.outcomes if o.outcome == "deferred"]
        assert observer.stopped_at is not None
        assert during["failed"] == 0, "an outage must never bounce"
        assert deferred, "the outage deferred nothing: the test did not test"
        assert all((o.code, o.enhanced) == (451, "4.3.0") and "lookup failure" in o.text
                   for o in deferred)
        start()
        for _ in range(5):  # bounded: each pass retries every deferred entry
            if not list(spool.scan(due=float("inf"), flush=True)):
                break
            await Replayer(spool, agent, concurrency=8, policy=policy, flush=True).run_pass()
    left = {f: sorted((spool.path / f).iterdir()) for f in ("msg", "deferred", "failed")
            if (spool.path / f).exists()}
    assert all(not v for v in left.values()), left
    got = Counter(r for m in sink.messages for r in m.recipients)
    want = Counter(r for i in range(MESSAGES) for r in _recipients(i))
    assert got == want  # every recipient exactly once: nothing lost, nothing twice
    print(f"outage: {len(deferred)} recipient outcomes deferred during the outage, "
          f"{during['delivered']} delivered during the first pass, all {sum(want.values())} "
          "delivered once after the database came back")


async def test_postgres_outage_mid_replay(postgres_db: PgDatabase, tmp_path: Path) -> None:
    async with Sink(f"unix:{tmp_path}/lmtp", collect=True) as sink:
        postgres_db.psql(
            "CREATE TABLE transport (k text PRIMARY KEY, v text);"
            "CREATE TABLE users (k text PRIMARY KEY);"
            f"INSERT INTO transport VALUES ('example.com', 'lmtp:unix:{tmp_path}/lmtp');"
            f"INSERT INTO users SELECT 'u' || g || '@example.com' FROM generate_series(0, "
            f"{USERS - 1}) g;")
        head = (f"hosts = inet:127.0.0.1:{postgres_db.server.port}\nuser = {postgres_db.user}\n"
                f"password = {postgres_db.password}\ndbname = {postgres_db.name}\n"
                "lmtpfast_connect_timeout = 5\n")
        (tmp_path / "t.cf").write_text(head + "query = SELECT v FROM transport WHERE k='%s'\n")
        (tmp_path / "r.cf").write_text(head + "query = SELECT 'ok' FROM users WHERE k='%s'\n")
        agent = Agent(transport_map=f"pgsql:{tmp_path}/t.cf",
                      recipient_map=f"pgsql:{tmp_path}/r.cf")
        server = postgres_db.server
        await _replay_through_outage(tmp_path, agent, sink, server.stop, server.start)


def _ldif() -> str:
    base = "dc=example,dc=com"
    parts = [f"dn: {base}\nobjectClass: dcObject\nobjectClass: organization\ndc: example\n"
             "o: outage\n", f"dn: ou=people,{base}\nobjectClass: organizationalUnit\nou: people\n"]
    for i in range(USERS):
        parts.append(f"dn: uid=u{i},ou=people,{base}\nobjectClass: inetOrgPerson\n"
                     f"objectClass: inetLocalMailRecipient\nuid: u{i}\ncn: u{i}\nsn: u\n"
                     f"mailLocalAddress: u{i}@example.com\n")
    return "\n".join(parts)


async def test_slapd_outage_mid_replay(slapd_factory: Any, tmp_path: Path) -> None:
    server: TempSlapd = slapd_factory(dit=_ldif(), loglevel="none")
    async with Sink(f"unix:{tmp_path}/lmtp", collect=True) as sink:
        (tmp_path / "t").write_text(f"example.com lmtp:unix:{tmp_path}/lmtp\n")
        (tmp_path / "r.cf").write_text(
            f"server_host = {server.url}\nsearch_base = dc=example,dc=com\nbind = no\n"
            "query_filter = (mailLocalAddress=%s)\nresult_attribute = uid\ntimeout = 5\n")
        agent = Agent(transport_map=str(tmp_path / "t"), recipient_map=f"ldap:{tmp_path}/r.cf")
        await _replay_through_outage(tmp_path, agent, sink, server.stop, server.start)
