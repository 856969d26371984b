/* LMTP/SMTP reply-line scanner: see reply.h. */
#include "reply.h"

#include <string.h>

size_t lmtp_find_lf(const unsigned char *buf, size_t from, size_t len)
{
    if (from >= len)
        return len;
    /* memchr is vectorised by every libc worth the name. */
    const unsigned char *p = memchr(buf + from, '\n', len - from);
    return p ? (size_t)(p - buf) : len;
}

static int is_digit(unsigned char c)
{
    return c >= '0' && c <= '9';
}

int lmtp_reply_scan(const unsigned char *buf, size_t len, size_t start, size_t *scan,
                    ptrdiff_t max_line, lmtp_reply_line *line)
{
    size_t nl = lmtp_find_lf(buf, *scan, len);

    line->start = start;
    if (nl == len) {
        ptrdiff_t pending = (ptrdiff_t)(len - start);
        *scan = len;
        line->next = start;
        /* No line end yet: a line already over the limit cannot get shorter,
         * except that a line of exactly max_line may have its CR here and its
         * LF in the next read. */
        if (pending > max_line
            && !(pending == max_line + 1 && len > 0 && buf[len - 1] == '\r'))
            return LMTP_REPLY_ERR_TOO_LONG;
        return LMTP_REPLY_NEED_MORE;
    }

    size_t end = (nl > start && buf[nl - 1] == '\r') ? nl - 1 : nl;
    *scan = nl + 1;
    line->next = nl + 1;
    line->end = end;

    size_t n = end - start;
    if ((ptrdiff_t)n > max_line)
        return LMTP_REPLY_ERR_TOO_LONG;
    if (n < 3)
        return LMTP_REPLY_ERR_MALFORMED;

    const unsigned char *p = buf + start;
    /* RFC 5321 4.2: first digit 2-5, second 0-5, third 0-9. */
    if (!(p[0] >= '2' && p[0] <= '5' && p[1] >= '0' && p[1] <= '5' && is_digit(p[2])))
        return LMTP_REPLY_ERR_MALFORMED;
    line->code = (p[0] - '0') * 100 + (p[1] - '0') * 10 + (p[2] - '0');

    if (n == 3) {
        line->last = 1;
        line->text = end;
        return LMTP_REPLY_LINE;
    }
    if (p[3] == ' ')
        line->last = 1;
    else if (p[3] == '-')
        line->last = 0;
    else
        return LMTP_REPLY_ERR_MALFORMED;
    line->text = start + 4;
    return LMTP_REPLY_LINE;
}

/* End of a run of 1-3 digits starting at text[i], or 0 if the run is empty or longer. */
static size_t digits_1_to_3(const unsigned char *text, size_t i, size_t n)
{
    size_t j = i;
    while (j < n && is_digit(text[j]))
        j++;
    return (j > i && j - i <= 3) ? j : 0;
}

size_t lmtp_parse_enhanced(const unsigned char *text, size_t n, int code)
{
    if (n < 5 || text[1] != '.')
        return 0;
    unsigned char cls = text[0];
    if ((cls != '2' && cls != '4' && cls != '5') || cls - '0' != code / 100)
        return 0;
    size_t i = digits_1_to_3(text, 2, n); /* subject */
    if (i == 0 || i >= n || text[i] != '.')
        return 0;
    i = digits_1_to_3(text, i + 1, n); /* detail */
    if (i == 0)
        return 0;
    if (i < n && text[i] != ' ')
        return 0;
    return i;
}
