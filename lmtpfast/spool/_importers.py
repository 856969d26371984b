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
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from email.parser import BytesHeaderParser
from email.policy import compat32
from email.utils import getaddresses, parseaddr
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._errors import ContentError
from ._format import BadEnvelope, new_envelope
from ._queue import NewMessage
from ._sqlite import SQLiteStore
from ._store import Spool

if TYPE_CHECKING:
    from ._pgqueue import PgWriter

__all__ = [
    "ImportStats",
    "Source",
    "envelope_from_headers",
    "import_messages",
    "iter_eml_dir",
    "iter_maildir",
    "iter_mbox",
]


@dataclass(frozen=True, slots=True)
class Source:
    """One message read from somewhere, with where it came from (for messages)."""

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
    with open(name, "rb") as f:
        lines: list[bytes] = []
        from_sender: str | None = None
        count = 0
        for line in f:
            if line.startswith(b"From "):
                if count:
                    yield _mbox_message(name, count, lines, from_sender)
                count += 1
                parts = line[5:].split()
                from_sender = parts[0].decode("utf-8", "replace") if parts else None
                if from_sender == "MAILER-DAEMON":
                    from_sender = ""
                lines = []
                continue
            if not count:
                if line.strip():
                    raise ValueError(f"{name} is not an mbox file (no 'From ' line first)")
                continue
            if line.startswith(b">") and line.lstrip(b">").startswith(b"From "):
                line = line[1:]
            lines.append(line)
        if count:
            yield _mbox_message(name, count, lines, from_sender)


def _mbox_message(name: str, n: int, lines: list[bytes], sender: str | None) -> Source:
    if lines and lines[-1] in (b"\n", b"\r\n"):
        lines = lines[:-1]
    return Source(f"{name}#{n}", b"".join(lines), sender)


_parser = BytesHeaderParser(policy=compat32)


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
    msg = _parser.parsebytes(_header_block(src.data))
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

    Into the store, messages go in groups of *group* (group commit: one
    flush per group, each group on disk before the next is read; what
    *stats* counts as queued is on disk). A directory spool gets one file
    pair per message, flushed one by one; with ``fsync=False`` its folders
    are synced once at the end instead.
    """
    stats = ImportStats() if stats is None else stats
    # The store or the PostgreSQL writer: anything but the directory spool groups.
    store = None if isinstance(spool, Spool) else spool
    batch: list[NewMessage] = []

    def flush() -> None:
        assert store is not None
        ids = store.enqueue_many(batch, durable=fsync)
        stats.queued += len(ids)
        stats.ids += [(m.origin, id) for m, id in zip(batch, ids, strict=True)]
        batch.clear()

    for src in sources:
        s, rcpts = sender, list(recipients or [])
        if from_headers:
            hs, hr = envelope_from_headers(src)
            if hs is not None:
                s = hs
            if hr:
                rcpts = hr
        if s is None or not rcpts:
            stats.skipped += 1
            what = "sender" if s is None else "recipient"
            stats.problems.append(f"{src.origin}: no envelope {what} (give it on the command line)")
            continue
        try:
            if store is not None:
                if (nul := src.data.find(b"\0")) >= 0:
                    raise ContentError(f"message contains a NUL byte at offset {nul}; "
                                       "it cannot be sent")
                batch.append(NewMessage(new_envelope(s, rcpts, **(options or {})), src.data,
                                        origin=src.origin))
                if len(batch) >= group:
                    flush()
                continue
            assert isinstance(spool, Spool)
            id = spool.enqueue(src.data, s, rcpts, fsync=fsync, **(options or {}))
        except (BadEnvelope, ContentError) as exc:
            stats.skipped += 1
            stats.problems.append(f"{src.origin}: {exc}")
            continue
        stats.queued += 1
        stats.ids.append((src.origin, id))
    if batch:
        flush()
    if not fsync and isinstance(spool, Spool):
        spool.sync()
    return stats
