/*
 * The page store: namespaces of u64 key -> (version, blob) in RAM.
 *
 * Each namespace is a keytab (keytab.h) of entries that own a malloc'd copy
 * of their blob. Namespaces are few (one per VM whose pages this peer holds)
 * and kept in a plain array. Accounting counts blob bytes only: a put that
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

#include "batch_plan.h"
#include "keytab.h"
#include "peer.h"

struct page {
    struct keytab_head h; /* key, version */
    uint8_t *blob;        /* malloc'd, never NULL */
    uint32_t len;
};

struct ns {
    char *name;
    char *owner;
    struct keytab tab; /* key -> struct page */
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

/* The namespace, NULL when absent; PEER_ST_FORBIDDEN via *rc when another
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
    keytab_init(&t->tab, sizeof(struct page));
    t->name = strdup(name);
    t->owner = strdup(owner);
    if (!t->name || !t->owner) {
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
    for (size_t i = 0; i < t->tab.cap; i++) {
        struct page *p = keytab_at(&t->tab, i);
        if (p)
            free(p->blob);
    }
    keytab_destroy(&t->tab);
    free(t->name);
    free(t->owner);
    free(t);
}

static void remove_ns_if_empty(struct peer_store *s, struct ns *t)
{
    size_t idx;
    if (t->tab.n || !find_ns(s, t->name, &idx))
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

/* Store one item the plan found OK in t (created by the caller). */
static int store_item(struct peer_store *s, struct ns *t, uint64_t key, uint64_t version,
                      const uint8_t *blob, uint32_t len)
{
    uint8_t *copy = malloc(len ? len : 1);
    if (!copy)
        return -ENOMEM;
    memcpy(copy, blob, len);
    int fresh;
    struct page *e = keytab_insert(&t->tab, key, &fresh);
    if (!e) {
        free(copy);
        return -ENOMEM;
    }
    if (fresh) {
        s->count++;
    } else {
        s->used -= e->len;
        t->bytes -= e->len;
        free(e->blob);
    }
    e->h.version = version;
    e->blob = copy;
    e->len = len;
    s->used += len;
    t->bytes += len;
    return PEER_ST_OK;
}

static int held(void *arg, uint64_t key, uint64_t *version, uint32_t *len)
{
    const struct ns *t = arg;
    const struct page *e = t ? keytab_find(&t->tab, key) : NULL;
    if (!e)
        return 0;
    *version = e->h.version;
    *len = e->len;
    return 1;
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
    /* The whole batch's growth first: FULL stores nothing. */
    struct plan_result plan;
    rc = batch_plan(n, keys, versions, lens, NULL, held, t, statuses, &plan);
    if (rc)
        goto out;
    if (plan.growth > 0 && s->used + (uint64_t)plan.growth > s->capacity) {
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
    if (t && keytab_reserve(&t->tab, plan.fresh) < 0)
        rc = -ENOMEM;
    /* In order: a key written twice keeps its last item the plan let in. */
    for (size_t i = 0; !rc && i < n; i++)
        if (statuses[i] == PEER_ST_OK)
            rc = store_item(s, t, keys[i], versions[i], blobs[i], lens[i]);
    if (t)
        remove_ns_if_empty(s, t);
out:
    pthread_rwlock_unlock(&s->lock);
    return rc;
}

int peer_store_read(struct peer_store *s, const char *ns, const char *owner, size_t n,
                    const uint64_t *keys, peer_room_fn room, void *arg)
{
    int rc;
    pthread_rwlock_rdlock(&s->lock);
    struct ns *t = authorize(s, ns, owner, &rc);
    for (size_t i = 0; !rc && i < n; i++) {
        const struct page *e = t ? keytab_find(&t->tab, keys[i]) : NULL;
        if (!e) {
            room(arg, 0, 0, 0);
            continue;
        }
        uint8_t *dst = room(arg, 1, e->h.version, e->len);
        if (!dst)
            rc = -ENOMEM;
        else
            memcpy(dst, e->blob, e->len);
    }
    pthread_rwlock_unlock(&s->lock);
    return rc;
}

uint8_t *peer_room_malloc(void *arg, int found, uint64_t version, uint32_t len)
{
    struct peer_copy *c = arg;
    c->found = found;
    if (!found)
        return NULL;
    c->version = version;
    c->len = len;
    c->blob = malloc(len ? len : 1);
    return c->blob;
}

int peer_store_get(struct peer_store *s, const char *ns, const char *owner, uint64_t key,
                   uint64_t *version, uint8_t **copy, uint32_t *len)
{
    struct peer_copy c = {0};
    int rc = peer_store_read(s, ns, owner, 1, &key, peer_room_malloc, &c);
    return peer_copy_result(rc, &c, version, copy, len);
}

int peer_copy_result(int rc, struct peer_copy *c, uint64_t *version, uint8_t **copy,
                     uint32_t *len)
{
    if (rc) {
        free(c->blob);
        return rc;
    }
    if (!c->found)
        return PEER_ST_NOT_FOUND;
    *version = c->version;
    *copy = c->blob;
    *len = c->len;
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
            struct page *e = keytab_find(&t->tab, keys[i]);
            if (!e)
                continue;
            s->used -= e->len;
            t->bytes -= e->len;
            s->count--;
            free(e->blob);
            keytab_remove(&t->tab, e);
            (*deleted)++;
        }
        remove_ns_if_empty(s, t);
    }
    pthread_rwlock_unlock(&s->lock);
    return rc;
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
    if (t)
        rc = keytab_list(&t->tab, after, first, limit, keys, versions, n, more);
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
        *dropped = t->tab.n;
        s->used -= t->bytes;
        s->count -= t->tab.n;
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
        if (m < max)
            peer_ns_info_fill(&out[m], t->name, t->owner, t->tab.n, t->bytes);
        m++;
    }
    pthread_rwlock_unlock(&s->lock);
    return m;
}

void peer_ns_info_fill(struct peer_ns_info *out, const char *name, const char *owner,
                       uint64_t keys, uint64_t bytes)
{
    snprintf(out->name, sizeof out->name, "%s", name);
    snprintf(out->owner, sizeof out->owner, "%s", owner ? owner : "");
    out->keys = keys;
    out->bytes = bytes;
}
