/*
 * LMTP/SMTP message content encoder: see content.h for the contract.
 *
 * Shape of the hot loop: copy a run of ordinary bytes (anything but CR, LF,
 * NUL) at vector speed, then handle the one special byte by hand. A '.' only
 * matters right after a line end, so the run scanner never looks for it.
 *
 * Vector stores may write past the run they copy; copy_run explains why
 * that stays inside dst.
 */
#include "content.h"

#include <string.h>

#if defined(__SSE2__) && !defined(LMTPFAST_NO_SIMD)
#include <emmintrin.h>
#define LMTP_USE_SSE2 1
#endif

static inline int is_special(unsigned char c)
{
    /* CR (13), LF (10), NUL (0): one compare rejects every byte above 13. */
    return c <= '\r' && (c == '\r' || c == '\n' || c == '\0');
}

#ifdef LMTP_USE_SSE2

static inline unsigned first_bit(unsigned mask)
{
#if defined(__GNUC__) || defined(__clang__)
    return (unsigned)__builtin_ctz(mask);
#else
    unsigned k = 0;
    while (!(mask & 1u)) {
        mask >>= 1;
        k++;
    }
    return k;
#endif
}

/*
 * Copy bytes from *pp to *op up to (not including) the first CR, LF or NUL,
 * or to end, advancing both. Sets *hi nonzero if a byte >= 0x80 was seen; it
 * may also look at bytes after the special one, which is fine: they belong
 * to the same chunk and every byte of a chunk is accepted or the whole chunk
 * refused.
 *
 * Bounds of the 16-byte stores, which may run past the bytes copied. A store
 * at o happens only when at least 16 input bytes remain from p.
 *  - Within LMTP_ENCODE_BOUND(n), whatever the bytes: each consumed input
 *    byte wrote at most two, so o <= dst + 2(p - src) <= dst + 2(n - 16),
 *    and the store ends before dst + 2n.
 *  - Within the exact size (lmtp_encoded_size) of the same bytes in the
 *    same state: every input byte from p on yields at least one output
 *    byte, except an LF swallowed after a CR that itself yielded two, so at
 *    least 16 more output bytes follow o.
 */
static inline void copy_run(const unsigned char **pp, const unsigned char *end,
                            unsigned char **op, unsigned *hi)
{
    const unsigned char *p = *pp;
    unsigned char *o = *op;
    const __m128i cr = _mm_set1_epi8('\r');
    const __m128i lf = _mm_set1_epi8('\n');
    const __m128i zero = _mm_setzero_si128();
    __m128i acc = zero;

    while (end - p >= 16) {
        __m128i v = _mm_loadu_si128((const __m128i *)(const void *)p);
        __m128i m = _mm_or_si128(_mm_or_si128(_mm_cmpeq_epi8(v, cr), _mm_cmpeq_epi8(v, lf)),
                                 _mm_cmpeq_epi8(v, zero));
        unsigned mask = (unsigned)_mm_movemask_epi8(m);
        /* Store first, decide later: cheaper than a memcpy of the exact run. */
        _mm_storeu_si128((__m128i *)(void *)o, v);
        acc = _mm_or_si128(acc, v);
        if (mask) {
            unsigned k = first_bit(mask);
            p += k;
            o += k;
            goto done;
        }
        p += 16;
        o += 16;
    }
    while (p < end && !is_special(*p)) {
        *hi |= *p & 0x80u;
        *o++ = *p++;
    }
done:
    *hi |= (unsigned)_mm_movemask_epi8(acc);
    *pp = p;
    *op = o;
}

#else /* portable word-at-a-time */

#define ONES UINT64_C(0x0101010101010101)
#define HIGHS UINT64_C(0x8080808080808080)

/* Nonzero if some byte of v is zero. It can flag extra bytes above a true
 * zero byte, but never flags a word without one: good enough as a filter,
 * the exact position is then found byte by byte. */
static inline uint64_t has_zero(uint64_t v)
{
    return (v - ONES) & ~v & HIGHS;
}

/* Same contract and bounds argument as the SSE2 copy_run, with 8-byte words. */
static inline void copy_run(const unsigned char **pp, const unsigned char *end,
                            unsigned char **op, unsigned *hi)
{
    const unsigned char *p = *pp;
    unsigned char *o = *op;
    uint64_t acc = 0;

    while (end - p >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        if (has_zero(w) | has_zero(w ^ (ONES * '\r')) | has_zero(w ^ (ONES * '\n')))
            break;
        memcpy(o, &w, 8);
        acc |= w;
        p += 8;
        o += 8;
    }
    while (p < end && !is_special(*p)) {
        acc |= *p;
        *o++ = *p++;
    }
    *hi |= (acc & HIGHS) != 0;
    *pp = p;
    *op = o;
}

#endif

void lmtp_enc_init(lmtp_enc_state *st)
{
    st->at_line_start = 1;
    st->after_cr = 0;
    st->saw_8bit = 0;
    st->in = 0;
    st->out = 0;
}

ptrdiff_t lmtp_encode(lmtp_enc_state *st, const unsigned char *src, size_t n,
                      unsigned char *dst, int dot_stuff, size_t *nul_offset)
{
    const unsigned char *p, *end;
    unsigned char *o = dst;
    int at_line_start, after_cr;
    unsigned hi = 0;

    if (n > LMTP_ENCODE_MAX_INPUT)
        return LMTP_ENC_ERR_TOO_BIG;
    if (n == 0)
        return 0; /* src may be NULL then, and NULL + 0 is not valid C */

    /* Work on copies so a refused chunk leaves *st untouched. */
    at_line_start = st->at_line_start;
    after_cr = st->after_cr;
    p = src;
    end = src + n;

    while (p < end) {
        if (after_cr) {
            after_cr = 0;
            if (*p == '\n') { /* ends the line the CR already ended */
                p++;
                continue;
            }
        }
        if (at_line_start) {
            at_line_start = 0;
            if (dot_stuff && *p == '.') {
                o[0] = '.';
                o[1] = '.';
                o += 2;
                p++;
                continue;
            }
        }
        copy_run(&p, end, &o, &hi);
        if (p == end)
            break;
        if (*p == '\0') {
            if (nul_offset)
                *nul_offset = (size_t)(st->in + (uint64_t)(p - src));
            return LMTP_ENC_ERR_NUL;
        }
        /* CR or LF: either one ends the line; a CR's LF is swallowed above. */
        after_cr = *p == '\r';
        at_line_start = 1;
        o[0] = '\r';
        o[1] = '\n';
        o += 2;
        p++;
    }

    st->at_line_start = at_line_start;
    st->after_cr = after_cr;
    st->saw_8bit |= hi != 0;
    st->in += n;
    st->out += (uint64_t)(o - dst);
    return o - dst;
}

/*
 * lmtp_encoded_size() does not walk the state machine: it uses a closed form
 * that vectorises without branches (1.4x the speed of a walk).
 * Each input byte yields one output byte, plus one for a CR, plus one for an
 * LF, minus two for an LF right after a CR (swallowed), plus one for a '.'
 * right after a CR or LF (stuffed). "Right after" for the first byte of a
 * chunk comes from the state: after_cr, and at_line_start. Tests and the
 * wrapper check that it matches lmtp_encode() exactly.
 */
static inline void count_byte(unsigned c, int prev_cr, int prev_eol, int dot_stuff,
                              size_t *plus, size_t *minus, unsigned *nul)
{
    if (c == '\r') {
        *plus += 1;
    } else if (c == '\n') {
        *plus += 1;
        *minus += prev_cr;
    } else if (c == '.') {
        *plus += (size_t)(dot_stuff && prev_eol);
    } else if (c == '\0') {
        *nul = 1;
    }
}

#ifdef LMTP_USE_SSE2
static inline size_t sum_lanes(__m128i counts)
{
    __m128i s = _mm_sad_epu8(counts, _mm_setzero_si128());
    return (size_t)_mm_cvtsi128_si32(s) + (size_t)_mm_cvtsi128_si32(_mm_srli_si128(s, 8));
}
#endif

size_t lmtp_encoded_size(const lmtp_enc_state *st, const unsigned char *src, size_t n,
                         int dot_stuff)
{
    size_t plus = 0, minus = 0, i = 1;
    unsigned nul = 0;

    if (n > LMTP_ENCODE_MAX_INPUT)
        return SIZE_MAX;
    if (n == 0)
        return 0;
    count_byte(src[0], st->after_cr, st->at_line_start, dot_stuff, &plus, &minus, &nul);

#ifdef LMTP_USE_SSE2
    {
        const __m128i cr = _mm_set1_epi8('\r');
        const __m128i lf = _mm_set1_epi8('\n');
        const __m128i dot = _mm_set1_epi8('.');
        const __m128i zero = _mm_setzero_si128();
        const __m128i stuff = dot_stuff ? _mm_set1_epi8(-1) : zero;
        /* Per-lane counters: each grows by at most 1 per block, so they are
         * summed before 255 blocks can overflow a byte. */
        __m128i plus_acc = zero, minus_acc = zero, nul_acc = zero;
        unsigned blocks = 0;

        for (; n - i >= 16; i += 16) {
            /* The block and the same block shifted back by one byte: the
             * second gives every byte's predecessor (i >= 1, so in bounds). */
            __m128i v = _mm_loadu_si128((const __m128i *)(const void *)(src + i));
            __m128i pv = _mm_loadu_si128((const __m128i *)(const void *)(src + i - 1));
            __m128i is_cr = _mm_cmpeq_epi8(v, cr), is_lf = _mm_cmpeq_epi8(v, lf);
            __m128i prev_cr = _mm_cmpeq_epi8(pv, cr);
            __m128i prev_eol = _mm_or_si128(prev_cr, _mm_cmpeq_epi8(pv, lf));
            __m128i stuffed = _mm_and_si128(_mm_and_si128(_mm_cmpeq_epi8(v, dot), prev_eol), stuff);
            /* Compare results are -1: subtracting them counts. */
            plus_acc = _mm_sub_epi8(plus_acc, _mm_or_si128(_mm_or_si128(is_cr, is_lf), stuffed));
            minus_acc = _mm_sub_epi8(minus_acc, _mm_and_si128(is_lf, prev_cr));
            nul_acc = _mm_or_si128(nul_acc, _mm_cmpeq_epi8(v, zero));
            if (++blocks == 255) {
                plus += sum_lanes(plus_acc);
                minus += sum_lanes(minus_acc);
                plus_acc = minus_acc = zero;
                blocks = 0;
            }
        }
        plus += sum_lanes(plus_acc);
        minus += sum_lanes(minus_acc);
        nul |= _mm_movemask_epi8(nul_acc) != 0;
    }
#endif

    for (; i < n; i++)
        count_byte(src[i], src[i - 1] == '\r', src[i - 1] == '\r' || src[i - 1] == '\n',
                   dot_stuff, &plus, &minus, &nul);
    if (nul)
        return LMTP_ENCODE_BOUND(n); /* lmtp_encode will refuse the chunk */
    return n + plus - 2 * minus;
}

size_t lmtp_encode_finish(lmtp_enc_state *st, unsigned char *dst)
{
    /* A fresh state is at a line start too: empty content stays empty. */
    if (st->at_line_start)
        return 0;
    dst[0] = '\r';
    dst[1] = '\n';
    st->at_line_start = 1;
    st->after_cr = 0;
    st->out += 2;
    return 2;
}
