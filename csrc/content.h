/*
 * LMTP/SMTP message content encoder: line-end normaliser + dot-stuffer.
 *
 * Makes arbitrary message bytes safe to send after DATA (RFC 5321 4.5.2,
 * RFC 2033) or in BDAT chunks (RFC 3030), so nothing in the message can end
 * the data early (SMTP smuggling, CVE-2023-51764/5/6):
 *
 *   - CRLF stays CRLF; a bare CR and a bare LF each become CRLF
 *     ("\r\r\n" is a bare CR then a CRLF: two line ends);
 *   - with dot_stuff, a line that starts with '.' gets one more '.';
 *   - lmtp_encode_finish() adds CRLF if non-empty content does not end
 *     with a line end (the caller then sends ".\r\n" for DATA);
 *   - a NUL byte is refused.
 *
 * Streaming: feed the message in chunks of any size, split anywhere; the
 * output is the same as for the whole message in one call. A CR written as
 * CRLF at the end of one chunk swallows an LF at the start of the next.
 *
 * Dependency-free C99 (SSE2 on x86-64, portable word-at-a-time elsewhere).
 */
#ifndef LMTPFAST_CONTENT_H
#define LMTPFAST_CONTENT_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
    int at_line_start;   /* the next byte starts a line (a '.' there is stuffed) */
    int after_cr;        /* the last byte was a CR, already written as CRLF:
                            an LF next is part of that line end */
    int saw_8bit;        /* some accepted byte was >= 0x80 (BODY=8BITMIME) */
    uint64_t in;         /* bytes accepted so far */
    uint64_t out;        /* bytes written so far, finish() included */
} lmtp_enc_state;

/* Worst-case output of lmtp_encode() for n input bytes: every byte may
 * become two (a bare CR or LF becomes CRLF, a '.' at a line start "..").
 * lmtp_encode_finish() writes at most LMTP_FINISH_MAX more. */
#define LMTP_ENCODE_BOUND(n) (2 * (size_t)(n))
#define LMTP_FINISH_MAX 2
/* Largest n accepted in one call, so that the bound fits the return type. */
#define LMTP_ENCODE_MAX_INPUT ((size_t)(PTRDIFF_MAX / 2))

#define LMTP_ENC_ERR_NUL (-1)
#define LMTP_ENC_ERR_TOO_BIG (-2)

/* Start of a message: at a line start, nothing seen. */
void lmtp_enc_init(lmtp_enc_state *st);

/*
 * Encode src[0..n) into dst, which must have room for LMTP_ENCODE_BOUND(n)
 * bytes, or for exactly lmtp_encoded_size(st, src, n, dot_stuff) bytes as
 * computed for the same state and the same bytes (if another thread may
 * change src in between, only the first is safe). dst may be written
 * anywhere in that room, past the returned length too. src and dst must
 * not overlap.
 *
 * Returns the number of bytes written, or
 *   LMTP_ENC_ERR_NUL:    src holds a NUL; *nul_offset (if not NULL) is set to
 *                        its offset in the whole stream (st->in + index);
 *   LMTP_ENC_ERR_TOO_BIG: n > LMTP_ENCODE_MAX_INPUT.
 * On error *st is left unchanged: the chunk is refused as a whole.
 *
 * ptrdiff_t rather than ssize_t: ssize_t is POSIX, not C99.
 */
ptrdiff_t lmtp_encode(lmtp_enc_state *st, const unsigned char *src, size_t n,
                      unsigned char *dst, int dot_stuff, size_t *nul_offset);

/*
 * The exact number of bytes lmtp_encode() would write for this chunk in
 * state *st (which is not changed), for sizing dst without the 2x bound:
 * a second pass over the input, but a read-only, branch-free one. If src holds a NUL it
 * returns LMTP_ENCODE_BOUND(n); if n > LMTP_ENCODE_MAX_INPUT, SIZE_MAX.
 */
size_t lmtp_encoded_size(const lmtp_enc_state *st, const unsigned char *src, size_t n,
                         int dot_stuff);

/* Write "\r\n" to dst (room for LMTP_FINISH_MAX) if the content so far is
 * non-empty and does not end with a line end; returns 0 or 2. Idempotent. */
size_t lmtp_encode_finish(lmtp_enc_state *st, unsigned char *dst);

#ifdef __cplusplus
}
#endif

#endif /* LMTPFAST_CONTENT_H */
