# Declarations of the compiled LMTP client engine (see _cproto.pyx).

from cpython.ref cimport PyObject
from libc.stddef cimport ptrdiff_t


cdef extern from "reply.h":
    ctypedef struct lmtp_reply_line:
        size_t start
        size_t end
        size_t next
        size_t text
        int code
        int last

    int LMTP_REPLY_NEED_MORE
    int LMTP_REPLY_LINE
    int LMTP_REPLY_ERR_TOO_LONG
    int LMTP_REPLY_ERR_MALFORMED

    size_t lmtp_find_lf(const unsigned char *buf, size_t start, size_t len) nogil
    int lmtp_reply_scan(const unsigned char *buf, size_t len, size_t start, size_t *scan,
                        ptrdiff_t max_line, lmtp_reply_line *line) nogil
    size_t lmtp_parse_enhanced(const unsigned char *text, size_t n, int code) nogil


cdef class ReplyParser:
    cdef public Py_ssize_t max_line_length
    cdef public Py_ssize_t max_reply_lines
    cdef unsigned char *_buf
    cdef Py_ssize_t _cap
    cdef Py_ssize_t _len
    cdef Py_ssize_t _start   # start of the current line
    cdef Py_ssize_t _scan    # where the search for LF resumes
    cdef int _code           # code of the reply being assembled (0: none yet)
    cdef list _lines         # its lines so far
    cdef object _enhanced    # the enhanced code of its first line, or None
    cdef int _reply_code     # code of the reply _next_reply() returned last

    cdef int _feed(self, const unsigned char *data, Py_ssize_t n) except -1
    cdef object _next_reply(self)
    cdef object _enhanced_of(self, size_t text, size_t end, int code)


cdef class CTransaction:
    # _common.Transaction's fields (see there), typed.
    cdef public list accepted
    cdef public object content
    cdef public object data_reply
    cdef public bint done
    cdef public bint dot_sent
    cdef public list final_replies
    cdef public Py_ssize_t id
    cdef public object mail_reply
    cdef public bint mail_sent
    cdef public list rcpt_replies
    cdef public list recipients
    cdef public list results
    cdef public object sender
    cdef public object waiter


ctypedef struct _CmdRec:
    # One command: queued (line set), then expected (its reply awaited).
    PyObject *line
    PyObject *txn    # a CTransaction, or None
    PyObject *name
    Py_ssize_t idx
    int kind


cdef class _CmdQueue:
    # The commands to send, or whose reply is awaited: a ring of _CmdRec.
    cdef _CmdRec *buf
    cdef Py_ssize_t cap   # a power of two
    cdef Py_ssize_t head
    cdef Py_ssize_t n

    cdef Py_ssize_t size(self)
    cdef int _grow(self) except -1
    cdef _CmdRec *_slot_back(self) except NULL
    cdef _CmdRec *_slot_front(self) except NULL
    cdef int push(self, object line, int kind, object txn, Py_ssize_t idx,
                  object name) except -1
    cdef int push_front(self, object line, int kind, object txn, Py_ssize_t idx,
                        object name) except -1
    cdef int push_rec(self, _CmdRec *rec) except -1
    cdef _CmdRec *first(self)
    cdef int pop_into(self, _CmdRec *out) except -1
    cdef void _drop_all(self)
    cdef int clear(self) except -1
    cdef int drop_txn(self, object txn) except -1


cdef class _Fifo:
    # A queue on a list with a moving head: O(1) push and pop, no tuples.
    cdef list items
    cdef Py_ssize_t head

    cdef Py_ssize_t size(self)
    cdef int push(self, object item) except -1
    cdef int push_front(self, object item) except -1
    cdef object first(self)
    cdef object pop(self)
    cdef int clear(self) except -1


cdef class Connection:
    cdef public object local_name
    cdef public object ignore_keywords
    cdef public object capabilities
    cdef public bint pipelining
    cdef public object error
    cdef public bint closed

    cdef bytes _local_name_bytes
    cdef bint _allow_pipelining
    cdef bint _eof
    cdef ReplyParser _parser
    cdef _CmdQueue _expect  # the receive cursor: commands whose reply is awaited
    cdef _CmdQueue _outq    # the send cursor: commands not yet written
    cdef list _wbuf
    cdef _Fifo _events
    cdef object _content_owed   # DATA sent, content not yet
    cdef object _data_ready     # 354 received, content not yet
    cdef bint _quit_queued
    cdef bint _tls_pending      # STARTTLS queued; nothing more until start_tls_done()
    cdef list _bdat_unsettled   # BDAT LAST sent, outcome unknown (see _pyproto)
    cdef set _reset_covered     # ids of those an RSET already followed
    cdef list _held             # all replies in, not yet proven in step
    cdef Py_ssize_t _bdat_inflight  # BDAT transactions sent since the last proof
    cdef Py_ssize_t _bdat_burst     # ...and how many may be
    cdef object _stream_stopped # a streamed BDAT transaction whose chunks were stopped
    cdef Py_ssize_t _sync_pending
    cdef Py_ssize_t _txn_seq
    cdef list _open
    cdef object _growing        # the transaction whose envelope is open (see _pyproto)
    cdef object _incremental    # the last such: its MAIL/RCPT replies are events too
    cdef object __weakref__

    cdef int _check_usable(self) except -1
    cdef bint _c_usable(self)
    cdef int _c_receive(self, object data) except -1
    cdef object _c_next_event(self)
    cdef object _c_data_to_send(self)
    cdef int _c_end_data(self, object txn) except -1
    cdef object _start(self, object sender, object recipients, object mail_params,
                       object rcpt_params, bint smtputf8, bint chunking, object body)
    cdef int _queue(self, bytes line, int kind, CTransaction txn, Py_ssize_t idx,
                    str name) except -1
    cdef int _queue_content_command(self, CTransaction txn, bint chunking,
                                    object body) except -1
    cdef int _abandoned(self, object txn) except -1
    cdef int _pump(self) except -1
    cdef int _on_reply(self, object reply, int code) except -1
    cdef int _on_data_reply(self, CTransaction txn, object reply, int code) except -1
    cdef int _on_bdat_last(self, CTransaction txn, object reply) except -1
    cdef int _stop_stream(self, CTransaction txn) except -1
    cdef bint _owes_more(self, object txn)
    cdef int _complete(self, CTransaction txn) except -1
    cdef int _settle(self) except -1
    cdef int _release_held(self) except -1
    cdef int _on_eof(self) except -1
    cdef int _break(self, object error, int code, object enhanced, bint desync=*) except -1
