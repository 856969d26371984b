"""The PostgreSQL queue: many replay workers on many hosts share one database (issue 15).

Schema and semantics are in ``docs/queue.md``; in short:

* ``lmtpfast.msg``: one row per message (state, next attempt, counters, the
  lease); ``lmtpfast.body``: its content, written once at enqueue and never
  updated (claims and outcomes rewrite only the small ``msg`` row, so a
  claim costs no copy of the message); ``lmtpfast.rcpt``: one row per
  recipient still in the envelope (state, attempts, last reply);
* a claim is one statement, ``UPDATE msg ... WHERE id IN (SELECT ... FOR
  UPDATE SKIP LOCKED LIMIT n) RETURNING ...``, which leases the rows to this
  worker (worker id, a random 63-bit token, an expiry renewed while the
  worker lives) and returns their envelopes and content; no transaction stays
  open while mail is delivered;
* outcomes are batched, one statement per kind of outcome, each *fenced* by
  the lease token: an update whose lease was taken over changes nothing
  (``lost``);
* an entry whose lease expired is claimable again, flagged *suspect*: its
  queued recipients are reported ``possibly_duplicated`` when delivered;
  after a restart of PostgreSQL no lease is taken over for one lease length,
  so living workers reconnect and write their outcomes first.

Connection trouble (the database down, restarting, a failover) is a
:class:`~lmtpfast.spool.QueueWriteError`: the replay keeps its outcomes in
memory, claims nothing more and tries again with a back-off; nothing is
bounced, nothing delivered twice by the living worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import msgspec

from .._shaping import LocalShapingState, ShapingState, ShapingUnavailable
from ._format import BadEnvelope, Envelope, Reason, Recipient, check_address
from ._queue import (
    ALL,
    ActionResult,
    ClaimBatch,
    Entry,
    EntryInfo,
    EntryState,
    NewMessage,
    Queue,
    QueueError,
    QueueStatus,
    QueueWriteError,
    RecordStatus,
    Selection,
    Update,
)
from ._store import ImportReport

__all__ = ["SCHEMA_VERSION", "ImportReport", "PgQueue", "PgShapingState", "PgWriter",
           "init_schema", "redact_dsn"]

T = TypeVar("T")

#: The schema version this code reads and writes (``lmtpfast.meta``).
SCHEMA_VERSION = 4
#: The LISTEN/NOTIFY channel rung by enqueues and operator actions.
CHANNEL = "lmtpfast_queue"
#: Default lease: a dead worker's entries move on within a minute.
LEASE = 30.0
#: Rows and bytes per enqueue transaction.
ENQUEUE_ROWS = 1000
ENQUEUE_BYTES = 16 * 1024 * 1024

_STATE_CODE: dict[EntryState, int] = {"queued": 0, "held": 1, "failed": 2, "quarantined": 3}
_STATE_NAME: dict[int, EntryState] = {v: k for k, v in _STATE_CODE.items()}
_RCPT_STATE = {"queued": 0, "failed": 1}

_reason_encoder = msgspec.json.Encoder()
_reason_decoder = msgspec.json.Decoder(Reason)

# Each migration: (version, statements), run in one transaction under an advisory lock.
_MIGRATIONS: list[tuple[int, tuple[str, ...]]] = [
    (1, (
        # A sequence, not an identity column: an enqueue reserves its ids first and
        # writes the three tables with them in one statement.
        "CREATE SEQUENCE lmtpfast.msg_id",
        # state: 0 queued, 1 held, 2 failed, 3 quarantined. lease/worker/lease_expires:
        # the current claim (all NULL when free); last_lease: the claim whose outcome
        # was written last (a retried write after a lost reply knows it was applied).
        # fillfactor: room on the page, so claims and renewals are HOT updates.
        """CREATE TABLE lmtpfast.msg (
            id bigint PRIMARY KEY,
            state smallint NOT NULL DEFAULT 0,
            next_attempt double precision NOT NULL,
            sender text NOT NULL,
            arrival double precision NOT NULL,
            attempts integer NOT NULL DEFAULT 0,
            last_attempt double precision,
            delivered integer NOT NULL DEFAULT 0,
            ret text,
            envid text,
            bounced boolean NOT NULL DEFAULT false,
            size bigint NOT NULL,
            lease bigint,
            worker text,
            lease_expires timestamptz,
            last_lease bigint,
            suspect boolean NOT NULL DEFAULT false,
            reason text,
            queued_at timestamptz NOT NULL DEFAULT now()
        ) WITH (fillfactor = 70)""",
        # Claims scan this in next-attempt order; they never change its columns.
        "CREATE INDEX msg_due ON lmtpfast.msg (next_attempt) WHERE state = 0",
        "CREATE TABLE lmtpfast.body (id bigint PRIMARY KEY, content bytea NOT NULL)",
        # state: 0 queued, 1 failed (delivered recipients are deleted).
        """CREATE TABLE lmtpfast.rcpt (
            msg_id bigint NOT NULL,
            idx integer NOT NULL,
            address text NOT NULL,
            state smallint NOT NULL DEFAULT 0,
            attempts integer NOT NULL DEFAULT 0,
            last text,
            last_code smallint,
            possibly_delivered boolean NOT NULL DEFAULT false,
            notify text,
            orcpt text,
            PRIMARY KEY (msg_id, idx)
        )""",
        # Directory-spool entries already imported (the import is idempotent).
        "CREATE TABLE lmtpfast.imported (legacy text PRIMARY KEY, id bigint NOT NULL)",
        # The queue is a hot, churning table: vacuum it early and often.
        "ALTER TABLE lmtpfast.msg SET (autovacuum_vacuum_scale_factor = 0.01,"
        " autovacuum_vacuum_threshold = 1000, autovacuum_vacuum_cost_delay = 0)",
        "ALTER TABLE lmtpfast.rcpt SET (autovacuum_vacuum_scale_factor = 0.01,"
        " autovacuum_vacuum_threshold = 1000, autovacuum_vacuum_cost_delay = 0)",
        "ALTER TABLE lmtpfast.body SET (autovacuum_vacuum_scale_factor = 0.01,"
        " autovacuum_vacuum_threshold = 1000, autovacuum_vacuum_cost_delay = 0)",
    )),
    (2, (
        # Shaping every worker agrees on: a destination marked dead by one is
        # dead for all (Unix time; 0: alive).
        """CREATE TABLE lmtpfast.dest (
            destination text PRIMARY KEY,
            dead_until double precision NOT NULL DEFAULT 0,
            reason text NOT NULL DEFAULT '',
            worker text,
            updated timestamptz NOT NULL DEFAULT now()
        )""",
    )),
    (3, (
        # Claims walk the queue in (next_attempt, id) order from where the worker's
        # last claim of the pass ended: the deleted rows behind it (dead index
        # entries until vacuum) are not walked again by every claim.
        "CREATE INDEX msg_due_id ON lmtpfast.msg (next_attempt, id) WHERE state = 0",
        "DROP INDEX lmtpfast.msg_due",
    )),
    (4, (
        # Per-destination concurrency across all workers: one row per transaction in
        # flight, leased (a dead worker's slots free themselves when they expire).
        """CREATE TABLE lmtpfast.dest_slot (
            token bigint PRIMARY KEY,
            destination text NOT NULL,
            worker text NOT NULL,
            expires timestamptz NOT NULL
        )""",
        "CREATE INDEX dest_slot_destination ON lmtpfast.dest_slot (destination)",
        # A row inserted and deleted per shaped transaction: vacuum it early.
        "ALTER TABLE lmtpfast.dest_slot SET (autovacuum_vacuum_scale_factor = 0.01,"
        " autovacuum_vacuum_threshold = 1000, autovacuum_vacuum_cost_delay = 0)",
        # The next start any worker may make to the destination (Unix time): message
        # rate and rate delay shared by all workers.
        "ALTER TABLE lmtpfast.dest ADD COLUMN next_start double precision NOT NULL DEFAULT 0",
        # One round trip per acquisition. The advisory lock serialises acquisitions of
        # one destination; each statement of a PL/pgSQL function sees what committed
        # before it, so the count after the lock is exact (a plain INSERT ... SELECT
        # count(*) < limit would let two concurrent ones both see a free slot).
        # Returns NULL when the limit is reached, else the seconds to wait before
        # starting (rate), the slot inserted with the caller's token (if lim > 0).
        """CREATE FUNCTION lmtpfast.acquire_slot(d text, lim integer, tok bigint, wrk text,
                                                lease double precision,
                                                step double precision)
        RETURNS double precision LANGUAGE plpgsql AS $$
        DECLARE
            t double precision := extract(epoch FROM clock_timestamp());
            n integer;
            s double precision;
        BEGIN
            IF lim > 0 THEN
                PERFORM pg_advisory_xact_lock(hashtext('lmtpfast.dest_slot'), hashtext(d));
                DELETE FROM lmtpfast.dest_slot
                    WHERE destination = d AND expires < clock_timestamp();
                SELECT count(*) INTO n FROM lmtpfast.dest_slot WHERE destination = d;
                IF n >= lim THEN
                    RETURN NULL;
                END IF;
                INSERT INTO lmtpfast.dest_slot VALUES
                    (tok, d, wrk, clock_timestamp() + make_interval(secs => lease));
            END IF;
            IF step < 0 THEN
                RETURN 0.0;
            END IF;
            INSERT INTO lmtpfast.dest AS x (destination, next_start) VALUES (d, t + step)
                ON CONFLICT (destination) DO UPDATE
                SET next_start = greatest(x.next_start, t) + step
                RETURNING x.next_start - step INTO s;
            RETURN greatest(0.0, s - t);
        END $$""",
    )),
]


def redact_dsn(dsn: str) -> str:
    """*dsn* without its password (in the userinfo or a ``password=`` parameter)."""
    try:
        parts = urllib.parse.urlsplit(dsn)
    except ValueError:
        return "postgresql://(unparsable)"
    netloc = parts.netloc
    if "@" in netloc:
        user, _, host = netloc.rpartition("@")
        if ":" in user:
            user = user.split(":", 1)[0] + ":***"
        netloc = f"{user}@{host}"
    query = "&".join(
        f"{k}=***" if k.lower() in ("password", "passfile", "sslpassword") else f"{k}={v}"
        for k, v in urllib.parse.parse_qsl(parts.query, keep_blank_values=True))
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, ""))


#: Parameters of a queue URL that are lmtpfast's, not libpq's (seconds).
URL_OPTIONS = ("lease", "restart_grace")


def split_options(dsn: str) -> tuple[str, dict[str, float]]:
    """*dsn* without lmtpfast's own parameters (``?lease=20``), and those parameters.

    ``lease``: seconds a claim lasts unrenewed; ``restart_grace``: seconds
    after PostgreSQL starts during which no expired lease is taken over.
    Everything else is passed to asyncpg (libpq's names).
    """
    parts = urllib.parse.urlsplit(dsn)
    if not parts.query:
        return dsn, {}
    keep, options = [], {}
    for k, v in urllib.parse.parse_qsl(parts.query, keep_blank_values=True):
        if k in URL_OPTIONS:
            try:
                options[k] = float(v)
            except ValueError:
                raise QueueError(0, f"bad queue URL parameter {k}={v!r} (seconds)",
                                 redact_dsn(dsn)) from None
            if not 0 <= options[k] <= 86400:
                raise QueueError(0, f"queue URL parameter {k} out of range (0 to 86400 s)",
                                 redact_dsn(dsn))
        else:
            keep.append((k, v))
    if not options:
        return dsn, {}
    query = urllib.parse.urlencode(keep, safe="/:,")
    return urllib.parse.urlunsplit((*parts[:3], query, parts.fragment)), options


def _asyncpg() -> Any:
    try:
        import asyncpg
    except ImportError:
        raise QueueError(0, "the PostgreSQL queue needs asyncpg (pip install "
                         "'lmtpfast[pgsql]')", "postgresql://") from None
    return asyncpg


def _config_error(exc: BaseException) -> bool:
    """A mistake in the set-up (no such database, bad password, no schema): not transient."""
    name = type(exc).__name__
    return name in ("InvalidPasswordError", "InvalidAuthorizationSpecificationError",
                    "InvalidCatalogNameError", "UndefinedTableError", "InvalidSchemaNameError",
                    "InsufficientPrivilegeError", "UndefinedFunctionError",
                    "ClientConfigurationError") or isinstance(exc, ValueError)


def _problem(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


async def init_schema(conn: Any) -> tuple[int, int]:
    """Create or migrate the schema on *conn*; returns (version before, version after).

    Runs in one transaction under an advisory lock: two ``queue init`` at
    once, or a worker starting meanwhile, see the old schema or the new one.
    """
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext('lmtpfast.schema'))")
        await conn.execute("CREATE SCHEMA IF NOT EXISTS lmtpfast")
        await conn.execute("CREATE TABLE IF NOT EXISTS lmtpfast.meta "
                           "(key text PRIMARY KEY, value text NOT NULL)")
        got = await conn.fetchval("SELECT value FROM lmtpfast.meta WHERE key = 'schema_version'")
        before = int(got) if got is not None else 0
        if before > SCHEMA_VERSION:
            raise QueueError(0, f"the queue schema is version {before}, newer than this "
                             f"lmtpfast ({SCHEMA_VERSION}): upgrade lmtpfast", "postgresql://")
        for version, statements in _MIGRATIONS:
            if version <= before:
                continue
            for sql in statements:
                await conn.execute(sql)
        await conn.execute(
            "INSERT INTO lmtpfast.meta VALUES ('schema_version', $1) "
            "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value", str(SCHEMA_VERSION))
    return before, SCHEMA_VERSION


@dataclass(slots=True)
class _Lease:
    row: int
    token: int


class PgQueue(Queue):
    """The :class:`~lmtpfast.spool.Queue` in a PostgreSQL database (``postgresql://...``).

    Options may also come in the URL (``?lease=20&restart_grace=0``, see
    :func:`split_options`). *lease*: seconds a claim lasts without renewal (renewed every third of
    it while this worker lives). *create*: make or migrate the schema when
    first used (``lmtpfast queue init`` does it explicitly); otherwise a
    database without the schema is a :class:`QueueError`. *pool_size*:
    connections at most. *restart_grace*
    (default: the lease): after PostgreSQL (re)starts, expired leases are
    not taken over for this long, so workers that lived through the outage
    write their outcomes before anyone re-delivers. Nothing connects until
    the first call.
    """

    kind = "postgresql"

    def __init__(self, dsn: str, *, create: bool = False, lease: float = LEASE,
                 pool_size: int = 4, worker: str | None = None,
                 connect_timeout: float = 10.0, command_timeout: float = 60.0,
                 restart_grace: float | None = None) -> None:
        if not dsn.startswith(("postgresql://", "postgres://")):
            raise QueueError(0, "not a PostgreSQL URL", redact_dsn(dsn))
        dsn, options = split_options(dsn)
        lease = options.get("lease", lease)
        restart_grace = options.get("restart_grace", restart_grace)
        if not 1.0 <= lease <= 86400:
            raise QueueError(0, "the lease must be between 1 second and a day",
                             redact_dsn(dsn))
        self._dsn = dsn
        self.location = redact_dsn(dsn)
        self._create = create
        self.lease = float(lease)
        #: After PostgreSQL starts, no expired lease is taken over for this long.
        self.restart_grace = self.lease if restart_grace is None else float(restart_grace)
        self._pool_size = max(2, pool_size)
        self.worker = worker or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self._connect_timeout = connect_timeout
        self._command_timeout = command_timeout
        self._pool: Any = None
        self._opening: asyncio.Lock | None = None
        self._checked = False
        #: Claimed by this worker and not recorded: id -> token (renewed, given back at close).
        self._inflight: dict[int, int] = {}
        #: Tokens of claims whose reply was lost: their rows (if any) are given back.
        self._orphans: list[int] = []
        #: Updates whose write's reply was lost: (id, token) -- "gone" then means applied.
        self._ambiguous: set[tuple[int, int]] = set()
        self._renewer: asyncio.Task[None] | None = None
        #: Where this pass's last claim ended: the next one starts after it.
        self._cursor: tuple[float, int] = (float("-inf"), 0)
        self._wake = asyncio.Event()
        # Reconnect back-off: after a failure, calls fail fast until this monotonic time.
        self._down_until = 0.0
        self._backoff = 0.0
        self._closed = False

    def __repr__(self) -> str:
        return f"<PgQueue {self.location} worker={self.worker}>"

    # -- connections ---------------------------------------------------------------

    async def _ensure_pool(self) -> Any:
        if self._pool is not None:
            return self._pool
        if self._closed:
            raise QueueError(0, "the queue is closed", self.location)
        if self._opening is None:
            self._opening = asyncio.Lock()
        async with self._opening:
            if self._pool is not None:
                return self._pool
            asyncpg = _asyncpg()
            # Synchronous commits whatever the server's default: a claim lost in a
            # crash of PostgreSQL would let a second worker deliver again unflagged.
            settings = {"application_name": "lmtpfast", "synchronous_commit": "on"}
            # min_size=0: no background task re-opening connections during an outage.
            pool = await asyncpg.create_pool(
                self._dsn, min_size=0, max_size=self._pool_size, timeout=self._connect_timeout,
                command_timeout=self._command_timeout, server_settings=settings,
                max_inactive_connection_lifetime=300.0, reset=_no_reset)
            try:
                if not self._checked:
                    async with pool.acquire() as conn:
                        await self._check_schema(conn)
                    self._checked = True
            except BaseException:
                await pool.close()
                raise
            self._pool = pool
            return pool

    async def _check_schema(self, conn: Any) -> None:
        asyncpg = _asyncpg()
        try:
            got = await conn.fetchval(
                "SELECT value FROM lmtpfast.meta WHERE key = 'schema_version'")
        except (asyncpg.UndefinedTableError, asyncpg.InvalidSchemaNameError):
            got = None
        version = int(got) if got is not None else 0
        if version == SCHEMA_VERSION:
            return
        if version > SCHEMA_VERSION:
            raise QueueError(0, f"the queue schema is version {version}, newer than this "
                             f"lmtpfast ({SCHEMA_VERSION}): upgrade lmtpfast", self.location)
        if not self._create:
            what = "no lmtpfast queue in this database" if version == 0 else (
                f"the queue schema is version {version}, this lmtpfast needs "
                f"{SCHEMA_VERSION}")
            raise QueueError(0, f"{what}: run 'lmtpfast queue init'", self.location)
        await init_schema(conn)

    async def _run(self, what: str, fn: Callable[[Any], Awaitable[T]], *,
                   write: bool = True) -> T:
        """Run *fn(conn)* on a pooled connection, mapping database trouble to our errors.

        A connection failure starts a back-off (doubling, 0.05 s to 5 s) during
        which calls fail at once: a worker facing an outage does not hammer
        the database, and the pool reconnects on the first call after it.
        """
        asyncpg = _asyncpg()
        now = time.monotonic()
        if now < self._down_until:
            raise QueueWriteError(0, f"{what}: the database is unavailable (retrying in "
                                  f"{self._down_until - now:.1f}s)", self.location)
        trouble = (asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError,
                   OSError, TimeoutError, ValueError)
        conn = None
        try:
            pool = await self._ensure_pool()
            conn = await pool.acquire(timeout=self._connect_timeout)
            if self._orphans and write:
                await self._give_back_orphans(conn)
            result = await fn(conn)
        except QueueError:
            await self._put_back(conn, broken=True)
            raise
        except trouble as exc:
            # A connection that failed mid-operation is never reused (asyncpg may
            # still think an operation is in progress on it).
            await self._put_back(conn, broken=True)
            if _config_error(exc):
                raise QueueError(0, f"{what}: {_problem(exc)}", self.location) from None
            self._backoff = min(5.0, max(0.05, self._backoff * 2))
            self._down_until = time.monotonic() + self._backoff
            raise QueueWriteError(0, f"{what}: {_problem(exc)}", self.location) from None
        except BaseException:
            await self._put_back(conn, broken=True)
            raise
        await self._put_back(conn, broken=False)
        self._backoff = 0.0
        return result

    async def _put_back(self, conn: Any, *, broken: bool) -> None:
        if conn is None or self._pool is None:
            return
        with contextlib.suppress(Exception):  # the pool may have taken a dead one back
            if broken:
                conn.terminate()
            await self._pool.release(conn, timeout=5)

    async def _give_back_orphans(self, conn: Any) -> None:
        """Rows leased by a claim whose reply never came: never delivered, so not suspect."""
        tokens = list(self._orphans)
        await conn.execute(
            "UPDATE lmtpfast.msg SET lease = NULL, worker = NULL, lease_expires = NULL "
            "WHERE lease = ANY($1::bigint[])", tokens)
        del self._orphans[:len(tokens)]

    # -- writers ---------------------------------------------------------------------

    async def enqueue_many(self, messages: Iterable[NewMessage], *, durable: bool = True
                           ) -> list[str]:
        ids: list[str] = []
        group: list[tuple[NewMessage, bytes, int]] = []
        size = 0
        for m in messages:
            data = _content_bytes(m)
            group.append((m, data, 0))
            size += len(data)
            if len(group) >= ENQUEUE_ROWS or size >= ENQUEUE_BYTES:
                ids += await self._enqueue_group(group, durable, [])
                group, size = [], 0
        if group:
            ids += await self._enqueue_group(group, durable, [])
        return ids

    _ENQUEUE: ClassVar[str] = (
        "WITH m AS (INSERT INTO lmtpfast.msg (id, state, next_attempt, sender, arrival, "
        "attempts, last_attempt, delivered, ret, envid, bounced, size) "
        "SELECT * FROM unnest($1::bigint[], $2::smallint[], $3::float8[], $4::text[], "
        "$5::float8[], $6::int[], $7::float8[], $8::int[], $9::text[], $10::text[], "
        "$11::bool[], $12::bigint[])), "
        "b AS (INSERT INTO lmtpfast.body (id, content) "
        "SELECT * FROM unnest($1::bigint[], $13::bytea[])) "
        "INSERT INTO lmtpfast.rcpt (msg_id, idx, address, state, attempts, last, last_code, "
        "possibly_delivered, notify, orcpt) "
        "SELECT * FROM unnest($14::bigint[], $15::int[], $16::text[], $17::smallint[], "
        "$18::int[], $19::text[], $20::smallint[], $21::bool[], $22::text[], $23::text[])")

    async def _enqueue_group(self, group: list[tuple[NewMessage, bytes, int]], durable: bool,
                             legacy: Sequence[tuple[str, int]]) -> list[str]:
        """One transaction: the messages, their recipients, their content (and import marks)."""
        n = len(group)

        async def body(conn: Any) -> list[int]:
            async with conn.transaction():
                if not durable:  # an import whose source stays until it is done
                    await conn.execute("SET LOCAL synchronous_commit TO off")
                ids = [r[0] for r in await conn.fetch(
                    "SELECT nextval('lmtpfast.msg_id') FROM generate_series(1, $1)", n)]
                cols: list[list[Any]] = [[] for _ in range(23)]
                for id, (m, data, state) in zip(ids, group, strict=True):
                    env = m.envelope
                    for c, v in zip(cols, (
                            id, state, env.next_attempt, env.sender,
                            env.arrival if env.arrival is not None else time.time(),
                            env.attempts, env.last_attempt, env.delivered, env.ret, env.envid,
                            env.bounced, len(data), data), strict=False):
                        c.append(v)
                    _rcpt_columns(id, env.recipients, cols[13:])
                await conn.execute(self._ENQUEUE, *cols)
                if legacy:
                    await conn.executemany(
                        "INSERT INTO lmtpfast.imported VALUES ($1, $2) ON CONFLICT DO NOTHING",
                        [(name, ids[i]) for name, i in legacy])
                await conn.execute("SELECT pg_notify($1, '')", CHANNEL)
            return ids

        return [str(i) for i in await self._run("enqueue", body)]

    # -- workers ---------------------------------------------------------------------

    _CLAIM: ClassVar[str] = (
        "WITH c AS (UPDATE lmtpfast.msg m SET lease = $1, worker = $2, "
        "lease_expires = now() + make_interval(secs => $3), "
        "suspect = m.suspect OR m.lease IS NOT NULL "
        "WHERE m.id = ANY(ARRAY(SELECT id FROM lmtpfast.msg WHERE state = 0 "
        "AND next_attempt <= $4 AND (next_attempt, id) > ($7::float8, $8::bigint) "
        "AND (lease IS NULL OR (lease_expires < now() "
        "AND now() > pg_postmaster_start_time() + make_interval(secs => $6))) "
        "ORDER BY next_attempt, id LIMIT $5 FOR UPDATE SKIP LOCKED)) "
        "RETURNING m.id, m.suspect, m.sender, m.arrival, m.attempts, m.next_attempt, "
        "m.last_attempt, m.delivered, m.ret, m.envid, m.bounced, m.size) "
        # The batch's recipients in one grouped scan (not one aggregate per message).
        ", r AS (SELECT msg_id, array_agg(address ORDER BY idx) AS addrs, "
        "array_agg(state ORDER BY idx) AS states, array_agg(attempts ORDER BY idx) AS tries, "
        "array_agg(last ORDER BY idx) AS lasts, "
        "array_agg(possibly_delivered ORDER BY idx) AS possibly, "
        "array_agg(notify ORDER BY idx) AS notifies, array_agg(orcpt ORDER BY idx) AS orcpts "
        "FROM lmtpfast.rcpt WHERE msg_id = ANY(ARRAY(SELECT id FROM c)) GROUP BY msg_id) "
        "SELECT c.*, b.content, r.* FROM c LEFT JOIN lmtpfast.body b ON b.id = c.id "
        "LEFT JOIN r ON r.msg_id = c.id ORDER BY c.next_attempt, c.id")

    async def begin_pass(self, *, due: float) -> list[tuple[str, str]]:
        """A new pass walks the queue from its start again."""
        self._cursor = (float("-inf"), 0)
        return []

    async def claim(self, n: int, *, due: float) -> ClaimBatch:
        """Lease up to *n* due entries (one statement; see the module docstring)."""
        if n <= 0:
            return ClaimBatch(exhausted=False)
        token = secrets.randbits(63) or 1

        async def body(conn: Any) -> list[Any]:
            try:
                return list(await conn.fetch(self._CLAIM, token, self.worker, self.lease,
                                             due, n, self.restart_grace, *self._cursor))
            except BaseException:
                # Committed or not, we cannot know: give its rows back at the next call.
                self._orphans.append(token)
                raise

        rows = await self._run("claim", body)
        batch = ClaimBatch(exhausted=len(rows) < n)
        if rows:
            last = rows[-1]  # the rows come in (next_attempt, id) order
            self._cursor = (last["next_attempt"], last["id"])
        bad: list[tuple[int, str]] = []
        for row in rows:
            try:
                batch.entries.append(self._entry(row, token))
            except BadEnvelope as exc:
                bad.append((row["id"], str(exc)))
        for e in batch.entries:
            self._inflight[int(e.id)] = token
        if bad:
            await self._quarantine_claimed(bad, token)
            batch.quarantined = [(str(i), r) for i, r in bad]
        if batch.entries:
            self._start_renewer()
        return batch

    @staticmethod
    def _entry(row: Any, token: int) -> Entry:
        suspect = bool(row["suspect"])
        env = _envelope(row, suspect)
        content = row["content"]
        if content is None:
            raise BadEnvelope("message content missing from lmtpfast.body")
        if len(content) != row["size"]:
            raise BadEnvelope("message content in lmtpfast.body has the wrong size")
        return Entry(str(row["id"]), env, content, row["size"], suspect,
                     _Lease(row["id"], token))

    async def _quarantine_claimed(self, bad: list[tuple[int, str]], token: int) -> None:
        async def body(conn: Any) -> None:
            await conn.execute(
                "UPDATE lmtpfast.msg m SET state = 3, reason = u.reason, lease = NULL, "
                "worker = NULL, lease_expires = NULL, last_lease = m.lease "
                "FROM unnest($1::bigint[], $2::text[]) AS u(id, reason) "
                "WHERE m.id = ANY($1::bigint[]) AND m.id = u.id AND m.lease = $3",
                [i for i, _ in bad], [r for _, r in bad], token)

        try:
            await self._run("quarantine", body)
        finally:
            for i, _ in bad:
                self._inflight.pop(i, None)

    # -- outcomes ----------------------------------------------------------------------

    _DONE: ClassVar[str] = (
        "WITH u AS (SELECT * FROM unnest($1::bigint[], $2::bigint[]) AS u(id, lease)), "
        "d AS (DELETE FROM lmtpfast.msg m USING u WHERE m.id = ANY($1::bigint[]) "
        "AND m.id = u.id AND m.lease = u.lease "
        "RETURNING m.id), "
        "r AS (DELETE FROM lmtpfast.rcpt WHERE msg_id = ANY(ARRAY(SELECT id FROM d))), "
        "b AS (DELETE FROM lmtpfast.body WHERE id = ANY(ARRAY(SELECT id FROM d))) "
        "SELECT id FROM d")
    # Defer and failed: the row's counters, then its recipients rewritten (the replay
    # removed the delivered ones from the envelope). A held entry stays held.
    _KEEP: ClassVar[str] = (
        "UPDATE lmtpfast.msg m SET state = CASE WHEN u.failed THEN 2 ELSE m.state END, "
        "next_attempt = u.next_attempt, arrival = u.arrival, attempts = u.attempts, "
        "last_attempt = u.last_attempt, delivered = u.delivered, bounced = u.bounced, "
        "lease = NULL, worker = NULL, lease_expires = NULL, last_lease = m.lease, "
        "suspect = false "
        "FROM unnest($1::bigint[], $2::bigint[], $3::bool[], $4::float8[], $5::float8[], "
        "$6::int[], $7::float8[], $8::int[], $9::bool[]) "
        "AS u(id, lease, failed, next_attempt, arrival, attempts, last_attempt, delivered, "
        "bounced) WHERE m.id = ANY($1::bigint[]) AND m.id = u.id AND m.lease = u.lease "
        "RETURNING m.id")
    _QUARANTINE: ClassVar[str] = (
        "UPDATE lmtpfast.msg m SET state = 3, reason = u.reason, lease = NULL, worker = NULL, "
        "lease_expires = NULL, last_lease = m.lease "
        "FROM unnest($1::bigint[], $2::bigint[], $3::text[]) AS u(id, lease, reason) "
        "WHERE m.id = ANY($1::bigint[]) AND m.id = u.id AND m.lease = u.lease RETURNING m.id")
    _RELEASE: ClassVar[str] = (
        "UPDATE lmtpfast.msg m SET lease = NULL, worker = NULL, lease_expires = NULL, "
        "last_lease = m.lease FROM unnest($1::bigint[], $2::bigint[]) AS u(id, lease) "
        "WHERE m.id = ANY($1::bigint[]) AND m.id = u.id AND m.lease = u.lease RETURNING m.id")
    _RCPT_INSERT: ClassVar[str] = (
        "INSERT INTO lmtpfast.rcpt (msg_id, idx, address, state, attempts, last, last_code, "
        "possibly_delivered, notify, orcpt) "
        "SELECT * FROM unnest($1::bigint[], $2::int[], $3::text[], $4::smallint[], "
        "$5::int[], $6::text[], $7::smallint[], $8::bool[], $9::text[], $10::text[])")

    async def record(self, updates: Sequence[Update]) -> list[RecordStatus]:
        """Apply *updates*: one statement per kind of outcome, in one transaction.

        All done (the common case): a single statement, no explicit
        transaction. An update whose lease was taken over is ``lost``; one
        whose entry is gone (deleted by an operator) ``gone``.
        """
        if not updates:
            return []
        by: dict[str, list[int]] = {}
        for i, u in enumerate(updates):
            if u.action not in ("done", "failed", "defer", "release", "quarantine"):
                raise ValueError(f"unknown action {u.action!r}")
            by.setdefault(u.action, []).append(i)
        keys = [(u.entry.lease.row, u.entry.lease.token) for u in updates]

        async def body(conn: Any) -> set[int]:
            try:
                if set(by) == {"done"}:
                    applied = await self._apply(conn, updates, by)
                else:
                    async with conn.transaction():
                        applied = await self._apply(conn, updates, by)
            except BaseException:
                # The commit may have happened: a retry must recognise its own effect.
                self._ambiguous.update(keys)
                raise
            return applied

        applied = await self._run("record", body)
        statuses: list[RecordStatus] = ["ok"] * len(updates)
        missing = [i for i, k in enumerate(keys) if k[0] not in applied]
        if missing:
            await self._unapplied(updates, missing, statuses)
        for u, k in zip(updates, keys, strict=True):
            self._ambiguous.discard(k)
            if self._inflight.get(k[0]) == k[1]:
                del self._inflight[k[0]]
            u.entry.close()
        return statuses

    async def _apply(self, conn: Any, updates: Sequence[Update], by: dict[str, list[int]]
                     ) -> set[int]:
        applied: set[int] = set()
        for action, idx in by.items():
            rows = [updates[i].entry.lease for i in idx]
            ids = [lease.row for lease in rows]
            tokens = [lease.token for lease in rows]
            if action == "done":
                got = await conn.fetch(self._DONE, ids, tokens)
            elif action == "release":
                got = await conn.fetch(self._RELEASE, ids, tokens)
            elif action == "quarantine":
                got = await conn.fetch(self._QUARANTINE, ids, tokens,
                                       [updates[i].reason or "quarantined" for i in idx])
            else:
                envs = [updates[i].entry.envelope for i in idx]
                failed = action == "failed"
                nexts = [updates[i].next_attempt if not failed and updates[i].next_attempt
                         is not None else e.next_attempt for i, e in zip(idx, envs, strict=True)]
                got = await conn.fetch(
                    self._KEEP, ids, tokens, [failed] * len(idx), nexts,
                    [e.arrival if e.arrival is not None else time.time() for e in envs],
                    [e.attempts for e in envs], [e.last_attempt for e in envs],
                    [e.delivered for e in envs], [e.bounced for e in envs])
                ok = {r[0] for r in got}
                kept = [i for i in ids if i in ok]
                if kept:
                    await conn.execute("DELETE FROM lmtpfast.rcpt WHERE msg_id = ANY($1::bigint[])",
                                       kept)
                    cols: list[list[Any]] = [[] for _ in range(10)]
                    for i, e in zip(ids, envs, strict=True):
                        if i in ok:
                            _rcpt_columns(i, e.recipients, cols)
                    await conn.execute(self._RCPT_INSERT, *cols)
            applied.update(r[0] for r in got)
        return applied

    async def _unapplied(self, updates: Sequence[Update], missing: list[int],
                         statuses: list[RecordStatus]) -> None:
        """Why some updates changed nothing: gone, taken over, or applied by a lost reply."""
        ids = [updates[i].entry.lease.row for i in missing]

        async def body(conn: Any) -> dict[int, int | None]:
            rows = await conn.fetch("SELECT id, last_lease FROM lmtpfast.msg "
                                    "WHERE id = ANY($1::bigint[])", ids)
            return {r[0]: r[1] for r in rows}

        try:
            found = await self._run("record", body, write=False)
        except QueueError:
            found = None  # unknown: say "lost" (never "ok" without proof)
        for i in missing:
            lease: _Lease = updates[i].entry.lease
            key = (lease.row, lease.token)
            if found is None:
                statuses[i] = "lost"
            elif lease.row not in found:
                statuses[i] = "ok" if key in self._ambiguous else "gone"
            else:
                statuses[i] = "ok" if found[lease.row] == lease.token else "lost"

    # -- leases ------------------------------------------------------------------------

    def _start_renewer(self) -> None:
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.get_running_loop().create_task(self._renew_loop())

    async def _renew_loop(self) -> None:
        """Renew this worker's leases every third of the lease while it holds any."""
        while self._inflight and not self._closed:
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self.lease / 3)
            if self._closed:
                return
            with contextlib.suppress(QueueError):
                await self.renew()

    async def renew(self) -> int:
        """Extend every lease this worker holds; returns how many rows were renewed."""
        held = list(self._inflight.items())
        if not held:
            return 0

        async def body(conn: Any) -> int:
            got = await conn.fetch(
                "UPDATE lmtpfast.msg m SET lease_expires = now() + make_interval(secs => $3) "
                "FROM unnest($1::bigint[], $2::bigint[]) AS u(id, lease) "
                "WHERE m.id = ANY($1::bigint[]) AND m.id = u.id AND m.lease = u.lease "
                "RETURNING m.id",
                [i for i, _ in held], [t for _, t in held], self.lease)
            return len(got)

        return await self._run("renew", body)

    # -- status and operators ------------------------------------------------------------

    async def status(self, *, due: float | None = None) -> QueueStatus:
        due = time.time() if due is None else due

        async def body(conn: Any) -> list[Any]:
            return list(await conn.fetch(
                "SELECT state, count(*), count(*) FILTER (WHERE next_attempt > $1), "
                "min(next_attempt) FILTER (WHERE next_attempt > $1), "
                "count(*) FILTER (WHERE lease IS NOT NULL AND lease_expires > now() "
                "AND worker IS DISTINCT FROM $2) FROM lmtpfast.msg GROUP BY state",
                due, self.worker))

        st = QueueStatus()
        for state, count, not_due, next_due, claimed in await self._run("status", body,
                                                                        write=False):
            if state == 0:
                st.queued, st.not_due, st.next_due, st.claimed = count, not_due, next_due, claimed
            elif state == 1:
                st.held = count
            elif state == 2:
                st.failed = count
            else:
                st.quarantined += count
        return st

    _INFO: ClassVar[str] = (
        "SELECT m.id, m.state, (m.lease IS NOT NULL AND m.lease_expires > now()) AS claimed, "
        "m.suspect, m.sender, m.arrival, m.attempts, m.next_attempt, m.last_attempt, "
        "m.delivered, m.ret, m.envid, m.bounced, m.size, m.reason, r.* FROM lmtpfast.msg m "
        "LEFT JOIN LATERAL (SELECT array_agg(address ORDER BY idx) AS addrs, "
        "array_agg(state ORDER BY idx) AS states, array_agg(attempts ORDER BY idx) AS tries, "
        "array_agg(last ORDER BY idx) AS lasts, "
        "array_agg(possibly_delivered ORDER BY idx) AS possibly, "
        "array_agg(notify ORDER BY idx) AS notifies, array_agg(orcpt ORDER BY idx) AS orcpts "
        "FROM lmtpfast.rcpt WHERE msg_id = m.id) r ON true ")

    @staticmethod
    def _info(row: Any) -> EntryInfo:
        env: Envelope | None
        try:
            env = _envelope(row, False)
        except BadEnvelope:
            env = None
        return EntryInfo(str(row["id"]), _STATE_NAME.get(row["state"], "quarantined"), env,
                         row["size"], bool(row["claimed"]), bool(row["suspect"]), row["reason"])

    async def entries(self, selection: Selection = ALL) -> AsyncIterator[EntryInfo]:
        """The selected entries in id order, 500 rows per query (no long transaction)."""
        states = None if selection.states is None else [_STATE_CODE[s]
                                                        for s in selection.states]
        ids = None if selection.ids is None else _int_ids(selection.ids)
        last = -1
        now = time.time()
        while True:
            async def body(conn: Any, last: int = last) -> list[Any]:
                return list(await conn.fetch(
                    self._INFO + "WHERE m.id > $1 AND ($2::smallint[] IS NULL OR "
                    "m.state = ANY($2)) AND ($3::bigint[] IS NULL OR m.id = ANY($3)) "
                    "ORDER BY m.id LIMIT 500", last, states, ids))

            rows = await self._run("list", body, write=False)
            for row in rows:
                info = self._info(row)
                if selection.matches(info, now=now):
                    yield info
            if len(rows) < 500:
                return
            last = rows[-1]["id"]

    async def show(self, id: str) -> EntryInfo | None:
        async for info in self.entries(Selection(ids=(id,))):
            return info
        return None

    async def content(self, id: str) -> bytes:
        rid = int(id) if id.isdigit() else -1

        async def body(conn: Any) -> bytes | None:
            got = await conn.fetchval("SELECT content FROM lmtpfast.body WHERE id = $1", rid)
            return None if got is None else bytes(got)

        data = await self._run("show", body, write=False)
        if data is None:
            raise KeyError(id)
        return data

    async def _selected(self, selection: Selection) -> list[int]:
        if (selection.ids is not None and not selection.needs_envelope()
                and selection.states is None):
            return _int_ids(selection.ids)
        return [int(i.id) async for i in self.entries(selection)]

    async def _act(self, selection: Selection, what: str,
                   fn: Callable[[Any, list[int]], Awaitable[dict[int, str]]]) -> ActionResult:
        """Apply *fn* to the selected ids, 500 per transaction; *fn* says done/busy per id."""
        result = ActionResult()
        ids = await self._selected(selection)
        if selection.ids is not None:
            chosen = {str(i) for i in ids}
            result.missing += [i for i in selection.ids if i not in chosen]
        for start in range(0, len(ids), 500):
            chunk = ids[start:start + 500]

            async def body(conn: Any, chunk: list[int] = chunk) -> dict[int, str]:
                async with conn.transaction():
                    out = await fn(conn, chunk)
                    if what in ("release", "retry", "requeue") and "done" in out.values():
                        await conn.execute("SELECT pg_notify($1, '')", CHANNEL)
                    return out

            outcome = await self._run(what, body)
            for i in chunk:
                getattr(result, outcome.get(i, "missing")).append(str(i))
        return result

    @staticmethod
    async def _busy_or_missing(conn: Any, ids: list[int], done: set[int]) -> dict[int, str]:
        rest = [i for i in ids if i not in done]
        out = {i: "done" for i in done}
        if rest:
            for r in await conn.fetch(
                    "SELECT id FROM lmtpfast.msg WHERE id = ANY($1::bigint[]) AND "
                    "lease IS NOT NULL AND lease_expires > now()", rest):
                out[r[0]] = "busy"
        return out

    async def hold(self, selection: Selection) -> ActionResult:
        """Put queued entries on hold; one being delivered is *busy* (as the other backends say)."""
        async def fn(conn: Any, ids: list[int]) -> dict[int, str]:
            got = await conn.fetch(
                "UPDATE lmtpfast.msg SET state = 1 WHERE id = ANY($1::bigint[]) AND state = 0 "
                "AND (lease IS NULL OR lease_expires <= now()) RETURNING id", ids)
            return await self._busy_or_missing(conn, ids, {r[0] for r in got})
        return await self._act(selection, "hold", fn)

    async def release(self, selection: Selection) -> ActionResult:
        now = time.time()

        async def fn(conn: Any, ids: list[int]) -> dict[int, str]:
            got = await conn.fetch(
                "UPDATE lmtpfast.msg SET state = 0, next_attempt = least(next_attempt, $2) "
                "WHERE id = ANY($1::bigint[]) AND state = 1 RETURNING id", ids, now)
            return await self._busy_or_missing(conn, ids, {r[0] for r in got})
        return await self._act(selection, "release", fn)

    async def retry(self, selection: Selection) -> ActionResult:
        now = time.time()

        async def fn(conn: Any, ids: list[int]) -> dict[int, str]:
            got = await conn.fetch(
                "UPDATE lmtpfast.msg SET next_attempt = least(next_attempt, $2) "
                "WHERE id = ANY($1::bigint[]) AND state = 0 "
                "RETURNING id, lease IS NOT NULL AND lease_expires > now()", ids, now)
            return {r[0]: "busy" if r[1] else "done" for r in got}
        return await self._act(selection, "retry", fn)

    async def delete(self, selection: Selection) -> ActionResult:
        """Remove entries, claimed or not (a worker finds them ``gone`` when it records)."""
        async def fn(conn: Any, ids: list[int]) -> dict[int, str]:
            got = await conn.fetch(
                "WITH d AS (DELETE FROM lmtpfast.msg WHERE id = ANY($1::bigint[]) RETURNING id),"
                " r AS (DELETE FROM lmtpfast.rcpt WHERE msg_id = ANY(ARRAY(SELECT id FROM d))),"
                " b AS (DELETE FROM lmtpfast.body WHERE id = ANY(ARRAY(SELECT id FROM d))) "
                "SELECT id FROM d", ids)
            return {r[0]: "done" for r in got}
        return await self._act(selection, "delete", fn)

    async def bounce(self, selection: Selection, reason: Reason) -> ActionResult:
        last = _reason_encoder.encode(reason).decode()

        async def fn(conn: Any, ids: list[int]) -> dict[int, str]:
            got = await conn.fetch(
                "UPDATE lmtpfast.msg SET state = 2, lease = NULL, worker = NULL, "
                "lease_expires = NULL WHERE id = ANY($1::bigint[]) AND state IN (0, 1) AND "
                "(lease IS NULL OR lease_expires <= now()) RETURNING id", ids)
            done = [r[0] for r in got]
            if done:
                await conn.execute(
                    "UPDATE lmtpfast.rcpt SET state = 1, last = $2, last_code = $3 "
                    "WHERE msg_id = ANY($1::bigint[]) AND state = 0", done, last, reason.code)
            return await self._busy_or_missing(conn, ids, set(done))
        return await self._act(selection, "bounce", fn)

    async def requeue(self, selection: Selection) -> ActionResult:
        now = time.time()

        async def fn(conn: Any, ids: list[int]) -> dict[int, str]:
            got = await conn.fetch(
                "UPDATE lmtpfast.msg SET state = 0, next_attempt = $2, reason = NULL "
                "WHERE id = ANY($1::bigint[]) AND state IN (2, 3) RETURNING id", ids, now)
            done = [r[0] for r in got]
            if done:
                await conn.execute("UPDATE lmtpfast.rcpt SET state = 0 "
                                   "WHERE msg_id = ANY($1::bigint[]) AND state = 1", done)
            return {i: "done" for i in done}
        return await self._act(selection, "requeue", fn)

    # -- migration from a directory spool ------------------------------------------------

    async def import_dir(self, path: str | os.PathLike[str], *, batch: int = 200
                         ) -> ImportReport:
        """Move every entry of the directory spool at *path* into this queue, without loss.

        Each entry is claimed the directory spool's way (its flock), written
        here with its whole state and its ``imported`` mark in one durable
        transaction, and only then removed from the directory. A crash
        leaves it in one place or both, never neither; a rerun removes what
        an earlier run imported and never queues it twice.
        """
        from ._store import Spool, SpoolError

        report = ImportReport()
        try:
            spool = Spool(path)
        except SpoolError as exc:
            raise QueueError(exc.errno or 0, exc.strerror or str(exc), str(path)) from None
        for claims in spool.claim_batches(batch, report):
            try:
                done = await self._already_imported([c.id for c in claims])
                todo = [c for c in claims if c.id not in done]
                report.already += len(claims) - len(todo)
                if todo:
                    msgs = [NewMessage(c.envelope, Path(c.message_path), origin=c.id)
                            for c in todo]
                    group = [(m, _content_bytes(m), 0) for m in msgs]
                    await self._enqueue_group(group, True, [(c.id, i)
                                                            for i, c in enumerate(todo)])
                    report.imported += len(todo)
                for c in claims:
                    c.delivered()  # the directory spool's commit point, after ours
            finally:
                for c in claims:
                    c.release()
        report.failed += await self._import_failed(Path(path))
        return report

    async def import_store(self, path: str | os.PathLike[str], *, batch: int = 200
                           ) -> ImportReport:
        """Move the entries of a spool's embedded store (``PATH/queue.db``) into this queue.

        Queued entries are claimed from the store as a replay claims them (so
        none a running replay holds is touched), written here with their
        state and an ``imported`` mark (``sqlite:ID``) in one transaction, and
        only then removed from the store; held and failed entries the same
        way with their state. Quarantined entries stay for the operator. A
        rerun after a crash removes what was already imported, never queues
        it twice.
        """
        from ._queue import Selection, Update
        from ._sqlite import SQLiteQueue, is_store

        report = ImportReport()
        if not is_store(path):
            return report
        async with SQLiteQueue(path) as store:
            while True:
                got = await store.claim(batch, due=float("inf"))
                if got.entries:
                    await self._import_entries(store, got.entries, 0, report)
                    await store.record([Update(e, "done") for e in got.entries])
                report.quarantined += got.quarantined
                if got.exhausted:
                    break
            for state in ("held", "failed"):
                infos = [i async for i in store.entries(Selection(states=(state,)))]
                for start in range(0, len(infos), batch):
                    chunk = [i for i in infos[start:start + batch] if i.envelope is not None]
                    entries = [Entry(i.id, i.envelope, await store.content(i.id), i.size)
                               for i in chunk if i.envelope is not None]
                    await self._import_entries(store, entries, _STATE_CODE[state], report)
                    await store.delete(Selection(ids=tuple(e.id for e in entries)))
            report.locked += (await store.status()).claimed
        return report

    async def _import_entries(self, store: Any, entries: Sequence[Entry], state: int,
                              report: ImportReport) -> None:
        names = [f"sqlite:{e.id}" for e in entries]
        done = await self._already_imported(names)
        todo = [(e, n) for e, n in zip(entries, names, strict=True) if n not in done]
        report.already += len(entries) - len(todo)
        if todo:
            group = [(NewMessage(e.envelope, bytes(e.content), origin=n), bytes(e.content), state)
                     for e, n in todo]
            await self._enqueue_group(group, True, [(n, i) for i, (_, n) in enumerate(todo)])
            if state == _STATE_CODE["failed"]:
                report.failed += len(todo)
            else:
                report.imported += len(todo)

    async def _already_imported(self, names: Sequence[str]) -> set[str]:
        async def body(conn: Any) -> set[str]:
            rows = await conn.fetch("SELECT legacy FROM lmtpfast.imported "
                                    "WHERE legacy = ANY($1::text[])", list(names))
            return {r[0] for r in rows}
        return await self._run("import", body, write=False)

    async def _import_failed(self, root: Path) -> int:
        """``failed/ID.json`` + ``ID.eml`` become failed entries (requeue-able)."""
        from ._format import decode_envelope

        failed = root / "failed"
        try:
            names = sorted(e.name[:-5] for e in os.scandir(failed) if e.name.endswith(".json"))
        except FileNotFoundError:
            return 0
        n = 0
        for name in names:
            js, eml, txt = (failed / f"{name}.{x}" for x in ("json", "eml", "txt"))
            if name not in await self._already_imported([name]):
                try:
                    env = decode_envelope(js.read_bytes())
                    msg = NewMessage(env, eml, origin=name)
                    data = _content_bytes(msg)
                except (OSError, BadEnvelope):
                    continue  # left as it is: the operator's to look at
                await self._enqueue_group([(msg, data, _STATE_CODE["failed"])], True,
                                          [(name, 0)])
                n += 1
            for p in (txt, eml, js):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(p)
        return n

    async def init(self) -> tuple[int, int]:
        """Create or migrate the schema (``lmtpfast queue init``); (version before, after)."""
        return await init_queue(self._dsn)

    # -- the end ---------------------------------------------------------------------------

    async def close(self) -> None:
        """Give back unrecorded claims (flagged suspect: they may have been attempted)."""
        if self._closed:
            return
        held = list(self._inflight.items())
        if held and self._pool is not None:
            async def body(conn: Any) -> None:
                await conn.execute(
                    "UPDATE lmtpfast.msg m SET lease = NULL, worker = NULL, "
                    "lease_expires = NULL, suspect = true, last_lease = m.lease "
                    "FROM unnest($1::bigint[], $2::bigint[]) AS u(id, lease) "
                    "WHERE m.id = ANY($1::bigint[]) AND m.id = u.id AND m.lease = u.lease",
                    [i for i, _ in held], [t for _, t in held])

            with contextlib.suppress(QueueError):
                self._down_until = 0.0
                await self._run("close", body)
            self._inflight.clear()
        self._closed = True
        self._wake.set()
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(BaseException):
                await self._renewer
        pool, self._pool = self._pool, None
        if pool is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(pool.close(), timeout=10)
            if not pool._closed:  # a hung connection: cut it
                pool.terminate()


async def _no_reset(conn: Any) -> None:
    """Nothing to undo when a connection goes back to the pool.

    asyncpg's default (``RESET ALL``, ``UNLISTEN *``, ...) is a round trip per
    call; this module leaves no session state behind (``SET LOCAL`` only, no
    ``LISTEN``, no cursors), and a connection that failed is terminated.
    """


def _content_bytes(m: NewMessage) -> bytes:
    c = m.content
    if isinstance(c, bytes):
        return c
    if isinstance(c, (bytearray, memoryview)):
        return bytes(c)
    with open(os.fspath(c), "rb") as f:
        return f.read()


def _rcpt_columns(id: int, recipients: Sequence[Recipient], cols: list[list[Any]]) -> None:
    for idx, r in enumerate(recipients):
        last = r.last
        for c, v in zip(cols, (
                id, idx, r.address, _RCPT_STATE[r.state], r.attempts,
                None if last is None else _reason_encoder.encode(last).decode(),
                None if last is None else max(-32768, min(32767, last.code)),
                r.possibly_delivered, None if r.notify is None else ",".join(r.notify),
                r.orcpt), strict=True):
            c.append(v)


def _envelope(row: Any, suspect: bool) -> Envelope:
    """The envelope of a ``msg`` row and its aggregated recipients; checked as a claim must."""
    addrs = row["addrs"]
    if not addrs:
        raise BadEnvelope("envelope has no recipients")
    check_address(row["sender"], sender=True)
    rcpts = []
    for addr, state, tries, last, possibly, notify, orcpt in zip(
            addrs, row["states"], row["tries"], row["lasts"], row["possibly"],
            row["notifies"], row["orcpts"], strict=True):
        check_address(addr)
        try:
            reason = None if last is None else _reason_decoder.decode(last)
        except msgspec.DecodeError as exc:
            raise BadEnvelope(f"malformed last reply of <{addr}>: {exc}") from None
        queued = state == 0
        rcpts.append(Recipient(
            address=addr, state="queued" if queued else "failed", attempts=tries, last=reason,
            possibly_delivered=bool(possibly) or (suspect and queued),
            notify=None if notify is None else tuple(notify.split(",")), orcpt=orcpt))
    ret = row["ret"]
    if ret not in (None, "FULL", "HDRS"):
        raise BadEnvelope(f"bad DSN RET {ret!r}")
    return Envelope(sender=row["sender"], recipients=rcpts, arrival=row["arrival"],
                    attempts=row["attempts"], next_attempt=row["next_attempt"],
                    last_attempt=row["last_attempt"], delivered=row["delivered"], ret=ret,
                    envid=row["envid"], bounced=row["bounced"])


def _int_ids(ids: Iterable[str]) -> list[int]:
    return [int(i) for i in ids if i.isdigit() and len(i) < 19]


async def init_queue(dsn: str) -> tuple[int, int]:
    """``lmtpfast queue init``: create or migrate the schema at *dsn*; (before, after)."""
    asyncpg = _asyncpg()
    try:
        conn = await asyncpg.connect(dsn, timeout=10)
    except (asyncpg.PostgresError, OSError, TimeoutError, ValueError) as exc:
        cls = QueueError if _config_error(exc) else QueueWriteError
        raise cls(0, f"connect: {_problem(exc)}", redact_dsn(dsn)) from None
    try:
        return await init_schema(conn)
    except asyncpg.PostgresError as exc:
        raise QueueError(0, f"init: {_problem(exc)}", redact_dsn(dsn)) from None
    finally:
        await conn.close()


class PgWriter:
    """A synchronous writer for the PostgreSQL queue (``lmtpfast enqueue``, scripts).

    The same ``enqueue``/``enqueue_many`` as the embedded store's
    :class:`~lmtpfast.spool.SQLiteStore`, over a private event loop kept for
    the writer's life (one connection pool for every call). Use as a context
    manager or call :meth:`close`.
    """

    def __init__(self, dsn: str, *, create: bool = False) -> None:
        self.queue = PgQueue(dsn, create=create, pool_size=2)
        #: Where the messages go, for messages (the URL without its password).
        self.path = self.queue.location
        self._runner: asyncio.Runner | None = asyncio.Runner()

    def __repr__(self) -> str:
        return f"<PgWriter {self.path}>"

    def _call(self, coro: Awaitable[T]) -> T:
        if self._runner is None:
            raise QueueError(0, "the writer is closed", self.path)
        return self._runner.run(coro)  # type: ignore[arg-type]

    def enqueue_many(self, messages: Iterable[NewMessage], *, durable: bool = True
                     ) -> list[str]:
        """Queue every message in as few transactions as the bounds allow; their ids."""
        return self._call(self.queue.enqueue_many(list(messages), durable=durable))

    def enqueue(self, message: bytes | str, sender: str, recipients: Sequence[str], *,
                durable: bool = True, **options: Any) -> str:
        """Queue one message; its id (``options``: :func:`~lmtpfast.spool.new_envelope`'s)."""
        from ._format import new_envelope

        data = message.encode("utf-8") if isinstance(message, str) else bytes(message)
        env = new_envelope(sender, list(recipients), **options)
        [id] = self.enqueue_many([NewMessage(env, data)], durable=durable)
        return id

    def close(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            try:
                runner.run(self.queue.close())
            finally:
                runner.close()

    def __enter__(self) -> PgWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class PgShapingState(ShapingState):
    """Dead destinations and limits shared by every worker of a PostgreSQL queue.

    The shaper's calls stay synchronous and cheap: they read and write a
    local mirror; a background task writes this worker's marks and revivals
    and reads everyone's every *refresh* seconds (at once after a local
    change). So a destination one worker found dead is deferred by all the
    others within *refresh* seconds, without each connecting and failing
    ``dead_after`` times itself. Times in the table are Unix time (the
    shaper's are monotonic: converted here).

    Concurrency and rate limits hold across all workers: each transaction
    takes a slot in ``lmtpfast.dest_slot`` (one statement,
    ``lmtpfast.acquire_slot``, which also reserves the shared next start in
    ``lmtpfast.dest.next_start``), leased for the queue's lease and renewed
    by the background task while held; releases are batched by a background
    task. A dead worker's slots free themselves when their lease expires. If
    the database cannot be reached, acquiring raises
    :class:`~lmtpfast.ShapingUnavailable` (the agent defers); a release
    that cannot be written is left to expire. What stays per worker: the
    probe after a dead spell (at most one per worker, so a few across the
    hosts) and the slow-start window (each worker's own, under the shared
    limit). A database outage leaves each worker with its own dead marks
    until it is back.
    """

    shared = True

    def __init__(self, queue: PgQueue, *, refresh: float = 0.5) -> None:
        self._queue = queue
        self.refresh = refresh
        self._local = LocalShapingState()
        #: destination -> (Unix time until, reason) not written yet.
        self._pending: dict[str, tuple[float, str]] = {}
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._closed = False
        #: Slots held: token -> destination (renewed by the background task).
        self._held: dict[int, str] = {}
        self._renewed = time.monotonic()
        #: Releases not written yet: (token, destination, delay).
        self._releases: list[tuple[int, str, float]] = []
        self._releaser: asyncio.Task[None] | None = None

    @staticmethod
    def _to_wall(mono: float) -> float:
        return mono - time.monotonic() + time.time() if mono else 0.0

    @staticmethod
    def _to_mono(wall: float) -> float:
        return wall - time.time() + time.monotonic() if wall else 0.0

    def _kick(self, *, changed: bool = True) -> None:
        """Make sure the background task runs; wake it now only after a local change."""
        if self._closed:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # outside a loop (a test's direct call): synced at the next sync()
        if self._wake is None:
            self._wake = asyncio.Event()
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._run())
        if changed:
            self._wake.set()

    def dead_until(self, destination: str) -> float:
        # Asked before every transaction: answered from the mirror, no query.
        self._kick(changed=False)
        return self._local.dead_until(destination)

    def mark_dead(self, destination: str, until: float, reason: str) -> None:
        self._local.mark_dead(destination, until, reason)
        self._pending[destination] = (self._to_wall(until), reason)
        self._kick()

    def reason(self, destination: str) -> str:
        return self._local.reason(destination)

    def claim_probe(self, destination: str, now: float) -> bool:
        return self._local.claim_probe(destination, now)

    def revive(self, destination: str) -> None:
        self._local.revive(destination)
        self._pending[destination] = (0.0, "")
        self._kick()

    def reserve_start(self, destination: str, now: float, interval: float) -> float:
        return self._local.reserve_start(destination, now, interval)

    async def acquire_slot(self, destination: str, limit: int, step: float
                           ) -> tuple[int, float] | None:
        self._kick(changed=False)  # the renewer
        token = secrets.randbits(63) or 1
        queue = self._queue

        async def body(conn: Any) -> float | None:
            got: float | None = await conn.fetchval(
                "SELECT lmtpfast.acquire_slot($1, $2, $3, $4, $5, $6)",
                destination, limit, token, queue.worker, queue.lease, step)
            return got

        try:
            wait = await queue._run("shaping", body)
        except QueueError as exc:
            raise ShapingUnavailable(str(exc)) from None
        if wait is None:
            return None
        if limit > 0:
            self._held[token] = destination
        return token, float(wait)

    def release_slot(self, destination: str, token: int, delay: float) -> None:
        self._held.pop(token, None)
        self._releases.append((token, destination, delay))
        if self._closed:
            return
        if self._releaser is None or self._releaser.done():
            self._releaser = asyncio.get_running_loop().create_task(self._release_all())

    async def _release_all(self) -> None:
        """Write the releases in one statement per batch (those made meanwhile next)."""
        while self._releases:
            batch, self._releases = self._releases, []

            async def body(conn: Any, batch: list[tuple[int, str, float]] = batch) -> None:
                await conn.execute(
                    "WITH r AS (DELETE FROM lmtpfast.dest_slot WHERE token = ANY($1::bigint[])) "
                    "UPDATE lmtpfast.dest x SET next_start = greatest(x.next_start, "
                    "extract(epoch FROM clock_timestamp()) + u.delay) "
                    "FROM (SELECT d, max(delay) AS delay FROM unnest($2::text[], $3::float8[]) "
                    "AS u(d, delay) WHERE delay > 0 GROUP BY d) u WHERE x.destination = u.d",
                    [t for t, _, _ in batch], [d for _, d, _ in batch],
                    [w for _, _, w in batch])

            # Not written (database down): the slots expire with their lease.
            with contextlib.suppress(QueueError):
                await self._queue._run("shaping", body)

    async def _renew(self) -> None:
        if not self._held or time.monotonic() - self._renewed < self._queue.lease / 3:
            return
        tokens = list(self._held)
        lease = self._queue.lease

        async def body(conn: Any) -> None:
            await conn.execute(
                "UPDATE lmtpfast.dest_slot SET expires = clock_timestamp() + "
                "make_interval(secs => $2) WHERE token = ANY($1::bigint[])", tokens, lease)

        await self._queue._run("shaping", body)
        self._renewed = time.monotonic()

    async def sync(self) -> None:
        """Write this worker's changes, then read everyone's (:class:`QueueWriteError` if
        the database cannot be reached: the changes stay pending)."""
        pending = dict(self._pending)

        async def body(conn: Any) -> list[Any]:
            if pending:
                await conn.execute(
                    "INSERT INTO lmtpfast.dest (destination, dead_until, reason, worker) "
                    "SELECT d, u, r, $4 FROM unnest($1::text[], $2::float8[], $3::text[]) "
                    "AS x(d, u, r) ON CONFLICT (destination) DO UPDATE SET "
                    "dead_until = EXCLUDED.dead_until, reason = EXCLUDED.reason, "
                    "worker = EXCLUDED.worker, updated = now()",
                    list(pending), [u for u, _ in pending.values()],
                    [r for _, r in pending.values()], self._queue.worker)
            return list(await conn.fetch(
                "SELECT destination, dead_until, reason FROM lmtpfast.dest "
                "WHERE dead_until > $1", time.time()))

        rows = await self._queue._run("shaping", body)
        for d, v in pending.items():
            if self._pending.get(d) == v:
                del self._pending[d]
        remote = {r[0]: (r[1], r[2]) for r in rows}
        for d, (wall, reason) in remote.items():
            if d in self._pending:
                continue  # a newer local change, written next round
            until = self._to_mono(wall)
            if abs(self._local.dead_until(d) - until) > 0.001:
                self._local.mark_dead(d, until, reason)
        for d in list(self._local._dead):
            if d not in remote and d not in self._pending:
                self._local.revive(d)  # revived (or expired) elsewhere

    async def _run(self) -> None:
        assert self._wake is not None
        while not self._closed:
            with contextlib.suppress(QueueError):
                await self.sync()
            with contextlib.suppress(QueueError):
                await self._renew()
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self.refresh)

    async def close(self) -> None:
        """Write what is pending (if the database is there) and stop the background task."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
        if self._releaser is not None:
            with contextlib.suppress(Exception):
                await self._releaser
        for token, dest in list(self._held.items()):
            self._releases.append((token, dest, 0.0))  # cut short: give them back
        self._held.clear()
        await self._release_all()
        if self._pending:
            with contextlib.suppress(QueueError):
                await self.sync()
