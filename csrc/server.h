/*
 * Server side of LMTP (RFC 2033 over RFC 5321): what the compiled server
 * engine (lmtpfast/server/_cserver.pyx) does per byte.
 *
 *   - the DATA decoder: finds the end of the content and un-stuffs it,
 *     strictly: only CR LF . CR LF ends it (or ". CR LF" as the very first
 *     line); a bare LF is no line end; the first '.' of every line that
 *     begins with one is removed (a line begins at the start of the content
 *     or after CR LF). Any split of the input gives the same result, and no
 *     byte is looked at twice;
 *   - the command-line finder (CR LF, resumable) and the path parser for
 *     MAIL FROM:/RCPT TO: ("<addr> params", quoted local parts, source
 *     routes dropped).
 *
 * Semantics follow lmtpfast/server/_data.py (DotDecoder) and
 * lmtpfast/server/_session.py (parse_path), which are the specification.
 *
 * Dependency-free C99.
 */
#ifndef LMTPFAST_SERVER_H
#define LMTPFAST_SERVER_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Where the decoder stands, relative to the last line start. */
enum {
    LMTP_DOT_LINE_START = 0, /* at a line start (also before the first byte) */
    LMTP_DOT_MID = 1,        /* inside a line */
    LMTP_DOT_CR = 2,         /* after a CR inside a line (written) */
    LMTP_DOT_DOT = 3,        /* after a line-start '.' (dropped either way) */
    LMTP_DOT_DOT_CR = 4      /* after "line start . CR" (the CR held back) */
};

typedef struct {
    int state;
    uint64_t size; /* content bytes so far, un-stuffed */
} lmtp_dot_state;

void lmtp_dot_init(lmtp_dot_state *st);

/*
 * Decode src[0..n). With dst (room for n bytes: the output never grows) the
 * un-stuffed content is written there and *dst_len set; with dst NULL it is
 * only measured (st->size). Returns the number of bytes of src consumed:
 * n when the end was not found, else the offset just after the end line;
 * *done is set to 1 then (the decoder must not be fed again), else 0.
 */
size_t lmtp_dot_decode(lmtp_dot_state *st, const unsigned char *src, size_t n,
                       unsigned char *dst, size_t *dst_len, int *done);

/*
 * Offset of the first CR LF in buf[from..len) (the CR's offset), or -1.
 * Only the LF is searched for; its CR must be at >= lo (the line start).
 */
ptrdiff_t lmtp_find_crlf(const unsigned char *buf, size_t lo, size_t from, size_t len);

/*
 * Parse "<address> [params]" (what follows FROM: or TO:) in s[0..n).
 * Returns 0 and sets *addr/*addr_len (within s) and *rest (offset of the
 * parameters, n if none; they start after a single space) or -1 if it is
 * not a path.
 */
int lmtp_parse_path(const unsigned char *s, size_t n, size_t *addr, size_t *addr_len,
                    size_t *rest);

/* 1 if s[0..n) holds a byte < 0x20 or 0x7f. */
int lmtp_has_ctl(const unsigned char *s, size_t n);

/* 1 if every byte of s[0..n) is < 0x80. */
int lmtp_is_ascii(const unsigned char *s, size_t n);

#ifdef __cplusplus
}
#endif

#endif /* LMTPFAST_SERVER_H */
