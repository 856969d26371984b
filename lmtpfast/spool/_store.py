"""The spool directory: atomic enqueue, lazy scan, claim by lock, and the final moves.

Layout (see ``docs/spool.md`` for the why)::

    SPOOL/tmp/         files being written (never looked at by replay)
    SPOOL/msg/ID       the message, immutable; its lock is the claim
    SPOOL/incoming/ID  envelope of a message never tried   (mtime = arrival)
    SPOOL/deferred/ID  envelope of a message to try again  (mtime = next attempt)
    SPOOL/failed/      ID.eml + ID.json + ID.txt: every recipient finally refused
    SPOOL/quarantine/  ID.eml / ID.env + ID.txt: entries that could not be read

A message exists once its envelope is in ``incoming/``: the message file is
renamed into ``msg/`` first, the envelope last, so a half-written entry is
never seen. Every envelope change is a rename over the old one.

The spool is private (Postfix's queue is): folders 0700 and files 0600
whatever the umask, and replay reads only what the spool owns: files are
opened with ``O_NOFOLLOW`` and must be regular files owned by the spool's
owner (or the replaying user), the message with no hard link from outside
the spool; anything else is quarantined without copying its content.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal, NoReturn

from .._errors import ContentError
from ._format import (
    MAX_ENVELOPE_SIZE,
    BadEnvelope,
    Envelope,
    decode_envelope,
    encode_envelope,
    new_envelope,
)

if TYPE_CHECKING:
    from .._delivery import MessageFile

__all__ = ["Claim", "ImportReport", "Quarantined", "Scan", "Spool", "SpoolError"]

Queue = Literal["incoming", "deferred"]
QUEUES: tuple[Queue, ...] = ("deferred", "incoming")
_DIRS = ("tmp", "msg", "incoming", "deferred", "failed", "quarantine")
# Temporary files older than this are left over from a crash (Maildir's rule).
TMP_MAX_AGE = 36 * 3600
# A message file without an envelope this old is an enqueue cut short by a crash.
ORPHAN_MAX_AGE = 3600


class SpoolError(OSError):
    """The spool directory is missing, not a spool, or cannot be read."""


class Quarantined(Exception):
    """Raised by :meth:`Spool.claim` after it moved a corrupt entry to ``quarantine/``."""

    def __init__(self, id: str, reason: str) -> None:
        super().__init__(f"{id}: {reason}")
        self.id = id
        self.reason = reason


#: Modes of everything the spool writes, whatever the umask.
DIR_MODE = 0o700
FILE_MODE = 0o600
_NOFOLLOW = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def make_private_dir(path: Path) -> None:
    """Create *path* (and missing parents) and make it 0700; an existing one is tightened.

    Parents made on the way get the usual mode (``mkdir -p``). A folder we do
    not own is left as it is (``chmod`` is the owner's decision then).
    """
    path.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
    st = path.stat()
    if stat.S_IMODE(st.st_mode) != DIR_MODE and st.st_uid == os.geteuid():
        os.chmod(path, DIR_MODE)


def open_private(path: str | os.PathLike[str]) -> int:
    """Create a new file 0600 (never following or replacing anything) and return its fd."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)  # the umask may have taken the owner's bits too
    except BaseException:
        os.close(fd)
        raise
    return fd


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def flocked_files() -> frozenset[tuple[int, int]] | None:
    """``(st_dev, st_ino)`` of every file some process holds a ``flock`` on, or ``None``.

    Read from Linux's ``/proc/locks``: an operator command sees which entries
    a replay holds (and which workers live) without taking any lock itself,
    so looking never makes a replay skip an entry. ``None`` where
    ``/proc/locks`` cannot be read.
    """
    try:
        with open("/proc/locks", "rb") as f:
            text = f.read()
    except OSError:
        return None
    held = set()
    for line in text.splitlines():
        # "1: FLOCK  ADVISORY  WRITE 1954 fe:00:2209274 0 EOF"; "1: -> FLOCK ..." waits.
        parts = line.split()
        if len(parts) < 6 or parts[1] != b"FLOCK":
            continue
        try:
            major, minor, ino = parts[5].split(b":")
            held.add((os.makedev(int(major, 16), int(minor, 16)), int(ino)))
        except ValueError:
            continue
    return frozenset(held)


class Scan:
    """A lazy walk over the due entries of a spool: ``(queue, id)`` pairs.

    Memory stays flat: entries come from ``os.scandir`` one at a time and
    nothing is remembered but the counters. ``deferred/`` entries whose
    modification time (the next attempt time) is after *due* are counted in
    :attr:`not_due` and skipped.
    """

    def __init__(self, spool: Spool, *, due: float, flush: bool = False) -> None:
        self.spool = spool
        self.due = due
        self.flush = flush
        self.seen = 0
        self.not_due = 0
        #: Earliest next attempt among the entries skipped as not due.
        self.next_due: float | None = None

    def __iter__(self) -> Iterator[tuple[Queue, str]]:
        for queue in QUEUES:
            directory = self.spool.path / queue
            with os.scandir(directory) as it:
                for entry in it:
                    name = entry.name
                    if name.startswith("."):
                        continue
                    if queue == "deferred" and not self.flush:
                        try:
                            mtime = entry.stat().st_mtime
                        except FileNotFoundError:
                            continue
                        if mtime > self.due:
                            self.not_due += 1
                            if self.next_due is None or mtime < self.next_due:
                                self.next_due = mtime
                            continue
                    self.seen += 1
                    yield queue, name


class Claim:
    """One message held by this process: the lock on ``msg/ID`` is the claim.

    The lock (``flock``) belongs to an open file, so the kernel drops it when
    the process ends, however it ends: a crashed replay's claims are free at
    once, without PID files or lock ages. Call exactly one of
    :meth:`delivered`, :meth:`failed`, :meth:`defer` or :meth:`release`.
    """

    def __init__(self, spool: Spool, id: str, queue: Queue, fd: int, envelope: Envelope) -> None:
        self.spool = spool
        self.id = id
        self.queue: Queue = queue
        self.envelope = envelope
        self._fd = fd
        self._reserved: tuple[Path, int] | None = None

    @property
    def envelope_path(self) -> Path:
        return self.spool.path / self.queue / self.id

    @property
    def message_path(self) -> Path:
        return self.spool.path / "msg" / self.id

    @property
    def message_size(self) -> int:
        return os.fstat(self._fd).st_size

    def message(self) -> bytes | MessageFile:
        """The message to deliver: its bytes, or a large one read a piece at a time.

        A message larger than the streaming threshold (1 MiB) is a
        :class:`~lmtpfast.MessageFile` over the locked descriptor: the
        delivery reads it in pieces as it sends, so several large messages in
        flight never sit in memory whole.
        """
        # Imported here: enqueue (which uses this module) never loads the delivery side.
        from .._delivery import STREAM_THRESHOLD, MessageFile

        size = os.fstat(self._fd).st_size
        if size > STREAM_THRESHOLD:
            return MessageFile(self._fd, size)
        return os.pread(self._fd, size, 0) if size else b""

    def read_message(self, limit: int | None = None) -> bytes:
        """The message bytes (read through the locked descriptor); the first *limit* only."""
        size = os.fstat(self._fd).st_size
        if limit is not None:
            size = min(size, limit)
        return os.pread(self._fd, size, 0) if size else b""

    def reserve(self, size: int) -> None:
        """Set aside *size* bytes on disk for the next :meth:`save` (before a delivery).

        A file of at least that size, allocated in ``tmp/`` (``posix_fallocate``),
        is set aside for this claim, so the envelope rewrite that records a
        partial delivery cannot fail for want of space afterwards: on a full
        disk this raises (``ENOSPC``) *before* anything is delivered. Files
        not used by a save go back to the spool's spares on :meth:`release`
        (see :meth:`Spool.drop_reservations`), so the common case (everybody
        delivered) costs no file operation after the first few messages.
        """
        if self._reserved is None:
            self._reserved = self.spool._take_reservation(size)

    def release(self) -> None:
        """Give the message back unchanged (and any space reserved for it)."""
        if self._reserved is not None:
            self.spool._return_reservation(self._reserved)
            self._reserved = None
        if self._fd >= 0:
            os.close(self._fd)  # closing drops the flock
            self._fd = -1

    @property
    def held(self) -> bool:
        """Whether the claim (the lock) is still held."""
        return self._fd >= 0

    def save(self, *, next_attempt: float) -> None:
        """Write the envelope (crash-safe) into ``deferred/`` with *next_attempt*.

        The new envelope is written and fsynced under a temporary name (into
        the space :meth:`reserve` set aside, if it did), its modification time
        set to the next attempt time (what the scan reads), then renamed over
        the old one. A message still in ``incoming/`` is first renamed into
        ``deferred/``, so one envelope exists at every instant. On an error
        nothing is left in ``tmp/`` but the reservation, kept for a retry.
        """
        env = self.envelope
        env.next_attempt = next_attempt
        spool = self.spool
        data = encode_envelope(env)
        fd = -1
        if self._reserved is not None:
            tmp = self._reserved[0]
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            except FileNotFoundError:  # a spare removed by another replay's sweep
                self._reserved = None
        if fd >= 0:
            try:
                _write_all(fd, data)
                os.ftruncate(fd, len(data))
                self._reserved = (tmp, len(data))
                os.fsync(fd)
                os.utime(fd, (next_attempt, next_attempt))
            finally:
                os.close(fd)
        else:
            tmp = spool.write_tmp(data, fsync=True, mtime=next_attempt)
        target = spool.path / "deferred" / self.id
        try:
            if self.queue == "incoming":
                os.rename(self.envelope_path, target)
                self.queue = "deferred"
            os.rename(tmp, target)
        except BaseException:
            if self._reserved is None:
                _unlink(tmp)
            raise
        self._reserved = None

    def delivered(self) -> None:
        """Every recipient delivered: remove the envelope (the commit point), then the message.

        Removing a file needs no free space, so this works on a full disk. A
        message file left behind (an error after the commit) is an orphan that
        :meth:`Spool.sweep` removes.
        """
        _unlink(self.envelope_path)
        with contextlib.suppress(OSError):
            _unlink(self.message_path)
        self.release()

    def failed(self, reasons: str) -> None:
        """No recipient left to try: move the entry to ``failed/`` with *reasons* beside it.

        ``failed/ID.eml`` (the message, hard-linked), ``failed/ID.json`` (the
        final envelope, each failed recipient with its last reply) and
        ``failed/ID.txt`` (*reasons* for people). The envelope is removed from
        the queue only after all three exist.
        """
        spool = self.spool
        failed = spool.path / "failed"
        spool.put(failed / f"{self.id}.json", encode_envelope(self.envelope))
        spool.put(failed / f"{self.id}.txt", reasons.encode("utf-8"))
        eml = failed / f"{self.id}.eml"
        _unlink(eml)
        os.link(self.message_path, eml)
        self.delivered()


@dataclass
class ImportReport:
    """What moving a directory spool (or a store) into another queue did."""

    imported: int = 0
    #: Imported by an earlier, interrupted run (removed from the directory now).
    already: int = 0
    failed: int = 0
    #: Held by a running replay of the directory spool: left for the next run.
    locked: int = 0
    quarantined: list[tuple[str, str]] = field(default_factory=list)


class Spool:
    """A spool directory (created with its sub-folders when *create* is true)."""

    def __init__(self, path: str | os.PathLike[str], *, create: bool = False) -> None:
        self.path = Path(path)
        if create:
            make_private_dir(self.path)
            for d in _DIRS:
                make_private_dir(self.path / d)
        if not self.path.is_dir():
            raise SpoolError(errno.ENOENT, "spool directory not found", str(self.path))
        #: The spool's owner: files owned by anyone else (or by this process's
        #: user) are not the spool's and are never delivered.
        self.owner = self.path.stat().st_uid
        self._owners = frozenset((self.owner, os.geteuid()))
        # Reservation files not used by a save, kept for the next claims.
        self._spares: list[tuple[Path, int]] = []
        present = {}
        for d in _DIRS:
            try:
                present[d] = os.lstat(self.path / d)
            except FileNotFoundError:
                continue
        missing = [d for d in _DIRS if d not in present]
        if "incoming" in missing and "deferred" in missing:
            raise SpoolError(errno.ENOENT, "not a spool (no incoming/ or deferred/)",
                             str(self.path))
        for d, st in present.items():
            # A folder replaced by a link would send reads and writes elsewhere.
            if stat.S_ISLNK(st.st_mode):
                raise SpoolError(errno.ELOOP, f"spool folder {d}/ is a symbolic link",
                                 str(self.path))
            if not stat.S_ISDIR(st.st_mode):
                raise SpoolError(errno.ENOTDIR, f"spool folder {d}/ is not a directory",
                                 str(self.path))
            if st.st_uid not in self._owners:
                raise SpoolError(errno.EPERM, f"spool folder {d}/ is owned by uid {st.st_uid}, "
                                 f"the spool by uid {self.owner}", str(self.path))
        # A spool made by hand (or an older tool) may lack the folders replay
        # writes into (the ones it reads must exist), or be world-readable:
        # queued mail is private, as Postfix's queue is.
        with contextlib.suppress(PermissionError):
            make_private_dir(self.path)
            for d in _DIRS:
                make_private_dir(self.path / d)
        if not os.access(self.path / "incoming", os.R_OK | os.X_OK):
            raise SpoolError(errno.EACCES, "spool not readable", str(self.path))

    def __repr__(self) -> str:
        return f"<Spool {self.path}>"

    # -- writing -------------------------------------------------------------

    def new_id(self) -> str:
        # Time first so names sort roughly by arrival; pid and randomness keep
        # several writers on one spool from colliding (Maildir's recipe).
        return f"{time.time_ns() // 1000:x}-{os.getpid():x}-{secrets.token_hex(4)}"

    def write_tmp(self, data: bytes, *, fsync: bool, mtime: float | None = None) -> Path:
        """Write *data* to a new file in ``tmp/`` and return its path."""
        tmp = self.path / "tmp" / f".{secrets.token_hex(8)}.{os.getpid()}"
        fd = open_private(tmp)
        try:
            _write_all(fd, data)
            if fsync:
                os.fsync(fd)
            if mtime is not None:
                os.utime(fd, (mtime, mtime))
        except BaseException:
            os.close(fd)
            _unlink(tmp)
            raise
        os.close(fd)
        return tmp

    def _take_reservation(self, size: int) -> tuple[Path, int]:
        """A file in ``tmp/`` with at least *size* bytes allocated (a spare if there is one)."""
        if self._spares:
            tmp, allocated = self._spares.pop()
        else:
            tmp, allocated = self.path / "tmp" / f".{secrets.token_hex(8)}.{os.getpid()}.res", 0
        if allocated >= size:
            return tmp, allocated
        try:
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC) if allocated else (
                    open_private(tmp))
            except FileNotFoundError:  # a spare removed by another replay's sweep
                fd = open_private(tmp)
            try:
                try:
                    os.posix_fallocate(fd, 0, size)
                except OSError as exc:
                    if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                        raise
                    # No fallocate here (some network file systems): write the bytes.
                    os.lseek(fd, 0, os.SEEK_SET)
                    _write_all(fd, bytes(size))
                    os.fsync(fd)
            finally:
                os.close(fd)
        except BaseException:
            _unlink(tmp)
            raise
        return tmp, size

    def _return_reservation(self, reservation: tuple[Path, int]) -> None:
        self._spares.append(reservation)

    def drop_reservations(self) -> None:
        """Remove the spare reservation files (replay does it when it ends)."""
        while self._spares:
            with contextlib.suppress(OSError):
                os.unlink(self._spares.pop()[0])

    def put(self, path: Path, data: bytes) -> None:
        """Write a whole file atomically (temporary file, fsync, rename); nothing left on error."""
        tmp = self.write_tmp(data, fsync=True)
        try:
            os.rename(tmp, path)
        except BaseException:
            _unlink(tmp)
            raise

    def enqueue(
        self,
        message: bytes,
        sender: str,
        recipients: list[str],
        *,
        fsync: bool = True,
        **envelope_options: object,
    ) -> str:
        """Queue *message* for *recipients*; returns the new entry's ID.

        The message is written and renamed into ``msg/`` first, then the
        envelope into ``incoming/``: only that last rename makes the entry
        visible. With *fsync* (the default) both files and both folders are
        flushed before returning, as an MTA must before it accepts a message.
        *envelope_options*: ``arrival``, ``ret``, ``envid``, ``notify``, ``orcpt``
        (see :func:`~lmtpfast.spool.new_envelope`). Raises
        :class:`BadEnvelope` for a bad address and :class:`~lmtpfast.ContentError`
        for a message with a NUL byte (it could never be sent).
        """
        env = new_envelope(sender, list(recipients), **envelope_options)  # type: ignore[arg-type]
        env_bytes = encode_envelope(env)
        if (nul := message.find(b"\0")) >= 0:
            # Refused now rather than queued and bounced later: it cannot be sent.
            raise ContentError(f"message contains a NUL byte at offset {nul}; it cannot be sent")
        tmp_msg = self.write_tmp(message, fsync=fsync)
        try:
            while True:
                id = self.new_id()
                try:
                    # link, not rename: it fails instead of replacing a namesake.
                    os.link(tmp_msg, self.path / "msg" / id)
                    break
                except FileExistsError:
                    continue
        finally:
            _unlink(tmp_msg)
        try:
            tmp_env = self.write_tmp(env_bytes, fsync=fsync, mtime=env.arrival)
            try:
                os.rename(tmp_env, self.path / "incoming" / id)
            except BaseException:
                _unlink(tmp_env)
                raise
        except BaseException:
            # Not queued after all (a full disk): leave no orphan message behind.
            _unlink(self.path / "msg" / id)
            raise
        if fsync:
            _fsync_dir(self.path / "msg")
            _fsync_dir(self.path / "incoming")
        return id

    def sync(self) -> None:
        """Flush the folders' entries to disk (after enqueues made with ``fsync=False``)."""
        for d in ("msg", "incoming"):
            _fsync_dir(self.path / d)

    # -- reading -------------------------------------------------------------

    def scan(self, *, due: float | None = None, flush: bool = False) -> Scan:
        """A lazy :class:`Scan` of entries due at *due* (default: now)."""
        return Scan(self, due=time.time() if due is None else due, flush=flush)

    def count(self) -> dict[str, int]:
        """Entries per folder (one ``scandir`` pass each, names only)."""
        counts: dict[str, int] = {}
        for d in ("incoming", "deferred", "failed", "quarantine"):
            n = 0
            with os.scandir(self.path / d) as it:
                for e in it:
                    if not e.name.startswith(".") and (
                        d in ("incoming", "deferred") or e.name.endswith(".txt")
                    ):
                        n += 1
            counts[d] = n
        return counts

    def claim(self, queue: Queue, id: str) -> Claim | None:
        """Lock and load one entry; ``None`` if another claim holds it or it is gone.

        A corrupt entry (unreadable or missing message, truncated or invalid
        envelope, bad address) is moved to ``quarantine/`` and
        :class:`Quarantined` is raised with the reason.
        """
        if "/" in id or id in ("", ".", ".."):
            raise ValueError(f"bad spool entry name {id!r}")
        env_path = self.path / queue / id
        msg_path = self.path / "msg" / id
        try:
            # O_NOFOLLOW: msg/ID -> /etc/shadow must never be read, let alone sent.
            fd = os.open(msg_path, os.O_RDONLY | _NOFOLLOW)
        except FileNotFoundError:
            # Finished by another process (it removes the envelope first), or
            # the message file was lost: only the second leaves an envelope.
            if env_path.exists():
                self._quarantine(queue, id, "message file is missing", have_lock=False)
            return None
        except OSError as exc:
            if not os.path.lexists(env_path):
                return None
            if exc.errno == errno.ELOOP:
                self._quarantine(queue, id, "message file is a symbolic link (not read)",
                                 have_lock=False, keep_message=False)
            self._quarantine(queue, id, f"message file cannot be opened: {exc.strerror or exc}",
                             have_lock=False)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        try:
            claim = self._load(queue, id, fd)
        except BaseException:
            os.close(fd)
            raise
        if claim is None:
            # Gone meanwhile (finished, moved, held): the lock must not outlive the attempt.
            os.close(fd)
        return claim

    def claim_batches(self, batch: int, report: ImportReport) -> Iterator[list[Claim]]:
        """Every entry, claimed, in lists of up to *batch* (for moving the spool elsewhere).

        Entries another process holds are counted in ``report.locked`` and
        corrupt ones in ``report.quarantined``; both are left where they are.
        The caller records each list durably in its own queue, then calls
        ``delivered()`` on each claim (the directory's commit point, after its
        own); claims still held when the caller stops are released here.
        """
        claims: list[Claim] = []
        try:
            for queue, name in self.scan(due=float("inf"), flush=True):
                try:
                    claim = self.claim(queue, name)
                except Quarantined as q:
                    report.quarantined.append((q.id, q.reason))
                    continue
                if claim is None:
                    report.locked += 1
                    continue
                claims.append(claim)
                if len(claims) >= batch:
                    yield claims
                    claims = []
            if claims:
                yield claims
        finally:
            for c in claims:
                c.release()

    def _foreign(self, st: os.stat_result, what: str) -> str | None:
        """Why a file is not the spool's own (``None`` if it is)."""
        if not stat.S_ISREG(st.st_mode):
            return f"{what} is not a regular file"
        if st.st_uid not in self._owners:
            return (f"{what} is owned by uid {st.st_uid}, not by the spool's owner "
                    f"(uid {self.owner})")
        return None

    def _own_links(self, id: str, st: os.stat_result) -> bool:
        """Whether every hard link of the message is inside this spool.

        The spool makes one extra link itself: ``failed/ID.eml`` or
        ``quarantine/ID.eml``, which a crash in the middle of a move leaves
        beside ``msg/ID``. Any other link may be a file from elsewhere.
        """
        if st.st_nlink == 1:
            return True
        if st.st_nlink != 2:
            return False
        for folder in ("failed", "quarantine"):
            try:
                other = os.lstat(self.path / folder / f"{id}.eml")
            except OSError:
                continue
            if (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino):
                return True
        return False

    def _load(self, queue: Queue, id: str, fd: int) -> Claim | None:
        env_path = self.path / queue / id
        # The lock is ours; is the entry still there (not finished meanwhile)?
        try:
            st_path = os.lstat(self.path / "msg" / id)
        except FileNotFoundError:
            return None
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != (st_path.st_dev, st_path.st_ino):
            return None
        try:
            efd = os.open(env_path, os.O_RDONLY | _NOFOLLOW)
            try:
                est = os.fstat(efd)
                problem = self._foreign(est, "envelope")
                if problem:
                    raise BadEnvelope(problem)
                data = os.read(efd, MAX_ENVELOPE_SIZE + 1)
            finally:
                os.close(efd)
        except FileNotFoundError:
            return None  # finished, or moved to deferred/, by the previous holder
        except IsADirectoryError:
            self._quarantine(queue, id, "envelope is not a regular file", have_lock=True)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                self._quarantine(queue, id, "envelope is a symbolic link (not read)",
                                 have_lock=True)
            self._quarantine(queue, id, f"envelope cannot be read: {exc.strerror or exc}",
                             have_lock=True)
        except BadEnvelope as exc:
            self._quarantine(queue, id, str(exc), have_lock=True)
        problem = self._foreign(st, "message file")
        if problem is None and not self._own_links(id, st):
            problem = (f"message file has {st.st_nlink - 1} hard link(s) outside the spool "
                       "(not read)")
        if problem:
            self._quarantine(queue, id, problem, have_lock=True, keep_message=False)
        try:
            os.pread(fd, 1, 0)
        except OSError as exc:
            self._quarantine(queue, id, f"message file cannot be read: {exc.strerror or exc}",
                             have_lock=True)
        try:
            env = decode_envelope(data)
        except BadEnvelope as exc:
            self._quarantine(queue, id, str(exc), have_lock=True)
        if env.arrival is None:
            env.arrival = est.st_mtime if queue == "incoming" else time.time()
        return Claim(self, id, queue, fd, env)

    def _quarantine(self, queue: Queue, id: str, reason: str, *, have_lock: bool,
                    keep_message: bool = True) -> NoReturn:
        """Move a corrupt entry to ``quarantine/`` and raise :class:`Quarantined`.

        Order: the reason first, then the message (hard link), then the
        envelope rename — the commit point, which also decides between two
        processes quarantining the same entry — and last the message's unlink.
        A message that is not the spool's own (*keep_message* false: a link to
        a file elsewhere, another owner's file) is not kept.
        """
        q = self.path / "quarantine"
        env_path = self.path / queue / id
        msg_path = self.path / "msg" / id
        self.put(q / f"{id}.txt", f"{reason}\n".encode())
        eml = q / f"{id}.eml"
        _unlink(eml)
        if keep_message:
            with contextlib.suppress(OSError):
                if stat.S_ISREG(os.lstat(msg_path).st_mode):
                    os.link(msg_path, eml)
        try:
            os.rename(env_path, q / f"{id}.env")
            with contextlib.suppress(OSError):
                # Hand-made envelopes may be world-readable; the quarantine is not.
                if stat.S_ISREG(os.lstat(q / f"{id}.env").st_mode):
                    os.chmod(q / f"{id}.env", FILE_MODE)
        except FileNotFoundError:
            if not have_lock:
                # Someone else moved it first (or finished it): not ours to report.
                raise Quarantined(id, reason) from None
        except OSError:
            # An envelope we cannot even move (e.g. a non-empty directory): take
            # it out of the queue's way under another name.
            with contextlib.suppress(OSError):
                os.rename(env_path, q / f"{id}.env.{secrets.token_hex(4)}")
        with contextlib.suppress(OSError):
            if os.path.isdir(msg_path) and not os.path.islink(msg_path):
                os.rename(msg_path, q / f"{id}.msgdir")
            else:
                os.unlink(msg_path)
        raise Quarantined(id, reason)

    # -- housekeeping --------------------------------------------------------

    def sweep(self, *, now: float | None = None) -> int:
        """Remove leftovers of crashed writers; returns how many files went.

        Files in ``tmp/`` older than 36 hours (Maildir's rule) and message
        files without an envelope older than an hour (an enqueue or a removal
        cut short between its two steps).
        """
        now = time.time() if now is None else now
        removed = 0
        with os.scandir(self.path / "tmp") as it:
            for e in it:
                with contextlib.suppress(OSError):
                    if now - e.stat(follow_symlinks=False).st_mtime > TMP_MAX_AGE:
                        os.unlink(e.path)
                        removed += 1
        incoming, deferred = self.path / "incoming", self.path / "deferred"
        with os.scandir(self.path / "msg") as it:
            for e in it:
                name = e.name
                if (incoming / name).exists() or (deferred / name).exists():
                    continue
                with contextlib.suppress(OSError):
                    if now - e.stat(follow_symlinks=False).st_mtime > ORPHAN_MAX_AGE:
                        # Re-check under the lock: a writer may be between its renames.
                        fd = os.open(e.path, os.O_RDONLY | _NOFOLLOW)
                        try:
                            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                            if not (incoming / name).exists() and not (deferred / name).exists():
                                os.unlink(e.path)
                                removed += 1
                        finally:
                            os.close(fd)
        return removed
