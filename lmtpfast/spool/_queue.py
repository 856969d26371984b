"""The queue backend interface: what every store of queued mail implements, and its types.

One interface, three backends (``docs/spool.md``, ``docs/queue.md``):

* :class:`~lmtpfast.spool.SQLiteQueue` -- the embedded default for a spool
  directory (``SPOOL/queue.db`` and its segment files);
* :class:`~lmtpfast.spool.DirQueue` -- the directory spool of one file pair per
  message (kept: plain files, and the source of migrations);
* a PostgreSQL queue for many hosts (issue 15), on the same methods.

:class:`~lmtpfast.spool.Replayer` is one engine over any of them. The methods
are async and batch-first: a replay claims many entries in one call and
records many outcomes in one call, so a backend spends statements (or
syscalls) per batch, not per message.

The life of an entry, as a worker sees it::

    batch = await queue.claim(256, due=now)        # leased to this worker
    ...deliver each entry.envelope.queued() recipients...
    await queue.record([Update(entry, "done"), Update(e2, "defer", next_attempt=t), ...])

Guarantees every backend gives (and ``tests/test_queue.py`` checks on each):

* **enqueue is atomic and durable**: an entry is visible whole or not at all,
  and :meth:`Queue.enqueue_many` returns only once every message given is on
  stable storage (group commit: one flush for many messages);
* **a claim is exclusive**: while a worker holds an entry nobody else gets
  it; a worker that dies (``kill -9``) loses its claims, and its entries come
  back *suspect*: their queued recipients may have been delivered, so the next
  delivery is reported ``possibly_duplicated``;
* **an outcome is fenced**: :meth:`Queue.record` applies an update only while
  the worker still holds the entry's lease;
* **a write failure of ours never re-delivers**: when an outcome cannot be
  written (:class:`QueueWriteError`), the entry stays claimed by the living
  worker, which keeps the outcome and tries again; :meth:`Queue.stash` puts
  outcomes where a later worker applies them before anyone delivers the
  entries again;
* **corrupt entries are quarantined**, reported in :attr:`ClaimBatch.quarantined`,
  never delivered and never a traceback;
* **operator actions** (:meth:`Queue.hold`, :meth:`Queue.delete`, ...) are safe
  while replays run: they never change an entry's recipients behind a
  worker's back (an entry being delivered is reported *busy* where that
  matters).
"""

from __future__ import annotations

import abc
import fnmatch
import os
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Self

from ._format import Envelope, Reason

if TYPE_CHECKING:
    from .._delivery import MessageFile
    from ._watch import Watch

__all__ = [
    "ALL",
    "Action",
    "ActionResult",
    "ClaimBatch",
    "Content",
    "Entry",
    "EntryInfo",
    "EntryState",
    "NewMessage",
    "Queue",
    "QueueCorrupt",
    "QueueError",
    "QueueStatus",
    "QueueWriteError",
    "RecordStatus",
    "Selection",
    "Update",
    "enqueue",
    "open_queue",
    "open_spool",
    "reasons_text",
]

#: What a worker decided for a claimed entry.
#:
#: ``done``: no recipient left (every one delivered, or failed ones already
#: bounced elsewhere): the entry leaves the queue.
#: ``failed``: nothing left to try, some recipients failed for good: kept as a
#: failed entry (for the operator, the bounce, ``requeue``).
#: ``defer``: some recipients still queued: kept, tried again at ``next_attempt``.
#: ``release``: given back unchanged (not attempted, e.g. at shutdown).
#: ``quarantine``: the entry cannot be used (``reason`` says why).
Action = Literal["done", "failed", "defer", "release", "quarantine"]

#: Where an entry is, for the operator.
EntryState = Literal["queued", "held", "failed", "quarantined"]

#: How :meth:`Queue.record` treated one update: ``ok`` applied; ``gone`` the
#: entry no longer exists (an operator deleted it meanwhile); ``lost`` the
#: lease was taken over (another worker decided the worker was dead).
RecordStatus = Literal["ok", "gone", "lost"]

#: A message's content as a writer gives it: bytes, or a file to copy from
#: (read in chunks, never whole).
Content = bytes | bytearray | memoryview | os.PathLike[str]


class QueueError(OSError):
    """The queue cannot be used (missing, unreadable, not a queue)."""


class QueueCorrupt(QueueError):
    """A store file is damaged beyond what quarantining one entry can handle.

    Nothing is lost by stopping: the entries stay where they are, and
    ``lmtpfast queue salvage`` copies every readable entry into a fresh store
    and moves the damaged file to ``quarantine/``.
    """


class QueueWriteError(QueueError):
    """A write of ours failed (disk full, read-only file system, database down).

    Raised by :meth:`Queue.record`: the updates in :attr:`pending` (all of
    that call, unless the backend applies them one by one) were not applied
    and their entries are still claimed by this worker; keep them and try
    again, never re-deliver. Also raised by :meth:`Queue.enqueue_many`
    (nothing of the failing group was queued; a store that commits a long
    iterable in several groups has queued the groups before it) and
    :meth:`Queue.claim`.
    """

    #: The updates of the failed :meth:`Queue.record` call not applied (``None``: all).
    pending: list[Update] | None = None


@dataclass(slots=True)
class NewMessage:
    """A message to queue: its envelope (:func:`~lmtpfast.spool.new_envelope`) and content."""

    envelope: Envelope
    content: Content
    #: Where it came from (a file name, ``<stdin>``): for error messages only.
    origin: str = ""


@dataclass(slots=True, eq=False)
class Entry:
    """A claimed entry: leased to this worker until :meth:`Queue.record` decides it.

    ``envelope`` is the worker's copy: change it (recipients' states, replies,
    counters) and record it with an :class:`Update`. ``content`` is the
    message as bytes, or for a big one (over 1 MiB) a
    :class:`~lmtpfast.MessageFile` over its open file, read a piece at a time
    as it is sent (never whole into memory); call :meth:`close` when done
    (``record`` does).
    """

    id: str
    envelope: Envelope
    content: bytes | memoryview | MessageFile
    size: int
    #: A worker that died held this entry: each queued recipient may already
    #: have been delivered (reported ``possibly_duplicated`` when delivered now).
    suspect: bool = False
    #: The backend's lease (a claim object, a worker token and row, ...).
    lease: Any = None
    #: When this worker claimed it (Unix time; set by the replay).
    picked: float = 0.0
    _close: Callable[[], None] | None = field(default=None, repr=False)

    def close(self) -> None:
        """Release the content (close a big message's file); idempotent."""
        closer, self._close = self._close, None
        self.content = b""
        if closer is not None:
            closer()


@dataclass(slots=True)
class Update:
    """One worker decision for one claimed entry (see :data:`Action`)."""

    entry: Entry
    action: Action
    #: ``defer``: Unix time of the next attempt.
    next_attempt: float | None = None
    #: ``quarantine``: why; ``failed``: the reasons for people (optional).
    reason: str = ""
    #: The recipients this attempt delivered (named if the outcome is lost).
    delivered: tuple[str, ...] = ()


@dataclass(slots=True)
class ClaimBatch:
    """What one :meth:`Queue.claim` call got."""

    entries: list[Entry] = field(default_factory=list)
    #: ``(id, reason)`` of corrupt entries met and quarantined on the way.
    quarantined: list[tuple[str, str]] = field(default_factory=list)
    #: Entries skipped because another worker holds them (directory spool).
    locked: int = 0
    #: Nothing more is due in this pass (a later call returns nothing too).
    exhausted: bool = False


@dataclass(slots=True)
class QueueStatus:
    """Counts of a queue at one moment (``lmtpfast queue`` and the replay summary)."""

    queued: int = 0
    #: Queued entries not due at the time asked (deferred to later).
    not_due: int = 0
    #: Earliest next attempt among those.
    next_due: float | None = None
    #: Queued entries held by a worker other than the asking one.
    claimed: int = 0
    held: int = 0
    failed: int = 0
    quarantined: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"queued": self.queued, "held": self.held, "failed": self.failed,
                "quarantined": self.quarantined}


@dataclass(slots=True)
class EntryInfo:
    """One entry as the operator sees it (``lmtpfast queue list/show``)."""

    id: str
    state: EntryState
    #: ``None`` when the entry is too damaged to decode (quarantined).
    envelope: Envelope | None
    size: int
    #: A worker holds it right now (being delivered).
    claimed: bool = False
    suspect: bool = False
    #: Why it was quarantined (or held, when the operator said).
    reason: str | None = None


@dataclass(slots=True)
class ActionResult:
    """What an operator action did: ids changed, ids being delivered (untouched), ids not found."""

    done: list[str] = field(default_factory=list)
    busy: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Selection:
    """Which entries an operator command means (every field set must match).

    ``ids``: exactly these; ``states``: in these states (default: every
    state); ``sender``/``recipient``: shell patterns (``*@example.org``,
    case-insensitive) on the sender or on any remaining recipient;
    ``domain``: a remaining recipient's domain; ``older``/``younger``: age in
    seconds since arrival; ``code``: the last reply of a remaining recipient
    starts with this (``4``, ``452``, ``4.2.2``).
    """

    ids: tuple[str, ...] | None = None
    states: tuple[EntryState, ...] | None = None
    sender: str | None = None
    recipient: str | None = None
    domain: str | None = None
    older: float | None = None
    younger: float | None = None
    code: str | None = None

    def needs_envelope(self) -> bool:
        """Whether matching needs more than the id and the state."""
        return any(v is not None for v in (self.sender, self.recipient, self.domain, self.older,
                                           self.younger, self.code))

    def matches(self, info: EntryInfo, *, now: float | None = None) -> bool:
        """Whether *info* is selected (backends push down what they can, then call this)."""
        if self.ids is not None and info.id not in self.ids:
            return False
        if self.states is not None and info.state not in self.states:
            return False
        if not self.needs_envelope():
            return True
        env = info.envelope
        if env is None:
            return False
        if self.sender is not None and not _glob(env.sender, self.sender):
            return False
        if self.older is not None or self.younger is not None:
            age = (time.time() if now is None else now) - (env.arrival or 0.0)
            if self.older is not None and age < self.older:
                return False
            if self.younger is not None and age > self.younger:
                return False
        rcpts = env.recipients
        if self.recipient is not None:
            rcpts = [r for r in rcpts if _glob(r.address, self.recipient)]
        if self.domain is not None:
            dom = self.domain.lower().lstrip("@")
            rcpts = [r for r in rcpts if r.address.rpartition("@")[2].lower() == dom]
        if self.code is not None:
            rcpts = [r for r in rcpts if r.last is not None and _code_matches(r.last, self.code)]
        return bool(rcpts) or (self.recipient is None and self.domain is None
                               and self.code is None)


#: Every entry (an operator command without a filter still needs to say ``--all``).
ALL = Selection()


def _glob(value: str, pattern: str) -> bool:
    return fnmatch.fnmatchcase(value.lower(), pattern.lower())


def _code_matches(reason: Reason, code: str) -> bool:
    if "." in code:
        return (reason.enhanced or "").startswith(code)
    return str(reason.code).startswith(code)


def reasons_text(id: str, envelope: Envelope) -> str:
    """Why every remaining recipient of a failed entry failed, for people (``failed/ID.txt``)."""
    lines = [f"Message {id} from <{envelope.sender}>: every remaining recipient failed.", ""]
    for r in envelope.failed():
        last = r.last.line() if r.last else "no reply recorded"
        lines.append(f"<{r.address}>: {last}")
    return "\n".join(lines) + "\n"


class Queue(abc.ABC):
    """A store of queued messages (see the module docstring for the guarantees).

    Use as ``async with``; :meth:`close` releases this worker's claims that
    were not recorded (a process that ends without closing loses them the
    same way, as a crash does).
    """

    #: ``"sqlite"``, ``"dir"``, ``"postgresql"``.
    kind: ClassVar[str]
    #: Where the queue is, for messages (a path, a URL without its password).
    location: str

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # -- writers -----------------------------------------------------------------------

    @abc.abstractmethod
    async def enqueue_many(self, messages: Iterable[NewMessage], *, durable: bool = True
                           ) -> list[str]:
        """Queue every message; returns their ids, in order.

        With *durable* (the default) it returns only once all of them are on
        stable storage, with one flush for the whole call where the backend
        can (group commit). ``durable=False`` is for imports whose source is
        kept until the replay is done.
        """

    # -- workers -----------------------------------------------------------------------

    async def begin_pass(self, *, due: float) -> list[tuple[str, str]]:
        """Housekeeping before a replay pass: free dead workers' claims, import, ...

        Returns ``(id, reason)`` of entries quarantined on the way.
        """
        return []

    @abc.abstractmethod
    async def claim(self, n: int, *, due: float) -> ClaimBatch:
        """Lease up to *n* queued entries due at *due* (not held, not claimed) to this worker.

        Entries come in next-attempt order. One pass of a replay uses one
        *due* (the time it started), so an entry deferred during the pass
        (its next attempt after *due*) is not claimed again in that pass.
        """

    @abc.abstractmethod
    async def record(self, updates: Sequence[Update]) -> list[RecordStatus]:
        """Apply *updates* (one transaction or as few writes as the backend allows).

        Raises :class:`QueueWriteError` when the write failed: then nothing of
        this call was applied and the entries are still claimed by this
        worker; call again later (or :meth:`stash`). Each entry recorded is
        closed.
        """

    async def stash(self, updates: Sequence[Update]) -> int:
        """Keep outcomes that cannot be written now where a later worker applies them first.

        For a worker that must stop while :meth:`record` keeps failing:
        returns how many updates were kept (0: the backend cannot; those
        entries may be delivered again).
        """
        return 0

    @abc.abstractmethod
    async def status(self, *, due: float | None = None) -> QueueStatus:
        """Counts of the queue (``not_due`` relative to *due*, default now)."""

    async def end_pass(self, *, due: float) -> QueueStatus:
        """Counts at the end of a replay pass that used *due* (:meth:`status` by default).

        A backend may answer from what the pass itself saw (the directory
        spool's scan) instead of walking the queue again.
        """
        return await self.status(due=due)

    # -- operators ------------------------------------------------------------------------

    @abc.abstractmethod
    def entries(self, selection: Selection = ALL) -> AsyncIterator[EntryInfo]:
        """The selected entries, one at a time (memory does not grow with the queue)."""

    @abc.abstractmethod
    async def show(self, id: str) -> EntryInfo | None:
        """One entry, or ``None``."""

    @abc.abstractmethod
    async def content(self, id: str) -> bytes:
        """The message of entry *id* (``KeyError`` if there is none)."""

    @abc.abstractmethod
    async def hold(self, selection: Selection) -> ActionResult:
        """Put queued entries on hold: no replay touches them until :meth:`release`."""

    @abc.abstractmethod
    async def release(self, selection: Selection) -> ActionResult:
        """Take held entries off hold, due now."""

    @abc.abstractmethod
    async def retry(self, selection: Selection) -> ActionResult:
        """Make queued entries due now (``postqueue -f`` / ``-i``)."""

    @abc.abstractmethod
    async def delete(self, selection: Selection) -> ActionResult:
        """Remove entries (``postsuper -d``); an entry being delivered is removed too.

        A worker delivering it finds it gone when it records (``gone``).
        """

    @abc.abstractmethod
    async def bounce(self, selection: Selection, reason: Reason) -> ActionResult:
        """Fail every queued recipient of queued or held entries with *reason*.

        The entries become failed (the caller writes the bounces from
        :meth:`show`/:meth:`content`); an entry being delivered is *busy*.
        """

    @abc.abstractmethod
    async def requeue(self, selection: Selection) -> ActionResult:
        """Put failed entries back in the queue, their failed recipients queued again, due now."""

    async def sweep(self) -> int:
        """Remove leftovers of crashed writers; returns how many files went."""
        return 0

    def watch(self) -> Watch | None:
        """A way to wait for new work without polling, or ``None`` (then poll, bounded).

        The :class:`~lmtpfast.spool._watch.Watch` fires when entries may have
        arrived or become due (an enqueue, a release, a retry, a requeue, by
        any process): inotify for files, ``LISTEN``/``NOTIFY`` for a database.
        A wake-up is a hint; the next pass decides from the queue itself.
        """
        return None

    @abc.abstractmethod
    async def close(self) -> None:
        """Give back this worker's unrecorded claims and release resources."""


def open_queue(location: str | os.PathLike[str], *, create: bool = False,
               convert: bool = True) -> Queue:
    """The queue at *location*: which backend a spool path or URL means.

    * ``dir:PATH`` -- the directory spool (one file pair per message);
    * ``sqlite:PATH`` or a plain ``PATH`` -- the embedded store of that spool
      directory (``PATH/queue.db``). A directory spool found there (entries in
      ``incoming/``, ``deferred/``, ``failed/``) is converted into it by the
      first replay pass that sees it, entry by entry and without loss
      (``lmtpfast queue import`` does the same on demand);
    * ``postgresql://...`` -- the PostgreSQL queue (issue 15), when installed.

    *create* makes a missing spool. A missing or unusable one raises
    :class:`QueueError`. ``convert=False`` opens a directory spool that has
    no store yet as the directory spool it is (:class:`DirQueue`), so a
    command that only looks (``lmtpfast queue list``) never creates a store.
    """
    text = os.fspath(location)
    if text.startswith(("postgresql://", "postgres://")):
        from ._pgqueue import PgQueue

        return PgQueue(text, create=create)
    if text.startswith("dir:"):
        from ._dirstore import DirQueue
        from ._store import SpoolError

        try:
            return DirQueue(text[4:], create=create)
        except SpoolError as exc:
            raise QueueError(exc.errno or 0, exc.strerror or str(exc), text[4:]) from None
    if text.startswith("sqlite:"):
        text = text[7:]
    elif _legacy_spool(text):
        if not convert and not create:
            return open_queue(f"dir:{text}")
        # Checked as the directory spool it is before a store is made beside it.
        from ._store import Spool, SpoolError

        try:
            Spool(text)
        except SpoolError as exc:
            raise QueueError(exc.errno or 0, exc.strerror or str(exc), text) from None
    from ._sqlite import SQLiteQueue

    return SQLiteQueue(text, create=create or _legacy_spool(text))


def _legacy_spool(path: str) -> bool:
    """A directory spool without a store yet: the store is made beside it (then converted)."""
    return (not os.path.lexists(os.path.join(path, "queue.db"))
            and any(os.path.isdir(os.path.join(path, d)) for d in ("incoming", "deferred")))


def open_spool(location: str | os.PathLike[str], *, create: bool = True) -> Any:
    """The synchronous writer for a spool location (for ``lmtpfast enqueue`` and scripts).

    Returns an :class:`~lmtpfast.spool.SQLiteStore` for a new spool or one
    that has its store, and a :class:`~lmtpfast.spool.Spool` for ``dir:PATH``
    or a directory spool no replay has converted yet: a directory spool stays
    one until a replay (or ``lmtpfast queue import``) converts it, so an older
    replay reading it never misses what is written now; a
    :class:`~lmtpfast.spool._pgqueue.PgWriter` for ``postgresql://...``. All
    have ``enqueue(message, sender, recipients, **options) -> id``.
    """
    text = os.fspath(location)
    if text.startswith(("postgresql://", "postgres://")):
        from ._pgqueue import PgWriter

        return PgWriter(text)
    if text.startswith("dir:") or (not text.startswith("sqlite:") and _legacy_spool(text)):
        from ._store import Spool

        return Spool(text[4:] if text.startswith("dir:") else text, create=create)
    from ._sqlite import SQLiteStore

    return SQLiteStore(text[7:] if text.startswith("sqlite:") else text, create=create)


def enqueue(
    directory: str | os.PathLike[str],
    message: bytes | str,
    *,
    sender: str,
    recipients: list[str],
    fsync: bool = True,
    **envelope_options: Any,
) -> str:
    """Queue *message* in the spool at *directory* (created if needed); returns its id.

    >>> enqueue("/var/spool/lmtpfast", raw, sender="a@example.org",   # doctest: +SKIP
    ...         recipients=["b@example.org"])

    Atomic and, with *fsync* (the default), on disk when it returns. Writes
    the spool's store, or the directory spool it still is (see
    :func:`open_spool`); many messages at once: ``SQLiteStore.enqueue_many``.
    """
    data = message.encode("utf-8") if isinstance(message, str) else bytes(message)
    writer = open_spool(directory)
    from ._sqlite import SQLiteStore

    if isinstance(writer, SQLiteStore):
        with writer:
            return writer.enqueue(data, sender, list(recipients), durable=fsync,
                                  **envelope_options)
    return str(writer.enqueue(data, sender, list(recipients), fsync=fsync, **envelope_options))
