/*
 * The u64-keyed table of keytab.h.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "keytab.h"

#define MIN_CAP 64

static size_t home_of(const struct keytab *t, uint64_t key)
{
    return (size_t)((key * 0x9E3779B97F4A7C15ull) >> t->shift);
}

static void *entry(const struct keytab *t, size_t i)
{
    return t->mem + i * t->esize;
}

static uint64_t key_at(const struct keytab *t, size_t i)
{
    return ((const struct keytab_head *)entry(t, i))->key;
}

void keytab_init(struct keytab *t, size_t esize)
{
    memset(t, 0, sizeof *t);
    t->esize = esize;
}

void keytab_destroy(struct keytab *t)
{
    free(t->mem);
    free(t->full);
    t->mem = t->full = NULL;
    t->cap = t->n = 0;
}

/* The slot of key: its entry's, or the empty one where it would go. */
static size_t probe(const struct keytab *t, uint64_t key)
{
    size_t i = home_of(t, key);
    while (t->full[i] && key_at(t, i) != key)
        i = (i + 1) & (t->cap - 1);
    return i;
}

void *keytab_find(const struct keytab *t, uint64_t key)
{
    if (!t->n)
        return NULL;
    size_t i = probe(t, key);
    return t->full[i] ? entry(t, i) : NULL;
}

static int resize(struct keytab *t, size_t ncap)
{
    unsigned char *mem = malloc(ncap * t->esize);
    unsigned char *full = calloc(ncap, 1);
    if (!mem || !full) {
        free(mem);
        free(full);
        return -ENOMEM;
    }
    struct keytab old = *t;
    t->mem = mem;
    t->full = full;
    t->cap = ncap;
    t->shift = 64 - (unsigned)__builtin_ctzll(ncap);
    for (size_t i = 0; i < old.cap; i++)
        if (old.full[i]) {
            size_t j = probe(t, key_at(&old, i));
            memcpy(entry(t, j), entry(&old, i), t->esize);
            t->full[j] = 1;
        }
    free(old.mem);
    free(old.full);
    return 0;
}

int keytab_reserve(struct keytab *t, size_t more)
{
    size_t want = t->n + more;
    size_t ncap = t->cap ? t->cap : MIN_CAP;
    while (want * 10 > ncap * 7) /* load factor at most 0.7 */
        ncap *= 2;
    return ncap == t->cap ? 0 : resize(t, ncap);
}

void *keytab_insert(struct keytab *t, uint64_t key, int *fresh)
{
    *fresh = 0;
    if (t->cap) {
        size_t i = probe(t, key);
        if (t->full[i])
            return entry(t, i);
    }
    if (keytab_reserve(t, 1) < 0)
        return NULL;
    size_t i = probe(t, key);
    struct keytab_head *e = entry(t, i);
    memset(e, 0, t->esize);
    e->key = key;
    t->full[i] = 1;
    t->n++;
    *fresh = 1;
    return e;
}

void keytab_remove(struct keytab *t, void *e)
{
    size_t hole = (size_t)((unsigned char *)e - t->mem) / t->esize;
    size_t mask = t->cap - 1;
    t->full[hole] = 0;
    for (size_t i = (hole + 1) & mask; t->full[i]; i = (i + 1) & mask) {
        size_t home = home_of(t, key_at(t, i));
        /* move i back into the hole when its home is not in (hole, i] */
        if (((i - home) & mask) >= ((i - hole) & mask)) {
            memcpy(entry(t, hole), entry(t, i), t->esize);
            t->full[hole] = 1;
            t->full[i] = 0;
            hole = i;
        }
    }
    t->n--;
}

void *keytab_at(const struct keytab *t, size_t i)
{
    return t->full[i] ? entry(t, i) : NULL;
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

int keytab_list(const struct keytab *t, uint64_t after, int first, uint32_t limit,
                uint64_t *keys, uint64_t *versions, uint32_t *n, int *more)
{
    *n = 0;
    *more = 0;
    uint64_t *all = malloc((t->n ? t->n : 1) * sizeof *all);
    if (!all)
        return -ENOMEM;
    size_t m = 0;
    for (size_t i = 0; i < t->cap; i++)
        if (t->full[i] && (first || key_at(t, i) > after))
            all[m++] = key_at(t, i);
    qsort(all, m, sizeof *all, cmp_u64);
    size_t take = m < limit ? m : limit;
    for (size_t i = 0; i < take; i++) {
        keys[i] = all[i];
        versions[i] = ((const struct keytab_head *)keytab_find(t, all[i]))->version;
    }
    *n = (uint32_t)take;
    *more = m > limit;
    free(all);
    return 0;
}
