/*
 * The page store: namespaces of u64 key -> (version, blob) in RAM.
 *
 * Each namespace is an open-addressing table (linear probing, backward-shift
 * deletion) of entries that own a malloc'd copy of their blob. Namespaces are
 * few (one per VM whose pages this peer holds) and kept in a plain array.
 * Accounting counts blob bytes only, as the Python store did: a put that
 * would take `used` past `capacity` is refused FULL and changes nothing; a
 * put older than the stored version is refused STALE; the same version
 * overwrites (an idempotent retry). A namespace left empty is removed, and
 * with it its owner.
 */
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "peer.h"

struct entry {
    uint64_t key;
    uint64_t version;
    uint8_t *blob;  /* NULL: an empty slot */
    uint32_t len;
};

struct ns {
    char *name;
    char *owner;
    struct entry *tab;
    size_t cap;     /* power of two */
    unsigned shift; /* 64 - log2(cap): slots come from the hash's top bits */
    size_t n;
    uint64_t bytes;
};

struct peer_store {
    pthread_rwlock_t lock;
    uint64_t capacity;
    uint64_t used;
    uint64_t count;
    struct ns **ns;
    size_t nns, nscap;
};

/* Fibonacci hashing: the product's top bits depend on every bit of the key,
 * so keys that differ only in high bits (multiples of 2^32...) spread too. */
static size_t slot_of(const struct ns *t, uint64_t key)
{
    return (size_t)((key * 0x9E3779B97F4A7C15ull) >> t->shift);
}

static struct entry *lookup(const struct ns *t, uint64_t key)
{
    for (size_t i = slot_of(t, key);; i = (i + 1) & (t->cap - 1)) {
        struct entry *e = &t->tab[i];
        if (!e->blob)
            return NULL;
        if (e->key == key)
            return e;
    }
}

/* The slot for key: its entry, or the empty slot where it would go. */
static struct entry *slot_for(struct ns *t, uint64_t key)
{
    for (size_t i = slot_of(t, key);; i = (i + 1) & (t->cap - 1)) {
        struct entry *e = &t->tab[i];
        if (!e->blob || e->key == key)
            return e;
    }
}

static int grow_table(struct ns *t)
{
    size_t ncap = t->cap ? t->cap * 2 : 64;
    struct entry *old = t->tab;
    size_t ocap = t->cap;
    struct entry *tab = calloc(ncap, sizeof *tab);
    if (!tab)
        return -ENOMEM;
    t->tab = tab;
    t->cap = ncap;
    t->shift = 64 - (unsigned)__builtin_ctzll(ncap);
    for (size_t i = 0; i < ocap; i++)
        if (old[i].blob)
            *slot_for(t, old[i].key) = old[i];
    free(old);
    return 0;
}

/* Remove the entry at e (its blob already freed by the caller). */
static void remove_at(struct ns *t, struct entry *e)
{
    size_t hole = (size_t)(e - t->tab);
    size_t mask = t->cap - 1;
    t->tab[hole].blob = NULL;
    for (size_t i = (hole + 1) & mask; t->tab[i].blob; i = (i + 1) & mask) {
        size_t home = slot_of(t, t->tab[i].key);
        /* move i back into the hole when its home is not in (hole, i] */
        if (((i - home) & mask) >= ((i - hole) & mask)) {
            t->tab[hole] = t->tab[i];
            t->tab[i].blob = NULL;
            hole = i;
        }
    }
    t->n--;
}

static struct ns *find_ns(const struct peer_store *s, const char *name, size_t *idx)
{
    for (size_t i = 0; i < s->nns; i++)
        if (strcmp(s->ns[i]->name, name) == 0) {
            if (idx)
                *idx = i;
            return s->ns[i];
        }
    return NULL;
}

/* The namespace, NULL when absent; -PEER_ST_FORBIDDEN via *rc when another
 * member owns it. */
static struct ns *authorize(const struct peer_store *s, const char *name, const char *owner,
                            int *rc)
{
    struct ns *t = find_ns(s, name, NULL);
    *rc = (t && strcmp(t->owner, owner) != 0) ? PEER_ST_FORBIDDEN : PEER_ST_OK;
    return *rc ? NULL : t;
}

static struct ns *create_ns(struct peer_store *s, const char *name, const char *owner)
{
    if (s->nns == s->nscap) {
        size_t ncap = s->nscap ? s->nscap * 2 : 8;
        struct ns **p = realloc(s->ns, ncap * sizeof *p);
        if (!p)
            return NULL;
        s->ns = p;
        s->nscap = ncap;
    }
    struct ns *t = calloc(1, sizeof *t);
    if (!t)
        return NULL;
    t->name = strdup(name);
    t->owner = strdup(owner);
    if (!t->name || !t->owner || grow_table(t) < 0) {
        free(t->name);
        free(t->owner);
        free(t);
        return NULL;
    }
    s->ns[s->nns++] = t;
    return t;
}

static void free_ns(struct ns *t)
{
    for (size_t i = 0; i < t->cap; i++)
        free(t->tab[i].blob);
    free(t->tab);
    free(t->name);
    free(t->owner);
    free(t);
}

static void remove_ns_if_empty(struct peer_store *s, struct ns *t)
{
    size_t idx;
    if (t->n || !find_ns(s, t->name, &idx))
        return;
    s->ns[idx] = s->ns[--s->nns];
    free_ns(t);
}

struct peer_store *peer_store_new(uint64_t capacity)
{
    struct peer_store *s = calloc(1, sizeof *s);
    if (!s)
        return NULL;
    if (pthread_rwlock_init(&s->lock, NULL) != 0) {
        free(s);
        return NULL;
    }
    s->capacity = capacity;
    return s;
}

void peer_store_free(struct peer_store *s)
{
    if (!s)
        return;
    for (size_t i = 0; i < s->nns; i++)
        free_ns(s->ns[i]);
    free(s->ns);
    pthread_rwlock_destroy(&s->lock);
    free(s);
}

void peer_store_usage(struct peer_store *s, uint64_t out[3])
{
    pthread_rwlock_rdlock(&s->lock);
    out[0] = s->capacity;
    out[1] = s->used;
    out[2] = s->count;
    pthread_rwlock_unlock(&s->lock);
}

/* Store one item in t (created by the caller); capacity already checked. */
static int store_item(struct peer_store *s, struct ns *t, uint64_t key, uint64_t version,
                      const uint8_t *blob, uint32_t len)
{
    if ((t->n + 1) * 10 > t->cap * 7 && grow_table(t) < 0)
        return -ENOMEM;
    struct entry *e = slot_for(t, key);
    if (e->blob && e->version > version)
        return PEER_ST_STALE;
    uint8_t *copy = malloc(len ? len : 1);
    if (!copy)
        return -ENOMEM;
    memcpy(copy, blob, len);
    if (e->blob) {
        s->used -= e->len;
        t->bytes -= e->len;
        free(e->blob);
    } else {
        t->n++;
        s->count++;
    }
    e->key = key;
    e->version = version;
    e->blob = copy;
    e->len = len;
    s->used += len;
    t->bytes += len;
    return PEER_ST_OK;
}

struct order {
    uint64_t key;
    size_t pos;
};

static int cmp_order(const void *a, const void *b)
{
    const struct order *x = a, *y = b;
    if (x->key != y->key)
        return x->key < y->key ? -1 : 1;
    return x->pos < y->pos ? -1 : x->pos > y->pos;
}

static int batch_growth(const struct ns *t, size_t n, const uint64_t *keys,
                        const uint64_t *versions, const uint32_t *lens, int64_t *growth)
{
    *growth = 0;
    if (n == 1) { /* the common PUT */
        const struct entry *old = t ? lookup(t, keys[0]) : NULL;
        if (!(old && old->version > versions[0]))
            *growth = (int64_t)lens[0] - (old ? old->len : 0);
        return 0;
    }
    struct order *o = malloc((n ? n : 1) * sizeof *o);
    if (!o)
        return -ENOMEM;
    for (size_t i = 0; i < n; i++)
        o[i] = (struct order){keys[i], i};
    qsort(o, n, sizeof *o, cmp_order);
    for (size_t i = 0; i < n;) {
        uint64_t key = o[i].key;
        const struct entry *old = t ? lookup(t, key) : NULL;
        int have = old != NULL;
        uint64_t ver = have ? old->version : 0;
        int64_t size = have ? old->len : 0;
        for (; i < n && o[i].key == key; i++) {
            size_t p = o[i].pos;
            if (have && ver > versions[p])
                continue;
            *growth += (int64_t)lens[p] - size;
            have = 1;
            ver = versions[p];
            size = lens[p];
        }
    }
    free(o);
    return 0;
}

int peer_store_put(struct peer_store *s, const char *ns, const char *owner, uint64_t key,
                   uint64_t version, const uint8_t *blob, uint32_t len)
{
    uint8_t status;
    const uint8_t *blobs[1] = {blob};
    int rc = peer_store_put_batch(s, ns, owner, 1, &key, &version, blobs, &len, &status);
    return rc == PEER_ST_OK ? status : rc;
}

int peer_store_put_batch(struct peer_store *s, const char *ns, const char *owner, size_t n,
                         const uint64_t *keys, const uint64_t *versions,
                         const uint8_t *const *blobs, const uint32_t *lens, uint8_t *statuses)
{
    int rc;
    pthread_rwlock_wrlock(&s->lock);
    struct ns *t = authorize(s, ns, owner, &rc);
    if (rc)
        goto out;
    /* Growth of the whole batch first: FULL stores nothing. The batch is
     * replayed key by key in its order (items sorted by key, stable), as
     * store_item will apply it: an item older than the key's current
     * version (stored, or set by an earlier item) is STALE and adds
     * nothing; otherwise it replaces the current size. */
    int64_t growth;
    rc = batch_growth(t, n, keys, versions, lens, &growth);
    if (rc)
        goto out;
    if (growth > 0 && s->used + (uint64_t)growth > s->capacity) {
        rc = PEER_ST_FULL;
        goto out;
    }
    if (!t && n) {
        t = create_ns(s, ns, owner);
        if (!t) {
            rc = -ENOMEM;
            goto out;
        }
    }
    for (size_t i = 0; i < n; i++) {
        int st = store_item(s, t, keys[i], versions[i], blobs[i], lens[i]);
        if (st < 0) {
            rc = st;
            break;
        }
        statuses[i] = (uint8_t)st;
    }
    if (t)
        remove_ns_if_empty(s, t);
out:
    pthread_rwlock_unlock(&s->lock);
    return rc;
}

int peer_store_visit(struct peer_store *s, const char *ns, const char *owner, size_t n,
                     const uint64_t *keys, peer_visit_fn fn, void *arg)
{
    int rc;
    pthread_rwlock_rdlock(&s->lock);
    struct ns *t = authorize(s, ns, owner, &rc);
    if (!rc)
        for (size_t i = 0; i < n; i++) {
            struct entry *e = t ? lookup(t, keys[i]) : NULL;
            if (e)
                fn(arg, 1, e->version, e->blob, e->len);
            else
                fn(arg, 0, 0, NULL, 0);
        }
    pthread_rwlock_unlock(&s->lock);
    return rc;
}

struct get_one {
    int found;
    uint64_t version;
    uint8_t *copy;
    uint32_t len;
};

static void copy_one(void *arg, int found, uint64_t version, const uint8_t *blob, uint32_t len)
{
    struct get_one *g = arg;
    g->found = found;
    if (!found)
        return;
    g->version = version;
    g->len = len;
    g->copy = malloc(len ? len : 1);
    if (g->copy)
        memcpy(g->copy, blob, len);
}

int peer_store_get(struct peer_store *s, const char *ns, const char *owner, uint64_t key,
                   uint64_t *version, uint8_t **copy, uint32_t *len)
{
    struct get_one g = {0};
    int rc = peer_store_visit(s, ns, owner, 1, &key, copy_one, &g);
    if (rc)
        return rc;
    if (!g.found)
        return PEER_ST_NOT_FOUND;
    if (!g.copy)
        return -ENOMEM;
    *version = g.version;
    *copy = g.copy;
    *len = g.len;
    return PEER_ST_OK;
}

void peer_store_release(uint8_t *copy)
{
    free(copy);
}

int peer_store_delete(struct peer_store *s, const char *ns, const char *owner, size_t n,
                      const uint64_t *keys, uint64_t *deleted)
{
    int rc;
    *deleted = 0;
    pthread_rwlock_wrlock(&s->lock);
    struct ns *t = authorize(s, ns, owner, &rc);
    if (t) {
        for (size_t i = 0; i < n; i++) {
            struct entry *e = lookup(t, keys[i]);
            if (!e)
                continue;
            s->used -= e->len;
            t->bytes -= e->len;
            s->count--;
            free(e->blob);
            remove_at(t, e);
            (*deleted)++;
        }
        remove_ns_if_empty(s, t);
    }
    pthread_rwlock_unlock(&s->lock);
    return rc;
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

int peer_store_list(struct peer_store *s, const char *ns, const char *owner, uint64_t after,
                    uint32_t limit, int first, uint64_t *keys, uint64_t *versions,
                    uint32_t *n, int *more)
{
    int rc;
    *n = 0;
    *more = 0;
    pthread_rwlock_rdlock(&s->lock);
    struct ns *t = authorize(s, ns, owner, &rc);
    if (!t)
        goto out;
    uint64_t *all = malloc((t->n ? t->n : 1) * sizeof *all);
    if (!all) {
        rc = -ENOMEM;
        goto out;
    }
    size_t m = 0;
    for (size_t i = 0; i < t->cap; i++)
        if (t->tab[i].blob && (first || t->tab[i].key > after))
            all[m++] = t->tab[i].key;
    qsort(all, m, sizeof *all, cmp_u64);
    size_t take = m < limit ? m : limit;
    for (size_t i = 0; i < take; i++) {
        keys[i] = all[i];
        versions[i] = lookup(t, all[i])->version;
    }
    *n = (uint32_t)take;
    *more = m > limit;
    free(all);
out:
    pthread_rwlock_unlock(&s->lock);
    return rc;
}

int peer_store_drop(struct peer_store *s, const char *ns, const char *owner, uint64_t *dropped)
{
    int rc;
    size_t idx;
    *dropped = 0;
    pthread_rwlock_wrlock(&s->lock);
    struct ns *t = authorize(s, ns, owner, &rc);
    if (t && find_ns(s, ns, &idx)) {
        *dropped = t->n;
        s->used -= t->bytes;
        s->count -= t->n;
        s->ns[idx] = s->ns[--s->nns];
        free_ns(t);
    }
    pthread_rwlock_unlock(&s->lock);
    return rc;
}

size_t peer_store_namespaces(struct peer_store *s, const char *owner, struct peer_ns_info *out,
                             size_t max)
{
    size_t m = 0;
    pthread_rwlock_rdlock(&s->lock);
    for (size_t i = 0; i < s->nns; i++) {
        struct ns *t = s->ns[i];
        if (owner && strcmp(t->owner, owner) != 0)
            continue;
        if (m < max) {
            snprintf(out[m].name, sizeof out[m].name, "%s", t->name);
            snprintf(out[m].owner, sizeof out[m].owner, "%s", t->owner);
            out[m].keys = t->n;
            out[m].bytes = t->bytes;
        }
        m++;
    }
    pthread_rwlock_unlock(&s->lock);
    return m;
}
