/*
 * LMTP/SMTP reply-line scanner (RFC 5321 4.2, RFC 2033; RFC 3463 status codes).
 *
 * A reply is one or more lines "NNN-text" ending with "NNN text" (or a bare
 * "NNN"); a line ends with LF, and a CR just before that LF is not part of it.
 * The code's digits are checked as RFC 5321 4.2 has them: first 2-5, second
 * 0-5, third 0-9.
 *
 * The scanner works on a caller-owned buffer and never copies: the caller
 * keeps `start` (where the current line begins) and `scan` (where the search
 * for LF resumes), so bytes already searched are never searched again and a
 * peer that drips a long line byte by byte costs O(n) in total.
 *
 * Semantics follow lmtpfast/proto/_pyproto.py (ReplyParser, _parse_line),
 * which is the specification.
 *
 * Dependency-free C99.
 */
#ifndef LMTPFAST_REPLY_H
#define LMTPFAST_REPLY_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

/* lmtp_reply_scan() results. */
#define LMTP_REPLY_NEED_MORE 0       /* no LF yet, and the line is within the limit */
#define LMTP_REPLY_LINE 1            /* a well-formed line: see lmtp_reply_line */
#define LMTP_REPLY_ERR_TOO_LONG (-1) /* the line is longer than max_line */
#define LMTP_REPLY_ERR_MALFORMED (-2) /* bad code digits or separator, or under 3 bytes */

typedef struct {
    size_t start; /* first byte of the line */
    size_t end;   /* end of the line's content: its CR (of CRLF) or its LF */
    size_t next;  /* where the next line starts (after the LF); `start` if no LF was found */
    size_t text;  /* first byte of the text: start + 4, or `end` for a bare "NNN" */
    int code;     /* 200..599, valid with LMTP_REPLY_LINE */
    int last;     /* 1: "NNN text" or "NNN" (the reply's last line); 0: "NNN-text" */
} lmtp_reply_line;

/* Offset of the first LF in buf[from..len), or len if there is none. */
size_t lmtp_find_lf(const unsigned char *buf, size_t from, size_t len);

/*
 * Find and check the line that starts at buf[start], searching for its LF
 * from buf[*scan] (start <= *scan <= len).
 *
 * Always sets line->start and line->next, and updates *scan: to len when no
 * LF was found, else to the byte after the LF. The caller continues at
 * line->next whatever the result, errors included (an erroneous line is
 * skipped, as the spec does).
 *
 *   LMTP_REPLY_NEED_MORE     no LF in buf[*scan..len) and the line can still fit:
 *                            len - start <= max_line, or max_line + 1 ending in CR
 *   LMTP_REPLY_ERR_TOO_LONG  no LF and the line cannot fit any more, or the
 *                            line's content (CR excluded) is longer than max_line
 *   LMTP_REPLY_ERR_MALFORMED line->end is set: the bad line is buf[start..end)
 *   LMTP_REPLY_LINE          every field is set
 *
 * max_line is signed so that any limit the Python side accepts behaves alike.
 */
int lmtp_reply_scan(const unsigned char *buf, size_t len, size_t start, size_t *scan,
                    ptrdiff_t max_line, lmtp_reply_line *line);

/*
 * Length of the RFC 3463 enhanced status code at the start of text[0..n)
 * ("class.subject.detail": class 2, 4 or 5 and equal to code's first digit,
 * subject and detail 1-3 digits, then a space or the end), or 0 if there is
 * none. 5 <= result <= 9.
 */
size_t lmtp_parse_enhanced(const unsigned char *text, size_t n, int code);

#ifdef __cplusplus
}
#endif

#endif /* LMTPFAST_REPLY_H */
