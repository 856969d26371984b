# cython: language_level=3
"""The compiled LMTP client engine (sans-IO): a port of ``_pyproto``.

``_pyproto`` is the specification: this module follows it line for line and
must behave identically (same events, exceptions, bytes and results). Reply
lines are found and checked by the C scanner in ``csrc/reply.c``; the shared
Python types of ``_common`` (``Reply``, ``Transaction``, the events, the
result builders) are reused, not duplicated.
"""

cimport cython
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.list cimport PyList_GET_SIZE
from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from cpython.tuple cimport PyTuple_New, PyTuple_SET_ITEM
from cpython.ref cimport PyObject, Py_INCREF, Py_XDECREF
from cpython.unicode cimport (
    PyUnicode_DATA,
    PyUnicode_READ_CHAR,
    PyUnicode_Substring,
    PyUnicode_Tailmatch,
    PyUnicode_DecodeASCII,
    PyUnicode_DecodeUTF8,
    PyUnicode_GET_LENGTH,
)
from libc.string cimport memcmp, memcpy, memmove

from .._errors import LocalProtocolError, RemoteProtocolError, ServerDisconnected
from ._common import (
    BDAT_BURST,
    DEFAULT_MAX_LINE_LENGTH,
    DEFAULT_MAX_REPLY_LINES,
    LOST_CODE,
    LOST_ENHANCED,
    NEED_DATA,
    PROTOCOL_CODE,
    PROTOCOL_ENHANCED,
    Capabilities,
    CommandReply,
    ConnectionBroken,
    ReadyForData,
    Reply,
    Transaction,
    TransactionDone,
    check_command_argument,
    check_session_verb,
    encode_address,
    encode_local_name,
    encode_param,
    fail_transaction,
)
from .._results import RecipientResult

__all__ = ["Connection", "ReplyParser"]

# -- Reply objects without the Python-level __init__ call -------------------------
#
# Reply is a plain __slots__ class from _common whose __init__ only stores its
# three arguments. Calling it costs a Python frame per reply, the largest cost
# of parsing once the scanning is in C. When (and only when) Reply still has
# exactly that shape, a reply is built the way object.__new__ + __init__ would:
# tp_alloc, then each slot's member descriptor. Anything else falls back to
# calling Reply(...), so a change to Reply in _common can never be skipped.

cdef extern from *:
    """
    static PyTypeObject *lmtpfast_reply_type = NULL;
    static PyObject *lmtpfast_reply_slots[3] = {NULL, NULL, NULL};

    static int lmtpfast_reply_fast_init(PyObject *type, PyObject *d0, PyObject *d1, PyObject *d2)
    {
        PyObject *ds[3] = {d0, d1, d2};
        int i;
        if (!PyType_Check(type))
            return 0;
        for (i = 0; i < 3; i++)
            if (Py_TYPE(ds[i])->tp_descr_set == NULL)
                return 0;
        Py_INCREF(type);
        Py_XDECREF((PyObject *)lmtpfast_reply_type);
        lmtpfast_reply_type = (PyTypeObject *)type;
        for (i = 0; i < 3; i++) {
            Py_INCREF(ds[i]);
            Py_XDECREF(lmtpfast_reply_slots[i]);
            lmtpfast_reply_slots[i] = ds[i];
        }
        return 1;
    }

    static PyObject *lmtpfast_reply_fast(PyObject *code, PyObject *enhanced, PyObject *lines)
    {
        PyTypeObject *t = lmtpfast_reply_type;
        PyObject *vals[3] = {code, enhanced, lines};
        PyObject *r = t->tp_alloc(t, 0);
        int i;
        if (r == NULL)
            return NULL;
        for (i = 0; i < 3; i++) {
            PyObject *d = lmtpfast_reply_slots[i];
            if (Py_TYPE(d)->tp_descr_set(d, r, vals[i]) < 0) {
                Py_DECREF(r);
                return NULL;
            }
        }
        return r;
    }
    """
    int lmtpfast_reply_fast_init(object type, object d0, object d1, object d2) except -1
    object lmtpfast_reply_fast(object code, object enhanced, object lines)

cdef extern from *:
    """
    /* An event of one slot (ReadyForData, TransactionDone) built as
       object.__new__ + its __init__ would: tp_alloc, then the slot's descriptor. */
    static PyObject *lmtpfast_event_fast(PyObject *type, PyObject *descr, PyObject *value)
    {
        PyTypeObject *t = (PyTypeObject *)type;
        PyObject *r = t->tp_alloc(t, 0);
        if (r == NULL)
            return NULL;
        if (Py_TYPE(descr)->tp_descr_set(descr, r, value) < 0) {
            Py_DECREF(r);
            return NULL;
        }
        return r;
    }
    """
    object lmtpfast_event_fast(object type, object descr, object value)


_REPLY_FIELDS = ("code", "enhanced", "lines")

# What Reply.__init__ must compile to, byte for byte, for the fast path.
_REFERENCE_INIT = """
def __init__(self, code, enhanced, lines):
    self.code = code
    self.enhanced = enhanced
    self.lines = lines
"""


def _same_code(a, b):
    return (
        a.co_code == b.co_code
        and a.co_consts == b.co_consts
        and a.co_names == b.co_names
        and a.co_varnames == b.co_varnames
        and a.co_argcount == b.co_argcount
        and a.co_kwonlyargcount == b.co_kwonlyargcount
        # The low flags say what kind of function it is; the high ones are
        # __future__ imports, which do not change what the body does.
        and a.co_flags & 0xFFFF == b.co_flags & 0xFFFF
    )


def _reply_fast_path_ok():
    """Whether Reply still is the three-slot class the fast constructor mimics."""
    if type(Reply) is not type or Reply.__mro__ != (Reply, object):
        return False
    if set(getattr(Reply, "__slots__", ())) != set(_REPLY_FIELDS):
        return False
    if Reply.__new__ is not object.__new__:
        return False
    init = Reply.__dict__.get("__init__")
    namespace = {}
    exec(_REFERENCE_INIT, namespace)
    reference = namespace["__init__"]
    code = getattr(init, "__code__", None)
    if code is None or not _same_code(code, reference.__code__):
        return False
    if init.__defaults__ or init.__kwdefaults__:
        return False
    descrs = [Reply.__dict__.get(name) for name in _REPLY_FIELDS]
    if any(type(d).__name__ != "member_descriptor" for d in descrs):
        return False
    if not lmtpfast_reply_fast_init(Reply, descrs[0], descrs[1], descrs[2]):
        return False
    code, enhanced, lines = 250, "2.1.5", ("2.1.5 ok", "more")
    fast = lmtpfast_reply_fast(code, enhanced, lines)
    slow = Reply(code, enhanced, lines)
    return type(fast) is Reply and fast == slow and all(
        getattr(fast, name) is getattr(slow, name) for name in _REPLY_FIELDS
    )


cdef bint _FAST_REPLY = _reply_fast_path_ok()
_FAST_REPLY_ACTIVE = _FAST_REPLY  # for the tests: a silent fallback would cost ~40% of parse speed


cdef inline object _make_reply(int code, object enhanced, tuple lines):
    if _FAST_REPLY:
        return lmtpfast_reply_fast(code, enhanced, lines)
    return Reply(code, enhanced, lines)


# The same for the per-transaction events (ReadyForData, TransactionDone):
# built without a Python __init__ frame while their class is still the plain
# one-slot class below; otherwise by calling it.
_REFERENCE_EVENT_INIT = """
def __init__(self, transaction):
    self.transaction = transaction
"""


def _event_descriptor(cls):
    """The slot descriptor of ``cls`` when it is the one-slot event class, else None."""
    if type(cls) is not type or cls.__mro__ != (cls, object):
        return None
    if tuple(getattr(cls, "__slots__", ())) != ("transaction",) or cls.__new__ is not object.__new__:
        return None
    init = cls.__dict__.get("__init__")
    namespace = {}
    exec(_REFERENCE_EVENT_INIT, namespace)
    code = getattr(init, "__code__", None)
    if code is None or not _same_code(code, namespace["__init__"].__code__):
        return None
    if init.__defaults__ or init.__kwdefaults__:
        return None
    descr = cls.__dict__.get("transaction")
    if type(descr).__name__ != "member_descriptor" or type(descr).__set__ is None:
        return None
    probe = lmtpfast_event_fast(cls, descr, 1)
    if type(probe) is not cls or probe.transaction != 1:
        return None
    return descr


cdef object _READY_SLOT = _event_descriptor(ReadyForData)
cdef object _DONE_SLOT = _event_descriptor(TransactionDone)
_FAST_EVENTS_ACTIVE = _READY_SLOT is not None and _DONE_SLOT is not None  # for the tests


cdef inline object _ready_event(object txn):
    if _READY_SLOT is not None:
        return lmtpfast_event_fast(ReadyForData, _READY_SLOT, txn)
    return ReadyForData(txn)


cdef inline object _done_event(object txn):
    if _DONE_SLOT is not None:
        return lmtpfast_event_fast(TransactionDone, _DONE_SLOT, txn)
    return TransactionDone(txn)


# -- ReplyParser ------------------------------------------------------------------

cdef enum:
    _MIN_CAPACITY = 4096
    # Enhanced status codes repeat ("2.1.0", "2.1.5", "2.0.0"...): the str
    # objects of the last few are reused. Purely an allocation saving.
    _ENH_CACHE = 8
cdef unsigned char _enh_keys[_ENH_CACHE][10]
cdef size_t _enh_lens[_ENH_CACHE]
cdef list _enh_values = [None] * _ENH_CACHE
cdef int _enh_next = 0


cdef object _enhanced_str(const unsigned char *p, size_t n):
    global _enh_next
    cdef int i
    for i in range(_ENH_CACHE):
        if _enh_lens[i] == n and memcmp(_enh_keys[i], p, n) == 0:
            return _enh_values[i]
    value = PyUnicode_DecodeASCII(<const char *>p, n, NULL)
    i = _enh_next
    _enh_next = (i + 1) % _ENH_CACHE
    memcpy(_enh_keys[i], p, n)
    _enh_lens[i] = n
    _enh_values[i] = value
    return value


@cython.final
cdef class ReplyParser:
    """Splits a byte stream into :class:`Reply` objects.

    Never rescans bytes it has already searched, so a peer that drips a long
    line one byte at a time costs O(n), not O(n^2). Lines may end in CRLF or
    a bare LF. Limits on line length and lines per reply are hard: going over
    is a :class:`RemoteProtocolError`.
    """

    def __cinit__(self):
        self._buf = NULL
        self._cap = self._len = self._start = self._scan = 0
        self._code = 0
        self._lines = []
        self._enhanced = None

    def __init__(
        self,
        max_line_length=DEFAULT_MAX_LINE_LENGTH,
        max_reply_lines=DEFAULT_MAX_REPLY_LINES,
    ):
        self.max_line_length = max_line_length
        self.max_reply_lines = max_reply_lines

    def __dealloc__(self):
        PyMem_Free(self._buf)

    def feed(self, data):
        cdef Py_buffer view
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            self._feed(<const unsigned char *>view.buf, view.len)
        finally:
            PyBuffer_Release(&view)

    cdef int _feed(self, const unsigned char *data, Py_ssize_t n) except -1:
        cdef Py_ssize_t need, cap
        cdef unsigned char *grown
        if self._start == self._len:
            # Everything consumed: start over instead of growing.
            self._start = self._scan = self._len = 0
        need = self._len + n
        if need > self._cap and self._start > 0:
            # Drop the consumed head: what remains is one partial line.
            memmove(self._buf, self._buf + self._start, self._len - self._start)
            self._len -= self._start
            self._scan -= self._start
            self._start = 0
            need = self._len + n
        if need > self._cap:
            cap = max(need, 2 * self._cap, _MIN_CAPACITY)
            grown = <unsigned char *>PyMem_Realloc(self._buf, cap)
            if grown == NULL:
                raise MemoryError()
            self._buf = grown
            self._cap = cap
        if n:
            memcpy(self._buf + self._len, data, n)
            self._len += n
        return 0

    @property
    def buffered(self):
        """Bytes received but not yet part of a complete reply."""
        return self._len - self._start

    @property
    def in_reply(self):
        """True when part of a reply (a line or more) has been received."""
        return self._code != 0 or self._len - self._start > 0

    def next_reply(self):
        """The next complete reply, or ``None`` until more bytes arrive."""
        return self._next_reply()

    cdef object _enhanced_of(self, size_t text, size_t end, int code):
        cdef size_t n = lmtp_parse_enhanced(self._buf + text, end - text, code)
        if n == 0:
            return None
        return _enhanced_str(self._buf + text, n)

    cdef object _next_reply(self):
        cdef lmtp_reply_line ln
        cdef size_t scan
        cdef int rc, code
        cdef object text, enhanced
        cdef tuple lines
        while True:
            scan = <size_t>self._scan
            rc = lmtp_reply_scan(self._buf, <size_t>self._len, <size_t>self._start, &scan,
                                 self.max_line_length, &ln)
            self._scan = <Py_ssize_t>scan
            self._start = <Py_ssize_t>ln.next
            if rc == LMTP_REPLY_NEED_MORE:
                return None
            if rc == LMTP_REPLY_ERR_TOO_LONG:
                raise RemoteProtocolError(f"reply line longer than {self.max_line_length} bytes")
            if rc == LMTP_REPLY_ERR_MALFORMED:
                bad = PyBytes_FromStringAndSize(<const char *>self._buf + ln.start,
                                                ln.end - ln.start)
                raise RemoteProtocolError(f"malformed reply line {bad!r}")
            code = ln.code
            if self._code and code != self._code:
                raise RemoteProtocolError(
                    f"reply code changed from {self._code} to {code} inside a multi-line reply"
                )
            text = PyUnicode_DecodeUTF8(<const char *>self._buf + ln.text, ln.end - ln.text,
                                        b"replace")
            if ln.last:
                if self._code == 0:
                    # A one-line reply: the common case, no list.
                    lines = PyTuple_New(1)
                    Py_INCREF(text)
                    PyTuple_SET_ITEM(lines, 0, text)
                    enhanced = self._enhanced_of(ln.text, ln.end, code)
                else:
                    self._lines.append(text)
                    lines = tuple(self._lines)
                    self._lines = []
                    enhanced = self._enhanced
                    if enhanced is None:
                        # Some servers (Cyrus) put the code on the last line only.
                        enhanced = self._enhanced_of(ln.text, ln.end, code)
                    self._enhanced = None
                    self._code = 0
                self._reply_code = code
                return _make_reply(code, enhanced, lines)
            if self._code == 0:
                self._enhanced = self._enhanced_of(ln.text, ln.end, code)
            self._code = code
            self._lines.append(text)
            if PyList_GET_SIZE(self._lines) >= self.max_reply_lines:
                raise RemoteProtocolError(f"reply longer than {self.max_reply_lines} lines")

    def take_buffered(self):
        """Remove and return the bytes not yet part of a reply (STARTTLS checks them)."""
        if self._len == self._start:
            rest = b""
        else:
            rest = PyBytes_FromStringAndSize(<const char *>self._buf + self._start,
                                             self._len - self._start)
        self._start = self._scan = self._len = 0
        return rest


# -- Connection -------------------------------------------------------------------

# What the receive cursor expects next (a _Cmd's kind); as in _pyproto.
cdef enum:
    _GREETING = 0
    _LHLO = 1
    _MAIL = 2
    _RCPT = 3
    _DATA = 4
    _DOT = 5          # one reply after the final dot, for one accepted recipient
    _LONE_DOT = 6     # the reply to a "." sent after 354 when no recipient was accepted
    _RSET_INTERNAL = 7  # RSET we sent to clean up after a failed transaction
    _COMMAND = 8      # a session command the caller asked for
    _BDAT_CHUNK = 9   # the reply to a BDAT chunk that is not the last
    _BDAT_LAST = 10   # the replies to BDAT LAST: one per accepted recipient (or one, if none)
    _BDAT_START = 11  # queue marker, never sent: the caller streams BDAT chunks from here

cdef tuple _STAGE_NAMES = (
    "greeting", "lhlo", "mail", "rcpt", "data", "final", "data", "rset", "command", "data",
    "final",
)

# Commands after which nothing else may be sent until their reply arrives
# (RFC 2920 3.1: LHLO/EHLO, STARTTLS, AUTH, QUIT, NOOP end a group).
cdef frozenset _SYNC_COMMANDS = frozenset(
    {"LHLO", "STARTTLS", "AUTH", "QUIT", "NOOP", "AUTH-RESPONSE"}
)

cdef bytes _CRLF = b"\r\n"
cdef bytes _DOT_LINE = b".\r\n"
cdef bytes _RSET_LINE = b"RSET\r\n"
cdef bytes _DATA_LINE = b"DATA\r\n"


@cython.final
@cython.freelist(64)
cdef class CTransaction:
    """``_common.Transaction`` as the compiled engine keeps it: the same fields, typed.

    Registered as a virtual subclass of ``_common.Transaction`` (``isinstance``
    holds for both engines' transactions); the engine reads and writes its
    fields in C instead of through slot descriptors, and builds it without a
    Python ``__init__`` frame. The layers above see the same attributes.
    """

    def __init__(self, txn_id, sender, recipients):
        _init_transaction(self, txn_id, sender, list(recipients))

    def __repr__(self):
        return (
            f"<Transaction {self.id} from={self.sender!r} rcpts={len(self.recipients)}"
            f" done={self.done}>"
        )


Transaction.register(CTransaction)


cdef inline CTransaction _new_transaction(Py_ssize_t txn_id, object sender, list recipients):
    cdef CTransaction t = CTransaction.__new__(CTransaction)
    _init_transaction(t, txn_id, sender, recipients)
    return t


cdef inline int _init_transaction(CTransaction t, Py_ssize_t txn_id, object sender,
                                  list recipients) except -1:
    # What _common.Transaction.__init__ sets, field for field.
    cdef Py_ssize_t n = len(recipients)
    t.id = txn_id
    t.sender = sender
    t.recipients = recipients
    t.mail_reply = None
    t.rcpt_replies = [None] * n
    t.data_reply = None
    t.final_replies = [None] * n
    t.accepted = []
    t.mail_sent = False
    t.dot_sent = False
    t.done = False
    t.results = []
    t.content = None
    t.waiter = None
    return 0


@cython.final
cdef class _CmdQueue:
    """A queue of commands (``_CmdRec``) in a C ring buffer: no object per command.

    Each record holds a reference to its line, transaction and name (``None``
    when absent, never NULL while queued). ``pop_into`` moves a record's
    references to the caller, who drops them with ``_rec_clear``;
    ``push_rec`` moves them back in.
    """

    def __cinit__(self):
        self.buf = <_CmdRec *>PyMem_Malloc(16 * sizeof(_CmdRec))
        if self.buf == NULL:
            raise MemoryError()
        self.cap = 16
        self.head = 0
        self.n = 0

    def __dealloc__(self):
        if self.buf != NULL:
            self._drop_all()
            PyMem_Free(self.buf)

    cdef Py_ssize_t size(self):
        return self.n

    cdef int _grow(self) except -1:
        cdef Py_ssize_t cap = self.cap * 2, i
        cdef _CmdRec *grown = <_CmdRec *>PyMem_Malloc(cap * sizeof(_CmdRec))
        if grown == NULL:
            raise MemoryError()
        for i in range(self.n):
            grown[i] = self.buf[(self.head + i) & (self.cap - 1)]
        PyMem_Free(self.buf)
        self.buf = grown
        self.cap = cap
        self.head = 0
        return 0

    cdef _CmdRec *_slot_back(self) except NULL:
        if self.n == self.cap:
            self._grow()
        self.n += 1
        return &self.buf[(self.head + self.n - 1) & (self.cap - 1)]

    cdef _CmdRec *_slot_front(self) except NULL:
        if self.n == self.cap:
            self._grow()
        self.head = (self.head - 1) & (self.cap - 1)
        self.n += 1
        return &self.buf[self.head]

    cdef int push(self, object line, int kind, object txn, Py_ssize_t idx,
                  object name) except -1:
        _rec_set(self._slot_back(), line, kind, txn, idx, name)
        return 0

    cdef int push_front(self, object line, int kind, object txn, Py_ssize_t idx,
                        object name) except -1:
        _rec_set(self._slot_front(), line, kind, txn, idx, name)
        return 0

    cdef int push_rec(self, _CmdRec *rec) except -1:
        # Moves rec's references into the queue.
        self._slot_back()[0] = rec[0]
        rec.line = rec.txn = rec.name = NULL
        return 0

    cdef _CmdRec *first(self):
        return &self.buf[self.head]

    cdef int pop_into(self, _CmdRec *out) except -1:
        # Moves the first record's references to out (the caller clears it).
        out[0] = self.buf[self.head]
        self.head = (self.head + 1) & (self.cap - 1)
        self.n -= 1
        return 0

    cdef void _drop_all(self):
        cdef _CmdRec rec
        while self.n:
            rec = self.buf[self.head]
            self.head = (self.head + 1) & (self.cap - 1)
            self.n -= 1
            _rec_clear(&rec)
        self.head = 0

    cdef int clear(self) except -1:
        self._drop_all()
        return 0

    cdef int drop_txn(self, object txn) except -1:
        # Removes every record of txn, keeping the others in order.
        cdef Py_ssize_t i, kept = 0, n = self.n
        cdef _CmdRec rec
        cdef PyObject *t = <PyObject *>txn
        for i in range(n):
            rec = self.buf[(self.head + i) & (self.cap - 1)]
            if rec.txn == t:
                _rec_clear(&rec)
            else:
                self.buf[(self.head + kept) & (self.cap - 1)] = rec
                kept += 1
        self.n = kept
        return 0


cdef inline void _rec_set(_CmdRec *rec, object line, int kind, object txn, Py_ssize_t idx,
                          object name):
    Py_INCREF(line)
    Py_INCREF(txn)
    Py_INCREF(name)
    rec.line = <PyObject *>line
    rec.txn = <PyObject *>txn
    rec.name = <PyObject *>name
    rec.idx = idx
    rec.kind = kind


cdef inline void _rec_clear(_CmdRec *rec):
    Py_XDECREF(rec.line)
    Py_XDECREF(rec.txn)
    Py_XDECREF(rec.name)
    rec.line = rec.txn = rec.name = NULL


cdef extern from "Python.h":
    bint PyUnicode_IS_ASCII(object o)
    const Py_ssize_t PY_SSIZE_T_MAX


cdef object _plain(object text, bint address):
    """The compiled fast path of ``_common.encode_address`` or ``encode_param``, or None.

    An address: printable ASCII without a quote, bracket, space or angle
    bracket is accepted by ``address_problem`` as it is. A parameter: a
    non-empty printable ASCII str without a space (bytes 33-126) is what
    ``encode_param`` accepts. Either is encoded without a Python call;
    anything else (empty, non-ASCII, quoted, a literal, bad) goes to the
    shared check, the one definition of what may be sent.
    """
    cdef Py_ssize_t n, i
    cdef const unsigned char *p
    cdef unsigned char ch
    if type(text) is not str or not PyUnicode_IS_ASCII(text):
        return None
    n = PyUnicode_GET_LENGTH(text)
    if n == 0:
        return None
    p = <const unsigned char *>PyUnicode_DATA(text)
    for i in range(n):
        ch = p[i]
        if ch <= 32 or ch >= 127:
            return None
        if address and (ch == 34 or ch == 60 or ch == 62 or ch == 91 or ch == 93):
            return None
    return PyBytes_FromStringAndSize(<const char *>p, n)


cdef bytes _MAIL_HEAD = b"MAIL FROM:<"
cdef bytes _RCPT_HEAD = b"RCPT TO:<"


cdef list _encode_params(object params):
    # Each ESMTP parameter encoded (the shared check for all but plain ones), or None.
    cdef list out = None
    for p in params:
        enc = _plain(p, False)
        if out is None:
            out = []
        out.append(encode_param(p) if enc is None else enc)
    return out


cdef bytes _command_line(bytes head, bytes address, list params):
    """``head + address + b">" + b"".join(b" " + p for p in params) + b"\r\n"``, one copy."""
    cdef Py_ssize_t n = len(head) + len(address) + 3, k
    cdef char *w
    if params is not None:
        for p in params:
            n += 1 + len(<bytes>p)
    out = PyBytes_FromStringAndSize(NULL, n)
    w = PyBytes_AS_STRING(out)
    k = len(head)
    memcpy(w, PyBytes_AS_STRING(head), k)
    w += k
    k = len(address)
    memcpy(w, PyBytes_AS_STRING(address), k)
    w += k
    w[0] = 62  # ">"
    w += 1
    if params is not None:
        for p in params:
            w[0] = 32  # " "
            k = len(<bytes>p)
            memcpy(w + 1, PyBytes_AS_STRING(<bytes>p), k)
            w += 1 + k
    w[0] = 13
    w[1] = 10
    return <bytes>out


cdef inline bint _ok(int code):
    return 200 <= code < 300


cdef inline bint _reply_ok(object reply):
    return reply is not None and 200 <= <int>reply.code < 300


@cython.final
cdef class _Fifo:
    def __cinit__(self):
        self.items = []
        self.head = 0

    cdef Py_ssize_t size(self):
        return PyList_GET_SIZE(self.items) - self.head

    cdef int push(self, object item) except -1:
        self.items.append(item)
        return 0

    cdef int push_front(self, object item) except -1:
        if self.head:
            self.head -= 1
            self.items[self.head] = item
        else:
            self.items.insert(0, item)
        return 0

    cdef object first(self):
        return self.items[self.head]

    cdef object pop(self):
        cdef object item = self.items[self.head]
        self.items[self.head] = None
        self.head += 1
        if self.head == PyList_GET_SIZE(self.items):
            del self.items[:]
            self.head = 0
        elif self.head >= 1024 and 2 * self.head >= PyList_GET_SIZE(self.items):
            del self.items[:self.head]
            self.head = 0
        return item

    cdef int clear(self) except -1:
        del self.items[:]
        self.head = 0
        return 0


cdef class Connection:
    """The client side of one LMTP connection, without I/O.

    The compiled twin of ``_pyproto.Connection``; see there for the contract.
    With PIPELINING (advertised and not disabled) MAIL, every RCPT and DATA
    go out in one write, and the content with its final dot may be followed
    by the next transaction's commands in the same write.
    """

    def __cinit__(self):
        self._expect = _CmdQueue()
        self._outq = _CmdQueue()
        self._events = _Fifo()
        self._wbuf = []
        self._open = []

    def __init__(
        self,
        local_name="localhost",
        *,
        pipelining=True,
        ignore_keywords=(),
        max_line_length=DEFAULT_MAX_LINE_LENGTH,
        max_reply_lines=DEFAULT_MAX_REPLY_LINES,
        bdat_burst=BDAT_BURST,
    ):
        if not isinstance(bdat_burst, int) or bdat_burst < 1:
            raise ValueError(f"bdat_burst must be an integer >= 1, got {bdat_burst!r}")
        self.local_name = local_name
        self._local_name_bytes = encode_local_name(local_name)
        self._allow_pipelining = pipelining
        self.ignore_keywords = tuple(ignore_keywords)
        self._parser = ReplyParser(max_line_length, max_reply_lines)
        self._expect.clear()
        self._expect.push(None, _GREETING, None, 0, "greeting")
        self._outq.clear()
        self._wbuf = []
        self._events.clear()
        self._content_owed = None  # DATA sent, content not yet
        self._data_ready = None  # 354 received, content not yet
        self._quit_queued = False
        self._tls_pending = False  # STARTTLS queued; nothing more until start_tls_done()
        self._bdat_unsettled = []
        self._reset_covered = set()
        self._held = []  # all replies in, not yet proven in step (in order)
        self._bdat_inflight = 0
        self._bdat_burst = bdat_burst
        self._stream_stopped = None
        self._sync_pending = 1  # greeting: nothing goes out before it
        self._txn_seq = 0
        self._open = []  # transactions not yet done (held too), in order
        self._growing = None
        self._incremental = None
        self.capabilities = None
        self.pipelining = False
        self.error = None
        self.closed = False  # QUIT answered or stream ended
        self._eof = False

    # -- state ----------------------------------------------------------------

    @property
    def waiting_for(self):
        """The stage whose reply is awaited first (for timers), or ``None``."""
        cdef _CmdRec *c
        if not self._expect.size():
            return None
        c = self._expect.first()
        if c.kind == _COMMAND:
            return (<object>c.name).lower()
        return _STAGE_NAMES[c.kind]

    @property
    def content_owed(self):
        """The transaction whose content must be sent next, if any."""
        return self._content_owed

    @property
    def idle(self):
        """No reply expected, nothing queued, no open transaction."""
        return (
            not self._expect.size()
            and not self._outq.size()
            and not self._open
            and self.error is None
        )

    @property
    def usable(self):
        """The connection can take new commands."""
        return self._c_usable()

    cdef bint _c_usable(self):
        return (
            self.error is None and not self.closed and not self._quit_queued
            and not self._tls_pending
        )

    @property
    def open_transactions(self):
        return len(self._open)

    # -- input ----------------------------------------------------------------

    def receive_data(self, data):
        """Bytes from the server; ``b""`` means it closed the connection."""
        self._c_receive(data)

    cdef int _c_receive(self, object data) except -1:
        if self.error is not None or self.closed:
            return 0
        if data:
            self._parser.feed(data)
        else:
            # Replies already buffered are still processed before the EOF counts.
            self._eof = True
        return 0

    def next_event(self):
        """The next event, or ``NEED_DATA`` when more bytes are needed."""
        return self._c_next_event()

    cdef object _c_next_event(self):
        cdef _Fifo events = self._events
        cdef ReplyParser parser = self._parser
        while not events.size():
            if self.error is not None or self.closed:
                return NEED_DATA
            try:
                reply = parser._next_reply()
            except RemoteProtocolError as exc:
                self._break(exc, PROTOCOL_CODE, PROTOCOL_ENHANCED)
                continue
            if reply is None:
                if self._eof:
                    self._on_eof()
                    continue
                return NEED_DATA
            self._on_reply(reply, parser._reply_code)
        return events.pop()

    def fail(self, error, code=LOST_CODE, enhanced=LOST_ENHANCED):
        """Break the connection from outside (timeout, write error, cancellation).

        Every open transaction is decided with a made-up ``code`` reply; a
        :class:`ConnectionBroken` event follows.
        """
        if self.error is None and not self.closed:
            self._break(error, code, enhanced)

    def data_to_send(self):
        """The bytes to write now (maybe empty)."""
        return self._c_data_to_send()

    cdef object _c_data_to_send(self):
        if not self._wbuf:
            return b""
        out = b"".join(self._wbuf)
        self._wbuf = []
        return out

    # -- commands ---------------------------------------------------------------

    def lhlo(self):
        """Queue LHLO; its :class:`CommandReply` sets :attr:`capabilities`."""
        self._check_usable()
        self._queue(b"LHLO " + self._local_name_bytes + _CRLF, _LHLO, None, 0, "LHLO")
        self._pump()

    def command(self, verb, argument=None):
        """Queue a session command (``RSET``, ``NOOP``, ``QUIT``, ``STARTTLS``, ``AUTH``...).

        Its reply comes back as ``CommandReply(verb, reply)``. ``AUTH-RESPONSE``
        sends ``argument`` alone as a line (a SASL response).
        """
        self._check_usable()
        verb = check_session_verb(verb)
        if verb == "AUTH-RESPONSE":
            line = check_command_argument(argument or "") + _CRLF
        else:
            line = check_command_argument(verb)
            if argument:
                line += b" " + check_command_argument(argument)
            line += _CRLF
        if verb == "QUIT":
            self._quit_queued = True
        elif verb == "STARTTLS":
            self._tls_pending = True
        self._queue(line, _COMMAND, None, 0, verb)
        self._pump()

    def start_transaction(
        self,
        sender,
        recipients,
        *,
        mail_params=(),
        rcpt_params=None,
        smtputf8=False,
        chunking=False,
        body=None,
    ):
        """Queue MAIL, one RCPT per recipient and DATA (or BDAT); return the transaction.

        See ``_pyproto.Connection.start_transaction`` for ``chunking`` and ``body``.

        Every argument is checked before anything is queued, so a bad address
        raises :class:`LocalProtocolError` and leaves the connection as it was.
        """
        return self._start(sender, recipients, mail_params, rcpt_params, smtputf8, chunking,
                           body)

    cdef object _start(self, object sender, object recipients, object mail_params,
                       object rcpt_params, bint smtputf8, bint chunking, object body):
        # start_transaction without the keyword parsing (the compiled protocol calls it).
        cdef Py_ssize_t i
        cdef list rcpt_lines
        self._check_usable()
        if self.capabilities is None:
            raise LocalProtocolError("LHLO must succeed before a transaction")
        if not recipients:
            raise LocalProtocolError("a transaction needs at least one recipient")
        if self._growing is not None:
            raise LocalProtocolError("a transaction with an open envelope is in progress")
        if rcpt_params is not None and len(rcpt_params) != len(recipients):
            raise LocalProtocolError("rcpt_params must have one entry per recipient")
        enc = _plain(sender, True)
        if enc is None:
            enc = encode_address(sender, allow_empty=True, utf8=smtputf8)
        mail = _command_line(_MAIL_HEAD, enc, _encode_params(mail_params))
        rcpt_lines = []
        i = 0
        for rcpt in recipients:
            enc = _plain(rcpt, True)
            if enc is None:
                enc = encode_address(rcpt, utf8=smtputf8)
            rcpt_lines.append(_command_line(
                _RCPT_HEAD, enc, None if rcpt_params is None else _encode_params(rcpt_params[i])))
            i += 1
        self._txn_seq += 1
        txn = _new_transaction(self._txn_seq, sender, list(recipients))
        self._open.append(txn)
        self._queue(mail, _MAIL, txn, 0, "MAIL")
        i = 0
        for line in rcpt_lines:
            self._queue(line, _RCPT, txn, i, "RCPT")
            i += 1
        self._queue_content_command(txn, chunking, body)
        self._pump()
        return txn

    def send_chunk(self, txn, bytes data, bint last=False):
        """Queue one BDAT chunk of a streamed CHUNKING transaction (after its ReadyForData)."""
        if self.error is not None or txn is self._stream_stopped:
            return  # decided already: nothing more of it may be sent
        if self._data_ready is not txn or self._content_owed is not txn:
            raise LocalProtocolError("send_chunk() for a transaction that is not streaming BDAT")
        if not self.pipelining and self._expect.size():
            raise LocalProtocolError(
                "without PIPELINING each BDAT chunk waits for the reply to the one before "
                "(send the next one on ReadyForData)")
        if last:
            self._wbuf.append(b"BDAT %d LAST\r\n" % len(data))
            self._wbuf.append(data)
            self._expect.push(None, _BDAT_LAST, txn, 0, "BDAT")
            self._data_ready = self._content_owed = None
            txn.dot_sent = True
            self._bdat_unsettled.append(txn)
            self._pump()
        elif data:
            self._wbuf.append(b"BDAT %d\r\n" % len(data))
            self._wbuf.append(data)
            self._expect.push(None, _BDAT_CHUNK, txn, 0, "BDAT")

    def end_data(self, txn):
        """The content of ``txn`` has been written: queue the final dot.

        Only valid after :class:`ReadyForData` for ``txn``; a no-op once the
        connection is broken (the transaction is already decided).
        """
        self._c_end_data(txn)

    cdef int _c_end_data(self, object txn) except -1:
        cdef CTransaction t
        if self.error is not None:
            return 0
        if self._data_ready is not txn:
            raise LocalProtocolError("end_data() for a transaction that is not owed content")
        if self._parser._code != 0 or self._parser._len > self._parser._start:
            # Received before the dot was sent, so it cannot answer the dot.
            self._break(RemoteProtocolError(
                "reply received before the end of the message content: replies out of step"),
                PROTOCOL_CODE, PROTOCOL_ENHANCED, True)
            return 0
        self._data_ready = None
        self._content_owed = None
        self._wbuf.append(_DOT_LINE)
        t = <CTransaction?>txn
        t.dot_sent = True
        for idx in t.accepted:
            self._expect.push(None, _DOT, t, idx, ".")
        self._pump()
        return 0

    # -- a transaction whose envelope grows (RCPT verification by a proxy) -----

    def open_transaction(self, sender, *, mail_params=(), smtputf8=False):
        """Queue MAIL alone (see ``_pyproto.Connection.open_transaction``)."""
        self._check_usable()
        if self.capabilities is None:
            raise LocalProtocolError("LHLO must succeed before a transaction")
        if self._open:
            raise LocalProtocolError("open_transaction() needs a connection with no "
                                     "transaction in progress")
        mail = b"MAIL FROM:<" + encode_address(sender, allow_empty=True, utf8=smtputf8) + b">"
        for p in mail_params:
            mail += b" " + encode_param(p)
        self._txn_seq += 1
        txn = _new_transaction(self._txn_seq, sender, [])
        self._open.append(txn)
        self._growing = self._incremental = txn
        self._queue(mail + _CRLF, _MAIL, txn, 0, "MAIL")
        self._pump()
        return txn

    def add_recipient(self, txn, recipient, params=(), *, smtputf8=False):
        """Queue one more RCPT of an open transaction; its index in ``txn.recipients``."""
        self._check_usable()
        if txn is not self._growing:
            raise LocalProtocolError("add_recipient() for a transaction whose envelope is "
                                     "not open")
        line = b"RCPT TO:<" + encode_address(recipient, utf8=smtputf8) + b">"
        for p in params:
            line += b" " + encode_param(p)
        idx = len(txn.recipients)
        txn.recipients.append(recipient)
        txn.rcpt_replies.append(None)
        txn.final_replies.append(None)
        self._queue(line + _CRLF, _RCPT, txn, idx, "RCPT")
        self._pump()
        return idx

    def close_transaction(self, txn, *, chunking=False, body=None):
        """The envelope is complete: queue DATA, or BDAT (as ``start_transaction``)."""
        self._check_usable()
        if txn is not self._growing:
            raise LocalProtocolError("close_transaction() for a transaction whose envelope "
                                     "is not open")
        if not txn.recipients:
            raise LocalProtocolError("a transaction needs at least one recipient")
        self._growing = None
        self._queue_content_command(txn, chunking, body)
        self._pump()

    def abandon_transaction(self, txn):
        """Give up an open transaction before its content: RSET after its RCPTs."""
        self._check_usable()
        if txn is not self._growing:
            raise LocalProtocolError("abandon_transaction() for a transaction whose envelope "
                                     "is not open")
        self._growing = None
        self._queue(_RSET_LINE, _RSET_INTERNAL, txn, 0, "RSET")
        self._pump()

    cdef int _abandoned(self, object txn) except -1:
        # The RSET of abandon_transaction() was answered: nothing of it was delivered.
        if txn in self._open:
            self._open.remove(txn)
        fail_transaction(txn, LOST_CODE, LOST_ENHANCED,
                         "transaction abandoned before its content was sent", "data")
        self._events.push(TransactionDone(txn))
        return 0

    def start_tls_done(self):
        """TLS is up after ``STARTTLS``: forget the server's capabilities.

        Bytes that arrived after the 220 reply and before the handshake were
        sent in the clear and could be an injection (CVE-2011-0411): they
        break the connection instead of being read as TLS-protected replies.
        """
        partial = self._parser.in_reply
        leftover = self._parser.take_buffered()
        self._tls_pending = False
        if leftover or partial:
            self._break(
                RemoteProtocolError("server sent data after its STARTTLS reply"),
                PROTOCOL_CODE, PROTOCOL_ENHANCED
            )
            return
        self.capabilities = None
        self.pipelining = False

    # -- internals ---------------------------------------------------------------

    cdef int _check_usable(self) except -1:
        if self.error is not None:
            raise LocalProtocolError(f"connection is broken: {self.error}")
        if self.closed or self._quit_queued:
            raise LocalProtocolError("connection is closed (QUIT was sent)")
        if self._tls_pending:
            raise LocalProtocolError("STARTTLS in progress: call start_tls_done() first")
        return 0

    cdef int _queue(self, bytes line, int kind, CTransaction txn, Py_ssize_t idx,
                    str name) except -1:
        self._outq.push(line, kind, txn, idx, name)
        return 0

    cdef int _queue_content_command(self, CTransaction txn, bint chunking,
                                    object body) except -1:
        # DATA, or BDAT LAST with the body, or the marker where streamed BDAT starts.
        if body is not None:
            self._queue(b"BDAT %d LAST\r\n" % len(body) + body, _BDAT_LAST, txn, 0, "BDAT")
        elif chunking:
            self._queue(b"", _BDAT_START, txn, 0, "BDAT")
        else:
            self._queue(_DATA_LINE, _DATA, txn, 0, "DATA")
        return 0

    cdef int _pump(self) except -1:
        """Move queued commands to the write buffer as far as the protocol allows."""
        cdef _CmdQueue outq = self._outq
        cdef _CmdRec c
        cdef int kind
        cdef CTransaction txn
        while outq.size() and self._content_owed is None and not self._sync_pending:
            if not self.pipelining and self._expect.size():
                return 0
            if outq.first().kind == _MAIL and self._bdat_inflight >= self._bdat_burst:
                if self._expect.size():
                    return 0  # let the replies drain: the proof for the BDAT ones sent
                self._bdat_inflight = 0
            outq.pop_into(&c)
            kind = c.kind
            txn = <CTransaction><object>c.txn
            if kind == _BDAT_START:
                # Nothing is sent: the caller streams the chunks now.
                _rec_clear(&c)
                self._content_owed = self._data_ready = txn
                self._bdat_inflight += 1
                self._events.push(_ready_event(txn))
                continue
            if kind == _MAIL and self._bdat_unsettled:
                # A failed BDAT transaction leaves the server inside it (RFC 3030 2).
                self._wbuf.append(_RSET_LINE)
                self._expect.push(None, _RSET_INTERNAL, None, 0, "RSET")
                for t in self._bdat_unsettled:
                    self._reset_covered.add(t.id)
                del self._bdat_unsettled[:]
            self._wbuf.append(<object>c.line)
            Py_XDECREF(c.line)
            c.line = NULL
            sync = kind == _LHLO or (kind == _COMMAND and <object>c.name in _SYNC_COMMANDS)
            self._expect.push_rec(&c)
            if kind == _BDAT_LAST:
                txn.dot_sent = True  # the whole content is on its way
                self._bdat_unsettled.append(txn)
                self._bdat_inflight += 1
            elif kind == _MAIL:
                txn.mail_sent = True
            elif kind == _DATA:
                # Nothing may follow DATA until its content has been sent.
                self._content_owed = txn
            elif sync:
                self._sync_pending += 1
        return 0

    cdef int _on_reply(self, object reply, int code) except -1:
        cdef _CmdRec c
        cdef CTransaction txn
        cdef Py_ssize_t idx
        cdef int kind
        cdef bint stopped
        if not self._expect.size():
            if code == 421:
                # As in _pyproto: a 421 at any time closes the session (RFC 5321 3.8).
                self._break(ServerDisconnected(
                    f"server closed the session: {code} {reply.text}"),
                    LOST_CODE, LOST_ENHANCED, True)
                return 0
            self._break(
                RemoteProtocolError(f"unexpected reply nobody waited for: {code}"),
                PROTOCOL_CODE,
                PROTOCOL_ENHANCED,
                True,
            )
            return 0
        self._expect.pop_into(&c)
        txn = <CTransaction><object>c.txn
        name = <object>c.name
        idx = c.idx
        kind = c.kind
        _rec_clear(&c)
        if 300 <= code < 400 and kind != _DATA and (code == 354 or kind != _COMMAND):
            # As in _pyproto: a 3xx in the wrong place, the stream is shifted.
            stage = name if kind == _COMMAND else _STAGE_NAMES[kind]
            self._break(RemoteProtocolError(
                f"{code} reply while waiting for the {stage.upper()} reply: "
                "replies out of step"),
                PROTOCOL_CODE, PROTOCOL_ENHANCED, True)
            return 0
        if kind == _RCPT:
            txn.rcpt_replies[idx] = reply
            accepted = txn.accepted
            if _ok(code) and _reply_ok(txn.mail_reply):
                accepted.append(idx)
            if txn is self._incremental:
                self._events.push(CommandReply("RCPT", reply))
            if not accepted and idx == len(txn.recipients) - 1 and txn is not self._growing:
                if not self.pipelining:
                    # Every recipient refused: do not send DATA, reset instead.
                    self._outq.drop_txn(txn)
                    self._outq.push_front(_RSET_LINE, _RSET_INTERNAL, None, 0, "RSET")
                    self._complete(txn)
                elif self._data_ready is txn and self._content_owed is txn:
                    # Streaming BDAT and nobody accepted: send no more of it.
                    self._stop_stream(txn)
        elif kind == _DOT:
            txn.final_replies[idx] = reply
            accepted = txn.accepted
            if idx == accepted[len(accepted) - 1]:  # (wraparound is off: no [-1])
                self._complete(txn)
        elif kind == _MAIL:
            txn.mail_reply = reply
            if txn is self._incremental:
                self._events.push(CommandReply("MAIL", reply))
            if not _ok(code) and not self.pipelining and txn is not self._growing:
                self._outq.drop_txn(txn)
                self._complete(txn)
        elif kind == _DATA:
            self._on_data_reply(txn, reply, code)
            if self.error is not None:
                return 0
        elif kind == _LONE_DOT:
            self._complete(txn)
        elif kind == _BDAT_CHUNK:
            stopped = txn is self._stream_stopped
            if not _ok(code) and txn.data_reply is None:
                txn.data_reply = reply  # decides every accepted recipient
                if self._data_ready is txn:
                    self._stop_stream(txn)  # RFC 3030 2: no further chunk
            if stopped:
                if not self._owes_more(txn):
                    self._complete(txn)  # the last chunk reply it was owed
            elif not self.pipelining and self._data_ready is txn:
                self._events.push(_ready_event(txn))  # the next chunk may go
        elif kind == _BDAT_LAST:
            self._on_bdat_last(txn, reply)
        elif kind == _RSET_INTERNAL:
            if not _ok(code):
                self._break(
                    RemoteProtocolError(f"RSET refused: {code} {reply.text}"),
                    PROTOCOL_CODE, PROTOCOL_ENHANCED,
                    True,
                )
                return 0
            if txn is not None:
                self._abandoned(txn)
        else:
            if kind == _LHLO:
                if _ok(code):
                    self.capabilities = caps = Capabilities.from_reply(reply, self.ignore_keywords)
                    self.pipelining = self._allow_pipelining and caps.pipelining
            elif kind == _GREETING:
                pass
            elif name == "QUIT":  # _COMMAND from here on
                self.closed = True
            elif name == "STARTTLS" and not _ok(code):
                self._tls_pending = False  # refused: go on in the clear
            # After a 334 to AUTH the exchange goes on with AUTH-RESPONSE
            # lines, each synchronous again.
            if kind != _COMMAND or name in _SYNC_COMMANDS:
                self._sync_pending -= 1
            # The transactions it proves in step come out before the reply.
            self._settle()
            if self.error is not None:
                return 0
            self._events.push(CommandReply(name, reply))
        if not self._expect.size():
            self._settle()  # (a call only when it can prove something)
        if self.error is None:
            self._pump()
        return 0

    cdef int _on_data_reply(self, CTransaction txn, object reply, int code) except -1:
        if code != 354 and code < 400:
            # As in _pyproto: replies out of step; never a delivery.
            self._break(RemoteProtocolError(
                f"{code} reply to DATA, 354 expected: replies out of step"),
                PROTOCOL_CODE, PROTOCOL_ENHANCED, True)
            return 0
        txn.data_reply = reply
        mail_ok = _reply_ok(txn.mail_reply)
        if code == 354:
            # In its place, so every reply before it was: the proof.
            self._bdat_inflight = 0
            if self._held:
                self._release_held()
            if txn.accepted:
                self._data_ready = txn
                self._events.push(_ready_event(txn))
                return 0  # _content_owed stays set until end_data()
            # 354 although nothing was accepted (possible with pipelining):
            # RFC 2920 says send a lone dot; its reply decides nothing.
            self._content_owed = None
            self._wbuf.append(_DOT_LINE)
            self._expect.push(None, _LONE_DOT, txn, 0, ".")
            return 0
        self._content_owed = None
        if mail_ok:
            # The server still holds the MAIL transaction: clear it before the next one.
            self._outq.push_front(_RSET_LINE, _RSET_INTERNAL, None, 0, "RSET")
        self._complete(txn)
        return 0

    cdef int _on_bdat_last(self, CTransaction txn, object reply) except -1:
        # As in _pyproto: the accepted recipients are known only now.
        cdef list accepted = txn.accepted
        cdef Py_ssize_t n = len(accepted), k
        if n and txn.data_reply is None:
            txn.final_replies[accepted[0]] = reply
            k = n - 1
            while k >= 1:
                self._expect.push_front(None, _DOT, txn, accepted[k], ".")
                k -= 1
            if n == 1:
                self._complete(txn)
            return 0
        if txn.data_reply is None:
            txn.data_reply = reply
        if _reply_ok(txn.mail_reply) and txn.id not in self._reset_covered:
            self._outq.push_front(_RSET_LINE, _RSET_INTERNAL, None, 0, "RSET")
        self._complete(txn)
        return 0

    cdef int _stop_stream(self, CTransaction txn) except -1:
        # As in _pyproto: no more chunks; complete once the sent ones are answered.
        self._data_ready = self._content_owed = None
        self._stream_stopped = txn
        if _reply_ok(txn.mail_reply):
            self._outq.push_front(_RSET_LINE, _RSET_INTERNAL, None, 0, "RSET")
        if not self._owes_more(txn):
            self._complete(txn)
        return 0

    cdef bint _owes_more(self, object txn):
        return self._expect.size() > 0 and self._expect.first().txn == <PyObject *>txn

    cdef int _complete(self, CTransaction txn) except -1:
        # Every reply of txn is in: hold it until the stream is proven in step.
        if txn.dot_sent:
            if txn in self._bdat_unsettled:
                self._bdat_unsettled.remove(txn)
            self._reset_covered.discard(txn.id)
        self._held.append(txn)
        return 0

    cdef int _settle(self) except -1:
        # After a reply: if no reply is expected any more, the held ones are proven.
        if self._expect.size() or self.error is not None:
            return 0
        self._bdat_inflight = 0
        if not self._held:
            return 0
        if self._parser._code != 0 or self._parser._len > self._parser._start:
            # Bytes nobody asked for: a surplus reply, so the ones before may be shifted.
            self._break(RemoteProtocolError(
                "server sent more replies than there were commands: replies out of step"),
                PROTOCOL_CODE, PROTOCOL_ENHANCED, True)
            return 0
        self._release_held()
        return 0

    cdef int _release_held(self) except -1:
        # The stream is proven in step up to here: decide the held transactions.
        cdef list held = self._held
        cdef CTransaction txn
        self._bdat_inflight = 0
        if not held:
            return 0
        for txn in held:
            _finish_transaction(txn)
            self._open.remove(txn)
            self._events.push(_done_event(txn))
        del held[:]
        return 0

    cdef int _on_eof(self) except -1:
        if (self._expect.size() and <object>self._expect.first().name == "QUIT"
                and not self._held):
            self.closed = True
            return 0
        stage = self.waiting_for
        if self._parser.in_reply:
            why = "server closed the connection in the middle of a reply"
        elif stage is not None:
            why = f"lost connection with server while waiting for the {stage.upper()} reply"
        elif self._content_owed is not None:
            why = "lost connection with server while sending message content"
        elif self._open:
            why = "lost connection with server before sending the transaction"
        else:
            why = "server closed an idle connection"
        self._break(ServerDisconnected(why), LOST_CODE, LOST_ENHANCED)
        return 0

    cdef int _break(self, object error, int code, object enhanced, bint desync=False) except -1:
        self.error = error
        failed = self._open
        self._open = []
        stage = self.waiting_for or "mail"
        why = str(error)
        # As in _pyproto: a shifted stream, or held transactions never proven.
        unproven = desync or bool(self._held)
        self._held = []
        for txn in failed:
            # The transaction whose content was being streamed (DATA or BDAT).
            where = "content" if txn is self._data_ready else stage
            fail_transaction(txn, code, enhanced, why, where, unproven=unproven)
        self._expect.clear()
        self._outq.clear()
        self._wbuf = []
        self._content_owed = None
        self._data_ready = None
        self._growing = None
        self._events.push(ConnectionBroken(error, failed))
        return 0


# -- per-recipient results ----------------------------------------------------------
# The compiled twin of _common.finish_transaction / result_from_reply: once per
# recipient, so no Python frame per result.

cdef inline object _text_of(object reply, object enh):
    # Reply.text in C for the one-line reply (once per recipient); else the property.
    cdef tuple lines = reply.lines
    cdef Py_ssize_t cut, n, j
    if len(lines) != 1:
        return reply.text
    line = lines[0]
    if enh is None or type(line) is not str or type(enh) is not str:
        return line if enh is None else reply.text
    cut = PyUnicode_GET_LENGTH(enh)
    n = PyUnicode_GET_LENGTH(line)
    if PyUnicode_Tailmatch(line, enh, 0, PY_SSIZE_T_MAX, -1) != 1:  # line.startswith(enh)
        return line
    if n == cut:
        return ""
    if PyUnicode_READ_CHAR(line, cut) != 32:
        return line
    # line[cut:].lstrip(" "), line[cut] being a space
    j = cut + 1
    while j < n and PyUnicode_READ_CHAR(line, j) == 32:
        j += 1
    return PyUnicode_Substring(line, j, n)


cdef inline object _result(object address, object reply, str stage):
    cdef int code = reply.code
    if 200 <= code < 300:
        status = "delivered"
    elif 500 <= code < 600:
        status = "permanent"
    else:
        status = "transient"
    enh = reply.enhanced
    return RecipientResult(address, status, code, enh, _text_of(reply, enh), stage)


cdef int _finish_transaction(CTransaction txn) except -1:
    cdef list results = []
    cdef list rcpt_replies = txn.rcpt_replies
    cdef list final_replies = txn.final_replies
    cdef Py_ssize_t i = 0
    mail = txn.mail_reply
    mail_failed = mail is not None and not _ok(mail.code)
    data = txn.data_reply
    for address in txn.recipients:
        if mail_failed:
            results.append(_result(address, mail, "mail"))
        else:
            rcpt = rcpt_replies[i]
            if rcpt is None:
                raise AssertionError("transaction finished without a RCPT reply")
            if not _ok(rcpt.code):
                results.append(_result(address, rcpt, "rcpt"))
            else:
                final = final_replies[i]
                if final is not None:
                    results.append(_result(address, final, "final"))
                elif data is not None and data.code != 354:
                    results.append(_result(address, data, "data"))
                else:
                    raise AssertionError("accepted recipient finished without a reply")
        i += 1
    txn.results = results
    txn.done = True
    return 0
