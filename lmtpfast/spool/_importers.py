"""Fill a spool from mail stored elsewhere: a Maildir folder, an mbox file, ``.eml`` files.

Each source is read lazily, one message at a time, so importing a large
mailbox needs no more memory than its largest message. The envelope comes from
the command line (``sender``, ``recipients``) or, when asked, from the message's
own header: ``Return-Path`` for the sender (the mbox ``From_`` line as a
fallback), the topmost ``Delivered-To`` or else ``X-Original-To`` for the
recipient, which is what a delivery agent wrote when it stored the message.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, NamedTuple

from .._errors import ContentError
from ._format import BadEnvelope, Envelope, new_envelope
from ._queue import NewMessage
from ._sqlite import SQLiteStore
from ._store import Spool

if TYPE_CHECKING:
    from ._pgqueue import PgWriter

__all__ = [
    "BadSource",
    "ImportStats",
    "Source",
    "envelope_from_headers",
    "import_messages",
    "iter_eml_dir",
    "iter_maildir",
    "iter_mbox",
]


class BadSource(ValueError):
    """A source that is not what it was given as (a file that is not an mbox): a data error."""


class Source(NamedTuple):
    """One message read from somewhere, with where it came from (for messages).

    A named tuple, not a frozen dataclass: an import makes one per message,
    and this is four times cheaper to make.
    """

    origin: str
    data: bytes
    #: The address on an mbox ``From_`` line, if any.
    from_line_sender: str | None = None


@dataclass(slots=True)
class ImportStats:
    queued: int = 0
    skipped: int = 0
    problems: list[str] = field(default_factory=list)
    #: ``(origin, ID)`` of every message queued, in order (what a failed run did).
    ids: list[tuple[str, str]] = field(default_factory=list)


def iter_maildir(path: str | os.PathLike[str]) -> Iterator[Source]:
    """Messages of one Maildir folder (``cur/`` then ``new/``), files in name order per folder.

    Names are sorted so an import is repeatable; a name list is small next to
    the messages. ``tmp/`` is never read (it holds half-written files).
    """
    root = Path(path)
    if not (root / "cur").is_dir() and not (root / "new").is_dir():
        raise FileNotFoundError(f"{root} is not a Maildir folder (no cur/ or new/)")
    for sub in ("cur", "new"):
        folder = root / sub
        if not folder.is_dir():
            continue
        names = sorted(e.name for e in os.scandir(folder) if not e.name.startswith("."))
        for name in names:
            p = folder / name
            try:
                data = p.read_bytes()
            except (IsADirectoryError, FileNotFoundError):
                continue
            yield Source(str(p), data)


def iter_eml_dir(path: str | os.PathLike[str], *, recursive: bool = False) -> Iterator[Source]:
    """Every ``*.eml`` file of a folder (and its sub-folders with *recursive*), in name order."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory")
    files = root.rglob("*.eml") if recursive else root.glob("*.eml")
    for p in sorted(files):
        if p.is_file():
            yield Source(str(p), p.read_bytes())


def iter_mbox(path: str | os.PathLike[str]) -> Iterator[Source]:
    """Messages of an mbox file, read as a stream.

    A line starting with ``From `` starts a message (mboxo/mboxrd writers
    escape such lines in bodies); one level of ``>From `` quoting is undone
    (mboxrd) and the empty line mbox puts between messages is dropped.
    """
    name = os.fspath(path)
    with open(name, "rb", buffering=0) as f:
        for n, (from_line, data) in enumerate(split_mbox(f, name), 1):
            parts = from_line[5:].split()
            sender = parts[0].decode("utf-8", "replace") if parts else None
            yield Source(f"{name}#{n}", data, "" if sender == "MAILER-DAEMON" else sender)


#: How much of an mbox is read at a time.
_MBOX_CHUNK = 1 << 20
_QUOTED_FROM = re.compile(rb"^>(>*From )", re.MULTILINE)


def split_mbox(f: BinaryIO, name: str = "mbox") -> Iterator[tuple[bytes, bytes]]:
    """``(From_ line, message)`` for each message of the mbox stream *f*.

    The file is read a megabyte at a time (more when one message is larger:
    the read size doubles, so a big message costs linear time) and cut where
    a line starts with ``From ``, found with one ``bytes.find`` per message
    (no Python work per line); memory stays at a chunk plus the largest
    message. The message
    is what follows the ``From_`` line, unquoted (``>From `` -> ``From ``,
    one level) and without the empty line that separates it from the next.
    Anything but empty lines before the first ``From_`` line is
    :class:`BadSource` (a ``ValueError``).
    """
    buf = b""
    start = 0  # where the current message's From_ line starts in buf
    scan = 0  # where to look for the next "From " (nothing before it matters)

    def more() -> bool:
        nonlocal buf, start, scan
        chunk = f.read(max(_MBOX_CHUNK, len(buf) - start))
        if not chunk:
            return False
        buf = buf[start:] + chunk
        scan -= start
        start = 0
        return True

    # Empty lines may come before the first From_ line; nothing else may.
    while True:
        nl = buf.find(b"\n", start)
        if nl < 0 and more():
            continue
        line = buf[start:] if nl < 0 else buf[start:nl + 1]
        if line.startswith(b"From "):
            break
        if line.strip():
            raise BadSource(f"{name} is not an mbox file (no 'From ' line first)")
        if nl < 0:
            return  # nothing, or empty lines only
        start = nl + 1
    # One search per message: every "From " is either a message's start (at the
    # start of a line), a quoted ">From " line (only '>' before it on its line)
    # or ordinary text.
    scan = start + 5
    quoted = False
    while True:
        at = buf.find(b"From ", scan)
        if at < 0:
            scan = max(scan, len(buf) - 4)
            if more():
                continue
            end = len(buf)
        elif buf[at - 1] == 10:  # "\n": the next message
            end = at
        else:
            if buf[at - 1] == 62:  # ">"
                bol = buf.rfind(b"\n", start, at) + 1 or start
                # Only a hint: the regex of _mbox_body decides what is unquoted.
                quoted = quoted or not buf[bol:at].strip(b">")
            scan = at + 5
            continue
        nl = buf.find(b"\n", start, end)
        body_at = end if nl < 0 else nl + 1
        yield buf[start:body_at], _mbox_body(buf[body_at:end], quoted)
        if at < 0:
            return
        start, scan, quoted = end, end + 5, False


def _mbox_body(data: bytes, quoted: bool) -> bytes:
    if quoted:
        data = _QUOTED_FROM.sub(rb"\1", data)
    # The empty line before the next From_ line belongs to the mbox, not the message.
    if data.endswith(b"\n\n") or data == b"\n":
        return data[:-1]
    if data.endswith(b"\n\r\n") or data == b"\r\n":
        return data[:-2]
    return data


def _header_block(data: bytes) -> bytes:
    for sep in (b"\r\n\r\n", b"\n\n"):
        at = data.find(sep)
        if at >= 0:
            return data[: at + len(sep)]
    return data


def envelope_from_headers(src: Source) -> tuple[str | None, list[str]]:
    """``(sender, recipients)`` as recorded in the message's header (``None``/``[]`` if absent).

    Sender: ``Return-Path`` (``<>`` is the null sender), else the mbox
    ``From_`` line. Recipient: the topmost ``Delivered-To`` (the last delivery
    agent's, i.e. the mailbox it was stored in), else every ``X-Original-To``.
    """
    from email.parser import BytesHeaderParser  # only --from-headers needs the email package
    from email.policy import compat32
    from email.utils import getaddresses, parseaddr

    msg = BytesHeaderParser(policy=compat32).parsebytes(_header_block(src.data))
    sender: str | None = None
    rp = msg.get("Return-Path")
    if rp is not None:
        text = str(rp).strip()
        sender = "" if text in ("<>", "") else parseaddr(text)[1] or None
    if sender is None:
        sender = src.from_line_sender
    recipients: list[str] = []
    delivered = msg.get_all("Delivered-To") or []
    if delivered:
        addr = parseaddr(str(delivered[0]))[1]
        if addr:
            recipients.append(addr)
    if not recipients:
        for _, addr in getaddresses([str(v) for v in msg.get_all("X-Original-To") or []]):
            if addr and addr not in recipients:
                recipients.append(addr)
    return sender, recipients


def import_messages(
    spool: Spool | SQLiteStore | PgWriter,
    sources: Iterable[Source],
    *,
    sender: str | None = None,
    recipients: list[str] | None = None,
    from_headers: bool = False,
    fsync: bool = True,
    options: dict[str, Any] | None = None,
    stats: ImportStats | None = None,
    group: int = 1000,
) -> ImportStats:
    """Queue every message of *sources* into *spool* (the store, or a directory spool).

    The envelope is *sender*/*recipients*; with *from_headers* a message's own
    ``Return-Path``/``Delivered-To``/``X-Original-To`` are used where they are
    present and the arguments fill the gaps. A message left without a sender
    or a recipient, with a bad address or a NUL byte, is skipped and named in
    :attr:`ImportStats.problems`. *stats*, when given, is filled as messages
    are queued (so a caller knows what was queued if a source fails midway).
    *options* go to every envelope (``ret``, ``envid``, ``notify``: see
    :func:`~lmtpfast.spool.new_envelope`).

    Into the store, messages stream into :meth:`SQLiteStore.enqueue_many`
    (group commit: content appended to segments as it is read, one flush per
    group of up to tens of thousands of messages; what *stats* counts as
    queued is on disk); messages with the same envelope share one envelope
    object, so it is encoded once per group. If a source fails midway, what
    was read before the failure is queued first, then the error is raised.
    The PostgreSQL writer gets groups of *group*. A directory spool gets one
    file pair per message, flushed one by one; with ``fsync=False`` its
    folders are synced once at the end instead.
    """
    stats = ImportStats() if stats is None else stats
    opts = options or {}
    # One envelope per distinct (sender, recipients) of a group: with the
    # envelope from the command line, one for the whole group.
    envelopes: dict[tuple[str, tuple[str, ...]], Envelope | str] = {}

    def envelope(s: str, rcpts: list[str]) -> Envelope | str:
        """The envelope for these addresses, or what is wrong with them."""
        key = (s, tuple(rcpts))
        env = envelopes.get(key)
        if env is None:
            if len(envelopes) >= 1024:
                envelopes.clear()
            try:
                env = new_envelope(s, list(rcpts), **opts)
            except BadEnvelope as exc:
                env = str(exc)
            envelopes[key] = env
        return env

    def skip(src: Source, problem: str) -> None:
        stats.skipped += 1
        stats.problems.append(f"{src.origin}: {problem}")

    def addressed() -> Iterator[tuple[Source, str, list[str]]]:
        for src in sources:
            s, rcpts = sender, recipients or []
            if from_headers:
                hs, hr = envelope_from_headers(src)
                if hs is not None:
                    s = hs
                if hr:
                    rcpts = hr
            if s is None or not rcpts:
                what = "sender" if s is None else "recipient"
                skip(src, f"no envelope {what} (give it on the command line)")
                continue
            yield src, s, rcpts

    def nul(src: Source) -> bool:
        if (at := src.data.find(b"\0")) < 0:
            return False
        skip(src, f"message contains a NUL byte at offset {at}; it cannot be sent")
        return True

    def messages() -> Iterator[NewMessage]:
        for src, s, rcpts in addressed():
            if nul(src):
                continue
            env = envelope(s, rcpts)
            if isinstance(env, str):
                skip(src, env)
            else:
                yield NewMessage(env, src.data, src.origin)

    def fixed_messages(s: str, rcpts: list[str]) -> Iterator[NewMessage]:
        # The command line's envelope for all (the common case): no per-message
        # lookup, one object per message.
        env: Envelope | str | None = None
        for src in sources:
            if src.data.find(b"\0") >= 0 and nul(src):  # find: `in` costs an exception
                continue
            if env is None or not envelopes:  # committed() cleared it: a new group
                env = envelope(s, rcpts)
            if isinstance(env, str):
                skip(src, env)
            else:
                yield NewMessage(env, src.data, src.origin)

    def committed(origins: list[str], ids: list[str]) -> None:
        stats.queued += len(ids)
        stats.ids += zip(origins, ids, strict=True)
        envelopes.clear()  # the next group's arrival time is its own

    queued = (fixed_messages(sender, recipients) if sender is not None and recipients
              and not from_headers else messages())
    if isinstance(spool, SQLiteStore):
        spool.enqueue_many(queued, durable=fsync, committed=committed)
    elif not isinstance(spool, Spool):  # the PostgreSQL writer
        batch: list[NewMessage] = []
        for m in queued:
            batch.append(m)
            if len(batch) >= group:
                committed([m.origin for m in batch], spool.enqueue_many(batch, durable=fsync))
                batch = []
        if batch:
            committed([m.origin for m in batch], spool.enqueue_many(batch, durable=fsync))
    else:
        for src, s, rcpts in addressed():
            try:
                id = spool.enqueue(src.data, s, list(rcpts), fsync=fsync, **opts)
            except (BadEnvelope, ContentError) as exc:
                skip(src, str(exc))
                continue
            stats.queued += 1
            stats.ids.append((src.origin, id))
        if not fsync:
            spool.sync()
    return stats
