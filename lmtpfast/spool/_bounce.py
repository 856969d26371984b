"""RFC 3464 delivery status notifications for messages replay gave up on.

:func:`write_bounce` writes one ``multipart/report; report-type=delivery-status``
message per failed spool entry into a folder, addressed to the envelope
sender, for an MTA (or ``lmtpfast enqueue``) to send on. It honours the DSN
parameters kept in the envelope: ``NOTIFY`` (no bounce for recipients that
asked ``NEVER`` or did not ask ``FAILURE``), ``ORCPT``, ``ENVID`` and ``RET``
(``HDRS``: only the header of the original; ``FULL``: all of it). No bounce
is written for the null sender (a bounce is never bounced).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import time
from datetime import UTC, datetime
from email.utils import format_datetime, formatdate, make_msgid
from pathlib import Path
from typing import Any

from ._format import Envelope, Recipient
from ._store import make_private_dir, open_private

__all__ = ["build_bounce", "write_bounce"]


def _date(ts: float | None) -> str:
    if ts is None:
        return formatdate(localtime=False)
    return format_datetime(datetime.fromtimestamp(ts, UTC))


def _wants_failure_notice(r: Recipient) -> bool:
    return r.notify is None or "FAILURE" in r.notify


def _header_of(message: bytes) -> bytes:
    for sep in (b"\r\n\r\n", b"\n\n"):
        at = message.find(sep)
        if at >= 0:
            return message[: at + len(sep) // 2]
    return message


def _crlf(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


#: The most of the original a bounce returns (Postfix's ``bounce_size_limit``):
#: a larger message comes back as its header only, so a bounce of a 200 MiB
#: message is small, and building it never holds the message whole.
BOUNCE_SIZE_LIMIT = 50_000


def build_bounce(
    id: str, env: Envelope, message: bytes, *, reporting_mta: str | None = None,
    postmaster: str | None = None, message_size: int | None = None,
) -> bytes | None:
    """The bounce for *env*'s failed recipients, or ``None`` when none is due.

    *message* may be just the start of the original when *message_size* (its
    real size) is larger than :data:`BOUNCE_SIZE_LIMIT`: then only its header
    is returned, whatever ``RET`` asked.
    """
    failed = [r for r in env.failed() if _wants_failure_notice(r)]
    if not env.sender or not failed:
        return None
    size = len(message) if message_size is None else message_size
    mta = reporting_mta or socket.getfqdn() or "localhost"
    from_addr = postmaster or f"MAILER-DAEMON@{mta}"
    boundary = f"lmtpfast-{secrets.token_hex(12)}"
    human = [
        "This is the mail system at host " + mta + ".",
        "",
        "The message with queue ID " + id + " could not be delivered to one or more",
        "recipients. The reasons follow.",
        "",
    ]
    for r in failed:
        human.append(f"<{r.address}>: {r.last.line() if r.last else 'delivery failed'}")
    per_message = [f"Reporting-MTA: dns; {mta}", f"X-Lmtpfast-Queue-ID: {id}"]
    if env.envid:
        per_message.append(f"Original-Envelope-Id: {env.envid}")
    per_message.append(f"Arrival-Date: {_date(env.arrival)}")
    blocks = ["\r\n".join(per_message)]
    for r in failed:
        fields = []
        if r.orcpt:
            fields.append(f"Original-Recipient: {r.orcpt}")
        fields += [f"Final-Recipient: rfc822; {r.address}", "Action: failed"]
        last = r.last
        status = last.enhanced if last and last.enhanced else (
            "5.0.0" if not last or last.code >= 500 else "4.0.0")
        fields.append(f"Status: {status}")
        if last and last.destination and not last.local:
            fields.append(f"Remote-MTA: dns; {last.destination}")
        if last:
            kind = "x-lmtpfast" if last.local else "smtp"
            fields.append(f"Diagnostic-Code: {kind}; {last.line()}")
            if last.at:
                fields.append(f"Last-Attempt-Date: {_date(last.at)}")
        blocks.append("\r\n".join(fields))
    too_big = size > BOUNCE_SIZE_LIMIT
    if too_big:
        human.append("")
        human.append(f"The message was larger than {BOUNCE_SIZE_LIMIT} bytes ({size}): only its "
                     "header is returned.")
    full = env.ret != "HDRS" and not too_big
    original = _crlf(message if full else _header_of(message))
    head = "\r\n".join([
        f"From: Mail Delivery System <{from_addr}>",
        f"To: <{env.sender}>",
        "Subject: Undelivered Mail Returned to Sender",
        f"Date: {formatdate(time.time(), localtime=False)}",
        f"Message-ID: {make_msgid(domain=mta)}",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"',
        "",
        "This is a MIME-encapsulated message.",
        "",
        f"--{boundary}",
        "Content-Description: Notification",
        "Content-Type: text/plain; charset=utf-8",
        "",
        "\r\n".join(human),
        "",
        f"--{boundary}",
        "Content-Description: Delivery report",
        "Content-Type: message/delivery-status",
        "",
        "\r\n\r\n".join(blocks),
        "",
        f"--{boundary}",
        "Content-Description: "
        + ("Undelivered Message" if full else "Undelivered Message Headers"),
        "Content-Type: " + ("message/rfc822" if full else "text/rfc822-headers"),
        "",
        "",
    ]).encode("utf-8")
    tail = f"\r\n--{boundary}--\r\n".encode()
    return head + original + (b"" if original.endswith(b"\r\n") else b"\r\n") + tail


def write_bounce(
    directory: str | os.PathLike[str], id: str, env: Envelope, message: bytes,
    **options: Any,
) -> Path | None:
    """Write the bounce for *id* to ``DIRECTORY/ID.eml`` (atomically); its path, or ``None``.

    The folder is made 0700 and the file 0600 (a bounce carries the message).
    On a write error (a full disk) the temporary file is removed before the
    error is raised, so failures leave nothing behind.
    """
    data = build_bounce(id, env, message, **options)
    if data is None:
        return None
    folder = Path(directory)
    make_private_dir(folder)
    target = folder / f"{id}.eml"
    tmp = folder / f".{id}.{secrets.token_hex(4)}.tmp"
    fd = open_private(tmp)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return target
