/*
 * CRC-32C of crc32c.h: reflected polynomial 0x82F63B78, initial value and
 * final xor all ones (so crc32c(0, "123456789", 9) == 0xE3069283).
 */
#include <pthread.h>
#include <string.h>

#include "crc32c.h"

#define POLY 0x82F63B78u

static uint32_t table[256];
static pthread_once_t table_once = PTHREAD_ONCE_INIT;

static void make_table(void)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = (c >> 1) ^ (POLY & (0u - (c & 1)));
        table[i] = c;
    }
}

static uint32_t crc_table(uint32_t c, const unsigned char *p, size_t n)
{
    pthread_once(&table_once, make_table);
    while (n--)
        c = table[(c ^ *p++) & 0xFF] ^ (c >> 8);
    return c;
}

#if defined(__x86_64__)
__attribute__((target("sse4.2")))
static uint32_t crc_sse42(uint32_t c, const unsigned char *p, size_t n)
{
    uint64_t c64 = c;
    for (; n >= 8; n -= 8, p += 8) {
        uint64_t v;
        memcpy(&v, p, 8);
        c64 = __builtin_ia32_crc32di(c64, v);
    }
    c = (uint32_t)c64;
    for (; n; n--)
        c = __builtin_ia32_crc32qi(c, *p++);
    return c;
}

/*
 * Long inputs run as three independent streams: the crc32 instruction takes
 * three cycles to give its result but can start one a cycle, so one chain
 * leaves two thirds of it idle. The streams' values are joined with the
 * crc's algebra: in the register's reflected order (bit 31 holds x^0),
 * running a crc over n zero bytes multiplies it by x^(8n) modulo the
 * polynomial, and crc(c, A || B) = crc(c, A) * x^(8|B|) ^ crc(0, B).
 */
#define STREAMS_FROM 768 /* bytes; below this one chain is as fast */

/* a * b modulo POLY, both in the reflected order. */
static uint32_t gf2_mul(uint32_t a, uint32_t b)
{
    uint32_t r = 0;
    for (uint32_t bit = 1u << 31; bit; bit >>= 1) {
        if (a & bit)
            r ^= b;
        b = (b >> 1) ^ (POLY & (0u - (b & 1))); /* b * x */
    }
    return r;
}

/* x^(8n) modulo POLY. */
static uint32_t x_pow_8n(uint64_t n)
{
    uint32_t r = 1u << 31, sq = 1u << 23; /* x^0 and x^8 */
    for (; n; n >>= 1) {
        if (n & 1)
            r = gf2_mul(r, sq);
        sq = gf2_mul(sq, sq);
    }
    return r;
}

/* x^(8n) for a stream length n, remembered: a store sees a few lengths. */
static uint32_t shift_for(uint64_t n)
{
    static uint64_t memo[16]; /* n << 32 | x^(8n); 0 = empty */
    uint64_t *e = &memo[(n >> 3) & 15];
    uint64_t v = __atomic_load_n(e, __ATOMIC_RELAXED);
    if (v && v >> 32 == n)
        return (uint32_t)v;
    uint32_t k = x_pow_8n(n);
    if (n < (1ull << 32))
        __atomic_store_n(e, n << 32 | k, __ATOMIC_RELAXED);
    return k;
}

__attribute__((target("sse4.2")))
static uint32_t crc_sse42_3(uint32_t c, const unsigned char *p, size_t n)
{
    size_t third = n / 24 * 8;
    const unsigned char *q = p + third, *r = q + third;
    uint64_t a = c, b = 0, d = 0;
    for (size_t i = 0; i < third; i += 8) {
        uint64_t va, vb, vd;
        memcpy(&va, p + i, 8);
        memcpy(&vb, q + i, 8);
        memcpy(&vd, r + i, 8);
        a = __builtin_ia32_crc32di(a, va);
        b = __builtin_ia32_crc32di(b, vb);
        d = __builtin_ia32_crc32di(d, vd);
    }
    uint32_t k = shift_for(third);
    uint32_t joined = gf2_mul(gf2_mul((uint32_t)a, k) ^ (uint32_t)b, k) ^ (uint32_t)d;
    return crc_sse42(joined, r + third, n - 3 * third);
}

static int have_sse42(void)
{
    static int known = -1; /* every thread that finds it unset computes the same */
    int k = __atomic_load_n(&known, __ATOMIC_RELAXED);
    if (k < 0) {
        k = __builtin_cpu_supports("sse4.2") ? 1 : 0;
        __atomic_store_n(&known, k, __ATOMIC_RELAXED);
    }
    return k;
}
#endif

uint32_t crc32c(uint32_t crc, const void *p, size_t n)
{
    uint32_t c = ~crc;
#if defined(__x86_64__)
    if (have_sse42())
        return ~(n >= STREAMS_FROM ? crc_sse42_3(c, p, n) : crc_sse42(c, p, n));
#endif
    return ~crc_table(c, p, n);
}
