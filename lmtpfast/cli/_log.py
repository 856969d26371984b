"""The delivery log: one line per recipient outcome, as Postfix writes it, to stderr/file/syslog.

A delivery line has Postfix's shape (``postfix/lmtp``'s), so tools that read a
Postfix maillog (pflogsumm, postfix_exporter's log mode, grep habits) read
ours::

    4F2A91: to=<bob@example.com>, relay=unix:/run/dovecot/lmtp, delay=0.12,
        delays=0.01/0.02/0.03/0.06, dsn=2.0.0, status=sent (250 2.0.0 <bob@example.com> Saved)

(one line). ``delays=a/b/c/d`` are Postfix's: *a* the time before replay
picked the entry up (since arrival), *b* the time in replay before the
transaction started (waiting for a slot, routing, shaping), *c* connection
set-up (connect, greeting, LHLO, STARTTLS, AUTH; 0 on a reused connection),
*d* the transaction itself. ``status`` is ``sent``, ``deferred`` or
``bounced`` (an expired message is ``bounced``, its reply saying so).

``--log-format json`` writes the same fields as one JSON object per line;
``--log-target`` is ``stderr`` (default), ``syslog`` (``/dev/log``, facility
mail, ident ``lmtpfast/COMMAND[PID]``), ``syslog:PATH`` (another datagram
socket), ``none``, or a file path (reopened when rotated away). Nothing
secret is ever logged: lines carry addresses, destinations (never a
password), reply codes and texts, with control characters escaped so a
server cannot forge lines.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import logging.handlers
import os
import socket
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import msgspec

__all__ = ["DeliveryLog", "add_arguments", "clean", "open_log"]

LEVELS = ("debug", "info", "warning", "error")
_STATUS = {"delivered": "sent", "deferred": "deferred", "failed": "bounced",
           "expired": "bounced"}
_DEV_LOG = "/dev/log"


def add_arguments(p: Any) -> None:
    """``--log-target``, ``--log-format``, ``--log-level`` (the same on every subcommand)."""
    g = p.add_argument_group("logging (docs/operations.md)")
    g.add_argument("--log-target", metavar="WHERE", default=None,
                   help="stderr (default), syslog (/dev/log), syslog:SOCKET, none, or a file")
    g.add_argument("--log-format", choices=("postfix", "json"), default="postfix",
                   help="postfix: Postfix's maillog lines (default); json: one object a line")
    g.add_argument("--log-level", choices=LEVELS, default="info",
                   help="least severe level written (default info: every delivery)")


_ESCAPES = {c: f"\\x{c:02x}" for c in (*range(32), 127)}


def clean(text: str) -> str:
    """*text* with control characters escaped: one log line stays one line."""
    if text.isprintable():
        return text
    return text.translate(_ESCAPES)


def _seconds(x: float) -> str:
    # Postfix: two significant digits below 1 s, else up to two decimals.
    if x < 0:
        x = 0.0
    if x < 0.01:
        return "0" if x < 0.0005 else f"{x:.3f}".rstrip("0")
    if x < 1:
        return f"{x:.2f}".rstrip("0").rstrip(".")
    if x < 100:
        return f"{x:.1f}".rstrip("0").rstrip(".")
    return f"{x:.0f}"


class _PostfixFormatter(logging.Formatter):
    """``TIME HOST PROGRAM[PID]: message`` for files and stderr (syslog adds its own)."""

    def __init__(self, program: str, *, with_prefix: bool) -> None:
        super().__init__()
        self.prefix = f"{socket.gethostname().split('.')[0]} {program}[{os.getpid()}]: "
        self.with_prefix = with_prefix

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.levelno >= logging.WARNING and not getattr(record, "fields", None):
            text = f"{record.levelname.lower()}: {text}"
        if not self.with_prefix:
            return text
        when = datetime.datetime.fromtimestamp(record.created).astimezone()
        return f"{when.isoformat(timespec='microseconds')} {self.prefix}{text}"


class _JsonFormatter(logging.Formatter):
    def __init__(self, program: str) -> None:
        super().__init__()
        self.program = program
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self._enc = msgspec.json.Encoder()

    def format(self, record: logging.LogRecord) -> str:
        when = datetime.datetime.fromtimestamp(record.created).astimezone()
        obj: dict[str, Any] = {"time": when.isoformat(timespec="microseconds"),
                               "host": self.host, "program": self.program, "pid": self.pid,
                               "level": record.levelname.lower()}
        fields = getattr(record, "fields", None)
        if fields:
            obj.update(fields)
        else:
            obj["message"] = record.getMessage()
        return self._enc.encode(obj).decode()


class _SyslogHandler(logging.handlers.SysLogHandler):
    # SysLogHandler appends a NUL by default; rsyslog and journald accept either.
    append_nul = False


class DeliveryLog:
    """Where a command's log lines go; ``delivery()`` writes one recipient's outcome.

    Build it with :func:`open_log`. Every method is cheap when its level is
    off (nothing is formatted).
    """

    def __init__(self, logger: logging.Logger, *, json: bool) -> None:
        self.logger = logger
        self.json = json
        self._info = logger.isEnabledFor(logging.INFO)

    def enabled(self, level: int = logging.INFO) -> bool:
        return self.logger.isEnabledFor(level)

    def delivery(self, id: str, recipient: str, outcome: str, *, code: int,
                 enhanced: str | None, text: str, relay: str | None,
                 delay: float, delays: Sequence[float] | None = None,
                 attempts: int = 0, possibly_duplicated: bool = False,
                 stage: str = "", next_attempt: float | None = None) -> None:
        """One recipient outcome (``delivered``/``deferred``/``failed``/``expired``)."""
        if not self._info:
            return
        status = _STATUS.get(outcome, outcome)
        dsn = enhanced or f"{str(code)[:1] or '4'}.0.0"
        reply = (f"{code} {enhanced} {text}" if enhanced else f"{code} {text}").rstrip()
        a, b, c, d = delays if delays is not None else (0.0, delay, 0.0, 0.0)
        relay_s = relay or "none"
        if self.json:  # JSON escapes control characters itself
            fields: dict[str, Any] = {
                "id": id, "to": recipient, "relay": relay_s, "delay": round(delay, 6),
                "delays": [round(a, 6), round(b, 6), round(c, 6), round(d, 6)], "dsn": dsn,
                "status": status, "reply": reply, "code": code, "stage": stage,
                "attempts": attempts}
            if outcome == "expired":
                fields["expired"] = True
            if possibly_duplicated:
                fields["possibly_duplicated"] = True
            if next_attempt is not None:
                fields["next_attempt"] = next_attempt
            self.logger.info("", extra={"fields": fields})
            return
        extra = ", possibly duplicated" if possibly_duplicated else ""
        self.logger.info(
            "%s: to=<%s>, relay=%s, delay=%s, delays=%s/%s/%s/%s, dsn=%s, status=%s (%s)%s",
            id, recipient, clean(relay_s), _seconds(delay), _seconds(a), _seconds(b), _seconds(c),
            _seconds(d), dsn, status, clean(reply), extra)

    def event(self, id: str, text: str, *, level: int = logging.INFO,
              **fields: Any) -> None:
        """``ID: text`` (a queue action, a quarantine, a removal)."""
        if not self.logger.isEnabledFor(level):
            return
        if self.json:
            self.logger.log(level, "", extra={"fields": {"id": id, "event": text,
                                                         **fields}})
        else:
            self.logger.log(level, "%s: %s", id, clean(text))

    def message(self, text: str, *, level: int = logging.INFO, **fields: Any) -> None:
        """A line about the process (started, reloaded, backing off, stopping)."""
        if not self.logger.isEnabledFor(level):
            return
        if self.json:
            self.logger.log(level, "", extra={"fields": {"event": text, **fields}})
        else:
            self.logger.log(level, "%s", clean(text))

    def close(self) -> None:
        for h in list(self.logger.handlers):
            self.logger.removeHandler(h)
            h.close()


def open_log(args: argparse.Namespace | Mapping[str, Any], program: str, *,
             default_target: str = "stderr") -> DeliveryLog:
    """The log the options ask for; ``ConfigurationError``-free: a bad target is a ValueError."""
    get = args.get if isinstance(args, Mapping) else (lambda k, d=None: getattr(args, k, d))
    target = get("log_target") or default_target
    fmt = get("log_format") or "postfix"
    level = getattr(logging, str(get("log_level") or "info").upper())
    logger = logging.getLogger(f"lmtpfast.log.{program}.{id(args)}")
    logger.propagate = False
    logger.setLevel(level)
    handler: logging.Handler | None
    syslog = target == "syslog" or target.startswith("syslog:")
    if target == "none":
        handler = None
    elif target == "stderr":
        handler = logging.StreamHandler(sys.stderr)
    elif syslog:
        path = target[7:] or _DEV_LOG
        if not os.path.exists(path):
            raise ValueError(f"--log-target {target}: no syslog socket at {path}")
        handler = _SyslogHandler(address=path, facility=logging.handlers.SysLogHandler.LOG_MAIL)
        handler.ident = f"{program}[{os.getpid()}]: "
    else:
        path = target[5:] if target.startswith("file:") else target
        try:
            # WatchedFileHandler reopens the file after logrotate moved it away.
            handler = logging.handlers.WatchedFileHandler(path, encoding="utf-8")
        except OSError as exc:
            raise ValueError(f"--log-target {path}: {exc.strerror or exc}") from None
    if handler is not None:
        if fmt == "json":
            handler.setFormatter(_JsonFormatter(program))
        else:
            handler.setFormatter(_PostfixFormatter(program, with_prefix=not syslog))
        logger.addHandler(handler)
    else:
        logger.disabled = True
    return DeliveryLog(logger, json=fmt == "json")


def default_target() -> str:
    """``syslog`` where ``/dev/log`` exists, else ``stderr`` (what operator commands use)."""
    return "syslog" if os.path.exists(_DEV_LOG) else "stderr"
