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
socket), ``none``, or a file path (reopened when rotated away; written in
batches, see :class:`_BufferedFile`). Nothing
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
import threading
import time
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


class _Stamp:
    """``datetime.fromtimestamp(t).astimezone().isoformat(timespec="microseconds")``, cheaply:
    the part up to the second and the UTC offset are made once a second."""

    __slots__ = ("_head", "_sec", "_tail")

    def __init__(self) -> None:
        self._sec = -1
        self._head = self._tail = ""

    def __call__(self, t: float) -> str:
        sec = int(t)
        if sec != self._sec:
            iso = datetime.datetime.fromtimestamp(sec).astimezone().isoformat()
            self._head, self._tail, self._sec = iso[:19], iso[19:], sec
        return f"{self._head}.{int((t - sec) * 1e6):06d}{self._tail}"


class _BufferedFile:
    """A log file written in batches: lines are buffered and written with one ``write``.

    The buffer goes out when it holds ``capacity`` lines, when a warning or
    error is logged, when the process stops (:meth:`close`), and at the latest
    ``interval`` seconds after its first line (a flusher thread). Rotation
    (logrotate moving the file away) is checked once per batch, as
    ``WatchedFileHandler`` does once per line. The unbuffered handler cost a
    ``stat`` and a ``write`` per recipient (``bench/bench_ops.py``); a crash
    loses at most ``interval`` seconds of log lines, never a delivery.
    """

    def __init__(self, path: str, *, capacity: int = 256, interval: float = 0.25) -> None:
        self.path = path
        self.capacity = capacity
        self.interval = interval
        self._lock = threading.Lock()
        self._lines: list[str] = []
        self._fd = -1
        self._ino: tuple[int, int] | None = None
        self._open()
        self._wake = threading.Event()
        self._closed = False
        self._thread: threading.Thread | None = None

    def _open(self) -> None:
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                           0o640)
        st = os.fstat(self._fd)
        self._ino = (st.st_dev, st.st_ino)

    def _reopen_if_moved(self) -> None:
        try:
            st = os.stat(self.path)
            same = (st.st_dev, st.st_ino) == self._ino
        except FileNotFoundError:
            same = False
        if not same:
            os.close(self._fd)
            self._open()

    def write(self, line: str) -> None:
        with self._lock:
            lines = self._lines
            lines.append(line)
            if len(lines) >= self.capacity:
                self._flush_locked()
            elif len(lines) == 1:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._flusher, daemon=True,
                                                    name="lmtpfast-log-flush")
                    self._thread.start()
                self._wake.set()

    def write_many(self, lines: Sequence[str]) -> None:
        """:meth:`write` for several lines at once (one lock, one wake-up)."""
        with self._lock:
            buf = self._lines
            first = not buf
            buf.extend(lines)
            if len(buf) >= self.capacity:
                self._flush_locked()
            elif first and buf:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._flusher, daemon=True,
                                                    name="lmtpfast-log-flush")
                    self._thread.start()
                self._wake.set()

    def flush(self) -> None:
        with self._lock:
            self._flush_locked()

    def _flush_locked(self) -> None:
        if not self._lines or self._fd < 0:
            return
        data = ("\n".join(self._lines) + "\n").encode("utf-8", "backslashreplace")
        self._lines.clear()
        try:
            self._reopen_if_moved()
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view):]
        except OSError as exc:  # a full disk must not stop deliveries; say so once per batch
            print(f"lmtpfast: cannot write the log {self.path}: {exc.strerror or exc}",
                  file=sys.stderr)

    def _flusher(self) -> None:
        pause = threading.Event()  # never set: a bounded wait, not a sleep in a loop
        while not self._closed:
            self._wake.wait()
            self._wake.clear()
            if self._closed:
                break
            # The first line of a batch woke us: give the batch its interval.
            pause.wait(self.interval)
            self.flush()

    def close(self) -> None:
        with self._lock:
            self._flush_locked()
            self._closed = True
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
        self._wake.set()


class _BufferedFileHandler(logging.Handler):
    """The logging side of a :class:`_BufferedFile` (process and queue-action lines)."""

    def __init__(self, file: _BufferedFile) -> None:
        super().__init__()
        self.file = file

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.file.write(self.format(record))
            if record.levelno >= logging.WARNING:
                self.file.flush()
        except Exception:
            self.handleError(record)  # logging's rule: emit never raises

    def flush(self) -> None:
        self.file.flush()

    def close(self) -> None:
        self.file.close()
        super().close()


class _PostfixFormatter(logging.Formatter):
    """``TIME HOST PROGRAM[PID]: message`` for files and stderr (syslog adds its own)."""

    def __init__(self, program: str, *, with_prefix: bool) -> None:
        super().__init__()
        self.prefix = f"{socket.gethostname().split('.')[0]} {program}[{os.getpid()}]: "
        self.with_prefix = with_prefix
        self.stamp = _Stamp()

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.levelno >= logging.WARNING and not getattr(record, "fields", None):
            text = f"{record.levelname.lower()}: {text}"
        if not self.with_prefix:
            return text
        return f"{self.stamp(record.created)} {self.prefix}{text}"


class _JsonFormatter(logging.Formatter):
    def __init__(self, program: str) -> None:
        super().__init__()
        self.program = program
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self._enc = msgspec.json.Encoder()
        self.stamp = _Stamp()

    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", None)
        return self.line(record.created, record.levelname.lower(), fields,
                         None if fields else record.getMessage())

    def line(self, created: float, level: str, fields: Mapping[str, Any] | None,
             message: str | None = None) -> str:
        obj: dict[str, Any] = {"time": self.stamp(created), "host": self.host,
                               "program": self.program, "pid": self.pid, "level": level}
        if fields:
            obj.update(fields)
        else:
            obj["message"] = message
        return self._enc.encode(obj).decode()


class _SyslogHandler(logging.handlers.SysLogHandler):
    # SysLogHandler appends a NUL by default; rsyslog and journald accept either.
    append_nul = False


class DeliveryLog:
    """Where a command's log lines go; ``delivery()`` writes one recipient's outcome.

    Build it with :func:`open_log`. Every method is cheap when its level is
    off (nothing is formatted).
    """

    def __init__(self, logger: logging.Logger, *, json: bool,
                 direct: _BufferedFileHandler | None = None) -> None:
        self.logger = logger
        self.json = json
        self._info = logger.isEnabledFor(logging.INFO)
        # A file target: delivery lines go straight into its buffer, formatted
        # as its formatter would, without a LogRecord each (the cost per
        # recipient is then the formatting alone).
        self._direct = direct.file if direct is not None else None
        self._formatter = direct.formatter if direct is not None else None

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
            if self._direct is not None and isinstance(self._formatter, _JsonFormatter):
                self._direct.write(self._formatter.line(time.time(), "info", fields))
                return
            self.logger.info("", extra={"fields": fields})
            return
        extra = ", possibly duplicated" if possibly_duplicated else ""
        if self._direct is not None and isinstance(self._formatter, _PostfixFormatter):
            f = self._formatter
            self._direct.write(
                f"{f.stamp(time.time())} {f.prefix}{id}: to=<{recipient}>, "
                f"relay={clean(relay_s)}, delay={_seconds(delay)}, delays={_seconds(a)}/"
                f"{_seconds(b)}/{_seconds(c)}/{_seconds(d)}, dsn={dsn}, status={status} "
                f"({clean(reply)}){extra}")
            return
        self.logger.info(
            "%s: to=<%s>, relay=%s, delay=%s, delays=%s/%s/%s/%s, dsn=%s, status=%s (%s)%s",
            id, recipient, clean(relay_s), _seconds(delay), _seconds(a), _seconds(b), _seconds(c),
            _seconds(d), dsn, status, clean(reply), extra)

    def deliveries(
        self, id: str, delay: float,
        rows: Sequence[tuple[str, str, int, str | None, str, str | None, bool, str]],
    ) -> None:
        """Outcomes of one transaction: for each ``(recipient, outcome, code, enhanced,
        text, relay, possibly_duplicated, stage)`` the line :meth:`delivery` writes,
        with the time stamp, id and delay formatted once for all of them."""
        if not self._info or not rows:
            return
        f = self._formatter
        direct = self._direct
        if self.json or direct is None or not isinstance(f, _PostfixFormatter):
            for rcpt, outcome, code, enhanced, text, relay, dup, stage in rows:
                self.delivery(id, rcpt, outcome, code=code, enhanced=enhanced, text=text,
                              relay=relay, delay=delay, possibly_duplicated=dup, stage=stage)
            return
        d = _seconds(delay)
        head = f"{f.stamp(time.time())} {f.prefix}{id}: to=<"
        mid = f", delay={d}, delays=0/{d}/0/0, dsn="
        last_relay: str | None = ""
        relay_s = ""
        last_reply: tuple[int, str | None, str] | None = None
        reply_s = ""
        lines = []
        for rcpt, outcome, code, enhanced, text, relay, dup, _stage in rows:
            if relay != last_relay:
                last_relay, relay_s = relay, clean(relay or "none")
            key = (code, enhanced, text)
            if key != last_reply:
                last_reply = key
                reply_s = clean((f"{code} {enhanced} {text}" if enhanced
                                 else f"{code} {text}").rstrip())
            lines.append(f"{head}{rcpt}>, relay={relay_s}{mid}"
                         f"{enhanced or (str(code)[:1] or '4') + '.0.0'}, "
                         f"status={_STATUS.get(outcome, outcome)} ({reply_s})"
                         f"{', possibly duplicated' if dup else ''}")
        direct.write_many(lines)

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

    def flush(self) -> None:
        """Write out what is buffered."""
        for h in list(self.logger.handlers):
            h.flush()

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
            # Reopened after logrotate moved it away; written in batches.
            handler = _BufferedFileHandler(_BufferedFile(path))
        except OSError as exc:
            raise ValueError(f"--log-target {path}: {exc.strerror or exc}") from None
    if handler is not None:
        if fmt == "json":
            handler.setFormatter(_JsonFormatter(program))
        else:
            handler.setFormatter(_PostfixFormatter(program, with_prefix=not syslog))
        logger.addHandler(handler)
    # A logger of the same name may be reused (names carry id(args)): reset it.
    logger.disabled = handler is None
    direct = handler if isinstance(handler, _BufferedFileHandler) else None
    return DeliveryLog(logger, json=fmt == "json", direct=direct)


def default_target() -> str:
    """``syslog`` where ``/dev/log`` exists, else ``stderr`` (what operator commands use)."""
    return "syslog" if os.path.exists(_DEV_LOG) else "stderr"
