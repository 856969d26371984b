# Declarations of csrc/server.h and of the compiled server engine (_cserver.pyx),
# so a compiled front end (the proxy) can cimport it.

from libc.stddef cimport ptrdiff_t
from libc.stdint cimport uint64_t


cdef extern from "server.h" nogil:
    ctypedef struct lmtp_dot_state:
        int state
        uint64_t size

    void lmtp_dot_init(lmtp_dot_state *st)
    size_t lmtp_dot_decode(lmtp_dot_state *st, const unsigned char *src, size_t n,
                           unsigned char *dst, size_t *dst_len, int *done)
    ptrdiff_t lmtp_find_crlf(const unsigned char *buf, size_t lo, size_t start, size_t len)
    int lmtp_parse_path(const unsigned char *s, size_t n, size_t *addr, size_t *addr_len,
                        size_t *rest)
    int lmtp_has_ctl(const unsigned char *s, size_t n)
    int lmtp_is_ascii(const unsigned char *s, size_t n)


cdef class DotDecoder:
    cdef lmtp_dot_state _st
    cdef bint _keep
    cdef Py_ssize_t _limit
    cdef list _parts
    cdef public bint done
    cdef public bint overflow


cdef class ServerSession:
    cdef public object context
    cdef public object peer
    cdef public object local
    cdef public long long received
    cdef public long long commands
    cdef object _cfg
    cdef object _handler
    cdef object _hooks
    cdef unsigned int _hk
    cdef object _stats
    # output: bytes gather in _obuf until an instruction needs _out
    cdef char *_obuf
    cdef Py_ssize_t _olen
    cdef Py_ssize_t _ocap
    cdef list _out
    cdef object _w                # None: the output above; else a list (held / a slot's)
    cdef object _held
    cdef list _slots
    cdef bint _content_wait
    cdef list _new_pending
    # input
    cdef bytes _buf
    cdef Py_ssize_t _scan
    cdef int _state
    # session
    cdef bint _greeted
    cdef bint _refused
    cdef bint _tls
    cdef bint _authed
    cdef Py_ssize_t _junk
    # transaction
    cdef object _sender
    cdef list _mail_params
    cdef bint _utf8
    cdef list _rcpts
    cdef list _rcpt_params
    cdef list _rcpt_ids
    cdef Py_ssize_t _rcpt_holes
    cdef Py_ssize_t _rcpt_seq
    cdef int _body
    cdef lmtp_dot_state _dot
    cdef bint _dot_overflow
    cdef bint _too_big
    cdef Py_ssize_t _bdat_left
    cdef Py_ssize_t _bdat_chunk
    cdef bint _bdat_last
    cdef object _bdat_err
    cdef Py_ssize_t _bdat_size
    # the configuration, read once
    cdef Py_ssize_t _max_line
    cdef Py_ssize_t _max_size
    cdef Py_ssize_t _max_rcpts
    cdef Py_ssize_t _max_commands
    cdef bint _chunking
    cdef bint _size_ext
    cdef bint _smtputf8
    cdef bint _eightbit
    cdef bint _dsn
    cdef bint _starttls
    cdef bint _auth
    cdef bint _auth_required
    cdef bint _tls_required
    cdef bytes _greeting
    cdef bytes _lhlo_reply
    cdef bytes _lhlo_reply_tls
    cdef bytes _delivered_text
    cdef bytes _too_big_text
    cdef bytes _quit_reply

    cdef int _put(self, const char *s, Py_ssize_t n) except -1
    cdef int _put_bytes(self, bytes b) except -1
    cdef int _put_item(self, object item) except -1
    cdef int _out_item(self, object item) except -1
    cdef int _push(self) except -1
    cdef list _take(self)
    cdef list _receive(self, object data)
    cdef bint _may_read(self, bytes buf, Py_ssize_t pos)
    cdef int _process(self) except -1
    cdef int _command(self, bytes buf, Py_ssize_t start, Py_ssize_t end) except -1
    cdef int _mail(self, bytes buf, Py_ssize_t a, Py_ssize_t end) except -1
    cdef int _rcpt(self, bytes buf, Py_ssize_t a, Py_ssize_t end) except -1
    cdef int _data(self, bytes arg) except -1
    cdef int _end_of_content(self, Py_ssize_t size, bint too_big) except -1
    cdef int _emit(self, object ans, bytes default, int default_code) except? -2
    cdef int _finish(self, object instruction) except -1
    cdef int _junk_stop(self) except -1
    cdef int _reset_transaction(self, bint completed) except -1
    cdef int _lhlo(self, bytes arg) except -1
    cdef list _accepted(self)
    cdef object _content_sequence_error(self)
    cdef int _start_data(self) except -1
    cdef int _bdat(self, bytes arg) except -1
    cdef int _bdat_chunk_done(self) except -1
    cdef bytes _final_default(self, bytes rcpt, bint too_big)
    cdef int _final_decided(self, object ans, bytes default, int dcode) except -1
    cdef int _rset(self, bytes arg) except -1
    cdef int _quit(self, bytes arg) except -1
    cdef int _simple(self, str hook, unsigned int bit, bytes default) except -1
    cdef int _content_out(self, bytes chunk) except -1
    cdef int _flush_held(self) except -1
    cdef int _rcpt_decided(self, object ans, bytes default, int dcode, bytes addr, list params,
                           object index, Py_ssize_t at) except -1
