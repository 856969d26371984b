"""Sans-IO server side of one LMTP connection: the reference engine.

:class:`ServerSession` takes the bytes a client sent and returns what to do:
reply bytes to write, plus the odd :class:`Delay` / :data:`STALL` /
:data:`CLOSE` / :data:`ABORT` / :data:`START_TLS` instruction and
:class:`Pending` answers to wait for. It imports no asyncio; ``_server.py``
runs it. What the server does with the mail is its :class:`Handler`
(``_common.py``); the sink's handler is in ``_sink.py``.

This pure-Python engine is the specification and the fallback; the compiled
twin (``_cserver.pyx``) behaves identically and every server test runs on
both.

Speed matters, because benchmarks of clients measure against it:
``receive_data`` handles everything a read brought (a pipelined
MAIL/RCPT*/DATA group, or the end of one message and the next group) and
returns one joined ``bytes`` of replies, so the I/O layer does one write per
read (RFC 2920 asks servers to flush only when they would block on reading).
Content is never copied or un-stuffed unless the handler asks for it.

Replies (RFC 5321 codes, RFC 3463 enhanced codes, RFC 2033 LMTP rules):
after the final dot, or BDAT LAST, one reply per *accepted* RCPT, in RCPT
order, duplicates included.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from typing import Any, Final

from ._common import (
    ABORT,
    CLOSE,
    DEFAULT,
    STALL,
    START_TLS,
    Answer,
    Decision,
    Envelope,
    Handler,
    Item,
    Pending,
    SessionConfig,
    SinkStats,
    _Instruction,
    answer_code,
)
from ._data import DotDecoder

__all__ = ["ServerSession", "check_mail_params", "check_rcpt_params", "parse_path"]

log = logging.getLogger("lmtpfast.server")

# --- canned replies -----------------------------------------------------------

_R_OK = b"250 2.0.0 OK\r\n"
_R_RSET = b"250 2.0.0 Reset OK\r\n"
_R_VRFY = b"252 2.0.0 Cannot VRFY; send RCPT to find out\r\n"
_R_DATA = b"354 Start mail input; end with <CRLF>.<CRLF>\r\n"
_R_NEED_LHLO = b"503 5.5.1 Bad sequence of commands: send LHLO first\r\n"
_R_NEED_MAIL = b"503 5.5.1 Bad sequence of commands: send MAIL first\r\n"
_R_NESTED_MAIL = b"503 5.5.1 Bad sequence of commands: nested MAIL command\r\n"
_R_NO_RCPT = b"503 5.5.1 Bad sequence of commands: no valid recipients\r\n"
_R_MIXED = b"503 5.5.1 Bad sequence of commands: DATA and BDAT cannot be mixed\r\n"
_R_REFUSED = b"503 5.5.1 Bad sequence of commands: service refused, send QUIT\r\n"
_R_EHLO = b"500 5.5.1 This is an LMTP server: use LHLO, not HELO or EHLO\r\n"
_R_UNKNOWN = b"500 5.5.2 Command unrecognized\r\n"
_R_BARE_LF = b"500 5.5.2 Syntax error: bare LF in command line (use CRLF)\r\n"
_R_TOO_LONG = b"500 5.5.6 Line too long\r\n"
_R_NOT_IMPL = b"502 5.5.1 Command not implemented\r\n"
_R_NO_CHUNKING = b"502 5.5.1 BDAT not available: CHUNKING is not offered\r\n"
_R_SYNTAX_LHLO = b"501 5.5.4 Syntax: LHLO hostname\r\n"
_R_SYNTAX_MAIL = b"501 5.5.4 Syntax: MAIL FROM:<address> [parameters]\r\n"
_R_SYNTAX_RCPT = b"501 5.5.4 Syntax: RCPT TO:<address> [parameters]\r\n"
_R_SYNTAX_VRFY = b"501 5.5.4 Syntax: VRFY <address> [parameters]\r\n"
_R_SYNTAX_BDAT = b"501 5.5.4 Syntax: BDAT size [LAST]\r\n"
_R_SYNTAX_NOARG = b"501 5.5.4 Syntax error: no arguments allowed\r\n"
_R_SYNTAX_AUTH = b"501 5.5.4 Syntax: AUTH mechanism [initial-response]\r\n"
_R_BAD_SENDER = b"501 5.1.7 Bad sender address syntax\r\n"
_R_BAD_RCPT = b"501 5.1.3 Bad recipient address syntax\r\n"
_R_BAD_PARAM = b"501 5.5.4 Invalid parameter value\r\n"
_R_BAD_BODY = b"555 5.5.4 Unsupported BODY type\r\n"
_R_NEED_UTF8 = b"553 5.6.7 Non-ASCII address needs SMTPUTF8\r\n"
_R_TOO_BIG = b"552 5.3.4 Message size exceeds fixed maximum message size\r\n"
_R_TOO_MANY = b"452 4.5.3 Too many recipients\r\n"
_R_LOCAL_ERROR = b"451 4.3.0 Local error in processing\r\n"
_R_TLS_READY = b"220 2.0.0 Ready to start TLS\r\n"
_R_TLS_ACTIVE = b"503 5.5.1 Bad sequence of commands: TLS already active\r\n"
_R_NEED_TLS = b"530 5.7.0 Must issue a STARTTLS command first\r\n"
_R_NEED_AUTH = b"530 5.7.0 Authentication required\r\n"
_R_AUTH_DONE = b"503 5.5.1 Bad sequence of commands: already authenticated\r\n"
_R_AUTH_TXN = b"503 5.5.1 Bad sequence of commands: AUTH not allowed in a transaction\r\n"
_R_AUTH_MECH = b"504 5.5.4 Unrecognized authentication type\r\n"
_R_AUTH_CANCEL = b"501 5.0.0 Authentication cancelled\r\n"
_R_JUNK = b"421 4.7.0 Too many commands without a transaction, closing\r\n"

# Characters never allowed in an unquoted address between < and >.
_BAD_ADDR = re.compile(rb"[\x00-\x20\x7f<>\\]")
_CTL = re.compile(rb"[\x00-\x1f\x7f]")

# States of the input.
_CMD, _DATA, _DATA_END, _BDAT, _SKIP_LINE, _AUTH, _TLS_WAIT, _DONE = range(8)
# The kinds of pending answer, by what they let through meanwhile.
_K_RCPT, _K_FINAL, _K_OTHER = range(3)
# Body kinds of a transaction: none yet, DATA, BDAT (they cannot be mixed).
_NO_BODY, _BODY_DATA, _BODY_BDAT = range(3)


def parse_path(rest: bytes) -> tuple[bytes, list[bytes]] | None:
    """``<address> [params]`` after ``FROM:``/``TO:`` -> (address, params), or None.

    Accepts a space after the colon (common, though RFC 5321 has none),
    drops an RFC 5321 source route (``<@a,@b:user@c>``) and allows a quoted
    local part (which may hold ``>`` or spaces).
    """
    rest = rest.lstrip(b" ")
    if rest[:1] != b"<":
        return None
    if rest[1:2] == b'"':
        i = 2
        while True:
            q = rest.find(b'"', i)
            if q < 0:
                return None
            if rest[q - 1 : q] != b"\\":
                break
            i = q + 1
        j = rest.find(b">", q)
        if j < 0:
            return None
        addr = rest[1:j]
        if _CTL.search(addr):
            return None
    else:
        j = rest.find(b">")
        if j < 0:
            return None
        addr = rest[1:j]
        if addr[:1] == b"@":
            c = addr.find(b":")
            if c < 0:
                return None
            addr = addr[c + 1 :]
        if _BAD_ADDR.search(addr):
            return None
    tail = rest[j + 1 :]
    if not tail:
        return addr, []
    if tail[:1] != b" ":
        return None
    return addr, tail.split()


def check_mail_params(cfg: SessionConfig, params: list[bytes]) -> bytes | None:
    """The refusal of MAIL's parameters, or None if the extensions offered allow them."""
    for p in params:
        key, eq, value = p.partition(b"=")
        key = key.upper()
        if key == b"SIZE" and cfg.size_ext:
            if not value.isdigit():
                return _R_BAD_PARAM
            if cfg.max_size and int(value) > cfg.max_size:
                return _R_TOO_BIG
        elif key == b"BODY" and cfg.eightbit:
            if value.upper() not in (b"7BIT", b"8BITMIME"):
                return _R_BAD_BODY
        elif key == b"SMTPUTF8" and cfg.smtputf8:
            if eq:
                return _R_BAD_PARAM
        elif key == b"RET" and cfg.dsn:
            if value.upper() not in (b"FULL", b"HDRS"):
                return _R_BAD_PARAM
        elif key == b"ENVID" and cfg.dsn:
            if not value:
                return _R_BAD_PARAM
        else:
            return b"555 5.5.4 Unsupported parameter " + key[:64] + b"\r\n"
    return None


def check_rcpt_params(cfg: SessionConfig, params: list[bytes]) -> bytes | None:
    """The refusal of RCPT's parameters, or None if the extensions offered allow them."""
    dsn = cfg.dsn
    for p in params:
        key, _, value = p.partition(b"=")
        key = key.upper()
        if key == b"NOTIFY" and dsn:
            words = value.upper().split(b",")
            if not words or not (
                words == [b"NEVER"] or all(w in (b"SUCCESS", b"FAILURE", b"DELAY") for w in words)
            ):
                return _R_BAD_PARAM
        elif key == b"ORCPT" and dsn:
            if b";" not in value:
                return _R_BAD_PARAM
        else:
            return b"555 5.5.4 Unsupported parameter " + key[:64] + b"\r\n"
    return None


def _decided(answer: object) -> bool:
    """An answer now (None, bytes, Decision), not an awaitable."""
    return answer is None or isinstance(answer, bytes | Decision)


class _Slot:
    """A place in the output held for an answer still to come."""

    __slots__ = ("apply", "done", "items", "kind")

    def __init__(self, kind: int, apply: Callable[[Any], None]) -> None:
        self.kind = kind
        self.apply = apply  # called with the answer; writes to the session's _w
        self.done = False
        self.items: list[Item] = []


# The slot of a content hook's back-pressure: blocks input, holds no output.
_CONTENT_WAIT: Final = _Slot(_K_OTHER, lambda _answer: None)


def _joined(items: list[Item]) -> list[Item]:
    """``items`` with each run of bytes joined: one write per run."""
    out: list[Item] = []
    run: list[bytes] = []
    for i in items:
        if type(i) is bytes:
            run.append(i)
            continue
        if run:
            out.append(run[0] if len(run) == 1 else b"".join(run))
            run = []
        out.append(i)
    if run:
        out.append(run[0] if len(run) == 1 else b"".join(run))
    return out


def _ends(items: Sequence[Item]) -> bool:
    return any(i is CLOSE or i is ABORT or i is STALL for i in items)


class ServerSession:
    """One LMTP connection, server side, as a state machine over bytes.

    ``start()`` gives the greeting; ``receive_data(data)`` (``b""`` = EOF)
    gives the replies to everything ``data`` completes; ``resolve()``
    delivers a :class:`Pending` answer; ``tls_started()`` says TLS is up
    after :data:`START_TLS`; ``connection_lost()`` ends the session. Each
    returns a list of :data:`Item` to carry out in order (``Pending`` items
    come first and are waited for at once). ``blocked`` is true while the
    engine consumes no input (an answer it needs is pending, or TLS is
    starting): the I/O layer should stop reading until a call returns with
    it false.
    """

    __slots__ = (
        "_authed",
        "_bdat_chunk",
        "_bdat_err",
        "_bdat_last",
        "_bdat_left",
        "_bdat_size",
        "_body",
        "_buf",
        "_cfg",
        "_content_wait",
        "_decoder",
        "_greeted",
        "_handler",
        "_held",
        "_hooks",
        "_junk",
        "_mail_params",
        "_new_pending",
        "_out",
        "_rcpt_holes",
        "_rcpt_ids",
        "_rcpt_params",
        "_rcpt_seq",
        "_rcpts",
        "_refused",
        "_scan",
        "_sender",
        "_slots",
        "_state",
        "_stats",
        "_tls",
        "_too_big",
        "_utf8",
        "_w",
        "commands",
        "context",
        "local",
        "peer",
        "received",
    )

    def __init__(
        self, config: SessionConfig, handler: Handler | None = None, stats: SinkStats | None = None
    ) -> None:
        self._cfg = config
        self._handler = handler if handler is not None else Handler()
        self._hooks = self._handler.hooks
        self._stats = stats if stats is not None else SinkStats()
        #: Free for the handler's per-connection state.
        self.context: Any = None
        #: The client's address and ours (the transport's peername and
        #: sockname), set by the I/O layer: for per-listener policy and logs.
        self.peer: Any = None
        self.local: Any = None
        #: Bytes fed so far (the I/O layer's idle timeout watches it).
        self.received = 0
        #: Command lines read so far (the I/O layer's command deadline watches it).
        self.commands = 0
        self._out: list[Item] = []
        self._w: list[Any] = (
            self._out
        )  # where output goes: _out, or _held while an answer is pending
        self._held: list[Item | _Slot] | None = None
        self._slots: list[_Slot] = []  # unresolved answers that hold output, in order
        self._content_wait = False  # the content hook asked us to wait
        self._new_pending: list[Pending] = []
        self._buf = b""
        self._scan = 0
        self._state = _CMD
        self._greeted = False
        self._refused = False  # greeting refused: only QUIT is allowed (RFC 5321 3.1)
        self._tls = False
        self._authed = False
        self._junk = 0
        self._sender: bytes | None = None
        self._mail_params: list[bytes] = []
        self._utf8 = False  # MAIL FROM had SMTPUTF8: non-ASCII recipients allowed
        self._rcpts: list[bytes | None] = []  # accepted; None keeps a pending one's place
        self._rcpt_params: list[list[bytes]] = []
        self._rcpt_ids: list[int] = []
        self._rcpt_holes = 0  # None entries in _rcpts
        self._rcpt_seq = 0
        self._body = _NO_BODY
        self._decoder: DotDecoder | None = None
        self._too_big = False
        self._bdat_left = 0
        self._bdat_chunk = 0
        self._bdat_last = False
        self._bdat_err: bytes | None = None
        self._bdat_size = 0

    # --- public --------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """True once the session will read nothing more (QUIT, EOF, fault)."""
        return self._state == _DONE

    @property
    def blocked(self) -> bool:
        """True while input waits for a pending answer or for TLS."""
        return self._state == _TLS_WAIT or not self._may_read(self._buf, 0)

    @property
    def sender(self) -> bytes | None:
        """The open transaction's sender (``b""`` for ``<>``), or None."""
        return self._sender

    @property
    def recipients(self) -> list[bytes]:
        """The recipients accepted so far in the open transaction, in RCPT order."""
        return [r for r in self._rcpts if r is not None]

    @property
    def idle(self) -> bool:
        """Between transactions with nothing owed or buffered: safe to close with a 421."""
        return (
            self._state == _CMD
            and self._sender is None
            and not self._slots
            and not self._content_wait
            and not self._buf
        )

    @property
    def in_transaction(self) -> bool:
        """True between an accepted MAIL and the end of its content (or a reset)."""
        return self._sender is not None

    @property
    def in_content(self) -> bool:
        """True while message content is read (after DATA's 354, or inside a BDAT chunk)."""
        return self._state == _DATA or (self._state == _BDAT and self._bdat_left > 0)

    @property
    def tls(self) -> bool:
        """True once ``tls_started()`` was called."""
        return self._tls

    @property
    def authenticated(self) -> bool:
        """True after a 235 to AUTH."""
        return self._authed

    def start(self) -> list[Item]:
        """The greeting (or what the handler's ``greeting`` answers instead)."""
        default = self._cfg.greeting
        ans = self._call("greeting", default) if "greeting" in self._hooks else None
        code = self._emit(self._now(ans, "greeting"), default, 220)
        if code >= 400 and self._state != _DONE:
            self._refused = True
        return self._take()

    def receive_data(self, data: bytes) -> list[Item]:
        """Feed what the client sent; ``b""`` means it closed its side."""
        if self._state == _DONE:
            return []  # stalled or closing: input is read and dropped
        if not data:
            self._finish(CLOSE)
            return self._take()
        self.received += len(data)
        if self._state == _TLS_WAIT:
            return []  # pipelined after STARTTLS: discarded (RFC 3207 section 6)
        self._buf = self._buf + data if self._buf else data
        self._process()
        return self._take()

    def resolve(
        self, pending: Pending, answer: Any, error: BaseException | None = None
    ) -> list[Item]:
        """The answer of a :class:`Pending` (``error``: the awaitable raised)."""
        slot = pending.slot
        if slot is _CONTENT_WAIT:
            if self._content_wait:
                if error is not None:
                    log.error("content hook failed: %r", error)
                    self._too_big = True  # the message will be refused
                self._content_wait = False
                if self._state != _DONE:
                    self._process()
            return self._take()
        if not isinstance(slot, _Slot) or slot.done:
            return self._take()
        if error is not None:
            log.error("%s hook failed: %r", pending.kind, error)
            answer = _R_LOCAL_ERROR
        elif not _decided(answer):
            log.error("%s hook resolved to %r, not an answer", pending.kind, answer)
            answer = _R_LOCAL_ERROR
        slot.done = True
        self._slots.remove(slot)
        w = self._w
        self._w = slot.items
        try:
            slot.apply(answer)
        finally:
            self._w = w
        held = self._held
        if held is not None and _ends(slot.items):
            # The answer ended the session: nothing held after it goes out.
            del held[held.index(slot) + 1 :]
            for s in self._slots:
                s.done = True
            self._slots.clear()
        self._flush_held()
        if self._state != _DONE:
            self._process()
        return self._take()

    def tls_started(self) -> list[Item]:
        """TLS is up after :data:`START_TLS`: a fresh session (RFC 3207 4.2)."""
        if self._state != _TLS_WAIT:
            return []
        self._tls = True
        self._greeted = False
        self._authed = False
        self._reset_transaction()
        self._state = _CMD
        return self._take()

    def connection_lost(self) -> None:
        """The connection is gone: the handler hears of it (``reset``, ``closed``)."""
        if self._sender is not None:
            self._reset_transaction()
        self._state = _DONE
        self._buf = b""
        for s in self._slots:
            s.done = True
        self._slots.clear()
        self._content_wait = False
        if "closed" in self._hooks:
            try:
                self._handler.closed(self)
            except Exception:
                log.exception("closed hook failed")

    # --- plumbing ------------------------------------------------------------

    def _take(self) -> list[Item]:
        out = self._out
        pend = self._new_pending
        if not out and not pend:
            return []  # never hand out our own list
        self._out = []
        if self._held is None:
            self._w = self._out
        if pend:
            self._new_pending = []
            return [*pend, *_joined(out)]
        if len(out) > 1:
            return _joined(out)
        return out

    def _call(self, hook: str, *args: Any) -> Any:
        try:
            return getattr(self._handler, hook)(self, *args)
        except Exception:
            log.exception("%s hook failed", hook)
            return _R_LOCAL_ERROR

    def _now(self, ans: Any, hook: str) -> Answer:
        """An answer from a hook that may not wait."""
        if _decided(ans):
            return ans  # type: ignore[no-any-return]
        log.error("%s hook returned %r, not an answer", hook, ans)
        close = getattr(ans, "close", None)
        if close is not None:
            close()  # an unawaited coroutine: do not leave it dangling
        return _R_LOCAL_ERROR

    def _emit(self, ans: Answer, default: bytes, default_code: int) -> int:
        """Write an answer (``DEFAULT`` = ``default``); return its code."""
        w = self._w
        if ans is None:
            w.append(default)
            return default_code
        if isinstance(ans, bytes):
            w.append(ans)
            code = answer_code(ans)
        else:
            code = ans.code
            for item in ans.items:
                if item is DEFAULT:
                    w.append(default)
                elif item is CLOSE or item is ABORT or item is STALL:
                    self._finish(item)
                    return code
                else:
                    w.append(item)
        if code == 421:  # RFC 5321 3.8: 421 means the server closes the channel
            self._finish(CLOSE)
        return code

    def _finish(self, instruction: _Instruction) -> None:
        self._w.append(instruction)
        self._state = _DONE
        self._buf = b""

    def _hold(self, kind: int, awaitable: Any, apply: Callable[[Any], None], name: str) -> None:
        """Keep a place in the output for an answer still to come."""
        slot = _Slot(kind, apply)
        if self._held is None:
            self._held = []
            self._w = self._held
        self._held.append(slot)
        self._slots.append(slot)
        self._new_pending.append(Pending(awaitable, name, slot))

    def _flush_held(self) -> None:
        held = self._held
        if held is None:
            return
        out = self._out
        i = 0
        for entry in held:
            if isinstance(entry, _Slot):
                if not entry.done:
                    break
                out.extend(entry.items)
            else:
                out.append(entry)
            i += 1
        del held[:i]
        if not held:
            self._held = None
            self._w = out

    def _may_read(self, buf: bytes, pos: int) -> bool:
        """May the input at ``buf[pos:]`` be processed, with what is pending?"""
        if self._content_wait:
            return False
        if not self._slots:
            return True
        rcpt_only = False
        for s in self._slots:
            if s.kind == _K_OTHER:
                return False
            if s.kind == _K_RCPT:
                rcpt_only = True
        if not rcpt_only:
            return True  # only final replies pending: the next transaction may go on
        # RCPT answers pending: further RCPTs may be asked about meanwhile.
        return self._state == _CMD and buf[pos : pos + 5].upper() == b"RCPT "

    def _process(self) -> None:
        buf = self._buf
        pos = 0
        n = len(buf)
        cfg = self._cfg
        while True:
            st = self._state
            if st == _BDAT and not self._bdat_left and not self._content_wait:
                # A chunk whose last bytes waited for the content hook.
                self._state = _CMD
                self._bdat_chunk_done()
                continue
            if st == _DATA_END and not self._content_wait:
                dec = self._decoder
                assert dec is not None
                self._end_of_content(dec.size, dec.overflow)
                continue
            if pos >= n or st in (_DONE, _TLS_WAIT, _DATA_END):
                break
            if (self._slots or self._content_wait) and not self._may_read(buf, pos):
                break
            if st in (_CMD, _AUTH):
                i = buf.find(b"\r\n", pos + self._scan)
                if i < 0:
                    if n - pos > cfg.max_line_length:
                        self._state = _SKIP_LINE
                        continue
                    # Never rescan what was searched: resume at the last byte
                    # (it may be the CR of a CR LF split across reads).
                    self._scan = n - pos - 1
                    break
                self._scan = 0
                line = buf[pos:i]
                pos = i + 2
                if st == _CMD:
                    self._command(line)
                else:
                    self._auth_line(line)
                if self._state == _TLS_WAIT:
                    pos = n  # RFC 3207 6: nothing pipelined after STARTTLS is kept
            elif st == _DATA:
                dec = self._decoder
                assert dec is not None
                end = dec.feed(buf, pos)
                pos = n if end < 0 else end
                if "content" in self._hooks and not dec.overflow:
                    self._content_out(dec.take())
                if end >= 0:
                    self._state = _DATA_END
            elif st == _BDAT:
                take = min(self._bdat_left, n - pos)
                if self._bdat_err is None and take:
                    self._bdat_size += take
                    if cfg.max_size and self._bdat_size > cfg.max_size:
                        self._too_big = True
                    elif "content" in self._hooks and not self._too_big:
                        self._content_out(buf[pos : pos + take])
                pos += take
                self._bdat_left -= take
                if self._bdat_left:
                    break
            else:  # _SKIP_LINE
                i = buf.find(b"\r\n", pos)
                if i < 0:
                    pos = n - 1 if buf.endswith(b"\r") else n
                    break
                pos = i + 2
                self._state = _CMD
                self._scan = 0
                if not self._junk_stop():
                    self._w.append(_R_TOO_LONG)
        self._buf = buf[pos:] if pos < n and self._state != _DONE else b""

    def _content_out(self, chunk: bytes) -> None:
        """Hand content to the handler, which may ask us to wait (back-pressure)."""
        if not chunk:
            return
        try:
            res = self._handler.content(self, chunk)
        except Exception:
            log.exception("content hook failed")
            self._too_big = True  # the message will be refused
            return
        if res is not None:
            self._content_wait = True
            self._new_pending.append(Pending(res, "content", _CONTENT_WAIT))

    def _junk_stop(self) -> bool:
        """Count a junk command; past the limit, answer 421 and close instead."""
        limit = self._cfg.max_commands
        if limit:
            self._junk += 1
            if self._junk > limit:
                self._w.append(_R_JUNK)
                self._finish(CLOSE)
                return True
        return False

    def _reset_transaction(self, *, completed: bool = False) -> None:
        was_open = self._sender is not None
        self._sender = None
        self._mail_params = []
        self._utf8 = False
        self._rcpts = []
        self._rcpt_params = []
        self._rcpt_ids = []
        self._rcpt_holes = 0
        self._rcpt_seq = 0
        self._body = _NO_BODY
        self._decoder = None
        self._too_big = False
        self._bdat_size = 0
        if was_open and not completed and "reset" in self._hooks:
            try:
                self._handler.reset(self)
            except Exception:
                log.exception("reset hook failed")

    # --- commands ------------------------------------------------------------

    def _command(self, line: bytes) -> None:
        self.commands += 1
        w = self._w
        if len(line) > self._cfg.max_line_length:
            if not self._junk_stop():
                w.append(_R_TOO_LONG)
            return
        if b"\n" in line:
            if not self._junk_stop():
                w.append(_R_BARE_LF)
            return
        sp = line.find(b" ")
        if sp < 0:
            verb = line.upper()
            arg = b""
        else:
            verb = line[:sp].upper()
            arg = line[sp + 1 :]
        handler = _HANDLERS.get(verb)
        if handler is None:
            if not self._junk_stop():
                w.append(_R_UNKNOWN)
        elif self._refused and verb != b"QUIT":
            w.append(_R_REFUSED)
        else:
            handler(self, arg)

    def _lhlo(self, arg: bytes) -> None:
        if not arg.strip() or _CTL.search(arg):
            self._w.append(_R_SYNTAX_LHLO)
            return
        self._reset_transaction()
        cfg = self._cfg
        default = cfg.lhlo_reply_tls if self._tls else cfg.lhlo_reply
        ans = self._call("lhlo", arg, default) if "lhlo" in self._hooks else None
        self._greeted = 200 <= self._emit(self._now(ans, "lhlo"), default, 250) < 300

    def _helo(self, arg: bytes) -> None:
        self._w.append(_R_EHLO)

    def _mail(self, arg: bytes) -> None:
        w = self._w
        cfg = self._cfg
        if not self._greeted:
            w.append(_R_NEED_LHLO)
            return
        if self._sender is not None:
            w.append(_R_NESTED_MAIL)
            return
        if cfg.tls_required and not self._tls:
            w.append(_R_NEED_TLS)
            return
        if cfg.auth_required and not self._authed:
            w.append(_R_NEED_AUTH)
            return
        if arg[:5].upper() != b"FROM:":
            w.append(_R_SYNTAX_MAIL)
            return
        parsed = parse_path(arg[5:])
        if parsed is None:
            w.append(_R_BAD_SENDER)
            return
        addr, params = parsed
        utf8 = False
        reply = None
        if params:
            reply = check_mail_params(cfg, params)
            utf8 = any(p.upper() == b"SMTPUTF8" for p in params)
        if reply is None and not utf8 and not addr.isascii():
            reply = _R_NEED_UTF8
        if reply is None and "mail" not in self._hooks:
            self._sender = addr
            self._mail_params = params
            self._utf8 = utf8
            w.append(b"250 2.1.0 Sender <" + addr + b"> OK\r\n")
            return
        default = reply if reply is not None else b"250 2.1.0 Sender <" + addr + b"> OK\r\n"
        dcode = answer_code(default)
        ans = self._call("mail", addr, params, default) if "mail" in self._hooks else None
        code = self._emit(self._now(ans, "mail"), default, dcode)
        if 200 <= code < 300 and self._state != _DONE:
            self._sender = addr
            self._mail_params = params
            self._utf8 = utf8

    def _rcpt(self, arg: bytes) -> None:
        w = self._w
        if self._sender is None:
            w.append(_R_NEED_MAIL if self._greeted else _R_NEED_LHLO)
            return
        if arg[:3].upper() != b"TO:":
            w.append(_R_SYNTAX_RCPT)
            return
        parsed = parse_path(arg[3:])
        if parsed is None or not parsed[0]:
            w.append(_R_BAD_RCPT)
            return
        addr, params = parsed
        reply = check_rcpt_params(self._cfg, params) if params else None
        if reply is None and not self._utf8 and not addr.isascii():
            reply = _R_NEED_UTF8
        if reply is None and len(self._rcpts) >= self._cfg.max_recipients:
            reply = _R_TOO_MANY  # pending ones count: a transient refusal is safe
        index = self._rcpt_seq
        self._rcpt_seq += 1
        if "rcpt" not in self._hooks:
            stats = self._stats
            if reply is None:
                self._rcpts.append(addr)
                self._rcpt_params.append(params)
                self._rcpt_ids.append(index)
                stats.recipients_accepted += 1
                w.append(b"250 2.1.5 Recipient <" + addr + b"> OK\r\n")
            else:
                stats.recipients_refused += 1
                w.append(reply)
            return
        default = reply if reply is not None else b"250 2.1.5 Recipient <" + addr + b"> OK\r\n"
        dcode = answer_code(default)
        ans = self._call("rcpt", index, addr, params, default)
        if _decided(ans):
            self._rcpt_decided(ans, default, dcode, addr, params, index, -1)
            return
        # Keep its place among the accepted: RCPT order must survive.
        at = len(self._rcpts)
        self._rcpts.append(None)
        self._rcpt_params.append(params)
        self._rcpt_ids.append(index)
        self._rcpt_holes += 1
        rcpts = self._rcpts

        def apply(a: Answer) -> None:
            if self._rcpts is rcpts:  # else the transaction is gone: only the reply
                self._rcpt_decided(a, default, dcode, addr, params, index, at)
            else:
                self._emit(a, default, dcode)

        self._hold(_K_RCPT, ans, apply, "rcpt")

    def _rcpt_decided(
        self,
        ans: Answer,
        default: bytes,
        dcode: int,
        addr: bytes,
        params: list[bytes],
        index: int,
        at: int,
    ) -> None:
        code = self._emit(ans, default, dcode)
        stats = self._stats
        ok = 200 <= code < 300
        if ok:
            stats.recipients_accepted += 1
        elif code:
            stats.recipients_refused += 1
        if at < 0:
            if ok:
                self._rcpts.append(addr)
                self._rcpt_params.append(params)
                self._rcpt_ids.append(index)
        elif ok:
            self._rcpts[at] = addr
            self._rcpt_holes -= 1
        # else: the hole stays, dropped once every answer is in

    def _accepted(self) -> list[bytes]:
        """The accepted recipients (every RCPT answer is in)."""
        rcpts = self._rcpts
        if None in rcpts:
            keep = [i for i, r in enumerate(rcpts) if r is not None]
            self._rcpt_params = [self._rcpt_params[i] for i in keep]
            self._rcpt_ids = [self._rcpt_ids[i] for i in keep]
            self._rcpts = rcpts = [rcpts[i] for i in keep]
        self._rcpt_holes = 0
        return rcpts  # type: ignore[return-value]

    def _content_sequence_error(self) -> bytes | None:
        if self._sender is None:
            return _R_NEED_MAIL if self._greeted else _R_NEED_LHLO
        if not self._accepted():
            return _R_NO_RCPT  # RFC 2033 4.2: DATA with no accepted RCPT gets 503
        return None

    def _data(self, arg: bytes) -> None:
        w = self._w
        if arg.strip():
            w.append(_R_SYNTAX_NOARG)
            return
        reply = self._content_sequence_error()
        if reply is None and self._body == _BODY_BDAT:
            reply = _R_MIXED  # RFC 3030: no DATA once BDAT has begun a message
        if reply is not None:
            w.append(reply)
            return
        if "data" not in self._hooks:
            w.append(_R_DATA)
            self._start_data()
            return
        ans = self._now(self._call("data", _R_DATA), "data")
        if self._emit(ans, _R_DATA, 354) == 354 and self._state != _DONE:
            self._start_data()

    def _start_data(self) -> None:
        self._body = _BODY_DATA
        self._decoder = DotDecoder(keep="content" in self._hooks, limit=self._cfg.max_size)
        self._state = _DATA

    def _bdat(self, arg: bytes) -> None:
        if not self._cfg.chunking:
            self._w.append(_R_NO_CHUNKING)
            return
        words = arg.split(b" ")
        if (
            not 1 <= len(words) <= 2
            or not words[0].isdigit()
            or len(words[0]) > 18
            or (len(words) == 2 and words[1].upper() != b"LAST")
        ):
            # The chunk size is unknown, so what follows is read as commands.
            self._w.append(_R_SYNTAX_BDAT)
            return
        size = int(words[0])
        self._bdat_last = len(words) == 2
        err = self._content_sequence_error()
        if err is None and self._body == _BODY_DATA:
            err = _R_MIXED
        # RFC 3030: the chunk is read and discarded even when the command
        # fails, and the reply comes once it has been read.
        self._bdat_err = err
        if err is None:
            self._body = _BODY_BDAT
        self._bdat_left = size
        self._bdat_chunk = size
        self._state = _BDAT  # _process finishes the chunk (at once if size is 0)

    def _bdat_chunk_done(self) -> None:
        err = self._bdat_err
        if err is not None:
            self._w.append(err)
            return
        last = self._bdat_last
        if "bdat" not in self._hooks:
            if last:
                self._end_of_content(self._bdat_size, self._too_big)
            else:
                self._w.append(b"250 2.0.0 %d octets received\r\n" % self._bdat_chunk)
            return
        default = None if last else b"250 2.0.0 %d octets received\r\n" % self._bdat_chunk
        ans = self._now(self._call("bdat", self._bdat_chunk, last, default), "bdat")
        if default is not None:
            if not 200 <= self._emit(ans, default, 250) < 300:
                # RFC 3030: a failed BDAT fails the transaction; chunks
                # already in the pipeline are then refused with 503.
                self._reset_transaction()
            return
        if ans is None:
            self._end_of_content(self._bdat_size, self._too_big)
            return
        code = answer_code(ans)
        if not 200 <= code < 300:
            # The message is refused with this one answer.
            if code:
                fr = self._stats.final_replies
                fr[code] = fr.get(code, 0) + 1
            self._reset_transaction()
            self._emit(ans, b"", code)
            return
        items = ans.items if isinstance(ans, Decision) else (ans,)
        if DEFAULT not in items:
            # Carried out, but the answer replaces the final replies.
            w = self._w
            mark = len(w)
            self._end_of_content(self._bdat_size, self._too_big)
            if self._w is w:
                w[mark:] = [i for i in w[mark:] if type(i) is not bytes]
            if self._state == _DONE:
                return
        w = self._w
        for item in items:
            if item is DEFAULT:
                self._end_of_content(self._bdat_size, self._too_big)
                w = self._w
            elif item is CLOSE or item is ABORT or item is STALL:
                self._finish(item)
                return
            else:
                w.append(item)
            if self._state == _DONE:
                return
        if code == 421:
            self._finish(CLOSE)

    def _end_of_content(self, size: int, too_big: bool) -> None:
        """The content is complete: one reply per accepted RCPT, in order."""
        cfg = self._cfg
        stats = self._stats
        stats.transactions += 1
        rcpts = self._accepted()
        too_big = too_big or bool(cfg.max_size and size > cfg.max_size)
        hooked = "end_of_content" in self._hooks
        env = (
            Envelope(
                self._sender if self._sender is not None else b"",
                self._mail_params,
                rcpts,
                self._rcpt_params,
                self._rcpt_ids,
                size,
                too_big,
                self._body == _BODY_BDAT,
            )
            if hooked
            else None
        )
        self._reset_transaction(completed=True)
        self._junk = 0
        self._state = _CMD
        ans = self._call("end_of_content", env) if hooked else None
        fr = stats.final_replies
        if ans is None:
            if too_big:
                self._w.append(b"".join([b"552 5.3.4 <" + r + cfg.too_big_text for r in rcpts]))
                fr[552] = fr.get(552, 0) + len(rcpts)
            else:
                self._w.append(b"".join([b"250 2.0.0 <" + r + cfg.delivered_text for r in rcpts]))
                fr[250] = fr.get(250, 0) + len(rcpts)
            return
        dcode = 552 if too_big else 250
        if isinstance(ans, bytes | Decision):
            default = b"".join(self._final_default(r, too_big) for r in rcpts)
            code = self._emit(ans, default, dcode)
            if code:
                fr[code] = fr.get(code, 0) + 1
            return
        try:
            answers = list(ans)
        except TypeError:
            log.error("end_of_content returned %r, not a list of answers", ans)
            answers = []
        if len(answers) < len(rcpts):
            log.error("end_of_content: %d answers for %d recipients", len(answers), len(rcpts))
        for i, r in enumerate(rcpts):
            if self._state == _DONE:
                return
            default = self._final_default(r, too_big)
            a = (
                answers[i]
                if i < len(answers)
                else b"451 4.3.0 <" + r + b"> Local error in processing\r\n"
            )
            if _decided(a):
                self._final_decided(a, default, dcode)
            else:

                def apply(x: Answer, default: bytes = default) -> None:
                    self._final_decided(x, default, dcode)

                self._hold(_K_FINAL, a, apply, "final")

    def _final_default(self, rcpt: bytes, too_big: bool) -> bytes:
        cfg = self._cfg
        if too_big:
            return b"552 5.3.4 <" + rcpt + cfg.too_big_text
        return b"250 2.0.0 <" + rcpt + cfg.delivered_text

    def _final_decided(self, ans: Answer, default: bytes, dcode: int) -> None:
        code = self._emit(ans, default, dcode)
        if code:
            fr = self._stats.final_replies
            fr[code] = fr.get(code, 0) + 1

    def _rset(self, arg: bytes) -> None:
        if arg.strip():
            self._w.append(_R_SYNTAX_NOARG)
            return
        if self._junk_stop():
            return
        self._reset_transaction()
        self._simple("rset", _R_RSET)

    def _noop(self, arg: bytes) -> None:
        # RFC 5321 4.1.1.9: NOOP may carry a string, which is ignored.
        if not self._junk_stop():
            self._simple("noop", _R_OK)

    def _quit(self, arg: bytes) -> None:
        if arg.strip():
            self._w.append(_R_SYNTAX_NOARG)
            return
        self._simple("quit", b"221 2.0.0 " + self._cfg.hostname.encode() + b" closing\r\n")
        if self._state != _DONE:
            self._finish(CLOSE)

    def _simple(self, hook: str, default: bytes) -> None:
        if hook not in self._hooks:
            self._w.append(default)
            return
        ans = self._now(self._call(hook, default), hook)
        self._emit(ans, default, answer_code(default))

    def _vrfy(self, arg: bytes) -> None:
        if not self._junk_stop():
            self._w.append(_R_VRFY if arg else _R_SYNTAX_VRFY)

    def _not_implemented(self, arg: bytes) -> None:
        self._w.append(_R_NOT_IMPL)

    def _starttls(self, arg: bytes) -> None:
        w = self._w
        if not self._cfg.starttls:
            w.append(_R_NOT_IMPL)
            return
        if arg.strip():
            w.append(_R_SYNTAX_NOARG)
            return
        if self._tls:
            w.append(_R_TLS_ACTIVE)
            return
        ans = self._call("starttls", _R_TLS_READY) if "starttls" in self._hooks else None
        code = self._emit(self._now(ans, "starttls"), _R_TLS_READY, 220)
        if code == 220 and self._state != _DONE:
            self._w.append(START_TLS)
            self._state = _TLS_WAIT

    def _auth(self, arg: bytes) -> None:
        w = self._w
        if not self._cfg.auth:
            w.append(_R_NOT_IMPL)
            return
        words = arg.split(b" ")
        if not arg or len(words) > 2 or not words[0]:
            w.append(_R_SYNTAX_AUTH)
            return
        if not self._greeted:
            w.append(_R_NEED_LHLO)
            return
        if self._authed:
            w.append(_R_AUTH_DONE)
            return
        if self._sender is not None:
            w.append(_R_AUTH_TXN)
            return
        if "auth" not in self._hooks:
            w.append(_R_AUTH_MECH)
            return
        mech = words[0].upper()
        initial = words[1] if len(words) == 2 else None
        self._auth_answer(self._call("auth", mech, initial, _R_AUTH_MECH), _R_AUTH_MECH)

    def _auth_line(self, line: bytes) -> None:
        self._state = _CMD
        if line == b"*":
            self._w.append(_R_AUTH_CANCEL)
            return
        if "auth_line" not in self._hooks:
            self._w.append(_R_AUTH_CANCEL)
            return
        self._auth_answer(self._call("auth_line", line, _R_AUTH_CANCEL), _R_AUTH_CANCEL)

    def _auth_answer(self, ans: Any, default: bytes) -> None:
        def apply(a: Answer) -> None:
            code = self._emit(a, default, answer_code(default))
            if self._state == _DONE:
                return
            if code == 334:
                self._state = _AUTH
            elif code == 235:
                self._authed = True

        if _decided(ans):
            apply(ans)
        else:
            self._hold(_K_OTHER, ans, apply, "auth")


_HANDLERS: Final[dict[bytes, Callable[[ServerSession, bytes], None]]] = {
    b"LHLO": ServerSession._lhlo,
    b"HELO": ServerSession._helo,
    b"EHLO": ServerSession._helo,
    b"MAIL": ServerSession._mail,
    b"RCPT": ServerSession._rcpt,
    b"DATA": ServerSession._data,
    b"BDAT": ServerSession._bdat,
    b"RSET": ServerSession._rset,
    b"NOOP": ServerSession._noop,
    b"QUIT": ServerSession._quit,
    b"VRFY": ServerSession._vrfy,
    b"STARTTLS": ServerSession._starttls,
    b"AUTH": ServerSession._auth,
    b"EXPN": ServerSession._not_implemented,
    b"ETRN": ServerSession._not_implemented,
    b"HELP": ServerSession._not_implemented,
}
