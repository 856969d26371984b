"""The directory spool as a :class:`~lmtpfast.spool.Queue`: one file pair per message.

The format and its promises are in :mod:`lmtpfast.spool._store` and
``docs/spool.md``; this module maps the queue interface onto them, so
:class:`~lmtpfast.spool.Replayer` and the operator commands work on a
directory spool as on the embedded store. A claim is the ``flock`` on the
message file (the lease is the :class:`~lmtpfast.spool.Claim` object), so a
dead replay's claims are free at once; unlike the embedded store, the
directory spool writes nothing at claim time and so cannot flag the entries
a killed replay had in flight (the at-least-once bound is the same).

Held entries live in ``SPOOL/hold/`` (replay only reads ``incoming/`` and
``deferred/``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Literal

from ._format import (
    MAX_ENVELOPE_SIZE,
    BadEnvelope,
    Envelope,
    Reason,
    decode_envelope,
    encode_envelope,
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
    QueueStatus,
    QueueWriteError,
    RecordStatus,
    Selection,
    Update,
    reasons_text,
)
from ._store import Claim, Quarantined, Scan, Spool, flocked_files
from ._watch import IN_ATTRIB, IN_CREATE, IN_MOVED_TO, Watch, watch_paths

__all__ = ["DirQueue"]

# The space an envelope rewrite may need per recipient: reply text and
# destination (cut to 512 and 256 characters by replay) at 6 bytes a
# character (JSON's \uXXXX), plus the keys and numbers of a Reason.
_RESERVE_PER_RECIPIENT = 6 * (512 + 256) + 512


def _read_small(path: Path) -> bytes | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        return os.read(fd, MAX_ENVELOPE_SIZE + 1)
    finally:
        os.close(fd)


def _content_bytes(content: object) -> bytes:
    if isinstance(content, bytes | bytearray | memoryview):
        return bytes(content)
    assert isinstance(content, os.PathLike)
    fd = os.open(content, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        return f.read()


class DirQueue(Queue):
    """A directory spool (:class:`~lmtpfast.spool.Spool`) behind the queue interface."""

    kind = "dir"

    def __init__(self, spool: Spool | str | os.PathLike[str], *, create: bool = False) -> None:
        self.spool = spool if isinstance(spool, Spool) else Spool(spool, create=create)
        self.location = str(self.spool.path)
        self._scan: Scan | None = None
        self._iter: Iterator[tuple[Literal["incoming", "deferred"], str]] | None = None
        self._scan_due: float | None = None
        self._refused: OSError | None = None
        #: The last pass's scan once it ended (its counts are the status).
        self._done_scan: Scan | None = None

    def __repr__(self) -> str:
        return f"<DirQueue {self.location}>"

    @property
    def _hold(self) -> Path:
        return self.spool.path / "hold"

    # -- writers -----------------------------------------------------------------------

    async def enqueue_many(self, messages: Iterable[NewMessage], *, durable: bool = True
                           ) -> list[str]:
        ids = []
        spool = self.spool
        try:
            for m in messages:
                ids.append(self._write_entry(m.envelope, _content_bytes(m.content), durable))
            if not durable:
                spool.sync()
        except OSError as exc:
            raise QueueWriteError(exc.errno or errno.EIO, f"enqueue: {exc.strerror or exc}",
                                  self.location) from None
        return ids

    def _write_entry(self, env: Envelope, data: bytes, durable: bool) -> str:
        """The directory spool's enqueue, for an envelope given whole (state, replies kept)."""
        spool = self.spool
        tmp_msg = spool.write_tmp(data, fsync=durable)
        try:
            while True:
                id = spool.new_id()
                try:
                    os.link(tmp_msg, spool.path / "msg" / id)  # fails rather than replace
                    break
                except FileExistsError:
                    continue
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_msg)
        queue = "deferred" if env.attempts else "incoming"
        mtime = env.next_attempt if queue == "deferred" else env.arrival
        tmp_env = spool.write_tmp(encode_envelope(env), fsync=durable, mtime=mtime)
        os.rename(tmp_env, spool.path / queue / id)
        if durable:
            for d in ("msg", queue):
                fd = os.open(spool.path / d, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        return id

    # -- workers -----------------------------------------------------------------------

    async def claim(self, n: int, *, due: float) -> ClaimBatch:
        if self._refused is not None:
            exc, self._refused = self._refused, None
            raise QueueWriteError(exc.errno or errno.EIO,
                                  f"left queued, not delivered: {exc.strerror or exc}",
                                  exc.filename or self.location)
        if self._scan_due != due or self._iter is None:
            self._scan = self.spool.scan(due=due)
            self._iter = iter(self._scan)
            self._scan_due = due
        batch = ClaimBatch()
        for queue, id in self._iter:
            try:
                claim = self.spool.claim(queue, id)
            except Quarantined as q:
                batch.quarantined.append((q.id, q.reason))
                continue
            except OSError:
                batch.locked += 1  # unreadable for now: left as it is
                continue
            if claim is None:
                batch.locked += 1
                continue
            pending = len(claim.envelope.queued())
            if pending > 1 or (pending and claim.envelope.failed()):
                # A delivery to some of them must be recordable whatever the
                # disk does next: set the space for the rewrite aside first (on
                # a full disk this fails here, before anything is sent).
                try:
                    claim.reserve(len(encode_envelope(claim.envelope)) + 1024
                                  + _RESERVE_PER_RECIPIENT * pending)
                except OSError as exc:
                    claim.release()
                    if batch.entries:
                        self._refused = exc  # raised by the next claim
                        return batch
                    raise QueueWriteError(exc.errno or errno.EIO,
                                          f"left queued, not delivered: {exc.strerror or exc}",
                                          exc.filename or self.location) from None
            try:
                data = claim.message()  # a big one is read as it is sent
            except OSError as exc:
                try:
                    self.spool._quarantine(claim.queue, claim.id,
                                           f"message file cannot be read: {exc.strerror or exc}",
                                           have_lock=True)
                except Quarantined as q:
                    batch.quarantined.append((q.id, q.reason))
                finally:
                    claim.release()
                continue
            batch.entries.append(Entry(claim.id, claim.envelope, data, len(data), lease=claim,
                                       _close=claim.release))
            if len(batch.entries) >= n:
                return batch
        batch.exhausted = True
        self._done_scan = self._scan
        return batch

    async def record(self, updates: Sequence[Update]) -> list[RecordStatus]:
        statuses: list[RecordStatus] = []
        for k, u in enumerate(updates):
            claim: Claim = u.entry.lease
            try:
                if u.action == "done":
                    claim.delivered()
                elif u.action == "failed":
                    claim.failed(u.reason or reasons_text(claim.id, claim.envelope))
                elif u.action == "defer":
                    assert u.next_attempt is not None
                    claim.save(next_attempt=u.next_attempt)
                elif u.action == "quarantine":
                    with contextlib.suppress(Quarantined):
                        self.spool._quarantine(claim.queue, claim.id, u.reason or "quarantined",
                                               have_lock=True)
                elif u.action != "release":
                    raise ValueError(f"unknown action {u.action!r}")
            except OSError as exc:
                err = QueueWriteError(exc.errno or errno.EIO, exc.strerror or str(exc),
                                      exc.filename or self.location)
                err.pending = list(updates[k:])
                raise err from None
            u.entry.close()
            statuses.append("ok")
        return statuses

    async def status(self, *, due: float | None = None) -> QueueStatus:
        due = time.time() if due is None else due
        scan = self.spool.scan(due=due)
        for _ in scan:
            pass
        return self._status(scan)

    async def end_pass(self, *, due: float) -> QueueStatus:
        # What the pass's own scan saw (the directory is not walked twice).
        scan = self._done_scan
        if scan is None or scan.due != due:
            return await self.status(due=due)
        return self._status(scan)

    def _status(self, scan: Scan) -> QueueStatus:
        counts = self.spool.count()
        return QueueStatus(queued=counts["incoming"] + counts["deferred"], not_due=scan.not_due,
                           next_due=scan.next_due, held=self._count_hold(),
                           failed=counts["failed"], quarantined=counts["quarantine"])

    def _count_hold(self) -> int:
        try:
            with os.scandir(self._hold) as it:
                return sum(1 for e in it if not e.name.startswith("."))
        except FileNotFoundError:
            return 0

    async def sweep(self) -> int:
        return self.spool.sweep()

    def watch(self) -> Watch | None:
        # An enqueue renames into incoming/, a release into deferred/, a
        # retry sets a deferred envelope's time (IN_ATTRIB).
        p = self.spool.path
        return watch_paths([(p / "incoming", IN_MOVED_TO | IN_CREATE),
                            (p / "deferred", IN_MOVED_TO | IN_CREATE | IN_ATTRIB)])

    async def close(self) -> None:
        self._iter = None
        self.spool.drop_reservations()

    # -- operators ------------------------------------------------------------------------

    def _locations(self) -> Iterator[tuple[EntryState, str, Path, Path]]:
        """``(state, id, envelope path, message path)`` of every entry, folder by folder."""
        p = self.spool.path
        for folder, state in (("deferred", "queued"), ("incoming", "queued"), ("hold", "held")):
            with contextlib.suppress(FileNotFoundError), os.scandir(p / folder) as it:
                for e in it:
                    if not e.name.startswith("."):
                        yield state, e.name, Path(e.path), p / "msg" / e.name  # type: ignore[misc]
        for folder, state, ext in (("failed", "failed", ".json"),
                                   ("quarantine", "quarantined", ".txt")):
            with contextlib.suppress(FileNotFoundError), os.scandir(p / folder) as it:
                for e in it:
                    if e.name.endswith(ext):
                        id = e.name[: -len(ext)]
                        env = p / folder / (f"{id}.json" if state == "failed" else f"{id}.env")
                        yield state, id, env, p / folder / f"{id}.eml"  # type: ignore[misc]

    def _info(self, state: EntryState, id: str, env_path: Path, msg_path: Path,
              locks: frozenset[tuple[int, int]] | None = None) -> EntryInfo:
        env: Envelope | None = None
        raw = _read_small(env_path)
        if raw is not None:
            with contextlib.suppress(BadEnvelope):
                env = decode_envelope(raw)
        size = 0
        claimed = False
        with contextlib.suppress(OSError):
            st = os.lstat(msg_path)
            size = st.st_size
            # A queued entry's message file is locked by the replay delivering
            # it: the claim the operator actions also meet (they say busy).
            claimed = state == "queued" and locks is not None and (st.st_dev, st.st_ino) in locks
        reason = None
        if state == "quarantined":
            text = _read_small(self.spool.path / "quarantine" / f"{id}.txt")
            reason = text.decode("utf-8", "replace").strip() if text else None
        return EntryInfo(id, state, env, size, claimed=claimed, reason=reason)

    async def entries(self, selection: Selection = ALL) -> AsyncIterator[EntryInfo]:
        locks = flocked_files()
        for state, id, env_path, msg_path in self._locations():
            if selection.states is not None and state not in selection.states:
                continue
            if selection.ids is not None and id not in selection.ids:
                continue
            info = self._info(state, id, env_path, msg_path, locks)
            if selection.matches(info):
                yield info

    async def show(self, id: str) -> EntryInfo | None:
        async for info in self.entries(Selection(ids=(id,))):
            return info
        return None

    async def content(self, id: str) -> bytes:
        for _state, eid, _, msg_path in self._locations():
            if eid == id:
                fd = os.open(msg_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                with os.fdopen(fd, "rb") as f:
                    return f.read()
        raise KeyError(id)

    async def _selected(self, selection: Selection) -> list[EntryInfo]:
        return [i async for i in self.entries(selection)]

    def _claim_any(self, id: str) -> Claim | None:
        for queue in ("deferred", "incoming"):
            if (self.spool.path / queue / id).exists():
                with contextlib.suppress(Quarantined):
                    return self.spool.claim(queue, id)
        return None

    async def _each(self, selection: Selection, states: tuple[EntryState, ...],
                    fn: object) -> ActionResult:
        result = ActionResult()
        seen = set()
        for info in await self._selected(selection):
            seen.add(info.id)
            if info.state not in states:
                result.missing.append(info.id)
                continue
            assert callable(fn)
            getattr(result, fn(info)).append(info.id)
        if selection.ids is not None:
            result.missing += [i for i in selection.ids if i not in seen]
        return result

    async def hold(self, selection: Selection) -> ActionResult:
        def one(info: EntryInfo) -> str:
            claim = self._claim_any(info.id)
            if claim is None:
                return "busy"
            try:
                self._hold.mkdir(mode=0o700, exist_ok=True)
                os.rename(claim.envelope_path, self._hold / claim.id)
            finally:
                claim.release()
            return "done"
        return await self._each(selection, ("queued",), one)

    async def release(self, selection: Selection) -> ActionResult:
        now = time.time()

        def one(info: EntryInfo) -> str:
            src = self._hold / info.id
            os.utime(src, (now, now))  # the scan reads a deferred envelope's time as "due"
            os.rename(src, self.spool.path / "deferred" / info.id)
            return "done"
        return await self._each(selection, ("held",), one)

    async def retry(self, selection: Selection) -> ActionResult:
        now = time.time()

        def one(info: EntryInfo) -> str:
            # Under the entry's claim: a replay delivering it would rewrite the
            # envelope over the new time, so it is busy, as in the store.
            claim = self._claim_any(info.id)
            if claim is None:
                return "busy"
            try:
                with contextlib.suppress(FileNotFoundError):
                    os.utime(self.spool.path / "deferred" / info.id, (now, now))
            finally:
                claim.release()
            return "done"
        return await self._each(selection, ("queued",), one)

    async def delete(self, selection: Selection) -> ActionResult:
        p = self.spool.path

        def one(info: EntryInfo) -> str:
            if info.state == "queued":
                claim = self._claim_any(info.id)
                if claim is None:
                    return "busy"
                claim.delivered()
            elif info.state == "held":
                for f in (self._hold / info.id, p / "msg" / info.id):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(f)
            else:
                folder = "failed" if info.state == "failed" else "quarantine"
                for ext in ("json", "txt", "env", "eml"):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(p / folder / f"{info.id}.{ext}")
            return "done"
        return await self._each(selection, ("queued", "held", "failed", "quarantined"), one)

    async def bounce(self, selection: Selection, reason: Reason) -> ActionResult:
        def one(info: EntryInfo) -> str:
            if info.state == "held":
                os.rename(self._hold / info.id, self.spool.path / "deferred" / info.id)
            claim = self._claim_any(info.id)
            if claim is None:
                return "busy"
            for r in claim.envelope.recipients:
                if r.state == "queued":
                    r.state, r.last = "failed", reason
            claim.failed(reasons_text(claim.id, claim.envelope))
            return "done"
        return await self._each(selection, ("queued", "held"), one)

    async def requeue(self, selection: Selection) -> ActionResult:
        p = self.spool.path

        def one(info: EntryInfo) -> str:
            env = info.envelope
            if env is None:
                return "missing"
            for r in env.recipients:
                if r.state == "failed":
                    r.state = "queued"
            env.next_attempt = 0.0
            folder = "failed" if info.state == "failed" else "quarantine"
            eml = p / folder / f"{info.id}.eml"
            os.link(eml, p / "msg" / info.id)
            tmp = self.spool.write_tmp(encode_envelope(env), fsync=True, mtime=time.time())
            os.rename(tmp, p / "deferred" / info.id)
            for ext in ("json", "txt", "env", "eml"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(p / folder / f"{info.id}.{ext}")
            return "done"
        return await self._each(selection, ("failed", "quarantined"), one)
