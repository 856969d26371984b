/*
 * Server side of LMTP: DATA decoder, command-line finder, path parser.
 * See server.h; the Python reference is lmtpfast/server/_data.py and
 * lmtpfast/server/_session.py.
 */
#include "server.h"

#include <string.h>

void lmtp_dot_init(lmtp_dot_state *st)
{
    /* A virtual CR LF before the content: ". CR LF" as the first line ends
     * it, and a first line starting with '.' is un-stuffed like any other. */
    st->state = LMTP_DOT_LINE_START;
    st->size = 0;
}

size_t lmtp_dot_decode(lmtp_dot_state *st, const unsigned char *src, size_t n,
                       unsigned char *dst, size_t *dst_len, int *done)
{
    size_t i = 0, o = 0;
    uint64_t size = st->size;
    int s = st->state;
    unsigned char c;

#define EMIT(ch)                     \
    do {                             \
        if (dst != NULL)             \
            dst[o] = (ch);           \
        o++;                         \
    } while (0)

    *done = 0;
    while (i < n) {
        switch (s) {
        case LMTP_DOT_MID: {
            /* Inside a line only a CR matters: copy up to it in one go. */
            const unsigned char *cr = memchr(src + i, '\r', n - i);
            size_t stop = cr != NULL ? (size_t)(cr - src) : n;
            if (dst != NULL)
                memcpy(dst + o, src + i, stop - i);
            o += stop - i;
            i = stop;
            if (cr != NULL) {
                EMIT('\r');
                i++;
                s = LMTP_DOT_CR;
            }
            break;
        }
        case LMTP_DOT_CR:
            c = src[i++];
            EMIT(c);
            s = c == '\n' ? LMTP_DOT_LINE_START : c == '\r' ? LMTP_DOT_CR : LMTP_DOT_MID;
            break;
        case LMTP_DOT_LINE_START:
            c = src[i++];
            if (c == '.') {
                s = LMTP_DOT_DOT; /* stuffing, or the end: never content */
            } else {
                EMIT(c);
                s = c == '\r' ? LMTP_DOT_CR : LMTP_DOT_MID;
            }
            break;
        case LMTP_DOT_DOT:
            c = src[i++];
            if (c == '\r') {
                s = LMTP_DOT_DOT_CR; /* held: the end marker, or content */
            } else {
                EMIT(c); /* the dot was stuffing; a bare LF is no line end */
                s = LMTP_DOT_MID;
            }
            break;
        default: /* LMTP_DOT_DOT_CR */
            c = src[i++];
            if (c == '\n') {
                *done = 1; /* CR LF . CR LF: the CR LF before the dot is content */
                s = LMTP_DOT_LINE_START;
                goto out;
            }
            EMIT('\r');
            EMIT(c);
            s = c == '\r' ? LMTP_DOT_CR : LMTP_DOT_MID;
            break;
        }
    }
out:
#undef EMIT
    st->state = s;
    st->size = size + o;
    if (dst_len != NULL)
        *dst_len = o;
    return i;
}

ptrdiff_t lmtp_find_crlf(const unsigned char *buf, size_t lo, size_t from, size_t len)
{
    while (from < len) {
        const unsigned char *lf = memchr(buf + from, '\n', len - from);
        size_t at;
        if (lf == NULL)
            return -1;
        at = (size_t)(lf - buf);
        if (at > lo && buf[at - 1] == '\r')
            return (ptrdiff_t)(at - 1);
        from = at + 1; /* a bare LF: the line goes on */
    }
    return -1;
}

int lmtp_has_ctl(const unsigned char *s, size_t n)
{
    size_t i;
    for (i = 0; i < n; i++)
        if (s[i] < 0x20 || s[i] == 0x7f)
            return 1;
    return 0;
}

int lmtp_is_ascii(const unsigned char *s, size_t n)
{
    size_t i;
    for (i = 0; i < n; i++)
        if (s[i] >= 0x80)
            return 0;
    return 1;
}

static const unsigned char *find_byte(const unsigned char *s, size_t from, size_t n, unsigned char c)
{
    return from < n ? memchr(s + from, c, n - from) : NULL;
}

int lmtp_parse_path(const unsigned char *s, size_t n, size_t *addr, size_t *addr_len,
                    size_t *rest)
{
    size_t b = 0, j, a, e, i;
    const unsigned char *p;

    while (b < n && s[b] == ' ')
        b++;
    if (b >= n || s[b] != '<')
        return -1;
    if (b + 1 < n && s[b + 1] == '"') {
        /* A quoted local part may hold '>' and spaces: find its end quote. */
        size_t q;
        i = b + 2;
        for (;;) {
            p = find_byte(s, i, n, '"');
            if (p == NULL)
                return -1;
            q = (size_t)(p - s);
            if (s[q - 1] != '\\')
                break;
            i = q + 1;
        }
        p = find_byte(s, q, n, '>');
        if (p == NULL)
            return -1;
        j = (size_t)(p - s);
        a = b + 1;
        e = j;
        if (lmtp_has_ctl(s + a, e - a))
            return -1;
    } else {
        p = find_byte(s, b, n, '>');
        if (p == NULL)
            return -1;
        j = (size_t)(p - s);
        a = b + 1;
        e = j;
        if (a < e && s[a] == '@') {
            /* An RFC 5321 source route, <@a,@b:user@c>: dropped. */
            p = find_byte(s, a, e, ':');
            if (p == NULL)
                return -1;
            a = (size_t)(p - s) + 1;
        }
        for (i = a; i < e; i++) {
            unsigned char c = s[i];
            if (c <= 0x20 || c == 0x7f || c == '<' || c == '>' || c == '\\')
                return -1;
        }
    }
    if (j + 1 < n && s[j + 1] != ' ')
        return -1;
    *addr = a;
    *addr_len = e - a;
    *rest = j + 1 < n ? j + 2 : n;
    return 0;
}
