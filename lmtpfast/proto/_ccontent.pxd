# Declarations of csrc/content.h (the C encoder) and of the compiled
# ContentEncoder, so other Cython modules (the protocol core) can cimport
# it and call it without going through Python attribute lookups.

from libc.stddef cimport ptrdiff_t
from libc.stdint cimport uint64_t


cdef extern from "content.h" nogil:
    ctypedef struct lmtp_enc_state:
        int at_line_start
        int after_cr
        int saw_8bit
        uint64_t in_ "in"
        uint64_t out

    size_t LMTP_ENCODE_BOUND(size_t n)
    size_t LMTP_ENCODE_MAX_INPUT
    enum:
        LMTP_FINISH_MAX
        LMTP_ENC_ERR_NUL
        LMTP_ENC_ERR_TOO_BIG

    void lmtp_enc_init(lmtp_enc_state *st)
    ptrdiff_t lmtp_encode(lmtp_enc_state *st, const unsigned char *src, size_t n,
                          unsigned char *dst, int dot_stuff, size_t *nul_offset)
    size_t lmtp_encoded_size(const lmtp_enc_state *st, const unsigned char *src, size_t n,
                             int dot_stuff)
    size_t lmtp_encode_finish(lmtp_enc_state *st, unsigned char *dst)


cdef class ContentEncoder:
    cdef lmtp_enc_state _st
    cdef bint _dot_stuff

    cdef bytes _encode(self, const unsigned char *src, Py_ssize_t n)
