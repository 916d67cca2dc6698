/*
 * A table of fixed-size entries keyed by u64, the index of both stores.
 *
 * Open addressing with linear probing and backward-shift deletion; the home
 * slot comes from Fibonacci hashing (the product's top bits depend on every
 * bit of the key, so keys that differ only in high bits spread too). Every
 * entry starts with struct keytab_head; the rest is the owner's. Not
 * thread-safe: each store guards its tables with its own locks.
 *
 * Return convention: 0 or a negative errno, unless stated.
 */
#ifndef OMEGA_KEYTAB_H
#define OMEGA_KEYTAB_H

#include <stddef.h>
#include <stdint.h>

struct keytab_head {
    uint64_t key;
    uint64_t version;
};

struct keytab {
    unsigned char *mem;  /* cap entries of esize bytes */
    unsigned char *full; /* cap flags: 1 where an entry lives */
    size_t cap;          /* a power of two, or 0 before the first insert */
    size_t n;
    size_t esize;
    unsigned shift;      /* 64 - log2(cap) */
};

/* An empty table of entries of esize (>= sizeof(struct keytab_head)) bytes. */
void keytab_init(struct keytab *t, size_t esize);
void keytab_destroy(struct keytab *t);

/* The entry of key, or NULL. */
void *keytab_find(const struct keytab *t, uint64_t key);

/* The entry of key; when absent it is added (zeroed but for its key) and
 * *fresh set to 1. NULL when memory runs out. Adding may move every entry. */
void *keytab_insert(struct keytab *t, uint64_t key, int *fresh);

/* Make room for `more` further keys without moving entries on insert. */
int keytab_reserve(struct keytab *t, size_t more);

/* Remove an entry returned by find or insert. */
void keytab_remove(struct keytab *t, void *entry);

/* The entry in slot i (i < cap), or NULL where the slot is empty. */
void *keytab_at(const struct keytab *t, size_t i);

/* Up to limit (key, version) with key > after (every key when first), in
 * key order; *more when others follow. */
int keytab_list(const struct keytab *t, uint64_t after, int first, uint32_t limit,
                uint64_t *keys, uint64_t *versions, uint32_t *n, int *more);

#endif
