"""Message content encoder, compiled over csrc/content.c.

Same behaviour as :mod:`lmtpfast.proto._pycontent` (the spec), byte for byte
and error for error; that module documents the rules. Input is read through
the buffer protocol without copying (bytes, bytearray, memoryview, mmap...).
"""

cimport cython
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport (
    PyBytes_AS_STRING,
    PyBytes_CheckExact,
    PyBytes_FromStringAndSize,
    PyBytes_GET_SIZE,
)
from cpython.mem cimport PyMem_RawFree, PyMem_RawMalloc
from cpython.ref cimport PyObject

from lmtpfast.proto._pycontent import _nul_error

__all__ = ["ContentEncoder", "encode_content"]


cdef extern from "Python.h":
    # Raw-pointer forms, to fill a new bytes object before Cython owns it.
    PyObject *_bytes_new "PyBytes_FromStringAndSize" (const char *v, Py_ssize_t n) except NULL
    char *_bytes_data "PyBytes_AS_STRING" (PyObject *o) nogil
    void _decref "Py_DECREF" (PyObject *o)


cdef enum:
    # Chunks up to this size are encoded into a stack buffer (no heap
    # scratch), then copied once into the result.
    _STACK_INPUT = 4096
    # Chunks at least this big are encoded without the GIL.
    _NOGIL_INPUT = 256 * 1024
    # Chunks at least this big are sized exactly before encoding rather than
    # going through a 2n scratch block: from 2n = 32 MiB (glibc's largest
    # adaptive mmap threshold) the scratch is a fresh mmap every time, and
    # 3n peak memory starts to matter.
    _EXACT_INPUT = 16 * 1024 * 1024


cdef bytes _encode_buf(lmtp_enc_state *st, const unsigned char *src, Py_ssize_t n,
                       bint dot_stuff, bint finish, bint immutable):
    # immutable: src is the buffer of an exact bytes object.
    cdef unsigned char stack[2 * _STACK_INPUT + 2]
    cdef ptrdiff_t r
    cdef size_t nul = 0

    if n <= _STACK_INPUT:
        r = lmtp_encode(st, src, <size_t>n, stack, dot_stuff, &nul)
        if r < 0:
            raise _nul_error(nul)
        if finish:
            r += <ptrdiff_t>lmtp_encode_finish(st, stack + r)
        if r == 0:
            return b""
        return PyBytes_FromStringAndSize(<char *>stack, r)

    if <size_t>n > LMTP_ENCODE_MAX_INPUT:
        raise OverflowError("message content chunk too large")
    if n < _EXACT_INPUT:
        return _encode_via_scratch(st, src, n, dot_stuff, finish)
    return _encode_exact(st, src, n, dot_stuff, finish, immutable)


cdef bytes _encode_via_scratch(lmtp_enc_state *st, const unsigned char *src, Py_ssize_t n,
                               bint dot_stuff, bint finish):
    # Encode into a 2n scratch block, then copy into a bytes of the exact
    # size. 2n holds whatever the bytes, so the GIL can go even for a
    # bytearray another thread might write to. Shrinking an over-sized bytes instead (realloc) looks cheaper but
    # is not: the block glibc then frees is only ~n, so its adaptive mmap
    # threshold never grows past the next 2n request, and every chunk gets
    # a fresh mmap whose pages all fault (measured 4x slower from 256 KiB).
    cdef ptrdiff_t r
    cdef size_t nul = 0
    cdef unsigned char *dst = <unsigned char *>PyMem_RawMalloc(
        LMTP_ENCODE_BOUND(<size_t>n) + LMTP_FINISH_MAX)
    if dst == NULL:
        raise MemoryError()
    try:
        if n >= _NOGIL_INPUT:
            with nogil:
                r = lmtp_encode(st, src, <size_t>n, dst, dot_stuff, &nul)
        else:
            r = lmtp_encode(st, src, <size_t>n, dst, dot_stuff, &nul)
        if r < 0:
            raise _nul_error(nul)
        if finish:
            r += <ptrdiff_t>lmtp_encode_finish(st, dst + r)
        return PyBytes_FromStringAndSize(<char *>dst, r)
    finally:
        PyMem_RawFree(dst)


cdef bytes _encode_exact(lmtp_enc_state *st, const unsigned char *src, Py_ssize_t n,
                         bint dot_stuff, bint finish, bint immutable):
    # Size first (a read-only pass), then encode straight into the result:
    # peak memory n instead of 3n for a big message sent in one call.
    # Both passes must see the same state and the same bytes, or the second
    # could overrun the size the first found: so they run on a private copy
    # of the state, and without the GIL only over an immutable bytes object
    # (another thread could write into a bytearray meanwhile).
    cdef lmtp_enc_state local = st[0]
    cdef ptrdiff_t r
    cdef size_t cap
    cdef size_t nul = 0
    cdef unsigned char *dst
    cdef PyObject *res
    cdef bytes out
    if immutable:
        with nogil:
            cap = lmtp_encoded_size(&local, src, <size_t>n, dot_stuff)
    else:
        cap = lmtp_encoded_size(&local, src, <size_t>n, dot_stuff)
    # finish() adds CRLF exactly when the chunk does not end a line.
    if finish and src[n - 1] != 13 and src[n - 1] != 10:
        cap += LMTP_FINISH_MAX
    res = _bytes_new(NULL, <Py_ssize_t>cap)
    dst = <unsigned char *>_bytes_data(res)
    if immutable:
        with nogil:
            r = lmtp_encode(&local, src, <size_t>n, dst, dot_stuff, &nul)
    else:
        r = lmtp_encode(&local, src, <size_t>n, dst, dot_stuff, &nul)
    if r < 0:
        _decref(res)
        raise _nul_error(nul)
    if finish:
        r += <ptrdiff_t>lmtp_encode_finish(&local, dst + r)
    if <size_t>r != cap:
        # lmtp_encoded_size() disagrees with lmtp_encode(): a bug, say so.
        _decref(res)
        raise SystemError(f"content encoder: sized {cap} bytes, wrote {r}")
    st[0] = local
    out = <bytes>res
    _decref(res)  # the cast above took its own reference
    return out


cdef bytes _encode_obj(lmtp_enc_state *st, object data, bint dot_stuff, bint finish):
    cdef Py_buffer view
    if PyBytes_CheckExact(data):
        return _encode_buf(st, <const unsigned char *>PyBytes_AS_STRING(data),
                           PyBytes_GET_SIZE(data), dot_stuff, finish, True)
    try:
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    except BufferError:
        # Not contiguous (a strided memoryview): its bytes in C order, as
        # memoryview.tobytes() gives them to the Python twin.
        return _encode_obj(st, memoryview(data).tobytes(), dot_stuff, finish)
    try:
        return _encode_buf(st, <const unsigned char *>view.buf, view.len, dot_stuff, finish,
                           False)
    finally:
        PyBuffer_Release(&view)


@cython.auto_pickle(False)
@cython.final
@cython.embedsignature(False)  # Cython writes "(dot_stuff=True, *)": stubtest needs the real one
cdef class ContentEncoder:
    """ContentEncoder(*, dot_stuff=True)
--

Streaming encoder for one message: feed chunks to :meth:`encode`, then call :meth:`finish`.

    ``dot_stuff=True`` for DATA, ``False`` for BDAT (same line-end
    normalisation, no dot-stuffing). A chunk holding a NUL raises
    :class:`~lmtpfast.ContentError` and is refused as a whole: the
    encoder's state is as before the call. Not thread-safe: one encoder per message.
    """

    def __cinit__(self):
        lmtp_enc_init(&self._st)
        self._dot_stuff = True

    def __init__(self, *, dot_stuff=True):
        lmtp_enc_init(&self._st)  # calling __init__ again starts over, as in Python
        self._dot_stuff = bool(dot_stuff)

    @property
    def dot_stuff(self):
        """Whether lines starting with ``.`` are stuffed (DATA) or not (BDAT)."""
        return self._dot_stuff

    @property
    def bytes_in(self):
        """Bytes of message content accepted so far."""
        return self._st.in_

    @property
    def bytes_out(self):
        """Bytes produced so far by :meth:`encode` and :meth:`finish`."""
        return self._st.out

    @property
    def saw_8bit(self):
        """Whether some accepted byte was >= 0x80 (the message needs ``BODY=8BITMIME``)."""
        return self._st.saw_8bit != 0

    def encode(self, data):
        """Encode one chunk of the message; returns the bytes to send (maybe ``b""``)."""
        return _encode_obj(&self._st, data, self._dot_stuff, False)

    cdef bytes _encode(self, const unsigned char *src, Py_ssize_t n):
        return _encode_buf(&self._st, src, n, self._dot_stuff, False, False)

    def finish(self):
        """``b"\\r\\n"`` if the content so far is non-empty and lacks a final line end, else ``b""``."""
        cdef unsigned char buf[LMTP_FINISH_MAX]
        if lmtp_encode_finish(&self._st, buf):
            return b"\r\n"
        return b""


def encode_content(data, *, dot_stuff=True):
    """Encode a whole message (:meth:`ContentEncoder.encode` then ``finish``).

    A ``str`` is encoded as UTF-8. ``b""`` gives ``b""``. For DATA, send the
    result followed by ``b".\\r\\n"``.
    """
    cdef lmtp_enc_state st
    lmtp_enc_init(&st)
    if isinstance(data, str):
        data = (<str>data).encode("utf-8")
    # One buffer for body and final CRLF: no concatenation copy.
    return _encode_obj(&st, data, bool(dot_stuff), True)
