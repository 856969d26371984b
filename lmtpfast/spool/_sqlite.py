"""The embedded queue store of a spool directory: SQLite (WAL) for the index, segment files
for content.

Layout (see ``docs/spool.md`` for the why and the measurements)::

    SPOOL/queue.db      one row per message: envelope, state, lease, where the content is
    SPOOL/seg/N         append-only segment files of small messages, written in groups
    SPOOL/data/ID       one file per big message (streamed, never read whole)
    SPOOL/workers/TOKEN one per live replay worker: its flock is its liveness, and its
                        preallocated body the journal of outcomes it could not write
    SPOOL/queue.lock    every process using the store holds a shared flock on it
    SPOOL/quarantine/   damaged store files moved aside (the salvage)

Content is stored as *records*, each self-describing: a header (magic, CRC-32,
id, lengths), the envelope as first queued (JSON) and the message. A segment
holds the records of many small messages; it is removed whole, by one unlink,
once none of its messages is queued any more (``seg.live`` counts them). A
deferred or failed message's content moves into its row, so a long-lived
entry never pins a segment.

Durability (what needs ``fsync`` and what only bounds duplicates):

* enqueue: segment data ``fdatasync``, then the rows in one commit with
  ``synchronous=FULL`` (the WAL is flushed) -- two flushes per group of
  messages, and :meth:`SQLiteStore.enqueue_many` returns only after them;
* claims and outcomes: commits with ``synchronous=NORMAL``: safe against a
  crash of the process (``kill -9``), not flushed for power loss, where a lost
  outcome means the entry is delivered again (a duplicate, never a loss);
* removing content (a segment, a data file) comes only after a commit that
  flushes the WAL (a *barrier*), so no row that power loss could bring back
  ever points at removed content.

Leases: a worker has a token and a file ``workers/TOKEN`` on which it holds
an exclusive flock from before its first claim to its end; a claimed row
names the token. Another worker that can take that flock knows the holder is
dead (the kernel drops the lock of a process that ends, however it ends):
it applies the dead worker's journal, then frees its rows, flagged *suspect*
(their queued recipients may have been delivered).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import io
import itertools
import os
import secrets
import sqlite3
import stat
import struct
import time
import zlib
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import msgspec

from ._format import (
    BadEnvelope,
    Envelope,
    Reason,
    Recipient,
    check_address,
    encode_envelope,
    new_envelope,
)
from ._queue import (
    ALL,
    ActionResult,
    ClaimBatch,
    Entry,
    EntryInfo,
    EntryState,
    NewMessage,
    Queue,
    QueueCorrupt,
    QueueError,
    QueueStatus,
    QueueWriteError,
    RecordStatus,
    Selection,
    Update,
)
from ._store import ImportReport, flocked_files

if TYPE_CHECKING:
    from .._delivery import MessageFile
    from ._watch import Watch

# asyncio and _watch (ctypes) are imported where SQLiteQueue uses them:
# `lmtpfast enqueue` writes through SQLiteStore and needs neither.

__all__ = ["SCHEMA_VERSION", "SQLiteQueue", "SQLiteStore", "is_store"]

SCHEMA_VERSION = 1
DB_NAME = "queue.db"
LOCK_NAME = "queue.lock"
#: Touched after every enqueue, release, retry and requeue: what waiting workers watch.
DOORBELL = "doorbell"
_DIRS = ("seg", "data", "workers", "tmp", "quarantine")
DIR_MODE = 0o700
FILE_MODE = 0o600

#: Messages larger than this get a data file of their own (streamed in and out).
BIG_MESSAGE = 128 * 1024
#: A segment is sealed (no more appends) once it is this large.
SEGMENT_SIZE = 8 * 1024 * 1024
#: A call queuing less than this in all stores its content in the rows
#: (one flush instead of two, no segment for a single message).
INLINE_BATCH = 64 * 1024
#: Group commit: an enqueue transaction holds at most this many rows and this
#: much content, and is committed at least this often (seconds) while messages
#: keep coming. Content goes to its segment as it comes, WRITE_SIZE at a time:
#: memory is the group's rows and one write buffer, not its content.
ENQUEUE_ROWS = 50_000
ENQUEUE_BYTES = 64 * 1024 * 1024
ENQUEUE_SECONDS = 1.0
WRITE_SIZE = 1 << 20
#: The worker journal: preallocated, so writing it never needs new disk space.
JOURNAL_OFFSET = 4096
JOURNAL_SIZE = 4 * 1024 * 1024
#: Leftovers of crashed writers this old are removed by the sweep.
ORPHAN_MAX_AGE = 3600

_STATE_CODE: dict[EntryState, int] = {"queued": 0, "held": 1, "failed": 2, "quarantined": 3}
_STATE_NAME: dict[int, EntryState] = {v: k for k, v in _STATE_CODE.items()}
_QUEUED, _HELD, _FAILED, _QUARANTINED = 0, 1, 2, 3

# Record header: magic, CRC-32 of envelope+message, id, envelope length, message length.
_HEADER = struct.Struct("<4sIqII")
_MAGIC = b"LQR1"
_JHEADER = struct.Struct("<4sIQ")
_JMAGIC = b"LWJ1"

_SCHEMA = (
    "CREATE TABLE meta(key TEXT PRIMARY KEY, value) WITHOUT ROWID",
    # state: 0 queued, 1 held, 2 failed, 3 quarantined.
    # Content is in exactly one place: body (inline), seg+off (a segment
    # record), or neither (the data file data/ID).
    """CREATE TABLE msg(
        id INTEGER PRIMARY KEY,
        state INTEGER NOT NULL DEFAULT 0,
        next_attempt REAL NOT NULL,
        worker TEXT,
        suspect INTEGER NOT NULL DEFAULT 0,
        sender TEXT NOT NULL,
        rcpts BLOB NOT NULL,
        arrival REAL NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        last_attempt REAL,
        delivered INTEGER NOT NULL DEFAULT 0,
        ret TEXT,
        envid TEXT,
        size INTEGER NOT NULL,
        crc INTEGER NOT NULL,
        seg INTEGER,
        off INTEGER,
        body BLOB,
        reason TEXT)""",
    # Claims never touch it (they only set worker): due rows in next-attempt order.
    "CREATE INDEX msg_due ON msg(next_attempt) WHERE state = 0",
    "CREATE TABLE seg(id INTEGER PRIMARY KEY, live INTEGER NOT NULL DEFAULT 0,"
    " sealed INTEGER NOT NULL DEFAULT 0)",
    # Directory-spool entries already converted (the import is idempotent).
    "CREATE TABLE imported(legacy TEXT PRIMARY KEY, id INTEGER NOT NULL) WITHOUT ROWID",
)

#: A fresh envelope's row in a segment (the other columns keep their defaults).
_INSERT_SEGMENT = ("INSERT INTO msg(id, next_attempt, sender, rcpts, arrival, size, crc, seg, off)"
                   " VALUES (?,?,?,?,?,?,?,?,?)")
_INSERT_FULL = ("INSERT INTO msg(id, next_attempt, sender, rcpts, arrival, attempts, last_attempt,"
                " delivered, ret, envid, size, crc, seg, off, body)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)")

_rcpts_encoder = msgspec.json.Encoder()
_rcpts_decoder = msgspec.json.Decoder(list[Recipient])
_env_decoder = msgspec.json.Decoder(Envelope)


class _JournalItem(msgspec.Struct, array_like=True):
    id: int
    action: str
    rcpts: bytes | None = None
    arrival: float = 0.0
    attempts: int = 0
    next_attempt: float = 0.0
    last_attempt: float | None = None
    delivered: int = 0
    reason: str = ""


_journal_encoder = msgspec.msgpack.Encoder()
_journal_decoder = msgspec.msgpack.Decoder(list[_JournalItem])


class _Bad(Exception):
    """An entry that cannot be used: quarantined with this reason."""


#: Errors of ours while opening content (out of descriptors or memory): the
#: entry is fine and stays queued; the claim fails as a refused write does.
_OURS = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOMEM))


@dataclass(slots=True)
class _Lease:
    row: int
    seg: int | None
    off: int | None
    #: Content kept in the row already (inline).
    inline: bool
    crc: int


class _Mismatch(Exception):
    """Some update of a batch matched no row: redo the batch one by one."""


@dataclass(slots=True)
class _Segment:
    """This process's open segment for appends (its flock says it is in use)."""

    id: int
    fd: int
    size: int
    new: bool = True


@dataclass(slots=True)
class SalvageReport:
    """What :meth:`SQLiteStore.salvage` did."""

    #: Rows copied from the damaged database.
    recovered: int = 0
    #: Entries rebuilt from their content records (quarantined).
    rebuilt: int = 0
    #: Id ranges whose rows could not be read.
    unreadable: list[tuple[int, int]] = field(default_factory=list)
    #: Where the damaged files went.
    moved: list[str] = field(default_factory=list)


# -- file helpers -----------------------------------------------------------------------


def _private_dir(path: Path) -> None:
    path.mkdir(mode=DIR_MODE, exist_ok=True)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise QueueError(errno.ENOTDIR, "not a directory", str(path))
    if stat.S_IMODE(st.st_mode) != DIR_MODE and st.st_uid == os.geteuid():
        os.chmod(path, DIR_MODE)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _create(path: Path, flags: int = os.O_WRONLY) -> int:
    fd = os.open(path, flags | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)  # whatever the umask
    except BaseException:
        os.close(fd)
        raise
    return fd


def _write_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def _is_corrupt(exc: BaseException) -> bool:
    if not isinstance(exc, sqlite3.DatabaseError) or isinstance(exc, sqlite3.OperationalError):
        return False
    return not isinstance(exc, sqlite3.IntegrityError | sqlite3.ProgrammingError)


def is_store(path: str | os.PathLike[str]) -> bool:
    """Whether *path* holds a queue store (``queue.db``)."""
    return os.path.lexists(os.path.join(os.fspath(path), DB_NAME))


def _record(id: int, env_bytes: bytes, body: bytes | bytearray | memoryview) -> tuple[bytes, int]:
    crc = zlib.crc32(body, zlib.crc32(env_bytes))
    return _HEADER.pack(_MAGIC, crc, id, len(env_bytes), len(body)) + env_bytes, crc


T = TypeVar("T")


class SQLiteStore:
    """The store of one spool directory, synchronous (use it from one thread at a time).

    :class:`SQLiteQueue` is the async :class:`~lmtpfast.spool.Queue` over it;
    writers that are not async (``lmtpfast enqueue``, :func:`~lmtpfast.spool.enqueue`)
    use this class directly. *create* makes the directory and the database;
    without it a missing store is a :class:`~lmtpfast.spool.QueueError`.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        create: bool = False,
        big_message: int = BIG_MESSAGE,
        segment_size: int = SEGMENT_SIZE,
        busy_timeout: float = 30.0,
        background_checkpoints: bool = False,
    ) -> None:
        self.path = Path(path)
        self._checkpointer: _Checkpointer | None = None
        self.big_message = big_message
        self.segment_size = segment_size
        self._busy_ms = int(busy_timeout * 1000)
        self._db_path = self.path / DB_NAME
        self._token: str | None = None
        self._worker_fd = -1
        self._segment: _Segment | None = None
        self._seg_fds: dict[int, int] = {}
        self._retired: list[_Segment] = []
        self._first_pass = True
        #: Ids of the enqueue_many call under way: [next, end of block, next block's size].
        self._ids = [0, 0, 256]
        self._lock_fd = -1
        self._closed = False
        self._open(create, background_checkpoints)

    def __repr__(self) -> str:
        return f"<SQLiteStore {self.path}>"

    # -- opening ---------------------------------------------------------------------

    def _open(self, create: bool, background_checkpoints: bool) -> None:
        try:
            self._open_files(create, background_checkpoints)
        except QueueError:
            raise
        except OSError as exc:
            # Making the store's folders and files on a full or read-only disk.
            cls = QueueWriteError if create else QueueError
            raise cls(exc.errno or errno.EIO, f"cannot set up the store: {exc.strerror or exc}",
                      exc.filename or str(self.path)) from None

    def _open_files(self, create: bool, background_checkpoints: bool) -> None:
        if create:
            self.path.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            raise QueueError(errno.ENOENT, "spool directory not found", str(self.path)) from None
        if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
            raise QueueError(errno.ENOTDIR, "not a spool directory", str(self.path))
        self.owner = st.st_uid
        self._owners = frozenset((self.owner, os.geteuid()))
        exists = os.path.lexists(self._db_path)
        if not exists and not create:
            raise QueueError(errno.ENOENT, "not a spool (no queue.db, incoming/ or deferred/)",
                             str(self.path))
        if create:
            with contextlib.suppress(PermissionError):
                _private_dir(self.path)
        for d in _DIRS:
            p = self.path / d
            try:
                dst = os.lstat(p)
            except FileNotFoundError:
                _private_dir(p)
                continue
            if stat.S_ISLNK(dst.st_mode) or not stat.S_ISDIR(dst.st_mode):
                raise QueueError(errno.ENOTDIR, f"spool folder {d}/ is not a directory",
                                 str(self.path))
            if dst.st_uid not in self._owners:
                raise QueueError(errno.EPERM, f"spool folder {d}/ is owned by uid {dst.st_uid}",
                                 str(self.path))
        for name in (DB_NAME, DB_NAME + "-wal", DB_NAME + "-shm"):
            self._check_own(self.path / name)
        # Every user of the store holds this shared; salvage takes it exclusively.
        self._lock_fd = os.open(self.path / LOCK_NAME,
                                os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)
        fcntl.flock(self._lock_fd, fcntl.LOCK_SH)
        try:
            if create and not exists:
                self._make_database()
            self._connect()
        except BaseException:
            self._release_lock()
            raise
        if background_checkpoints:
            self.db.execute("PRAGMA wal_autocheckpoint = 0")
            self._checkpointer = _Checkpointer(self._db_path, self._busy_ms)

    def _check_own(self, path: Path) -> None:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if not stat.S_ISREG(st.st_mode):
            raise QueueError(errno.EINVAL, f"{path.name} is not a regular file", str(self.path))
        if st.st_uid not in self._owners:
            raise QueueError(errno.EPERM, f"{path.name} is owned by uid {st.st_uid}",
                             str(self.path))

    def _make_database(self) -> None:
        """Create ``queue.db`` whole or not at all: built aside, then linked into place.

        A creation cut short (a full disk, a crash) leaves no half-made
        database for the next run to mistake for a damaged one; of two
        processes creating it at once, the second finds the first's (a link
        never replaces a file).
        """
        tmp = self.path / "tmp" / f".queue.db.{secrets.token_hex(6)}"
        try:
            db = sqlite3.connect(tmp, isolation_level=None)
            try:
                # A private file until it is linked: SQLite need not flush it
                # step by step (8 flushes); the one fsync below makes it durable.
                db.execute("PRAGMA synchronous = OFF")
                db.execute("PRAGMA journal_mode = WAL")
                self.db = db
                self._create_schema()
                db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            finally:
                db.close()
            os.chmod(tmp, FILE_MODE)
            fd = os.open(tmp, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            try:
                os.link(tmp, self._db_path)
            except FileExistsError:
                pass  # another process made it first: use that one
            _fsync_dir(self.path)
        except sqlite3.Error as exc:
            code = errno.ENOSPC if "full" in str(exc) else errno.EIO
            raise QueueWriteError(code, f"cannot create queue.db: {exc}", str(self.path)
                                  ) from None
        except OSError as exc:
            raise QueueWriteError(exc.errno or errno.EIO,
                                  f"cannot create queue.db: {exc.strerror or exc}",
                                  str(self.path)) from None
        finally:
            for extra in ("", "-wal", "-shm", "-journal"):
                with contextlib.suppress(OSError):
                    os.unlink(f"{tmp}{extra}")

    def _connect(self) -> None:
        try:
            db = sqlite3.connect(self._db_path, isolation_level=None, check_same_thread=False,
                                 cached_statements=64)
        except sqlite3.Error as exc:
            raise QueueError(errno.EIO, f"cannot open queue.db: {exc}", str(self.path)) from None
        self.db = db
        try:
            db.execute(f"PRAGMA busy_timeout = {self._busy_ms}")
            mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode != "wal":
                raise QueueError(errno.EIO, f"queue.db cannot use WAL mode ({mode})",
                                 str(self.path))
            db.execute("PRAGMA synchronous = NORMAL")
            # The WAL file is kept (up to this size) and overwritten from its
            # start after each checkpoint: writes then need no new disk space.
            db.execute("PRAGMA journal_size_limit = 67108864")
            db.execute("PRAGMA cache_size = -16384")
            self._check_schema()
        except sqlite3.DatabaseError as exc:
            db.close()
            if _is_corrupt(exc):
                raise QueueCorrupt(errno.EIO, f"queue.db is damaged: {exc}",
                                   str(self.path)) from None
            raise QueueError(errno.EIO, f"cannot use queue.db: {exc}", str(self.path)) from None
        except BaseException:
            db.close()
            raise
        for name in (DB_NAME, DB_NAME + "-wal", DB_NAME + "-shm"):
            with contextlib.suppress(OSError):
                p = self.path / name
                if stat.S_IMODE(os.lstat(p).st_mode) != FILE_MODE:
                    os.chmod(p, FILE_MODE, follow_symlinks=False)

    def _create_schema(self) -> None:
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            if db.execute("SELECT count(*) FROM sqlite_master WHERE name='meta'").fetchone()[0]:
                db.execute("ROLLBACK")
                return  # another process created it first
            for sql in _SCHEMA:
                db.execute(sql)
            db.executemany("INSERT INTO meta VALUES (?, ?)", [
                ("schema", SCHEMA_VERSION), ("next_id", 1), ("created", time.time()),
                ("barrier", 0)])
            db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise

    def _check_schema(self) -> None:
        row = self.db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        if row is None:
            raise QueueCorrupt(errno.EIO, "queue.db has no schema version", str(self.path))
        if row[0] != SCHEMA_VERSION:
            raise QueueError(errno.EINVAL, f"queue.db schema version {row[0]} is not supported "
                             f"(this lmtpfast knows {SCHEMA_VERSION})", str(self.path))

    # -- transactions ----------------------------------------------------------------

    def _begin(self, *, durable: bool = False) -> None:
        if durable:
            self.db.execute("PRAGMA synchronous = FULL")
        self.db.execute("BEGIN IMMEDIATE")

    def _commit(self, *, durable: bool = False) -> None:
        try:
            self.db.execute("COMMIT")
        finally:
            if durable:
                self.db.execute("PRAGMA synchronous = NORMAL")

    def _rollback(self, durable: bool = False) -> None:
        with contextlib.suppress(sqlite3.Error):
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
        if durable:
            with contextlib.suppress(sqlite3.Error):
                self.db.execute("PRAGMA synchronous = NORMAL")

    def _write(self, what: str, fn: Callable[[], T], *, durable: bool = False) -> T:
        """Run *fn* in one write transaction; failures become typed errors."""
        try:
            self._begin(durable=durable)
            try:
                result = fn()
                self._commit(durable=durable)
            except BaseException:
                self._rollback(durable)
                raise
        except sqlite3.DatabaseError as exc:
            raise self._error(what, exc) from None
        return result

    def _error(self, what: str, exc: BaseException) -> QueueError:
        if _is_corrupt(exc):
            return QueueCorrupt(errno.EIO, f"{what}: queue.db is damaged: {exc}", str(self.path))
        if isinstance(exc, OSError):
            return QueueWriteError(exc.errno or errno.EIO, f"{what}: {exc.strerror or exc}",
                                   str(self.path))
        code = errno.ENOSPC if "full" in str(exc) else errno.EIO
        return QueueWriteError(code, f"{what}: {exc}", str(self.path))

    def _barrier(self, dead_segments: Sequence[int] = ()) -> None:
        """A commit that flushes the WAL: everything committed before is on disk."""

        def body() -> None:
            if dead_segments:
                self.db.executemany("DELETE FROM seg WHERE id = ? AND live <= 0",
                                    [(s,) for s in dead_segments])
            self.db.execute("UPDATE meta SET value = value + 1 WHERE key = 'barrier'")

        self._write("flush", body, durable=True)

    # -- enqueue ---------------------------------------------------------------------

    def enqueue(self, message: bytes | str, sender: str, recipients: Sequence[str], *,
                durable: bool = True, **envelope_options: Any) -> str:
        """Queue one message (see :meth:`enqueue_many`); returns its id."""
        data = message.encode("utf-8") if isinstance(message, str) else message
        env = new_envelope(sender, list(recipients), **envelope_options)
        return self.enqueue_many([NewMessage(env, data)], durable=durable)[0]

    def enqueue_many(self, messages: Iterable[NewMessage], *, durable: bool = True,
                     committed: Callable[[list[str], list[str]], None] | None = None
                     ) -> list[str]:
        """Queue *messages*; returns their ids once they are all on disk (*durable*).

        Group commit: content is appended to a segment as it comes, in large
        writes, then each segment written is flushed (``fdatasync``) and the
        group's rows go in one transaction that flushes the WAL. A group ends
        at :data:`ENQUEUE_ROWS` messages, :data:`ENQUEUE_BYTES` of content or
        :data:`ENQUEUE_SECONDS`, so memory stays bounded however many messages
        the iterable yields; *committed* is called with the origins and ids of
        each group once it is on disk (what a caller may report as queued).
        A failed write raises :class:`QueueWriteError`: that group is not
        queued, the groups before it are. An exception raised by the iterable
        itself (a bad input) is raised once what came before it is queued.
        """
        it = iter(messages)
        hint = len(messages) if isinstance(messages, list | tuple) else 0
        # A call queuing less than INLINE_BATCH in all keeps its content in rows.
        head: list[NewMessage] = []
        small = held = 0
        failure: Exception | None = None
        exhausted = True
        try:
            for m in it:
                head.append(m)
                c = m.content
                if not isinstance(c, bytes) and isinstance(c, os.PathLike):
                    n = os.stat(c).st_size
                    small += n if n <= self.big_message else 0
                else:
                    n = len(c)
                    if n <= self.big_message:
                        small += n
                    else:
                        held += n
                if small >= INLINE_BATCH or held >= ENQUEUE_BYTES or len(head) >= 256:
                    exhausted = False
                    break
        except Exception as exc:  # the input failed: what came before it is queued
            failure = exc
        ids: list[str] = []
        if exhausted:
            if head:
                ids = self._enqueue_inline(head, durable)
                if committed is not None:
                    committed([m.origin for m in head], ids)
        else:
            source = itertools.chain(head, it)
            self._ids = [0, 0, hint or 256]
            more = True
            while more:
                origins: list[str] = []
                got, more, failure = self._enqueue_group(source, durable, origins)
                ids += got
                if got and committed is not None:
                    committed(origins, got)
        if ids:
            self.ring()
        if failure is not None:
            raise failure
        return ids

    def ring(self) -> None:
        """Tell waiting workers that entries arrived or became due (``DOORBELL``'s time).

        Workers watch that file (:meth:`SQLiteQueue.watch`); a failure here
        only costs them a poll interval.
        """
        path = self.path / DOORBELL
        try:
            os.utime(path)
        except FileNotFoundError:
            with contextlib.suppress(OSError):
                os.close(_create(path))
        except OSError:
            pass

    def _reserve_ids(self, n: int) -> int:
        def body() -> int:
            row = self.db.execute("UPDATE meta SET value = value + ? WHERE key = 'next_id'"
                                  " RETURNING value", (n,)).fetchone()
            return int(row[0]) - n

        return self._write("enqueue", body)

    def _new_id_block(self) -> None:
        """Reserve the next block of ids for this enqueue_many call (``self._ids``)."""
        ids = self._ids
        n = ids[2]
        ids[0] = self._reserve_ids(n)
        ids[1] = ids[0] + n
        ids[2] = min(n * 2, 8192)

    def _enqueue_group(self, source: Iterator[NewMessage], durable: bool, origins: list[str]
                       ) -> tuple[list[str], bool, Exception | None]:
        """One group of :meth:`enqueue_many` into segments: (ids, more to come, input error).

        The loop is the enqueue's hot path: per message a CRC, a header and
        three appends to the write buffer, one row tuple; the envelope's
        encoding is reused for every message that shares it.
        """
        rows: list[tuple[Any, ...]] = []  # fresh envelopes in a segment: defaults elsewhere
        full: list[tuple[Any, ...]] = []  # anything else (a data file, an imported state)
        ids: list[int] = []
        seg_counts: dict[int, int] = {}
        buf = bytearray()
        seg = self._segment
        seg_id = seg.id if seg else 0
        seg_size = buf_at = seg.size if seg else 0
        live = 0
        written: list[_Segment] = []  # segments this group wrote to, to flush before the commit
        new_files = False
        failure: Exception | None = None
        more = True
        env_key: Envelope | None = None
        env_bytes, env_crc, rcpts = b"", 0, bytearray()
        elen = 0
        arrival = due = 0.0
        fresh = True
        pack, crc32, magic, hsize = _HEADER.pack, zlib.crc32, _MAGIC, _HEADER.size
        big, seg_max = self.big_message, self.segment_size
        count = nbytes = 0
        max_rows, max_bytes, write_size = ENQUEUE_ROWS, ENQUEUE_BYTES, WRITE_SIZE
        deadline = time.monotonic() + ENQUEUE_SECONDS
        ids_ = self._ids
        next_id, end_id = ids_[0], ids_[1]
        add_row, add_id, add_origin = rows.append, ids.append, origins.append
        sender = ""
        try:
            while True:
                try:
                    m = next(source, None)
                except Exception as exc:  # the input failed: commit what came before
                    failure, more = exc, False
                    break
                if m is None:
                    more = False
                    break
                env = m.envelope
                if env is not env_key:
                    env_key, sender = env, env.sender
                    env_bytes = encode_envelope(env)
                    env_crc, elen = crc32(env_bytes), len(env_bytes)
                    arrival = env.arrival or time.time()
                    due = env.next_attempt or arrival
                    # A bytearray: sqlite3 binds it as a blob directly, while bytes
                    # goes through its adapter lookup (two failed getattr) per row.
                    rcpts = bytearray(_rcpts_encoder.encode(env.recipients))
                    fresh = not (env.attempts or env.last_attempt is not None or env.delivered
                                 or env.ret is not None or env.envid is not None)
                content = m.content
                if not isinstance(content, bytes) and isinstance(content, os.PathLike):
                    content = self._small_file(content)
                if next_id >= end_id:
                    self._new_id_block()
                    next_id, end_id = ids_[0], ids_[1]
                id = next_id
                next_id += 1
                if (not isinstance(content, bytes) and isinstance(content, os.PathLike)) or len(
                        content) > big:
                    size, crc = self._write_data_file(id, env_bytes, content, durable)
                    new_files = True
                    nbytes += size
                    full.append((id, due, sender, rcpts, arrival, env.attempts,
                                 env.last_attempt, env.delivered, env.ret, env.envid, size, crc,
                                 None, None, None))
                else:
                    n = len(content)
                    if seg is None:
                        seg = self._new_segment()
                        seg_id, seg_size, buf_at, live = seg.id, 0, 0, 0
                    crc = crc32(content, env_crc)
                    buf += pack(magic, crc, id, elen, n)
                    buf += env_bytes
                    buf += content
                    if fresh:
                        add_row((id, due, sender, rcpts, arrival, n, crc, seg_id, seg_size))
                    else:
                        full.append((id, due, sender, rcpts, arrival, env.attempts,
                                     env.last_attempt, env.delivered, env.ret, env.envid, n,
                                     crc, seg_id, seg_size, None))
                    seg_size += hsize + elen + n
                    live += 1
                    nbytes += n
                    if len(buf) >= write_size or seg_size >= seg_max:
                        _write_all(seg.fd, buf, buf_at)
                        buf_at = seg.size = seg_size
                        buf.clear()
                        if seg_size >= seg_max:
                            # Full: flushed now, sealed once its rows are committed
                            # (sealing a segment with no committed row would drop it).
                            if durable:
                                os.fdatasync(seg.fd)
                            seg_counts[seg_id] = live
                            if seg.new:
                                written.append(seg)
                            self._retired.append(seg)
                            self._segment = seg = None
                add_id(id)
                add_origin(m.origin)
                count += 1
                if count >= max_rows or nbytes >= max_bytes or (
                        not count & 255 and time.monotonic() >= deadline):
                    break
            ids_[0] = next_id
            if seg is not None and live:
                if buf:
                    _write_all(seg.fd, buf, buf_at)
                seg.size = seg_size
                seg_counts[seg_id] = live
                if durable:
                    os.fdatasync(seg.fd)
                written.append(seg)
            if durable:
                if any(s.new for s in written):
                    _fsync_dir(self.path / "seg")
                if new_files:
                    _fsync_dir(self.path / "data")
            for s in written:
                s.new = False
        except OSError as exc:
            # Whatever was appended is garbage nobody points at: start afresh.
            self._abandon_segments()
            raise QueueWriteError(exc.errno or errno.EIO,
                                  f"enqueue: {exc.strerror or exc}", str(self.path)) from None
        except BaseException:
            self._abandon_segments()
            raise
        if not ids:
            return [], more, failure

        def body() -> None:
            if rows:
                self.db.executemany(_INSERT_SEGMENT, rows)
            if full:
                self.db.executemany(_INSERT_FULL, full)
            self.db.executemany("UPDATE seg SET live = live + ? WHERE id = ?",
                                [(k, s) for s, k in seg_counts.items()])

        try:
            self._write("enqueue", body, durable=durable)
        except QueueError:
            self._abandon_segments()
            raise
        self._seal_retired()
        return [str(i) for i in ids], more, failure

    def _seal_retired(self) -> None:
        while self._retired:
            self._seal_segment(self._retired.pop())
        if self._segment is not None and self._segment.size >= self.segment_size:
            seg, self._segment = self._segment, None
            self._seal_segment(seg)

    def _enqueue_inline(self, group: list[NewMessage], durable: bool) -> list[str]:
        """A small call: content in the rows (big messages in data files), one commit."""
        first = self._reserve_ids(len(group))
        rows: list[tuple[Any, ...]] = []
        new_files = False
        try:
            for i, m in enumerate(group):
                id = first + i
                env = m.envelope
                content = m.content
                if isinstance(content, os.PathLike):
                    content = self._small_file(content)
                body = None
                if isinstance(content, os.PathLike) or len(content) > self.big_message:
                    size, crc = self._write_data_file(id, encode_envelope(env), content, durable)
                    new_files = True
                else:
                    size, crc, body = len(content), zlib.crc32(content), bytes(content)
                arrival = env.arrival or time.time()
                rows.append((id, env.next_attempt or arrival, env.sender,
                             _rcpts_encoder.encode(env.recipients), arrival, env.attempts,
                             env.last_attempt, env.delivered, env.ret, env.envid, size, crc,
                             None, None, body))
            if durable and new_files:
                _fsync_dir(self.path / "data")
        except OSError as exc:
            raise QueueWriteError(exc.errno or errno.EIO,
                                  f"enqueue: {exc.strerror or exc}", str(self.path)) from None
        self._write("enqueue", lambda: self.db.executemany(_INSERT_FULL, rows), durable=durable)
        return [str(r[0]) for r in rows]

    def _small_file(self, path: os.PathLike[str]) -> bytes | os.PathLike[str]:
        """A file given as content: its bytes when small, else the path (streamed later)."""
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise OSError(errno.EINVAL, "not a regular file", os.fspath(path))
            if st.st_size > self.big_message:
                return path
            chunks = []
            while chunk := os.read(fd, 1 << 20):
                chunks.append(chunk)
            return b"".join(chunks)
        finally:
            os.close(fd)

    def _write_data_file(self, id: int, env_bytes: bytes,
                         content: bytes | bytearray | memoryview | os.PathLike[str],
                         durable: bool) -> tuple[int, int]:
        """The data file of a big message (a record alone); returns (size, crc)."""
        path = self.path / "data" / f"{id}"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # left by an enqueue whose ids were never committed
        fd = _create(path)
        try:
            crc = zlib.crc32(env_bytes)
            pos = _HEADER.size + len(env_bytes)
            if isinstance(content, os.PathLike):
                # Streamed: never more than a chunk in memory.
                size = 0
                src = os.open(content, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                try:
                    while chunk := os.read(src, 1 << 20):
                        crc = zlib.crc32(chunk, crc)
                        _write_all(fd, chunk, pos + size)
                        size += len(chunk)
                finally:
                    os.close(src)
            else:
                size = len(content)
                crc = zlib.crc32(content, crc)
                _write_all(fd, content, pos)
            _write_all(fd, _HEADER.pack(_MAGIC, crc, id, len(env_bytes), size) + env_bytes, 0)
            if durable:
                os.fdatasync(fd)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise
        os.close(fd)
        return size, crc

    def _new_segment(self) -> _Segment:
        def body() -> int:
            return int(self.db.execute("INSERT INTO seg(live) VALUES (0) RETURNING id"
                                       ).fetchone()[0])

        sid = self._write("enqueue", body)
        fd = _create(self.path / "seg" / f"{sid}", os.O_WRONLY)
        # Held while we may append: nobody drops a segment whose writer lives.
        fcntl.flock(fd, fcntl.LOCK_EX)
        self._segment = _Segment(sid, fd, 0)
        return self._segment

    def _abandon_segments(self) -> None:
        for seg in [*self._retired, *([self._segment] if self._segment else [])]:
            with contextlib.suppress(OSError):
                os.close(seg.fd)  # its flock goes: collected once it holds nothing live
        self._retired.clear()
        self._segment = None

    def _seal_segment(self, seg: _Segment) -> None:
        dead: list[int] = []

        def body() -> None:
            row = self.db.execute("UPDATE seg SET sealed = 1 WHERE id = ? RETURNING live",
                                  (seg.id,)).fetchone()
            if row is not None and row[0] <= 0:
                dead.append(seg.id)

        try:
            self._write("seal", body)
        finally:
            os.close(seg.fd)
        if dead:
            self._drop_content(dead, [])

    # -- claims ----------------------------------------------------------------------

    def _ensure_worker(self) -> str:
        if self._token is not None:
            return self._token
        token = secrets.token_hex(8)
        workers = self.path / "workers"
        tmp = workers / f".new-{token}"
        try:
            fd = _create(tmp, os.O_RDWR)
        except OSError as exc:
            raise self._error("start worker", exc) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            header = f"lmtpfast worker pid={os.getpid()} started={time.time():.3f}\n".encode()
            _write_all(fd, header, 0)
            # The journal's room, taken now: stashing outcomes later needs no new space.
            os.posix_fallocate(fd, 0, JOURNAL_OFFSET + JOURNAL_SIZE)
            os.rename(tmp, workers / token)
        except OSError as exc:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise self._error("start worker", exc) from None
        self._token, self._worker_fd = token, fd
        return token

    def begin_pass(self, *, due: float) -> list[tuple[str, str]]:
        """Before a pass: free dead workers' claims, drop finished segments, import a dir spool."""
        self._ensure_worker()
        self._recover()
        self._collect_segments()
        quarantined: list[tuple[str, str]] = []
        if _has_legacy(self.path):
            report = self.import_dir()
            quarantined += report.quarantined
        self._first_pass = False
        return quarantined

    def claim(self, n: int, *, due: float) -> ClaimBatch:
        """Lease up to *n* due entries to this worker (see :meth:`Queue.claim`)."""
        token = self._ensure_worker()

        def body() -> list[Any]:
            return self.db.execute(
                "UPDATE msg SET worker = ? WHERE id IN (SELECT id FROM msg WHERE state = 0 AND "
                "next_attempt <= ? AND worker IS NULL ORDER BY next_attempt LIMIT ?) "
                "RETURNING id, suspect, sender, rcpts, arrival, attempts, next_attempt, "
                "last_attempt, delivered, ret, envid, size, crc, seg, off, body",
                (token, due, n)).fetchall()

        rows = self._write("claim", body)
        batch = ClaimBatch(exhausted=len(rows) < n)
        bad: list[tuple[int, str]] = []
        entries = batch.entries
        try:
            contents = self._read_segments([r for r in rows if r[13] is not None])
            for row in rows:
                try:
                    entries.append(self._entry(row, contents))
                except _Bad as exc:
                    bad.append((row[0], str(exc)))
        except OSError as exc:
            # Out of descriptors (a big message holds its file while it is
            # sent) or memory: ours, so every entry of this claim goes back
            # untouched and the worker backs off as from a refused write.
            for e in entries:
                e.close()
            ids = [r[0] for r in rows]
            with contextlib.suppress(QueueError):
                self._write("release", lambda: self.db.executemany(
                    "UPDATE msg SET worker = NULL WHERE id = ? AND worker = ?",
                    [(i, token) for i in ids]))
            raise QueueWriteError(exc.errno or errno.EIO,
                                  f"claim left queued: {exc.strerror or exc}",
                                  str(self.path)) from None
        if bad:
            self._write("quarantine", lambda: self.db.executemany(
                "UPDATE msg SET state = 3, worker = NULL, reason = ? WHERE id = ? AND worker = ?",
                [(reason, id, token) for id, reason in bad]))
            batch.quarantined = [(str(id), reason) for id, reason in bad]
        return batch

    def _entry(self, row: tuple[Any, ...], contents: dict[int, bytes | _Bad]) -> Entry:
        (id, suspect, sender, rcpts, arrival, attempts, next_attempt, last_attempt, delivered,
         ret, envid, size, crc, seg, off, body) = row
        try:
            recipients = _rcpts_decoder.decode(rcpts)
        except (msgspec.DecodeError, TypeError) as exc:
            raise _Bad(f"malformed recipients in queue.db: {exc}") from None
        try:
            check_address(sender, sender=True)
            if not recipients:
                raise BadEnvelope("envelope has no recipients")
            for r in recipients:
                check_address(r.address)
                if suspect and r.state == "queued":
                    r.possibly_delivered = True
            if ret not in (None, "FULL", "HDRS"):
                raise BadEnvelope(f"bad DSN RET {ret!r}")
        except BadEnvelope as exc:
            raise _Bad(str(exc)) from None
        env = Envelope(sender=sender, recipients=recipients, arrival=arrival, attempts=attempts,
                       next_attempt=next_attempt, last_attempt=last_attempt, delivered=delivered,
                       ret=ret, envid=envid)
        closer = None
        content: bytes | memoryview | MessageFile
        if body is not None:
            if len(body) != size or zlib.crc32(body) != crc:
                raise _Bad("message content in queue.db is damaged (checksum mismatch)")
            content = body
        elif seg is not None:
            got = contents[id]
            if isinstance(got, _Bad):
                raise got
            content = got
        else:
            content, closer = self._open_data_file(id, size, crc)
        return Entry(str(id), env, content, size, bool(suspect),
                     _Lease(id, seg, off, body is not None, crc), _close=closer)

    def _open_own(self, path: Path, what: str) -> tuple[int, os.stat_result]:
        """Open a content file of ours for reading: never through a link, never another's."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            raise _Bad(f"{what} is missing") from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise _Bad(f"{what} is a symbolic link (not read)") from None
            if exc.errno in _OURS:
                raise  # not the entry's fault: never a quarantine
            raise _Bad(f"{what} cannot be read: {exc.strerror}") from None
        st = os.fstat(fd)
        problem = None
        if not stat.S_ISREG(st.st_mode):
            problem = f"{what} is not a regular file"
        elif st.st_uid not in self._owners:
            problem = f"{what} is owned by uid {st.st_uid}"
        if problem:
            os.close(fd)
            raise _Bad(problem)
        return fd, st

    def _segment_fd(self, seg: int) -> int:
        fd = self._seg_fds.get(seg)
        if fd is not None:
            return fd
        fd, _ = self._open_own(self.path / "seg" / f"{seg}", f"segment file seg/{seg}")
        if len(self._seg_fds) >= 64:
            os.close(self._seg_fds.pop(next(iter(self._seg_fds))))
        self._seg_fds[seg] = fd
        return fd

    def _read_segments(self, rows: list[Any]) -> dict[int, bytes | _Bad]:
        """The messages of *rows* in segments, with one ``pread`` per run of neighbours.

        ``pread``, not a mapping: a segment truncated under us is then an
        error for its entries, never a SIGBUS for the process.
        """
        out: dict[int, bytes | _Bad] = {}
        by_seg: dict[int, list[Any]] = {}
        for r in rows:
            by_seg.setdefault(r[13], []).append(r)
        for seg, items in by_seg.items():
            items.sort(key=lambda r: r[14])
            try:
                fd = self._segment_fd(seg)
            except _Bad as exc:
                for r in items:
                    out[r[0]] = exc
                continue
            i = 0
            while i < len(items):
                # One read for neighbours: records are mostly contiguous.
                lo = items[i][14]
                j, hi = i, lo
                while j < len(items) and items[j][14] - lo < (4 << 20):
                    hi = max(hi, items[j][14] + _HEADER.size + 4096 + items[j][11])
                    j += 1
                try:
                    buf = os.pread(fd, hi - lo, lo)
                except OSError as exc:
                    buf = b""
                    err: _Bad | None = _Bad(f"segment file seg/{seg} cannot be read: "
                                            f"{exc.strerror}")
                else:
                    err = None
                for r in items[i:j]:
                    out[r[0]] = err or self._one_record(fd, seg, r, buf, lo)
                i = j
        return out

    @staticmethod
    def _one_record(fd: int, seg: int, row: Any, buf: bytes, base: int) -> bytes | _Bad:
        id, size, crc, off = row[0], row[11], row[12], row[14]
        at = off - base
        if at + _HEADER.size > len(buf):
            return _Bad(f"record of message {id} is beyond the end of seg/{seg} (truncated)")
        magic, hcrc, hid, elen, blen = _HEADER.unpack_from(buf, at)
        if magic != _MAGIC or hid != id or blen != size or hcrc != crc:
            return _Bad(f"record of message {id} in seg/{seg} is damaged")
        start, end = at + _HEADER.size, at + _HEADER.size + elen + blen
        if end > len(buf):
            more = os.pread(fd, end - len(buf), base + len(buf))
            buf = buf + more
            if end > len(buf):
                return _Bad(f"record of message {id} is cut short in seg/{seg} (truncated)")
        view = memoryview(buf)
        try:
            if zlib.crc32(view[start:end]) != crc:
                return _Bad(f"message {id} in seg/{seg} is damaged (checksum mismatch)")
        finally:
            view.release()
        return buf[start + elen:end]

    def _open_data_file(self, id: int, size: int, crc: int
                        ) -> tuple[bytes | MessageFile, Callable[[], None] | None]:
        """A big message's content: read when it is sent in one write, else its open file."""
        from .._delivery import STREAM_THRESHOLD, MessageFile

        fd, st = self._open_own(self.path / "data" / f"{id}", f"message file data/{id}")
        # Owned by a file object: a descriptor an entry never closed goes with it.
        f = io.FileIO(fd, "rb", closefd=True)
        try:
            if st.st_nlink != 1:
                raise _Bad(f"message file data/{id} has other hard links (not read)")
            head = os.pread(fd, _HEADER.size, 0)
            if len(head) < _HEADER.size:
                raise _Bad(f"message file data/{id} is truncated")
            magic, hcrc, hid, elen, blen = _HEADER.unpack(head)
            if magic != _MAGIC or hid != id or blen != size or hcrc != crc:
                raise _Bad(f"message file data/{id} is damaged")
            start = _HEADER.size + elen
            if st.st_size != start + size:
                raise _Bad(f"message file data/{id} has the wrong size")
            if size <= STREAM_THRESHOLD:
                data = os.pread(fd, size, start)
                if len(data) != size:
                    raise _Bad(f"message file data/{id} is truncated")
                return data, None
        except BaseException:
            f.close()
            raise
        # Read a piece at a time as it is sent: several big messages in flight
        # cost neither heap nor resident file pages beyond the pieces.
        return MessageFile(fd, size, offset=start), f.close

    # -- outcomes --------------------------------------------------------------------

    _SQL: ClassVar[dict[str, str]] = {
        "done": "DELETE FROM msg WHERE id = ? AND worker = ?",
        "defer": "UPDATE msg SET worker = NULL, suspect = 0, rcpts = ?, arrival = ?, "
                 "attempts = ?, next_attempt = ?, last_attempt = ?, delivered = ?, seg = ?, "
                 "off = ?, body = ?, crc = ? WHERE id = ? AND worker = ?",
        "failed": "UPDATE msg SET state = 2, worker = NULL, suspect = 0, rcpts = ?, "
                  "arrival = ?, attempts = ?, next_attempt = ?, last_attempt = ?, "
                  "delivered = ?, seg = ?, off = ?, body = ?, crc = ? WHERE id = ? AND worker = ?",
        "quarantine": "UPDATE msg SET state = 3, worker = NULL, reason = ? "
                      "WHERE id = ? AND worker = ?",
        "release": "UPDATE msg SET worker = NULL WHERE id = ? AND worker = ?",
    }

    def record(self, updates: Sequence[Update]) -> list[RecordStatus]:
        """Apply *updates* in one transaction (see :meth:`Queue.record`)."""
        if not updates:
            return []
        token = self._ensure_worker()
        try:
            statuses, dead, files = self._write(
                "record", lambda: self._apply(updates, token, exact=False))
        except _Mismatch:
            statuses, dead, files = self._write(
                "record", lambda: self._apply(updates, token, exact=True))
        for u in updates:
            u.entry.close()
        if dead or files:
            self._drop_content(dead, files)
        return statuses

    @staticmethod
    def _moves_inline(u: Update) -> bool:
        """A deferred/failed entry's content leaves its segment for its row."""
        e = u.entry
        return (u.action in ("defer", "failed") and e.lease.seg is not None
                and isinstance(e.content, bytes) and len(e.content) == e.size)

    def _apply(self, updates: Sequence[Update], token: str, *, exact: bool
               ) -> tuple[list[RecordStatus], list[int], list[int]]:
        db = self.db
        by_action: dict[str, list[tuple[int, tuple[Any, ...]]]] = {}
        for i, u in enumerate(updates):
            lease: _Lease = u.entry.lease
            env = u.entry.envelope
            a = u.action
            if a in ("done", "release"):
                params: tuple[Any, ...] = (lease.row, token)
            elif a in ("defer", "failed"):
                where: tuple[Any, ...]
                if self._moves_inline(u):
                    content = u.entry.content
                    assert isinstance(content, bytes)  # _moves_inline checked it
                    where = (None, None, content, zlib.crc32(content))
                else:
                    where = (lease.seg, lease.off, u.entry.content if lease.inline else None,
                             lease.crc)
                params = (_rcpts_encoder.encode(env.recipients), env.arrival, env.attempts,
                          u.next_attempt if a == "defer" else env.next_attempt, env.last_attempt,
                          env.delivered, *where, lease.row, token)
            elif a == "quarantine":
                params = (u.reason or "quarantined", lease.row, token)
            else:
                raise ValueError(f"unknown action {a!r}")
            by_action.setdefault(a, []).append((i, params))
        statuses: list[RecordStatus] = ["ok"] * len(updates)
        for action, items in by_action.items():
            stmt = self._SQL[action]
            if not exact:
                if db.executemany(stmt, [p for _, p in items]).rowcount != len(items):
                    raise _Mismatch  # rolled back; redone one by one
                continue
            for i, p in items:
                if db.execute(stmt, p).rowcount:
                    continue
                row = db.execute("SELECT worker FROM msg WHERE id = ?", (p[-2],)).fetchone()
                statuses[i] = "gone" if row is None else "lost"
        seg_release: dict[int, int] = {}
        files: list[int] = []
        for u, status in zip(updates, statuses, strict=True):
            if status != "ok":
                continue
            lease = u.entry.lease
            if u.action == "done":
                if lease.seg is not None:
                    seg_release[lease.seg] = seg_release.get(lease.seg, 0) + 1
                elif not lease.inline:
                    files.append(lease.row)
            elif self._moves_inline(u):
                assert lease.seg is not None
                seg_release[lease.seg] = seg_release.get(lease.seg, 0) + 1
        dead: list[int] = []
        for s, k in seg_release.items():
            row = db.execute("UPDATE seg SET live = live - ? WHERE id = ? RETURNING live",
                             (k, s)).fetchone()
            if row is not None and row[0] <= 0:
                dead.append(s)
        return statuses, dead, files

    def _drop_content(self, segments: Sequence[int], files: Sequence[int]) -> None:
        """Remove content nobody needs, after a barrier (power loss cannot bring its rows back)."""
        own = {s.id for s in (self._segment, *self._retired) if s is not None}
        dead = [s for s in segments if s not in own and self._segment_unused(s)]
        if not dead and not files:
            return
        try:
            self._barrier(dead)
        except QueueError:
            return  # kept for now; the next pass (or the sweep) drops them
        for s in dead:
            fd = self._seg_fds.pop(s, None)
            if fd is not None:
                os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path / "seg" / f"{s}")
        for f in files:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path / "data" / f"{f}")

    def _segment_unused(self, seg: int) -> bool:
        """Whether no writer appends to *seg* (sealed, or its writer's flock is free)."""
        row = self.db.execute("SELECT sealed, live FROM seg WHERE id = ?", (seg,)).fetchone()
        if row is None or row[1] > 0:
            return False
        if row[0]:
            return True
        try:
            fd = os.open(self.path / "seg" / f"{seg}", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return True
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        finally:
            os.close(fd)
        return True

    def _collect_segments(self) -> None:
        try:
            dead = [r[0] for r in self.db.execute("SELECT id FROM seg WHERE live <= 0")]
        except sqlite3.DatabaseError as exc:
            raise self._error("read segments", exc) from None
        if dead:
            self._drop_content(dead, [])

    # -- the journal of a worker that cannot write -------------------------------------

    def stash(self, updates: Sequence[Update]) -> int:
        """Write *updates* into this worker's preallocated journal (see :meth:`Queue.stash`)."""
        if not updates or self._worker_fd < 0:
            return 0
        items = []
        for u in updates:
            env = u.entry.envelope
            items.append(_JournalItem(
                id=u.entry.lease.row, action=u.action,
                rcpts=None if u.action in ("done", "release", "quarantine") else
                _rcpts_encoder.encode(env.recipients),
                arrival=env.arrival or 0.0, attempts=env.attempts,
                next_attempt=u.next_attempt if u.next_attempt is not None else env.next_attempt,
                last_attempt=env.last_attempt, delivered=env.delivered, reason=u.reason))
        old = self._read_journal(self._worker_fd)
        keep = len(items)
        while keep:
            payload = _journal_encoder.encode(old + items[:keep])
            if _JHEADER.size + len(payload) <= JOURNAL_SIZE:
                break
            keep //= 2
        if not keep:
            return 0
        head = _JHEADER.pack(_JMAGIC, zlib.crc32(payload), len(payload))
        try:
            _write_all(self._worker_fd, head + payload, JOURNAL_OFFSET)
            os.fdatasync(self._worker_fd)
        except OSError:
            return 0
        for u in updates[:keep]:
            u.entry.close()
        return keep

    @staticmethod
    def _read_journal(fd: int) -> list[_JournalItem]:
        head = os.pread(fd, _JHEADER.size, JOURNAL_OFFSET)
        if len(head) < _JHEADER.size:
            return []
        magic, crc, length = _JHEADER.unpack(head)
        if magic != _JMAGIC or length > JOURNAL_SIZE:
            return []
        payload = os.pread(fd, length, JOURNAL_OFFSET + _JHEADER.size)
        if zlib.crc32(payload) != crc:
            return []
        try:
            return _journal_decoder.decode(payload)
        except msgspec.DecodeError:
            return []

    def _recover(self) -> None:
        """Free the claims of dead workers (their flock is free), applying their journals."""
        workers = self.path / "workers"
        tokens: set[str] | None = None
        if self._first_pass:
            # Rows first, then the folder: a live worker publishes its file
            # before its first claim, so a token seen in a row whose file is
            # absent afterwards belongs to a dead worker.
            try:
                tokens = {r[0] for r in self.db.execute(
                    "SELECT DISTINCT worker FROM msg WHERE worker IS NOT NULL")}
            except sqlite3.DatabaseError as exc:
                raise self._error("read claims", exc) from None
        names = set()
        with os.scandir(workers) as it:
            for e in it:
                names.add(e.name)
        for name in sorted(names):
            if name == self._token:
                continue
            path = workers / name
            if name.startswith("."):
                self._sweep_new_worker(path)
                continue
            try:
                fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # alive
                journal = self._read_journal(fd)
                if self._free_worker(name, journal):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)
            finally:
                os.close(fd)
        if tokens:
            for t in tokens - names - {self._token}:
                self._free_worker(t, [])

    def _sweep_new_worker(self, path: Path) -> None:
        with contextlib.suppress(OSError):
            if time.time() - os.lstat(path).st_mtime > ORPHAN_MAX_AGE:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    os.unlink(path)
                finally:
                    os.close(fd)

    def _free_worker(self, token: str, journal: list[_JournalItem]) -> bool:
        """Apply a dead worker's journal, then free its rows as suspect. False if it failed."""
        dead: list[int] = []
        files: list[int] = []

        def body() -> None:
            db = self.db
            for j in journal:
                if j.action == "done":
                    row = db.execute("DELETE FROM msg WHERE id = ? AND worker = ? RETURNING seg, "
                                     "body IS NOT NULL", (j.id, token)).fetchone()
                    if row is None:
                        continue
                    if row[0] is not None:
                        live = db.execute("UPDATE seg SET live = live - 1 WHERE id = ? "
                                          "RETURNING live", (row[0],)).fetchone()
                        if live is not None and live[0] <= 0:
                            dead.append(row[0])
                    elif not row[1]:
                        files.append(j.id)
                elif j.action in ("defer", "failed"):
                    db.execute(
                        "UPDATE msg SET worker = NULL, suspect = 0, state = ?, rcpts = ?, "
                        "arrival = ?, attempts = ?, next_attempt = ?, last_attempt = ?, "
                        "delivered = ? WHERE id = ? AND worker = ?",
                        (_FAILED if j.action == "failed" else _QUEUED, j.rcpts, j.arrival,
                         j.attempts, j.next_attempt, j.last_attempt, j.delivered, j.id, token))
                elif j.action == "quarantine":
                    db.execute("UPDATE msg SET state = 3, worker = NULL, reason = ? "
                               "WHERE id = ? AND worker = ?", (j.reason, j.id, token))
                elif j.action == "release":
                    db.execute("UPDATE msg SET worker = NULL WHERE id = ? AND worker = ?",
                               (j.id, token))
            db.execute("UPDATE msg SET worker = NULL, suspect = 1 WHERE worker = ?", (token,))

        try:
            # With a journal, its effect must be on disk before its file goes.
            self._write("recover", body, durable=bool(journal))
        except QueueError:
            return False
        if dead or files:
            self._drop_content(dead, files)
        return True

    # -- status and operators ------------------------------------------------------------

    def status(self, *, due: float | None = None) -> QueueStatus:
        """Counts per state; not-due and claimed-by-others counts relative to *due*."""
        due = time.time() if due is None else due
        st = QueueStatus()
        try:
            rows = self.db.execute(
                "SELECT state, count(*), sum(next_attempt > ?), "
                "min(CASE WHEN next_attempt > ? THEN next_attempt END), "
                "sum(worker IS NOT NULL AND worker IS NOT ?) FROM msg GROUP BY state",
                (due, due, self._token)).fetchall()
        except sqlite3.DatabaseError as exc:
            raise self._error("status", exc) from None
        for state, count, not_due, next_due, claimed in rows:
            if state == _QUEUED:
                st.queued, st.not_due, st.next_due = count, not_due or 0, next_due
                st.claimed = claimed or 0
            elif state == _HELD:
                st.held = count
            elif state == _FAILED:
                st.failed = count
            elif state == _QUARANTINED:
                st.quarantined = count
        return st

    _INFO_COLUMNS: ClassVar[str] = (
        "id, state, worker, suspect, sender, rcpts, arrival, attempts, "
        "next_attempt, last_attempt, delivered, ret, envid, size, reason")

    def _live_workers(self) -> frozenset[str] | None:
        """Tokens of the workers alive now (their file is flocked), or ``None`` if unknown."""
        locks = flocked_files()
        if locks is None:
            return None
        live = set()
        with contextlib.suppress(OSError), os.scandir(self.path / "workers") as it:
            for e in it:
                with contextlib.suppress(OSError):
                    st = e.stat(follow_symlinks=False)
                    if not e.name.startswith(".") and (st.st_dev, st.st_ino) in locks:
                        live.add(e.name)
        return frozenset(live)

    def _info(self, row: tuple[Any, ...], live: frozenset[str] | None = None) -> EntryInfo:
        (id, state, worker, suspect, sender, rcpts, arrival, attempts, next_attempt,
         last_attempt, delivered, ret, envid, size, reason) = row
        env: Envelope | None
        try:
            env = Envelope(sender=sender, recipients=_rcpts_decoder.decode(rcpts),
                           arrival=arrival, attempts=attempts, next_attempt=next_attempt,
                           last_attempt=last_attempt, delivered=delivered, ret=ret, envid=envid)
        except (msgspec.DecodeError, TypeError):
            env = None
        # Claimed by a live worker: a dead one's rows are free for the next
        # pass (or operator action) to take back, so they are not shown busy.
        claimed = worker is not None and (live is None or worker in live)
        return EntryInfo(str(id), _STATE_NAME.get(state, "quarantined"), env, size,
                         claimed, bool(suspect), reason)

    def iter_entries(self, selection: Selection = ALL, *, now: float | None = None
                     ) -> Iterator[EntryInfo]:
        """The selected entries in id order, read in chunks (no long read transaction)."""
        live = self._live_workers()
        where = []
        args: list[Any] = []
        if selection.states is not None:
            codes = [_STATE_CODE[s] for s in selection.states]
            where.append(f"state IN ({','.join('?' * len(codes))})")
            args += codes
        if selection.ids is not None:
            ids = _int_ids(selection.ids)
            for start in range(0, len(ids), 500):
                chunk = ids[start:start + 500]
                q = (f"SELECT {self._INFO_COLUMNS} FROM msg WHERE id IN "
                     f"({','.join('?' * len(chunk))})" + "".join(f" AND {w}" for w in where))
                for row in self._read(q, [*chunk, *args]):
                    info = self._info(row, live)
                    if selection.matches(info, now=now):
                        yield info
            return
        last = -1
        while True:
            q = (f"SELECT {self._INFO_COLUMNS} FROM msg WHERE id > ?"
                 + "".join(f" AND {w}" for w in where) + " ORDER BY id LIMIT 500")
            rows = self._read(q, [last, *args])
            if not rows:
                return
            for row in rows:
                info = self._info(row, live)
                if selection.matches(info, now=now):
                    yield info
            last = rows[-1][0]

    def _read(self, sql: str, args: Sequence[Any]) -> list[Any]:
        try:
            return self.db.execute(sql, args).fetchall()
        except sqlite3.DatabaseError as exc:
            raise self._error("read", exc) from None

    def show(self, id: str) -> EntryInfo | None:
        """One entry, or ``None``."""
        return next(self.iter_entries(Selection(ids=(id,))), None)

    def content(self, id: str) -> bytes:
        """The message of entry *id* (``KeyError`` when there is none; checks as a claim does)."""
        rid = int(id) if id.isdigit() else -1
        rows = self._read("SELECT size, crc, seg, off, body FROM msg WHERE id = ?", (rid,))
        if not rows:
            raise KeyError(id)
        size, crc, seg, off, body = rows[0]
        try:
            if body is not None:
                return bytes(body)
            if seg is not None:
                got = self._read_segments([(rid, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, size, crc, seg,
                                            off)])[rid]
                if isinstance(got, _Bad):
                    raise got
                return got
            data, closer = self._open_data_file(rid, size, crc)
            try:
                return bytes(data)
            finally:
                if closer is not None:
                    closer()
        except _Bad as exc:
            raise QueueError(errno.EIO, str(exc), str(self.path)) from None

    def _selected(self, selection: Selection) -> list[int]:
        if selection.ids is not None and not selection.needs_envelope() and (
                selection.states is None):
            return _int_ids(selection.ids)
        return [int(i.id) for i in self.iter_entries(selection)]

    def _act(self, selection: Selection, fn: Callable[[int], str]) -> ActionResult:
        """Apply *fn* (``done``/``busy``/``missing``) to each selected id, 500 per transaction.

        A dead worker's claims are taken back first (its journal applied, its
        entries suspect), as a replay's pass would: only a live worker's
        entries are *busy*, which is what ``list`` shows as being delivered.
        """
        self._recover()
        result = ActionResult()
        ids = self._selected(selection)
        if selection.ids is not None:
            # Ids that name no entry (or none in the states asked) are missing,
            # as the directory spool reports them.
            chosen = {str(i) for i in ids}
            result.missing += [i for i in selection.ids if i not in chosen]
        dead: list[int] = []
        files: list[int] = []
        self._act_dead, self._act_files = dead, files

        def run(chunk: list[int]) -> list[tuple[int, str]]:
            return [(i, fn(i)) for i in chunk]

        for start in range(0, len(ids), 500):
            outcome = self._write("queue command", functools.partial(run, ids[start:start + 500]))
            for i, what in outcome:
                getattr(result, what).append(str(i))
        if dead or files:
            self._drop_content(dead, files)
        return result

    def hold(self, selection: Selection) -> ActionResult:
        """Put queued entries on hold; one being delivered is *busy* (as in a directory spool).

        Holding a claimed row would be undone by its worker's outcome (a
        delivered entry is deleted): the operator would read "placed on hold"
        about mail that went out.
        """
        def one(i: int) -> str:
            row = self.db.execute("UPDATE msg SET state = 1 WHERE id = ? AND state = 0 "
                                  "AND worker IS NULL RETURNING id", (i,)).fetchone()
            return "done" if row else self._why_not(i)
        return self._act(selection, one)

    def release(self, selection: Selection) -> ActionResult:
        """Take held entries off hold, due now."""
        now = time.time()

        def one(i: int) -> str:
            row = self.db.execute("UPDATE msg SET state = 0, next_attempt = min(next_attempt, ?) "
                                  "WHERE id = ? AND state = 1 RETURNING id", (now, i)).fetchone()
            return "done" if row else self._why_not(i)
        return self._act(selection, one)

    def retry(self, selection: Selection) -> ActionResult:
        """Make queued entries due now."""
        now = time.time()

        def one(i: int) -> str:
            row = self.db.execute("UPDATE msg SET next_attempt = min(next_attempt, ?) "
                                  "WHERE id = ? AND state = 0 RETURNING worker", (now, i)
                                  ).fetchone()
            if row is None:
                return self._why_not(i)
            return "busy" if row[0] is not None else "done"
        return self._act(selection, one)

    def delete(self, selection: Selection) -> ActionResult:
        """Remove entries (their content goes after a barrier)."""
        def one(i: int) -> str:
            row = self.db.execute("DELETE FROM msg WHERE id = ? RETURNING seg, body IS NOT NULL",
                                  (i,)).fetchone()
            if row is None:
                return "missing"
            self._release_content(row[0], bool(row[1]), i)
            return "done"
        return self._act(selection, one)

    def _release_content(self, seg: int | None, inline: bool, id: int) -> None:
        if seg is not None:
            live = self.db.execute("UPDATE seg SET live = live - 1 WHERE id = ? RETURNING live",
                                   (seg,)).fetchone()
            if live is not None and live[0] <= 0:
                self._act_dead.append(seg)
        elif not inline:
            self._act_files.append(id)

    def bounce(self, selection: Selection, reason: Reason) -> ActionResult:
        """Fail every queued recipient of queued/held entries (not those being delivered)."""
        def one(i: int) -> str:
            row = self.db.execute("SELECT worker, state, rcpts FROM msg WHERE id = ?", (i,)
                                  ).fetchone()
            if row is None:
                return "missing"
            if row[0] is not None:
                return "busy"
            if row[1] not in (_QUEUED, _HELD):
                return "missing"
            rcpts = _rcpts_decoder.decode(row[2])
            for r in rcpts:
                if r.state == "queued":
                    r.state, r.last = "failed", reason
            self.db.execute("UPDATE msg SET state = 2, rcpts = ? WHERE id = ?",
                            (_rcpts_encoder.encode(rcpts), i))
            return "done"
        return self._act(selection, one)

    def requeue(self, selection: Selection) -> ActionResult:
        """Put failed (or quarantined, when readable) entries back, their recipients queued, due
        now."""
        now = time.time()

        def one(i: int) -> str:
            row = self.db.execute("SELECT state, rcpts FROM msg WHERE id = ?", (i,)).fetchone()
            if row is None or row[0] not in (_FAILED, _QUARANTINED):
                return "missing"
            try:
                rcpts = _rcpts_decoder.decode(row[1])
            except msgspec.DecodeError:
                return "missing"
            for r in rcpts:
                if r.state == "failed":
                    r.state = "queued"
            self.db.execute("UPDATE msg SET state = 0, next_attempt = ?, reason = NULL, "
                            "rcpts = ? WHERE id = ?", (now, _rcpts_encoder.encode(rcpts), i))
            return "done"
        return self._act(selection, one)

    def _why_not(self, i: int) -> str:
        row = self.db.execute("SELECT worker FROM msg WHERE id = ?", (i,)).fetchone()
        if row is None:
            return "missing"
        return "busy" if row[0] is not None else "missing"

    _act_dead: list[int]
    _act_files: list[int]

    # -- converting a directory spool ----------------------------------------------------

    def import_dir(self, *, durable: bool = True, batch: int = 500) -> ImportReport:
        """Move every entry of the directory spool in :attr:`path` into the store.

        Each entry is claimed the directory spool's way (its flock), written
        here with its whole state (recipients, replies, attempts, next
        attempt, DSN) and recorded as imported in the same durable commit, and
        only then removed from the directory. A crash anywhere leaves it in
        one place or both, never neither; a rerun finishes the removal and
        never queues it twice (the ``imported`` table). Entries another
        replay holds are left for the next run.
        """
        from ._store import Spool, SpoolError

        report = ImportReport()
        if not _has_legacy(self.path):
            return report
        try:
            spool = Spool(self.path)
        except SpoolError as exc:
            raise QueueError(exc.errno or errno.EIO, f"the directory spool here cannot be "
                             f"converted: {exc.strerror or exc}", str(self.path)) from None
        for claims in spool.claim_batches(batch, report):
            try:
                new = self._import_claims(claims, durable)
                report.imported += new
                report.already += len(claims) - new
            finally:
                for c in claims:
                    c.release()
        report.failed += self._import_failed(spool, durable)
        return report

    def _import_claims(self, claims: list[Any], durable: bool) -> int:
        """Write *claims* here (those not imported by an earlier run); how many were new."""
        done = self._imported([c.id for c in claims])
        todo = [c for c in claims if c.id not in done]
        if todo:
            msgs = [NewMessage(c.envelope, Path(c.message_path), origin=c.id) for c in todo]
            ids = self.enqueue_many(msgs, durable=durable)
            self._write("import", lambda: self.db.executemany(
                "INSERT OR IGNORE INTO imported VALUES (?, ?)",
                [(c.id, int(i)) for c, i in zip(todo, ids, strict=True)]), durable=durable)
        for c in claims:
            c.delivered()  # envelope first (the directory spool's commit point), then message
        return len(todo)

    def _imported(self, legacy: Sequence[str]) -> set[str]:
        out: set[str] = set()
        for start in range(0, len(legacy), 500):
            chunk = list(legacy[start:start + 500])
            out |= {r[0] for r in self._read(
                f"SELECT legacy FROM imported WHERE legacy IN ({','.join('?' * len(chunk))})",
                chunk)}
        return out

    def _import_failed(self, spool: Any, durable: bool) -> int:
        """``failed/ID.json`` + ``ID.eml`` become failed entries (requeue-able)."""
        failed = spool.path / "failed"
        n = 0
        try:
            names = sorted(e.name[:-5] for e in os.scandir(failed) if e.name.endswith(".json"))
        except FileNotFoundError:
            return 0
        for name in names:
            js, eml, txt = (failed / f"{name}.{x}" for x in ("json", "eml", "txt"))
            if name not in self._imported([name]):
                try:
                    fd = os.open(js, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                    try:
                        env = _env_decoder.decode(os.read(fd, 16 << 20))
                    finally:
                        os.close(fd)
                    os.lstat(eml)
                except (OSError, msgspec.DecodeError):
                    continue  # left as it is: the operator's to look at
                [id] = self.enqueue_many([NewMessage(env, eml, origin=name)], durable=durable)

                def mark(id: str = id, name: str = name) -> None:
                    self.db.execute("UPDATE msg SET state = 2 WHERE id = ?", (int(id),))
                    self.db.execute("INSERT OR IGNORE INTO imported VALUES (?, ?)",
                                    (name, int(id)))

                self._write("import", mark, durable=durable)
                n += 1
            for p in (txt, eml, js):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(p)
        return n

    # -- salvage ---------------------------------------------------------------------

    _ROW_COLUMNS: ClassVar[str] = (
        "id, state, next_attempt, worker, suspect, sender, rcpts, arrival, attempts, "
        "last_attempt, delivered, ret, envid, size, crc, seg, off, body, reason")

    @classmethod
    def salvage(cls, path: str | os.PathLike[str]) -> SalvageReport:
        """Rebuild a damaged ``queue.db``: every readable entry kept, nothing silently lost.

        Needs the store to itself (no replay or enqueue running: the
        exclusive flock on ``queue.lock``). Rows that can be read are copied
        into a fresh database (those a worker held come back suspect). A
        message whose row cannot be read is rebuilt from its content record
        (segments and data files carry each message's first envelope) as a
        *quarantined* entry: it may have been delivered already, so it is not
        sent again until the operator says (``lmtpfast queue requeue``). The
        damaged files are moved to ``quarantine/``.
        """
        root = Path(path)
        report = SalvageReport()
        lock = os.open(root / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                       FILE_MODE)
        try:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise QueueError(errno.EBUSY, "the queue is in use (a replay or enqueue is "
                                 "running): stop them, then salvage", str(root)) from None
            rows, lost = cls._readable_rows(root / DB_NAME)
            report.recovered = len(rows)
            report.unreadable = lost
            stamp = time.strftime("%Y%m%dT%H%M%S")
            new_path = root / f".{DB_NAME}.salvage"
            for p in (new_path, Path(f"{new_path}-wal"), Path(f"{new_path}-shm")):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(p)
            db = sqlite3.connect(new_path, isolation_level=None)
            try:
                db.execute("PRAGMA journal_mode = WAL")
                db.execute("BEGIN")
                for sql in _SCHEMA:
                    db.execute(sql)
                have = {r[0] for r in rows}
                rebuilt = cls._records(root, have, lost)
                report.rebuilt = len(rebuilt)
                max_id = max([0, *have, *(r[0] for r in rebuilt)])
                db.executemany(f"INSERT INTO msg({cls._ROW_COLUMNS}) VALUES "
                               f"({','.join('?' * 19)})", rows + rebuilt)
                # Nothing was delivered to "since": every claim a dead worker had is suspect.
                db.execute("UPDATE msg SET worker = NULL, suspect = 1 WHERE worker IS NOT NULL")
                db.execute("INSERT INTO seg(id, live, sealed) SELECT seg, count(*), 1 FROM msg "
                           "WHERE seg IS NOT NULL GROUP BY seg")
                db.executemany("INSERT INTO meta VALUES (?, ?)", [
                    ("schema", SCHEMA_VERSION), ("next_id", max_id + 1),
                    ("created", time.time()), ("barrier", 0), ("salvaged", stamp)])
                db.execute("COMMIT")
                db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            finally:
                db.close()
            os.chmod(new_path, FILE_MODE)
            q = root / "quarantine"
            _private_dir(q)
            for name in (DB_NAME, f"{DB_NAME}-wal", f"{DB_NAME}-shm"):
                with contextlib.suppress(FileNotFoundError):
                    os.rename(root / name, q / f"{name}.damaged-{stamp}")
                    report.moved.append(f"quarantine/{name}.damaged-{stamp}")
            for extra in ("-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(f"{new_path}{extra}")
            os.rename(new_path, root / DB_NAME)
            _fsync_dir(root)
        finally:
            os.close(lock)
        return report

    @classmethod
    def _readable_rows(cls, db_path: Path) -> tuple[list[tuple[Any, ...]], list[tuple[int, int]]]:
        """Every row that can be read, and the id ranges that could not."""
        rows: list[tuple[Any, ...]] = []
        lost: list[tuple[int, int]] = []
        try:
            db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, isolation_level=None)
        except sqlite3.Error:
            return rows, [(1, 2**62)]
        try:
            try:
                top = db.execute("SELECT max(id) FROM msg").fetchone()[0] or 0
            except sqlite3.DatabaseError:
                top = None
            last = 0
            while True:
                try:
                    chunk = db.execute(f"SELECT {cls._ROW_COLUMNS} FROM msg WHERE id > ? "
                                       "ORDER BY id LIMIT 256", (last,)).fetchall()
                except sqlite3.DatabaseError:
                    # Probe further and further ahead for the next readable row.
                    step, found = 1, None
                    while step < 2**62 and found is None:
                        try:
                            found = db.execute("SELECT min(id) FROM msg WHERE id > ?",
                                               (last + step,)).fetchone()[0]
                            if found is None:
                                break
                        except sqlite3.DatabaseError:
                            step *= 4
                    end = (found - 1) if found is not None else max(top or 0, last + step)
                    end = end if top is not None else 2**62
                    if lost and lost[-1][1] >= last:
                        lost[-1] = (lost[-1][0], max(end, lost[-1][1]))
                    elif end > last:
                        lost.append((last + 1, end))
                    if found is None:
                        break
                    last = found - 1
                    continue
                if not chunk:
                    break
                rows += chunk
                last = chunk[-1][0]
        except sqlite3.DatabaseError:
            lost.append((rows[-1][0] + 1 if rows else 1, 2**62))
        finally:
            db.close()
        return rows, lost

    @staticmethod
    def _records(root: Path, have: set[int], lost: list[tuple[int, int]]) -> list[tuple[Any, ...]]:
        """Rows rebuilt (quarantined) from content records whose row is in a lost range."""
        out: list[tuple[Any, ...]] = []
        if not lost:
            return out

        def wanted(id: int) -> bool:
            return id not in have and any(lo <= id <= hi for lo, hi in lost)

        reason = ("rebuilt from its content record after queue.db was damaged: it may have "
                  "been delivered already (lmtpfast queue requeue sends it)")

        def add(id: int, env_bytes: bytes, size: int, crc: int, seg: int | None,
                off: int | None) -> None:
            try:
                env = _env_decoder.decode(env_bytes)
            except msgspec.DecodeError:
                return
            out.append((id, _QUARANTINED, env.next_attempt or env.arrival or 0.0, None, 1,
                        env.sender, _rcpts_encoder.encode(env.recipients),
                        env.arrival or 0.0, env.attempts, env.last_attempt, env.delivered,
                        env.ret, env.envid, size, crc, seg, off, None, reason))

        with contextlib.suppress(FileNotFoundError), os.scandir(root / "seg") as it:
            for e in it:
                if not e.name.isdigit() or not e.is_file(follow_symlinks=False):
                    continue
                with open(e.path, "rb") as f:
                    data = f.read()
                at = 0
                while at + _HEADER.size <= len(data):
                    magic, crc, id, elen, blen = _HEADER.unpack_from(data, at)
                    if magic != _MAGIC:
                        break  # a torn tail: nothing after it was committed
                    end = at + _HEADER.size + elen + blen
                    if end <= len(data) and wanted(id):
                        add(id, data[at + _HEADER.size:at + _HEADER.size + elen], blen, crc,
                            int(e.name), at)
                    at = end
        with contextlib.suppress(FileNotFoundError), os.scandir(root / "data") as it:
            for e in it:
                if not e.name.isdigit() or not e.is_file(follow_symlinks=False):
                    continue
                with open(e.path, "rb") as f:
                    head = f.read(_HEADER.size)
                    if len(head) < _HEADER.size:
                        continue
                    magic, crc, id, elen, blen = _HEADER.unpack(head)
                    if magic == _MAGIC and id == int(e.name) and wanted(id):
                        add(id, f.read(elen), blen, crc, None, None)
        return out

    # -- housekeeping ----------------------------------------------------------------

    def sweep(self, *, now: float | None = None) -> int:
        """Remove leftovers of crashed writers (older than an hour); returns how many went."""
        now = time.time() if now is None else now
        removed = 0
        try:
            known_segs = {r[0] for r in self.db.execute("SELECT id FROM seg")}
            big = {r[0] for r in self.db.execute(
                "SELECT id FROM msg WHERE seg IS NULL AND body IS NULL")}
        except sqlite3.DatabaseError as exc:
            raise self._error("sweep", exc) from None
        for folder, keep in (("seg", known_segs), ("data", big)):
            with os.scandir(self.path / folder) as it:
                for e in it:
                    if e.name.isdigit() and int(e.name) in keep:
                        continue
                    with contextlib.suppress(OSError):
                        if now - e.stat(follow_symlinks=False).st_mtime > ORPHAN_MAX_AGE:
                            # A writer still busy with it holds no row yet but its flock.
                            fd = os.open(e.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                            try:
                                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                                os.unlink(e.path)
                                removed += 1
                            finally:
                                os.close(fd)
        with os.scandir(self.path / "tmp") as it:
            for e in it:
                with contextlib.suppress(OSError):
                    if now - e.stat(follow_symlinks=False).st_mtime > 36 * 3600:
                        os.unlink(e.path)
                        removed += 1
        return removed

    def checkpoint(self) -> None:
        """Copy the WAL into the database file (also flushes both)."""
        with contextlib.suppress(sqlite3.Error):
            self.db.execute("PRAGMA wal_checkpoint(PASSIVE)")

    def close(self) -> None:
        """Give back unrecorded claims (flagged suspect), seal the segment, close files."""
        if self._closed:
            return
        self._closed = True
        try:
            segs = [*self._retired, *([self._segment] if self._segment else [])]
            self._retired.clear()
            self._segment = None
            for seg in segs:
                with contextlib.suppress(QueueError, OSError):
                    self._seal_segment(seg)
            if self._token is not None:
                stashed = bool(self._read_journal(self._worker_fd))
                if not stashed:
                    try:
                        self._write("close", lambda: self.db.execute(
                            "UPDATE msg SET worker = NULL, suspect = 1 WHERE worker = ?",
                            (self._token,)))
                    except QueueError:
                        stashed = True  # keep the file: the next worker frees the rows
                if not stashed:
                    with contextlib.suppress(OSError):
                        os.unlink(self.path / "workers" / self._token)
                os.close(self._worker_fd)
                self._worker_fd = -1
        finally:
            for fd in self._seg_fds.values():
                os.close(fd)
            self._seg_fds.clear()
            if self._checkpointer is not None:
                self._checkpointer.stop()
            with contextlib.suppress(sqlite3.Error):
                self.db.close()
            self._release_lock()

    def _release_lock(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def __enter__(self) -> SQLiteStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Checkpointer:
    """Copies the WAL into the database file from a thread of its own, when it grows.

    SQLite does this inside a commit (every 1000 pages) by default, with a
    flush of both files: on the event loop's thread that is a stall of
    milliseconds. Here it runs on its own connection, and SQLite releases
    the GIL while it works.
    """

    WAL_PAGES = 2000
    INTERVAL = 0.2

    def __init__(self, db_path: Path, busy_ms: int) -> None:
        import threading

        self._wal = Path(f"{db_path}-wal")
        self._db_path = db_path
        self._busy_ms = busy_ms
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lmtpfast-checkpoint",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            db = sqlite3.connect(self._db_path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error:
            return
        try:
            db.execute(f"PRAGMA busy_timeout = {self._busy_ms}")
            db.execute("PRAGMA wal_autocheckpoint = 0")
            limit = self.WAL_PAGES * 4096
            while not self._stop.wait(self.INTERVAL):
                try:
                    if os.stat(self._wal).st_size < limit:
                        continue
                    db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                except (OSError, sqlite3.Error):
                    continue  # the next round tries again; the WAL only grows meanwhile
            with contextlib.suppress(sqlite3.Error):
                db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        finally:
            db.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def _int_ids(ids: Iterable[str]) -> list[int]:
    return [int(i) for i in ids if i.isdigit()]


def _has_legacy(path: Path) -> bool:
    """Whether a directory spool's entries are waiting here (cheap: stops at the first)."""
    for folder in ("incoming", "deferred", "failed"):
        try:
            with os.scandir(path / folder) as it:
                for e in it:
                    if not e.name.startswith("."):
                        return True
        except (FileNotFoundError, NotADirectoryError):
            continue
    return False


class SQLiteQueue(Queue):
    """The async :class:`~lmtpfast.spool.Queue` over an :class:`SQLiteStore`.

    Calls run on the event loop's thread: a claim or a record of a few
    hundred entries is a few milliseconds of SQLite and no flush, and a
    second thread would make both wait for the GIL (measured: a thread for
    the store halved the replay rate). What does block -- copying the WAL
    into the database file and flushing it -- runs in a checkpoint thread of
    its own, outside the GIL.
    """

    kind = "sqlite"

    def __init__(self, path: str | os.PathLike[str], *, create: bool = False,
                 **options: Any) -> None:
        options.setdefault("background_checkpoints", True)
        self.store = SQLiteStore(path, create=create, **options)
        self.location = str(self.store.path)

    def __repr__(self) -> str:
        return f"<SQLiteQueue {self.location}>"

    async def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return fn(*args, **kwargs)

    async def enqueue_many(self, messages: Iterable[NewMessage], *, durable: bool = True
                           ) -> list[str]:
        import asyncio  # loaded already: this runs in an event loop

        ids: list[str] = []
        group: list[NewMessage] = []
        for m in messages:
            group.append(m)
            if len(group) >= 500:
                ids += self.store.enqueue_many(group, durable=durable)
                group = []
                await asyncio.sleep(0)  # other tasks run between groups
        if group:
            ids += self.store.enqueue_many(group, durable=durable)
        return ids

    async def begin_pass(self, *, due: float) -> list[tuple[str, str]]:
        return await self._call(self.store.begin_pass, due=due)

    async def claim(self, n: int, *, due: float) -> ClaimBatch:
        return await self._call(self.store.claim, n, due=due)

    async def record(self, updates: Sequence[Update]) -> list[RecordStatus]:
        return await self._call(self.store.record, list(updates))

    async def stash(self, updates: Sequence[Update]) -> int:
        return await self._call(self.store.stash, list(updates))

    async def status(self, *, due: float | None = None) -> QueueStatus:
        return await self._call(self.store.status, due=due)

    async def entries(self, selection: Selection = ALL) -> AsyncIterator[EntryInfo]:
        it = self.store.iter_entries(selection)
        while True:
            chunk = await self._call(_take, it, 500)
            for info in chunk:
                yield info
            if len(chunk) < 500:
                return

    async def show(self, id: str) -> EntryInfo | None:
        return await self._call(self.store.show, id)

    async def content(self, id: str) -> bytes:
        return await self._call(self.store.content, id)

    async def hold(self, selection: Selection) -> ActionResult:
        return await self._call(self.store.hold, selection)

    async def release(self, selection: Selection) -> ActionResult:
        result = await self._call(self.store.release, selection)
        if result.done:
            self.store.ring()
        return result

    async def retry(self, selection: Selection) -> ActionResult:
        result = await self._call(self.store.retry, selection)
        if result.done:
            self.store.ring()
        return result

    async def delete(self, selection: Selection) -> ActionResult:
        return await self._call(self.store.delete, selection)

    async def bounce(self, selection: Selection, reason: Reason) -> ActionResult:
        return await self._call(self.store.bounce, selection, reason)

    async def requeue(self, selection: Selection) -> ActionResult:
        result = await self._call(self.store.requeue, selection)
        if result.done:
            self.store.ring()
        return result

    async def sweep(self) -> int:
        return await self._call(self.store.sweep)

    def watch(self) -> Watch | None:
        # The doorbell (rung by writers and operator commands), and incoming/
        # for writers of a directory spool beside the store (converted by a pass).
        bell = self.store.path / DOORBELL
        if not bell.exists():
            self.store.ring()
        from ._watch import IN_ATTRIB, IN_CLOSE_WRITE, IN_CREATE, IN_MOVED_TO, watch_paths

        return watch_paths([(bell, IN_ATTRIB | IN_CLOSE_WRITE),
                            (self.store.path / "incoming", IN_MOVED_TO | IN_CREATE)])

    async def close(self) -> None:
        self.store.close()


def _take(it: Iterator[T], n: int) -> list[T]:
    out = []
    for x in it:
        out.append(x)
        if len(out) >= n:
            break
    return out
