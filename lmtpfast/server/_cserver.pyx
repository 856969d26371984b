# cython: language_level=3
"""The compiled LMTP server engine (sans-IO): a port of ``_session``.

``_session`` is the specification: this module follows it and must behave
identically (same items, replies, handler calls, content chunks and
counters). Command lines, paths and DATA content are
scanned by the C in ``csrc/server.c``; replies gather in one C buffer and
leave as one ``bytes`` per call. The shared Python types (``_common``) and
canned replies (``_session``) are reused, not duplicated.
"""

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.mem cimport PyMem_Free, PyMem_Realloc
from libc.string cimport memchr, memcpy

import logging

from ._common import (
    ABORT,
    CLOSE,
    DEFAULT,
    STALL,
    START_TLS,
    Decision,
    Envelope,
    Handler,
    Pending,
    SinkStats,
)
from . import _session as _ref
from ._session import _CONTENT_WAIT, _Slot, _joined

__all__ = ["DotDecoder", "ServerSession"]


# _session._decided and _common.answer_code, compiled: the engine asks them
# several times per command (a Python call each was ~50 per proxied message).
cdef inline bint _decided(object answer):
    return answer is None or type(answer) is bytes or isinstance(answer, (bytes, Decision))


cdef inline bint _ends(list items):
    # _session._ends: does the output close the session?
    for i in items:
        if i is CLOSE or i is ABORT or i is STALL:
            return True
    return False


cdef int answer_code(object answer) except? -1:
    cdef const char *p
    if type(answer) is bytes:
        if PyBytes_GET_SIZE(answer) < 3:
            return 0
        p = PyBytes_AS_STRING(answer)
        if (48 <= p[0] <= 57) and (48 <= p[1] <= 57) and (48 <= p[2] <= 57):
            return (p[0] - 48) * 100 + (p[1] - 48) * 10 + (p[2] - 48)
        return 0
    if isinstance(answer, Decision):
        return answer.code
    c = answer[:3]
    return int(c) if len(c) == 3 and c.isdigit() else 0

log = logging.getLogger("lmtpfast.server")

# Content is un-stuffed here, then copied into its bytes object: one buffer
# for the module (decoding runs with the GIL held, never re-entered).
cdef unsigned char *_scratch = NULL
cdef Py_ssize_t _scratch_cap = 0

cdef unsigned char *_scratch_for(Py_ssize_t n) except NULL:
    global _scratch, _scratch_cap
    cdef unsigned char *nb
    if n > _scratch_cap:
        nb = <unsigned char *>PyMem_Realloc(_scratch, max(n, 65536))
        if nb == NULL:
            raise MemoryError()
        _scratch = nb
        _scratch_cap = max(n, 65536)
    return _scratch

# The canned replies are the reference's own objects.
cdef bytes _R_OK = _ref._R_OK
cdef bytes _R_RSET = _ref._R_RSET
cdef bytes _R_VRFY = _ref._R_VRFY
cdef bytes _R_DATA = _ref._R_DATA
cdef bytes _R_NEED_LHLO = _ref._R_NEED_LHLO
cdef bytes _R_NEED_MAIL = _ref._R_NEED_MAIL
cdef bytes _R_NESTED_MAIL = _ref._R_NESTED_MAIL
cdef bytes _R_NO_RCPT = _ref._R_NO_RCPT
cdef bytes _R_MIXED = _ref._R_MIXED
cdef bytes _R_REFUSED = _ref._R_REFUSED
cdef bytes _R_EHLO = _ref._R_EHLO
cdef bytes _R_UNKNOWN = _ref._R_UNKNOWN
cdef bytes _R_BARE_LF = _ref._R_BARE_LF
cdef bytes _R_TOO_LONG = _ref._R_TOO_LONG
cdef bytes _R_NOT_IMPL = _ref._R_NOT_IMPL
cdef bytes _R_NO_CHUNKING = _ref._R_NO_CHUNKING
cdef bytes _R_SYNTAX_LHLO = _ref._R_SYNTAX_LHLO
cdef bytes _R_SYNTAX_MAIL = _ref._R_SYNTAX_MAIL
cdef bytes _R_SYNTAX_RCPT = _ref._R_SYNTAX_RCPT
cdef bytes _R_SYNTAX_VRFY = _ref._R_SYNTAX_VRFY
cdef bytes _R_SYNTAX_BDAT = _ref._R_SYNTAX_BDAT
cdef bytes _R_SYNTAX_NOARG = _ref._R_SYNTAX_NOARG
cdef bytes _R_SYNTAX_AUTH = _ref._R_SYNTAX_AUTH
cdef bytes _R_BAD_SENDER = _ref._R_BAD_SENDER
cdef bytes _R_BAD_RCPT = _ref._R_BAD_RCPT
cdef bytes _R_NEED_UTF8 = _ref._R_NEED_UTF8
cdef bytes _R_TOO_MANY = _ref._R_TOO_MANY
cdef bytes _R_LOCAL_ERROR = _ref._R_LOCAL_ERROR
cdef bytes _R_TLS_READY = _ref._R_TLS_READY
cdef bytes _R_TLS_ACTIVE = _ref._R_TLS_ACTIVE
cdef bytes _R_NEED_TLS = _ref._R_NEED_TLS
cdef bytes _R_NEED_AUTH = _ref._R_NEED_AUTH
cdef bytes _R_AUTH_DONE = _ref._R_AUTH_DONE
cdef bytes _R_AUTH_TXN = _ref._R_AUTH_TXN
cdef bytes _R_AUTH_MECH = _ref._R_AUTH_MECH
cdef bytes _R_AUTH_CANCEL = _ref._R_AUTH_CANCEL
cdef bytes _R_JUNK = _ref._R_JUNK
_check_mail_params = _ref.check_mail_params
_check_rcpt_params = _ref.check_rcpt_params

# States of the input (as in _session).
cdef enum:
    S_CMD
    S_DATA
    S_DATA_END
    S_BDAT
    S_SKIP_LINE
    S_AUTH
    S_TLS_WAIT
    S_DONE

# Kinds of pending answer.
cdef enum:
    K_RCPT
    K_FINAL
    K_OTHER

cdef enum:
    B_NONE
    B_DATA
    B_BDAT

# One bit per hook.
cdef enum:
    H_GREETING = 1 << 0
    H_LHLO = 1 << 1
    H_MAIL = 1 << 2
    H_RCPT = 1 << 3
    H_DATA = 1 << 4
    H_BDAT = 1 << 5
    H_CONTENT = 1 << 6
    H_EOC = 1 << 7
    H_RSET = 1 << 8
    H_NOOP = 1 << 9
    H_QUIT = 1 << 10
    H_STARTTLS = 1 << 11
    H_AUTH = 1 << 12
    H_AUTH_LINE = 1 << 13
    H_RESET = 1 << 14
    H_CLOSED = 1 << 15

_HOOK_BITS = {
    "greeting": H_GREETING, "lhlo": H_LHLO, "mail": H_MAIL, "rcpt": H_RCPT,
    "data": H_DATA, "bdat": H_BDAT, "content": H_CONTENT, "end_of_content": H_EOC,
    "rset": H_RSET, "noop": H_NOOP, "quit": H_QUIT, "starttls": H_STARTTLS,
    "auth": H_AUTH, "auth_line": H_AUTH_LINE, "reset": H_RESET, "closed": H_CLOSED,
}

# Verbs as the upper-cased first four bytes, little-endian.
cdef inline unsigned int _v(const char *s):
    return (<unsigned char>s[0]) | (<unsigned char>s[1]) << 8 | (<unsigned char>s[2]) << 16 | (<unsigned char>s[3]) << 24

cdef unsigned int V_LHLO = _v(b"LHLO")
cdef unsigned int V_HELO = _v(b"HELO")
cdef unsigned int V_EHLO = _v(b"EHLO")
cdef unsigned int V_MAIL = _v(b"MAIL")
cdef unsigned int V_RCPT = _v(b"RCPT")
cdef unsigned int V_DATA = _v(b"DATA")
cdef unsigned int V_BDAT = _v(b"BDAT")
cdef unsigned int V_RSET = _v(b"RSET")
cdef unsigned int V_NOOP = _v(b"NOOP")
cdef unsigned int V_QUIT = _v(b"QUIT")
cdef unsigned int V_VRFY = _v(b"VRFY")
cdef unsigned int V_AUTH = _v(b"AUTH")
cdef unsigned int V_EXPN = _v(b"EXPN")
cdef unsigned int V_ETRN = _v(b"ETRN")
cdef unsigned int V_HELP = _v(b"HELP")
cdef unsigned int V_STARTTLS = 1  # eight letters: no four-byte code can be 1

cdef inline unsigned char _up(unsigned char c):
    return c - 32 if 97 <= c <= 122 else c

cdef inline bint _ieq(const char *s, const char *word, Py_ssize_t n):
    """s[0..n) equals word (upper case) ignoring ASCII case."""
    cdef Py_ssize_t i
    for i in range(n):
        if _up(<unsigned char>s[i]) != <unsigned char>word[i]:
            return False
    return True


cdef class DotDecoder:
    """The compiled twin of :class:`lmtpfast.server._data.DotDecoder` (same API).

    Like the reference it holds back nothing but a line-start dot and the CR
    after it, so ``take()`` returns the same chunks.
    """

    def __init__(self, keep=True, limit=0):
        lmtp_dot_init(&self._st)
        self._keep = keep
        self._limit = limit
        self._parts = []
        self.done = False
        self.overflow = False

    @property
    def size(self):
        return <Py_ssize_t>self._st.size

    def feed(self, data, Py_ssize_t pos=0):
        """Consume ``data[pos:]``; the index after the end line once found, else -1."""
        cdef bytes b = data if type(data) is bytes else bytes(data)
        cdef Py_ssize_t n = PyBytes_GET_SIZE(b)
        cdef const unsigned char *p = <const unsigned char *>PyBytes_AS_STRING(b)
        cdef size_t used, out_len = 0
        cdef int done = 0
        if pos < 0 or pos > n:
            raise ValueError("pos out of range")
        if self.done:
            raise ValueError("the end of the content was already found")
        cdef unsigned char *dst
        if self._keep and not self.overflow:
            dst = _scratch_for(n - pos)
            used = lmtp_dot_decode(&self._st, p + pos, n - pos, dst, &out_len, &done)
            if self._limit and self._st.size > <uint64_t>self._limit:
                self.overflow = True
                self._parts.clear()
            elif out_len:
                self._parts.append(PyBytes_FromStringAndSize(<char *>dst, out_len))
        else:
            # Only measured: ``overflow`` is about kept content, as in _data.
            used = lmtp_dot_decode(&self._st, p + pos, n - pos, NULL, NULL, &done)
        if done:
            self.done = True
            return pos + <Py_ssize_t>used
        return -1

    def take(self):
        """The content decoded since the last ``take()``, and forget it."""
        parts = self._parts
        if not parts:
            return b""
        chunk = parts[0] if len(parts) == 1 else b"".join(parts)
        parts.clear()
        return chunk

    def content(self):
        """The content so far (all of it once ``done``); empty if not kept or overflowed."""
        parts = self._parts
        if len(parts) == 1:
            return parts[0]
        joined = b"".join(parts)
        self._parts = [joined]
        return joined


cdef class _FinalApply:
    """A pending final reply's continuation (a closure cannot live in a cdef method)."""

    cdef ServerSession _s
    cdef bytes _default
    cdef int _dcode

    def __init__(self, ServerSession s, bytes default, int dcode):
        self._s = s
        self._default = default
        self._dcode = dcode

    def __call__(self, ans):
        self._s._final_decided(ans, self._default, self._dcode)


cdef class _RcptApply:
    """A pending RCPT's continuation (a closure cannot live in a cdef method)."""

    cdef ServerSession _s
    cdef object _default, _addr, _params, _index, _rcpts
    cdef int _dcode
    cdef Py_ssize_t _at

    def __init__(self, ServerSession s, default, int dcode, addr, params, index, Py_ssize_t at):
        self._s = s
        self._default = default
        self._dcode = dcode
        self._addr = addr
        self._params = params
        self._index = index
        self._at = at
        self._rcpts = s._rcpts

    def __call__(self, ans):
        cdef ServerSession s = self._s
        if s._rcpts is self._rcpts:
            s._rcpt_decided(ans, self._default, self._dcode, self._addr, self._params, self._index, self._at)
        else:  # the transaction is gone: only the reply
            s._emit(ans, self._default, self._dcode)


@cython.final
cdef class _Reader:
    """``ServerProtocol.data_received`` in C: feed the session, write a plain reply at once.

    Anything but one ``bytes`` (a delay, a close, a pending answer) and any
    state of the protocol but the plain one go to the protocol's own Python
    path, so the two cannot disagree.
    """

    cdef ServerSession _s
    cdef object _proto
    cdef object _stats
    # The transport's write while connected (None before and after: the
    # Python path then), and a copy of the protocol's _blocked (a delay, a
    # stall, STARTTLS under way), both kept up to date by the protocol.
    cdef public object write
    cdef public bint io_blocked

    def __init__(self, ServerSession s, protocol):
        self._s = s
        self._proto = protocol
        self._stats = s._stats
        self.write = None
        self.io_blocked = False

    def __call__(self, data):
        cdef ServerSession s = self._s
        cdef list items
        proto = self._proto
        if self.write is None:
            return proto._data_received(data)
        self._stats.bytes_received += len(data)
        items = s._receive(data)
        if items:
            if len(items) == 1 and type(items[0]) is bytes and not self.io_blocked:
                self.write(items[0])
            else:
                proto._dispatch(items)
        # Reading resumes where the session unblocks (resolve, tls_started)
        # or the transport drains (resume_writing): only blocking is news here.
        if s._state == S_TLS_WAIT or s._slots or s._content_wait:
            proto._update_reading()


@cython.final
cdef class ServerSession:
    """The compiled twin of :class:`lmtpfast.server._session.ServerSession` (same API)."""

    def __cinit__(self):
        self._obuf = NULL
        self._olen = 0
        self._ocap = 0

    def __dealloc__(self):
        if self._obuf != NULL:
            PyMem_Free(self._obuf)
            self._obuf = NULL

    def __init__(self, config, handler=None, stats=None):
        self._cfg = config
        self._handler = handler if handler is not None else Handler()
        self._hooks = self._handler.hooks
        cdef unsigned int hk = 0
        for name in self._hooks:
            hk |= _HOOK_BITS.get(name, 0)
        self._hk = hk
        self._stats = stats if stats is not None else SinkStats()
        self.context = None
        self.peer = None
        self.local = None
        self.received = 0
        self.commands = 0
        self._out = []
        self._w = None
        self._held = None
        self._slots = []
        self._content_wait = False
        self._new_pending = []
        self._buf = b""
        self._scan = 0
        self._state = S_CMD
        self._greeted = False
        self._refused = False
        self._tls = False
        self._authed = False
        self._junk = 0
        self._sender = None
        self._mail_params = []
        self._utf8 = False
        self._rcpts = []
        self._rcpt_params = []
        self._rcpt_ids = []
        self._rcpt_holes = 0
        self._rcpt_seq = 0
        self._body = B_NONE
        lmtp_dot_init(&self._dot)
        self._dot_overflow = False
        self._too_big = False
        self._bdat_left = 0
        self._bdat_chunk = 0
        self._bdat_last = False
        self._bdat_err = None
        self._bdat_size = 0
        self._max_line = config.max_line_length
        self._max_size = config.max_size
        self._max_rcpts = config.max_recipients
        self._max_commands = config.max_commands
        self._chunking = config.chunking
        self._size_ext = config.size_ext
        self._smtputf8 = config.smtputf8
        self._eightbit = config.eightbit
        self._dsn = config.dsn
        self._starttls = config.starttls
        self._auth = config.auth
        self._auth_required = config.auth_required
        self._tls_required = config.tls_required
        self._greeting = config.greeting
        self._lhlo_reply = config.lhlo_reply
        self._lhlo_reply_tls = config.lhlo_reply_tls
        self._delivered_text = config.delivered_text
        self._too_big_text = config.too_big_text
        self._quit_reply = b"221 2.0.0 " + config.hostname.encode() + b" closing\r\n"

    # --- public --------------------------------------------------------------

    @property
    def closed(self):
        """True once the session will read nothing more (QUIT, EOF, fault)."""
        return self._state == S_DONE

    @property
    def blocked(self):
        """True while input waits for a pending answer or for TLS."""
        if self._state == S_TLS_WAIT:
            return True
        if not self._slots and not self._content_wait:
            return False
        return not self._may_read(self._buf, 0)

    @property
    def sender(self):
        """The open transaction's sender (``b""`` for ``<>``), or None."""
        return self._sender

    @property
    def recipients(self):
        """The recipients accepted so far in the open transaction, in RCPT order."""
        return [r for r in self._rcpts if r is not None]

    @property
    def idle(self):
        """Between transactions with nothing owed or buffered: safe to close with a 421."""
        return (
            self._state == S_CMD
            and self._sender is None
            and not self._slots
            and not self._content_wait
            and not PyBytes_GET_SIZE(self._buf)
        )

    @property
    def in_transaction(self):
        return self._sender is not None

    @property
    def in_content(self):
        """True while message content is read (after DATA's 354, or inside a BDAT chunk)."""
        return self._state == S_DATA or (self._state == S_BDAT and self._bdat_left > 0)

    @property
    def tls(self):
        return self._tls

    @property
    def authenticated(self):
        return self._authed

    def start(self):
        """The greeting (or what the handler's ``greeting`` answers instead)."""
        default = self._greeting
        ans = self._call("greeting", default) if self._hk & H_GREETING else None
        code = self._emit(self._now(ans, "greeting"), default, 220)
        if code >= 400 and self._state != S_DONE:
            self._refused = True
        return self._take()

    def receive_data(self, data):
        """Feed what the client sent; ``b""`` means it closed its side."""
        return self._receive(data)

    cdef list _receive(self, object data):
        if self._state == S_DONE:
            return []
        if type(data) is not bytes:
            data = bytes(data)
        if not PyBytes_GET_SIZE(data):
            self._finish(CLOSE)
            return self._take()
        self.received += PyBytes_GET_SIZE(data)
        if self._state == S_TLS_WAIT:
            return []
        if PyBytes_GET_SIZE(self._buf):
            self._buf = self._buf + data
        else:
            self._buf = data
        self._process()
        return self._take()

    def reader(self, protocol):
        """A compiled ``data_received`` for ``protocol`` (``_server.ServerProtocol``)."""
        return _Reader(self, protocol)

    def resolve(self, pending, answer, error=None):
        """The answer of a :class:`Pending` (``error``: the awaitable raised)."""
        slot = pending.slot
        if slot is _CONTENT_WAIT:
            if self._content_wait:
                if error is not None:
                    log.error("content hook failed: %r", error)
                    self._too_big = True
                self._content_wait = False
                if self._state != S_DONE:
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
            del held[held.index(slot) + 1 :]
            for s in self._slots:
                s.done = True
            self._slots.clear()
        self._flush_held()
        if self._state != S_DONE:
            self._process()
        return self._take()

    def tls_started(self):
        """TLS is up after :data:`START_TLS`: a fresh session (RFC 3207 4.2)."""
        if self._state != S_TLS_WAIT:
            return []
        self._tls = True
        self._greeted = False
        self._authed = False
        self._reset_transaction(False)
        self._state = S_CMD
        return self._take()

    def connection_lost(self):
        """The connection is gone: the handler hears of it (``reset``, ``closed``)."""
        if self._sender is not None:
            self._reset_transaction(False)
        self._state = S_DONE
        self._buf = b""
        for s in self._slots:
            s.done = True
        self._slots.clear()
        self._content_wait = False
        if self._hk & H_CLOSED:
            try:
                self._handler.closed(self)
            except Exception:
                log.exception("closed hook failed")

    # --- output ----------------------------------------------------------------

    cdef int _put(self, const char *s, Py_ssize_t n) except -1:
        cdef Py_ssize_t need
        cdef char *nb
        if self._w is not None:
            self._w.append(PyBytes_FromStringAndSize(s, n))
            return 0
        need = self._olen + n
        if need > self._ocap:
            cap = max(need, 2 * self._ocap, 4096)
            nb = <char *>PyMem_Realloc(self._obuf, cap)
            if nb == NULL:
                raise MemoryError()
            self._obuf = nb
            self._ocap = cap
        memcpy(self._obuf + self._olen, s, n)
        self._olen = need
        return 0

    cdef int _put_bytes(self, bytes b) except -1:
        if self._w is not None:
            self._w.append(b)
            return 0
        return self._put(PyBytes_AS_STRING(b), PyBytes_GET_SIZE(b))

    cdef int _put_item(self, object item) except -1:
        if type(item) is bytes:
            return self._put_bytes(<bytes>item)
        if self._w is not None:
            self._w.append(item)
            return 0
        self._push()
        self._out.append(item)
        return 0

    cdef int _out_item(self, object item) except -1:
        # To the output proper, whatever _w says (flushing held answers).
        w = self._w
        self._w = None
        try:
            self._put_item(item)
        finally:
            self._w = w
        return 0

    cdef int _push(self) except -1:
        if self._olen:
            self._out.append(PyBytes_FromStringAndSize(self._obuf, self._olen))
            self._olen = 0
        return 0

    cdef list _take(self):
        cdef list out
        self._push()
        out = self._out
        pend = self._new_pending
        if not out and not pend:
            return []
        self._out = []
        if len(out) > 1:
            out = _joined(out)  # rare: only with instructions in the output
        if pend:
            self._new_pending = []
            return pend + out
        return out

    def _call(self, hook, *args):
        try:
            return getattr(self._handler, hook)(self, *args)
        except Exception:
            log.exception("%s hook failed", hook)
            return _R_LOCAL_ERROR

    def _now(self, ans, hook):
        if _decided(ans):
            return ans
        log.error("%s hook returned %r, not an answer", hook, ans)
        close = getattr(ans, "close", None)
        if close is not None:
            close()
        return _R_LOCAL_ERROR

    cdef int _emit(self, object ans, bytes default, int default_code) except? -2:
        cdef int code
        if ans is None:
            self._put_bytes(default)
            return default_code
        if isinstance(ans, bytes):
            self._put_bytes(<bytes>ans)
            code = answer_code(ans)
        else:
            code = ans.code
            for item in ans.items:
                if item is DEFAULT:
                    self._put_bytes(default)
                elif item is CLOSE or item is ABORT or item is STALL:
                    self._finish(item)
                    return code
                else:
                    self._put_item(item)
        if code == 421:
            self._finish(CLOSE)
        return code

    cdef int _finish(self, object instruction) except -1:
        self._put_item(instruction)
        self._state = S_DONE
        self._buf = b""
        return 0

    def _hold(self, int kind, awaitable, apply, name):
        slot = _Slot(kind, apply)
        if self._held is None:
            self._held = []
        self._w = self._held
        self._held.append(slot)
        self._slots.append(slot)
        self._new_pending.append(Pending(awaitable, name, slot))

    cdef int _flush_held(self) except -1:
        held = self._held
        if held is None:
            return 0
        cdef Py_ssize_t i = 0
        for entry in held:
            if isinstance(entry, _Slot):
                if not entry.done:
                    break
                for item in entry.items:
                    self._out_item(item)
            else:
                self._out_item(entry)
            i += 1
        del held[:i]
        if not held:
            self._held = None
            self._w = None

    cdef bint _may_read(self, bytes buf, Py_ssize_t pos):
        cdef bint rcpt_only = False
        cdef int kind
        if self._content_wait:
            return False
        if not self._slots:
            return True
        for s in self._slots:
            kind = s.kind
            if kind == K_OTHER:
                return False
            if kind == K_RCPT:
                rcpt_only = True
        if not rcpt_only:
            return True
        if self._state != S_CMD or PyBytes_GET_SIZE(buf) - pos < 5:
            return False
        return _ieq(PyBytes_AS_STRING(buf) + pos, b"RCPT ", 5)

    # --- input -------------------------------------------------------------------

    cdef int _process(self) except -1:
        cdef bytes buf = self._buf
        cdef Py_ssize_t pos = 0
        cdef Py_ssize_t n = PyBytes_GET_SIZE(buf)
        cdef const unsigned char *p = <const unsigned char *>PyBytes_AS_STRING(buf)
        cdef ptrdiff_t i
        cdef int st
        cdef size_t used, out_len
        cdef int done
        cdef Py_ssize_t take
        cdef unsigned char *dst
        while True:
            st = self._state
            if st == S_BDAT and not self._bdat_left and not self._content_wait:
                self._state = S_CMD
                self._bdat_chunk_done()
                continue
            if st == S_DATA_END and not self._content_wait:
                self._end_of_content(<Py_ssize_t>self._dot.size, self._dot_overflow)
                continue
            if pos >= n or st == S_DONE or st == S_TLS_WAIT or st == S_DATA_END:
                break
            if (self._slots or self._content_wait) and not self._may_read(buf, pos):
                break
            if st == S_CMD or st == S_AUTH:
                i = lmtp_find_crlf(p, pos, pos + self._scan, n)
                if i < 0:
                    if n - pos > self._max_line:
                        self._state = S_SKIP_LINE
                        continue
                    self._scan = n - pos - 1
                    break
                self._scan = 0
                if st == S_CMD:
                    self._command(buf, pos, i)
                else:
                    self._auth_line(buf[pos:i])
                pos = i + 2
                if self._state == S_TLS_WAIT:
                    pos = n
            elif st == S_DATA:
                done = 0
                if self._hk & H_CONTENT and not self._dot_overflow:
                    dst = _scratch_for(n - pos)
                    out_len = 0
                    used = lmtp_dot_decode(&self._dot, p + pos, n - pos, dst, &out_len, &done)
                    if self._max_size and self._dot.size > <uint64_t>self._max_size:
                        self._dot_overflow = True
                    elif out_len:
                        self._content_out(PyBytes_FromStringAndSize(<char *>dst, out_len))
                else:
                    used = lmtp_dot_decode(&self._dot, p + pos, n - pos, NULL, NULL, &done)
                    if self._max_size and self._dot.size > <uint64_t>self._max_size:
                        self._dot_overflow = True
                pos += <Py_ssize_t>used
                if done:
                    self._state = S_DATA_END
            elif st == S_BDAT:
                take = min(self._bdat_left, n - pos)
                if self._bdat_err is None and take:
                    self._bdat_size += take
                    if self._max_size and self._bdat_size > self._max_size:
                        self._too_big = True
                    elif self._hk & H_CONTENT and not self._too_big:
                        self._content_out(buf[pos : pos + take])
                pos += take
                self._bdat_left -= take
                if self._bdat_left:
                    break
            else:  # S_SKIP_LINE
                i = lmtp_find_crlf(p, pos, pos, n)
                if i < 0:
                    pos = n - 1 if p[n - 1] == 13 else n
                    break
                pos = i + 2
                self._state = S_CMD
                self._scan = 0
                if not self._junk_stop():
                    self._put_bytes(_R_TOO_LONG)
        if pos < n and self._state != S_DONE:
            self._buf = buf[pos:] if pos else buf
        else:
            self._buf = b""
        return 0

    cdef int _content_out(self, bytes chunk) except -1:
        if not chunk:
            return 0
        try:
            res = self._handler.content(self, chunk)
        except Exception:
            log.exception("content hook failed")
            self._too_big = True
            return 0
        if res is not None:
            self._content_wait = True
            self._new_pending.append(Pending(res, "content", _CONTENT_WAIT))

    cdef int _junk_stop(self) except -1:
        if self._max_commands:
            self._junk += 1
            if self._junk > self._max_commands:
                self._put_bytes(_R_JUNK)
                self._finish(CLOSE)
                return 1
        return 0

    cdef int _reset_transaction(self, bint completed) except -1:
        cdef bint was_open = self._sender is not None
        self._sender = None
        if self._mail_params:
            self._mail_params = []
        self._utf8 = False
        if self._rcpts:
            self._rcpts = []
            self._rcpt_params = []
            self._rcpt_ids = []
        self._rcpt_holes = 0
        self._rcpt_seq = 0
        self._body = B_NONE
        lmtp_dot_init(&self._dot)
        self._dot_overflow = False
        self._too_big = False
        self._bdat_size = 0
        if was_open and not completed and self._hk & H_RESET:
            try:
                self._handler.reset(self)
            except Exception:
                log.exception("reset hook failed")
        return 0

    # --- commands ------------------------------------------------------------

    cdef int _command(self, bytes buf, Py_ssize_t start, Py_ssize_t end) except -1:
        cdef const char *s = PyBytes_AS_STRING(buf) + start
        cdef Py_ssize_t n = end - start
        cdef const char *sp
        cdef Py_ssize_t vlen
        cdef unsigned int v
        self.commands += 1
        if n > self._max_line:
            if not self._junk_stop():
                self._put_bytes(_R_TOO_LONG)
            return 0
        if memchr(s, 10, n) != NULL:
            if not self._junk_stop():
                self._put_bytes(_R_BARE_LF)
            return 0
        sp = <const char *>memchr(s, 32, n)
        vlen = (sp - s) if sp != NULL else n
        cdef Py_ssize_t a = start + vlen + 1 if sp != NULL else end  # the argument
        if vlen == 4:
            v = _up(<unsigned char>s[0]) | _up(<unsigned char>s[1]) << 8 | _up(<unsigned char>s[2]) << 16 | _up(<unsigned char>s[3]) << 24
        elif vlen == 8 and _ieq(s, b"STARTTLS", 8):
            v = V_STARTTLS
        else:
            v = 0
        if v == 0 or not (
            v == V_LHLO or v == V_HELO or v == V_EHLO or v == V_MAIL or v == V_RCPT
            or v == V_DATA or v == V_BDAT or v == V_RSET or v == V_NOOP or v == V_QUIT
            or v == V_VRFY or v == V_AUTH or v == V_EXPN or v == V_ETRN or v == V_HELP
            or v == V_STARTTLS
        ):
            if not self._junk_stop():
                self._put_bytes(_R_UNKNOWN)
            return 0
        if self._refused and v != V_QUIT:
            self._put_bytes(_R_REFUSED)
            return 0
        if v == V_MAIL:
            return self._mail(buf, a, end)
        if v == V_RCPT:
            return self._rcpt(buf, a, end)
        arg = buf[a:end] if a < end else b""
        if v == V_DATA:
            return self._data(arg)
        if v == V_BDAT:
            self._bdat(arg)
        elif v == V_LHLO:
            self._lhlo(arg)
        elif v == V_HELO or v == V_EHLO:
            self._put_bytes(_R_EHLO)
        elif v == V_RSET:
            self._rset(arg)
        elif v == V_NOOP:
            if not self._junk_stop():
                self._simple("noop", H_NOOP, _R_OK)
        elif v == V_QUIT:
            self._quit(arg)
        elif v == V_VRFY:
            if not self._junk_stop():
                self._put_bytes(_R_VRFY if arg else _R_SYNTAX_VRFY)
        elif v == V_STARTTLS:
            self._starttls_cmd(arg)
        elif v == V_AUTH:
            self._auth_cmd(arg)
        else:
            self._put_bytes(_R_NOT_IMPL)
        return 0

    cdef int _lhlo(self, bytes arg) except -1:
        if not arg.strip() or lmtp_has_ctl(<const unsigned char *>PyBytes_AS_STRING(arg), PyBytes_GET_SIZE(arg)):
            self._put_bytes(_R_SYNTAX_LHLO)
            return 0
        self._reset_transaction(False)
        default = self._lhlo_reply_tls if self._tls else self._lhlo_reply
        ans = self._call("lhlo", arg, default) if self._hk & H_LHLO else None
        code = self._emit(self._now(ans, "lhlo"), default, 250)
        self._greeted = 200 <= code < 300

    cdef int _mail(self, bytes buf, Py_ssize_t a, Py_ssize_t end) except -1:
        cdef const unsigned char *s = <const unsigned char *>PyBytes_AS_STRING(buf)
        cdef size_t addr_at, addr_len, rest
        cdef bytes addr
        cdef list params
        cdef int code
        if not self._greeted:
            return self._put_bytes(_R_NEED_LHLO)
        if self._sender is not None:
            return self._put_bytes(_R_NESTED_MAIL)
        if self._tls_required and not self._tls:
            return self._put_bytes(_R_NEED_TLS)
        if self._auth_required and not self._authed:
            return self._put_bytes(_R_NEED_AUTH)
        if end - a < 5 or not _ieq(<const char *>s + a, b"FROM:", 5):
            return self._put_bytes(_R_SYNTAX_MAIL)
        if lmtp_parse_path(s + a + 5, end - a - 5, &addr_at, &addr_len, &rest) < 0:
            return self._put_bytes(_R_BAD_SENDER)
        addr = PyBytes_FromStringAndSize(<const char *>s + a + 5 + addr_at, addr_len)
        rest += a + 5
        params = buf[rest:end].split() if <Py_ssize_t>rest < end else []
        utf8 = False
        reply = None
        if params:
            reply = _check_mail_params(self._cfg, params)
            utf8 = any(p.upper() == b"SMTPUTF8" for p in params)
        if reply is None and not utf8 and not lmtp_is_ascii(<const unsigned char *>PyBytes_AS_STRING(addr), addr_len):
            reply = _R_NEED_UTF8
        if reply is None and not self._hk & H_MAIL:
            self._sender = addr
            self._mail_params = params
            self._utf8 = utf8
            self._put(b"250 2.1.0 Sender <", 18)
            self._put_bytes(addr)
            self._put(b"> OK\r\n", 6)
            return 0
        default = reply if reply is not None else b"250 2.1.0 Sender <" + addr + b"> OK\r\n"
        dcode = answer_code(default)
        ans = self._call("mail", addr, params, default) if self._hk & H_MAIL else None
        code = self._emit(self._now(ans, "mail"), default, dcode)
        if 200 <= code < 300 and self._state != S_DONE:
            self._sender = addr
            self._mail_params = params
            self._utf8 = utf8
        return 0

    cdef int _rcpt(self, bytes buf, Py_ssize_t a, Py_ssize_t end) except -1:
        cdef const unsigned char *s = <const unsigned char *>PyBytes_AS_STRING(buf)
        cdef size_t addr_at, addr_len, rest
        cdef bytes addr
        cdef list params
        cdef Py_ssize_t index
        if self._sender is None:
            return self._put_bytes(_R_NEED_MAIL if self._greeted else _R_NEED_LHLO)
        if end - a < 3 or not _ieq(<const char *>s + a, b"TO:", 3):
            return self._put_bytes(_R_SYNTAX_RCPT)
        if lmtp_parse_path(s + a + 3, end - a - 3, &addr_at, &addr_len, &rest) < 0 or addr_len == 0:
            return self._put_bytes(_R_BAD_RCPT)
        addr = PyBytes_FromStringAndSize(<const char *>s + a + 3 + addr_at, addr_len)
        rest += a + 3
        params = buf[rest:end].split() if <Py_ssize_t>rest < end else []
        reply = _check_rcpt_params(self._cfg, params) if params else None
        if reply is None and not self._utf8 and not lmtp_is_ascii(<const unsigned char *>PyBytes_AS_STRING(addr), addr_len):
            reply = _R_NEED_UTF8
        if reply is None and len(self._rcpts) >= self._max_rcpts:
            reply = _R_TOO_MANY
        index = self._rcpt_seq
        self._rcpt_seq += 1
        if not self._hk & H_RCPT:
            stats = self._stats
            if reply is None:
                self._rcpts.append(addr)
                if self._hk & H_EOC:  # else nobody reads them
                    self._rcpt_params.append(params)
                    self._rcpt_ids.append(index)
                stats.recipients_accepted += 1
                self._put(b"250 2.1.5 Recipient <", 21)
                self._put_bytes(addr)
                self._put(b"> OK\r\n", 6)
            else:
                stats.recipients_refused += 1
                self._put_bytes(reply)
            return 0
        default = reply if reply is not None else b"250 2.1.5 Recipient <" + addr + b"> OK\r\n"
        dcode = answer_code(default)
        ans = self._call("rcpt", index, addr, params, default)
        if _decided(ans):
            self._rcpt_decided(ans, default, dcode, addr, params, index, -1)
            return 0
        at = len(self._rcpts)
        self._rcpts.append(None)
        self._rcpt_params.append(params)
        self._rcpt_ids.append(index)
        self._rcpt_holes += 1
        self._hold(K_RCPT, ans, _RcptApply(self, default, dcode, addr, params, index, at), "rcpt")
        return 0

    cdef int _rcpt_decided(self, object ans, bytes default, int dcode, bytes addr, list params, object index, Py_ssize_t at) except -1:
        cdef int code = self._emit(ans, default, dcode)
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

    cdef list _accepted(self):
        rcpts = self._rcpts
        if None in rcpts:
            keep = [i for i, r in enumerate(rcpts) if r is not None]
            self._rcpt_params = [self._rcpt_params[i] for i in keep]
            self._rcpt_ids = [self._rcpt_ids[i] for i in keep]
            self._rcpts = rcpts = [rcpts[i] for i in keep]
        self._rcpt_holes = 0
        return rcpts

    cdef object _content_sequence_error(self):
        if self._sender is None:
            return _R_NEED_MAIL if self._greeted else _R_NEED_LHLO
        if not self._accepted():
            return _R_NO_RCPT
        return None

    cdef int _data(self, bytes arg) except -1:
        if arg.strip():
            return self._put_bytes(_R_SYNTAX_NOARG)
        reply = self._content_sequence_error()
        if reply is None and self._body == B_BDAT:
            reply = _R_MIXED
        if reply is not None:
            return self._put_bytes(reply)
        if not self._hk & H_DATA:
            self._put_bytes(_R_DATA)
            self._start_data()
            return 0
        ans = self._now(self._call("data", _R_DATA), "data")
        if self._emit(ans, _R_DATA, 354) == 354 and self._state != S_DONE:
            self._start_data()
        return 0

    cdef int _start_data(self) except -1:
        self._body = B_DATA
        lmtp_dot_init(&self._dot)
        self._dot_overflow = False
        self._state = S_DATA

    cdef int _bdat(self, bytes arg) except -1:
        if not self._chunking:
            self._put_bytes(_R_NO_CHUNKING)
            return 0
        words = arg.split(b" ")
        if (
            not 1 <= len(words) <= 2
            or not words[0].isdigit()
            or len(words[0]) > 18
            or (len(words) == 2 and words[1].upper() != b"LAST")
        ):
            self._put_bytes(_R_SYNTAX_BDAT)
            return 0
        size = int(words[0])
        self._bdat_last = len(words) == 2
        err = self._content_sequence_error()
        if err is None and self._body == B_DATA:
            err = _R_MIXED
        self._bdat_err = err
        if err is None:
            self._body = B_BDAT
        self._bdat_left = size
        self._bdat_chunk = size
        self._state = S_BDAT

    cdef int _bdat_chunk_done(self) except -1:
        err = self._bdat_err
        if err is not None:
            self._put_bytes(err)
            return 0
        last = self._bdat_last
        if not self._hk & H_BDAT:
            if last:
                self._end_of_content(self._bdat_size, self._too_big)
            else:
                self._put_bytes(b"250 2.0.0 %d octets received\r\n" % self._bdat_chunk)
            return 0
        default = None if last else b"250 2.0.0 %d octets received\r\n" % self._bdat_chunk
        ans = self._now(self._call("bdat", self._bdat_chunk, last, default), "bdat")
        if default is not None:
            if not 200 <= self._emit(ans, default, 250) < 300:
                self._reset_transaction(False)
            return 0
        if ans is None:
            self._end_of_content(self._bdat_size, self._too_big)
            return 0
        code = answer_code(ans)
        if not 200 <= code < 300:
            if code:
                fr = self._stats.final_replies
                fr[code] = fr.get(code, 0) + 1
            self._reset_transaction(False)
            self._emit(ans, b"", code)
            return 0
        items = ans.items if isinstance(ans, Decision) else (ans,)
        if DEFAULT not in items:
            # Carried out, but the answer replaces the final replies.
            self._push()
            w = self._w
            target = self._out if w is None else w
            mark = len(target)
            self._end_of_content(self._bdat_size, self._too_big)
            if self._w is w:
                self._push()
                target[mark:] = [i for i in target[mark:] if type(i) is not bytes]
            if self._state == S_DONE:
                return 0
        for item in items:
            if item is DEFAULT:
                self._end_of_content(self._bdat_size, self._too_big)
            elif item is CLOSE or item is ABORT or item is STALL:
                self._finish(item)
                return 0
            else:
                self._put_item(item)
            if self._state == S_DONE:
                return 0
        if code == 421:
            self._finish(CLOSE)

    cdef int _end_of_content(self, Py_ssize_t size, bint too_big) except -1:
        cdef Py_ssize_t i, nr
        stats = self._stats
        stats.transactions += 1
        rcpts = self._accepted()
        too_big = too_big or (self._max_size and size > self._max_size)
        hooked = self._hk & H_EOC
        env = (
            Envelope(
                self._sender if self._sender is not None else b"",
                self._mail_params,
                rcpts,
                self._rcpt_params,
                self._rcpt_ids,
                size,
                too_big,
                self._body == B_BDAT,
            )
            if hooked
            else None
        )
        self._reset_transaction(True)
        self._junk = 0
        self._state = S_CMD
        ans = self._call("end_of_content", env) if hooked else None
        fr = stats.final_replies
        nr = len(rcpts)
        if ans is None:
            if too_big:
                for r in rcpts:
                    self._put(b"552 5.3.4 <", 11)
                    self._put_bytes(r)
                    self._put_bytes(self._too_big_text)
                fr[552] = fr.get(552, 0) + nr
            else:
                for r in rcpts:
                    self._put(b"250 2.0.0 <", 11)
                    self._put_bytes(r)
                    self._put_bytes(self._delivered_text)
                fr[250] = fr.get(250, 0) + nr
            return 0
        dcode = 552 if too_big else 250
        if isinstance(ans, (bytes, Decision)):
            default = b"".join([self._final_default(r, too_big) for r in rcpts])
            code = self._emit(ans, default, dcode)
            if code:
                fr[code] = fr.get(code, 0) + 1
            return 0
        try:
            answers = list(ans)
        except TypeError:
            log.error("end_of_content returned %r, not a list of answers", ans)
            answers = []
        if len(answers) < nr:
            log.error("end_of_content: %d answers for %d recipients", len(answers), nr)
        for i in range(nr):
            if self._state == S_DONE:
                return 0
            r = rcpts[i]
            default = self._final_default(r, too_big)
            a = answers[i] if i < len(answers) else b"451 4.3.0 <" + r + b"> Local error in processing\r\n"
            if _decided(a):
                self._final_decided(a, default, dcode)
            else:
                self._hold(K_FINAL, a, _FinalApply(self, default, dcode), "final")
        return 0

    cdef bytes _final_default(self, bytes rcpt, bint too_big):
        if too_big:
            return b"552 5.3.4 <" + rcpt + self._too_big_text
        return b"250 2.0.0 <" + rcpt + self._delivered_text

    cdef int _final_decided(self, object ans, bytes default, int dcode) except -1:
        cdef int code = self._emit(ans, default, dcode)
        if code:
            fr = self._stats.final_replies
            fr[code] = fr.get(code, 0) + 1

    cdef int _rset(self, bytes arg) except -1:
        if arg.strip():
            self._put_bytes(_R_SYNTAX_NOARG)
            return 0
        if self._junk_stop():
            return 0
        self._reset_transaction(False)
        self._simple("rset", H_RSET, _R_RSET)

    cdef int _quit(self, bytes arg) except -1:
        if arg.strip():
            self._put_bytes(_R_SYNTAX_NOARG)
            return 0
        self._simple("quit", H_QUIT, self._quit_reply)
        if self._state != S_DONE:
            self._finish(CLOSE)

    cdef int _simple(self, str hook, unsigned int bit, bytes default) except -1:
        if not self._hk & bit:
            self._put_bytes(default)
            return 0
        ans = self._now(self._call(hook, default), hook)
        self._emit(ans, default, answer_code(default))

    def _starttls_cmd(self, bytes arg):
        if not self._starttls:
            self._put_bytes(_R_NOT_IMPL)
            return
        if arg.strip():
            self._put_bytes(_R_SYNTAX_NOARG)
            return
        if self._tls:
            self._put_bytes(_R_TLS_ACTIVE)
            return
        ans = self._call("starttls", _R_TLS_READY) if self._hk & H_STARTTLS else None
        code = self._emit(self._now(ans, "starttls"), _R_TLS_READY, 220)
        if code == 220 and self._state != S_DONE:
            self._put_item(START_TLS)
            self._state = S_TLS_WAIT

    def _auth_cmd(self, bytes arg):
        if not self._auth:
            self._put_bytes(_R_NOT_IMPL)
            return
        words = arg.split(b" ")
        if not arg or len(words) > 2 or not words[0]:
            self._put_bytes(_R_SYNTAX_AUTH)
            return
        if not self._greeted:
            self._put_bytes(_R_NEED_LHLO)
            return
        if self._authed:
            self._put_bytes(_R_AUTH_DONE)
            return
        if self._sender is not None:
            self._put_bytes(_R_AUTH_TXN)
            return
        if not self._hk & H_AUTH:
            self._put_bytes(_R_AUTH_MECH)
            return
        mech = words[0].upper()
        initial = words[1] if len(words) == 2 else None
        self._auth_answer(self._call("auth", mech, initial, _R_AUTH_MECH), _R_AUTH_MECH)

    def _auth_line(self, bytes line):
        self._state = S_CMD
        if line == b"*" or not self._hk & H_AUTH_LINE:
            self._put_bytes(_R_AUTH_CANCEL)
            return
        self._auth_answer(self._call("auth_line", line, _R_AUTH_CANCEL), _R_AUTH_CANCEL)

    def _auth_answer(self, ans, default):
        if _decided(ans):
            self._auth_apply(ans, default)
        else:
            self._hold(K_OTHER, ans, lambda a: self._auth_apply(a, default), "auth")

    def _auth_apply(self, ans, default):
        cdef int code = self._emit(ans, default, answer_code(default))
        if self._state == S_DONE:
            return
        if code == 334:
            self._state = S_AUTH
        elif code == 235:
            self._authed = True
