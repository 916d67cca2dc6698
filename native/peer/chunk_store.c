/*
 * The chunk store: the chunk_store_* calls of peer.h over the slot files of
 * chunk_store.h.
 *
 * Same contract as the page store (versions, STALE, FULL all or nothing,
 * owners), on disk. A namespace exists while it holds chunks; its owner is
 * in its directory, so it survives a restart. A put runs in three steps:
 * under its namespace's write lock it plans the batch (STALE items, FULL),
 * reserves the growth and takes free slots; with no lock it writes the
 * slots and fdatasyncs each file once; under the lock again it replans
 * against what other puts did meanwhile and installs. Reads hold their
 * namespace's read lock while they read the disk, so a slot a reader is
 * reading cannot be freed and reused under it.
 */
#include <errno.h>
#include <fcntl.h>
#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include "batch_plan.h"
#include "chunk_store.h"
#include "peer.h"

#define NS_GONE 0x100 /* ns_lock: the namespace was removed meanwhile */

static int name_ok(const char *name)
{
    size_t n = strlen(name);
    return n >= 1 && n <= PEER_NAME_MAX && name[0] != '.' && !strchr(name, '/');
}

/* ------------------------------------------------------- the namespace table */

/* The namespace called name (store lock held), its index into *idx. */
static struct cns *ns_find(const struct chunk_store *s, const char *name, size_t *idx)
{
    for (size_t i = 0; i < s->nns; i++)
        if (strcmp(s->ns[i]->name, name) == 0) {
            if (idx)
                *idx = i;
            return s->ns[i];
        }
    return NULL;
}

/* The namespace called name with a reference the caller drops with
 * ns_unref, or NULL. */
static struct cns *ns_ref(struct chunk_store *s, const char *name)
{
    pthread_rwlock_rdlock(&s->lock);
    struct cns *t = ns_find(s, name, NULL);
    if (t)
        __atomic_add_fetch(&t->refs, 1, __ATOMIC_RELAXED);
    pthread_rwlock_unlock(&s->lock);
    return t;
}

static void ns_unref(struct cns *t)
{
    if (__atomic_sub_fetch(&t->refs, 1, __ATOMIC_ACQ_REL) == 0)
        cns_free(t);
}

/* Add t (whose reference passes to the table); store lock held for writing. */
static int table_add(struct chunk_store *s, struct cns *t)
{
    if (s->nns == s->nscap) {
        size_t ncap = s->nscap ? s->nscap * 2 : 8;
        struct cns **p = realloc(s->ns, ncap * sizeof *p);
        if (!p)
            return -ENOMEM;
        s->ns = p;
        s->nscap = ncap;
    }
    s->ns[s->nns++] = t;
    return 0;
}

/*
 * Lock t for a request of owner: PEER_ST_OK, PEER_ST_FORBIDDEN, NS_GONE (it
 * was removed: for readers it holds nothing), or -errno (recording the
 * owner failed). A namespace with no recorded owner is adopted by its first
 * user. The lock is held on return, whatever the result.
 */
static int ns_lock(struct chunk_store *s, struct cns *t, const char *owner, int write)
{
    for (;;) {
        if (write)
            pthread_rwlock_wrlock(&t->lock);
        else
            pthread_rwlock_rdlock(&t->lock);
        if (t->dead)
            return NS_GONE;
        if (t->owner)
            return strcmp(t->owner, owner) ? PEER_ST_FORBIDDEN : PEER_ST_OK;
        if (write)
            return chunk_dir_set_owner(s, t, owner);
        pthread_rwlock_unlock(&t->lock);
        pthread_rwlock_wrlock(&t->lock);
        int rc = t->dead || t->owner ? 0 : chunk_dir_set_owner(s, t, owner);
        pthread_rwlock_unlock(&t->lock);
        if (rc < 0) {
            pthread_rwlock_rdlock(&t->lock);
            return rc;
        }
    }
}

/* The namespace called name, made (directory, owner file) when missing,
 * with a reference. */
static int ns_create(struct chunk_store *s, const char *name, const char *owner,
                     struct cns **out)
{
    char err[256];
    pthread_rwlock_wrlock(&s->lock);
    struct cns *t = ns_find(s, name, NULL);
    int rc = 0;
    if (!t) {
        rc = chunk_dir_load(s, name, 1, &t, err, sizeof err);
        /* Empty (nothing of ours, or leftovers of a removed namespace): the
         * name is free, this put's member owns it. */
        if (!rc && (!t->index.n || !t->owner))
            rc = chunk_dir_set_owner(s, t, owner);
        if (!rc && s->fsync && fsync(s->rootfd) < 0)
            rc = -errno;
        if (!rc && !(rc = table_add(s, t))) {
            pthread_mutex_lock(&s->acct);
            s->used += t->bytes;
            s->count += t->index.n;
            pthread_mutex_unlock(&s->acct);
        }
        if (rc && t) {
            cns_free(t);
            t = NULL;
        }
    }
    if (t)
        __atomic_add_fetch(&t->refs, 1, __ATOMIC_RELAXED);
    pthread_rwlock_unlock(&s->lock);
    *out = t;
    return rc;
}

/* Remove t from the table and its directory from the disk when it holds
 * nothing and no put is under way. */
static void ns_remove_if_empty(struct chunk_store *s, struct cns *t)
{
    pthread_rwlock_rdlock(&t->lock);
    int empty = !t->dead && !t->index.n && !t->pending;
    pthread_rwlock_unlock(&t->lock);
    if (!empty)
        return;
    char trash[64];
    int removed = 0, trashed = 0;
    size_t idx;
    pthread_rwlock_wrlock(&s->lock);
    pthread_rwlock_wrlock(&t->lock);
    if (!t->dead && !t->index.n && !t->pending && ns_find(s, t->name, &idx) == t) {
        /* Should the rename fail, the directory holds no live slot: it
         * loads as empty, and a later put of the name reuses it. */
        trashed = chunk_dir_to_trash(s, t->name, trash, sizeof trash) == 0;
        t->dead = 1;
        s->ns[idx] = s->ns[--s->nns];
        removed = 1;
    }
    pthread_rwlock_unlock(&t->lock);
    pthread_rwlock_unlock(&s->lock);
    if (trashed)
        chunk_dir_remove(s->rootfd, trash);
    if (removed)
        ns_unref(t); /* the table's reference */
}

/* ------------------------------------------------------------ open, usage */

static int mkdir_p(const char *path)
{
    char buf[4096];
    size_t n = strlen(path);
    if (n == 0 || n >= sizeof buf)
        return -ENAMETOOLONG;
    memcpy(buf, path, n + 1);
    for (char *p = buf + 1; *p; p++)
        if (*p == '/') {
            *p = 0;
            if (mkdir(buf, 0755) < 0 && errno != EEXIST)
                return -errno;
            *p = '/';
        }
    return mkdir(buf, 0755) < 0 && errno != EEXIST ? -errno : 0;
}

static int is_dir(int dirfd, const struct dirent *de)
{
    if (de->d_type != DT_UNKNOWN)
        return de->d_type == DT_DIR;
    struct stat st;
    return fstatat(dirfd, de->d_name, &st, AT_SYMLINK_NOFOLLOW) == 0 && S_ISDIR(st.st_mode);
}

/* Load every namespace directory under the root; finish removing trash. */
static int load_all(struct chunk_store *s, char *err, size_t errlen)
{
    int fd = dup(s->rootfd);
    DIR *d = fd < 0 ? NULL : fdopendir(fd);
    if (!d) {
        int rc = -errno;
        if (fd >= 0)
            close(fd);
        snprintf(err, errlen, "cannot read it: %s", strerror(-rc));
        return rc;
    }
    rewinddir(d);
    int rc = 0;
    struct dirent *de;
    while (!rc && (de = readdir(d))) {
        if (!strncmp(de->d_name, ".trash-", 7)) {
            chunk_dir_remove(s->rootfd, de->d_name);
            continue;
        }
        if (!name_ok(de->d_name) || !is_dir(s->rootfd, de))
            continue;
        struct cns *t;
        rc = chunk_dir_load(s, de->d_name, 0, &t, err, errlen);
        if (rc)
            break;
        if (!t->index.n) { /* nothing of ours: left alone, not served */
            cns_free(t);
            continue;
        }
        rc = table_add(s, t);
        if (rc) {
            cns_free(t);
            snprintf(err, errlen, "out of memory");
            break;
        }
        s->used += t->bytes;
        s->count += t->index.n;
    }
    closedir(d);
    return rc;
}

struct chunk_store *chunk_store_open(const char *root, uint64_t capacity, int fsync, char *err,
                                     size_t errlen)
{
    struct chunk_store *s = calloc(1, sizeof *s);
    if (!s) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    s->rootfd = -1;
    s->capacity = capacity;
    s->fsync = fsync != 0;
    if (chunk_rwlock_init(&s->lock) != 0 || pthread_mutex_init(&s->acct, NULL) != 0) {
        snprintf(err, errlen, "cannot make its locks");
        free(s); /* a lock that failed to initialise holds nothing to destroy */
        return NULL;
    }
    int rc = mkdir_p(root);
    if (rc < 0) {
        snprintf(err, errlen, "cannot make it: %s", strerror(-rc));
        goto fail;
    }
    s->rootfd = open(root, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (s->rootfd < 0) {
        snprintf(err, errlen, "cannot open it: %s", strerror(errno));
        goto fail;
    }
    /* Two stores writing one directory would free each other's slots. */
    if (flock(s->rootfd, LOCK_EX | LOCK_NB) < 0) {
        snprintf(err, errlen, "%s",
                 errno == EWOULDBLOCK ? "in use by another chunk store" : strerror(errno));
        goto fail;
    }
    if (load_all(s, err, errlen) < 0)
        goto fail;
    return s;
fail:
    chunk_store_close(s);
    return NULL;
}

void chunk_store_close(struct chunk_store *s)
{
    if (!s)
        return;
    for (size_t i = 0; i < s->nns; i++)
        ns_unref(s->ns[i]);
    free(s->ns);
    if (s->rootfd >= 0)
        close(s->rootfd);
    pthread_mutex_destroy(&s->acct);
    pthread_rwlock_destroy(&s->lock);
    free(s);
}

void chunk_store_usage(struct chunk_store *s, uint64_t out[3])
{
    pthread_mutex_lock(&s->acct);
    out[0] = s->capacity;
    out[1] = s->used;
    out[2] = s->count;
    pthread_mutex_unlock(&s->acct);
}

/* ------------------------------------------------------------------- puts */

static int held(void *arg, uint64_t key, uint64_t *version, uint32_t *len)
{
    const struct cns *t = arg;
    const struct chunk *e = t ? keytab_find(&t->index, key) : NULL;
    if (!e)
        return 0;
    *version = e->h.version;
    *len = t->files[e->file].len;
    return 1;
}

/* Whether growth more bytes fit beside what is held and reserved (acct
 * held). */
static int fits_locked(const struct chunk_store *s, int64_t growth)
{
    return growth <= 0 || s->used + s->reserved + (uint64_t)growth <= s->capacity;
}

static int fits(struct chunk_store *s, int64_t growth)
{
    pthread_mutex_lock(&s->acct);
    int ok = fits_locked(s, growth);
    pthread_mutex_unlock(&s->acct);
    return ok;
}

/* Reserve growth bytes of capacity: 1 when they fit (or growth <= 0). */
static int reserve(struct chunk_store *s, int64_t growth)
{
    pthread_mutex_lock(&s->acct);
    int ok = fits_locked(s, growth);
    if (ok && growth > 0)
        s->reserved += (uint64_t)growth;
    pthread_mutex_unlock(&s->acct);
    return ok;
}

struct put {
    size_t n;
    const uint64_t *keys, *versions;
    const uint8_t *const *blobs;
    const uint32_t *lens;
    uint8_t *statuses;
    /* per item, for the items the first plan let in (take[i]) */
    uint8_t *take, *again;
    uint32_t *file, *slot;
    struct slot_dest *dest;
    uint64_t *seq;
    int64_t reserved;
};

static int put_alloc(struct put *p)
{
    size_t n = p->n ? p->n : 1;
    p->take = calloc(n, 2);
    p->file = malloc(n * 2 * sizeof *p->file);
    p->dest = malloc(n * sizeof *p->dest);
    p->seq = malloc(n * sizeof *p->seq);
    if (!p->take || !p->file || !p->dest || !p->seq)
        return -ENOMEM;
    p->again = p->take + n;
    p->slot = p->file + n;
    return 0;
}

static void put_free(struct put *p)
{
    free(p->take);
    free(p->file);
    free(p->dest);
    free(p->seq);
}

/* Give back the slots of the first k items taken (never written). */
static void untake(struct cns *t, struct put *p, size_t k)
{
    for (size_t i = 0; i < k; i++)
        if (p->take[i])
            slot_untake(&t->files[p->file[i]], p->slot[i]);
}

/* Step 1, under t's write lock: plan, reserve, take slots. PEER_ST_OK with
 * t->pending raised, PEER_ST_FULL, or -errno; nothing held on failure. */
static int put_plan(struct chunk_store *s, struct cns *t, struct put *p)
{
    struct plan_result plan;
    int rc = batch_plan(p->n, p->keys, p->versions, p->lens, NULL, held, t, p->statuses, &plan);
    if (rc)
        return rc;
    if (!reserve(s, plan.growth))
        return PEER_ST_FULL;
    p->reserved = plan.growth > 0 ? plan.growth : 0;
    size_t i;
    for (i = 0; !rc && i < p->n; i++) {
        p->take[i] = p->statuses[i] == PEER_ST_OK;
        if (!p->take[i])
            continue;
        rc = slotfile_get(t, p->lens[i], 1, s->fsync, &p->file[i]);
        if (!rc)
            rc = slot_take(&t->files[p->file[i]], &p->slot[i]);
        if (rc) {
            p->take[i] = 0;
            break;
        }
        slot_dest(&t->files[p->file[i]], p->slot[i], &p->dest[i]);
        p->seq[i] = __atomic_add_fetch(&s->seq, 1, __ATOMIC_RELAXED);
    }
    if (rc) {
        untake(t, p, i);
        pthread_mutex_lock(&s->acct);
        s->reserved -= (uint64_t)p->reserved;
        pthread_mutex_unlock(&s->acct);
        return rc;
    }
    t->pending++;
    return PEER_ST_OK;
}

/* Step 2, no lock held: write the slots, then fdatasync each file once. */
static int put_write(struct chunk_store *s, struct put *p)
{
    int rc = 0;
    for (size_t i = 0; !rc && i < p->n; i++)
        if (p->take[i]) {
            struct slot_head h = {p->keys[i], p->versions[i], p->seq[i], p->lens[i]};
            rc = slot_write(&p->dest[i], p->slot[i], &h, p->blobs[i]);
        }
    for (size_t i = 0; !rc && s->fsync && i < p->n; i++) {
        if (!p->take[i])
            continue;
        size_t j = 0;
        while (j < i && !(p->take[j] && p->dest[j].fd == p->dest[i].fd))
            j++;
        if (j == i && fdatasync(p->dest[i].fd) < 0)
            rc = -errno;
    }
    return rc;
}

/* Step 3, under t's write lock: replan the items written against what
 * changed meanwhile, then point the index at the new slots. */
static int put_install(struct chunk_store *s, struct cns *t, struct put *p, int wrote)
{
    struct plan_result plan = {0, 0};
    int rc = wrote;
    if (!rc && !t->dead)
        rc = batch_plan(p->n, p->keys, p->versions, p->lens, p->take, held, t, p->again, &plan);
    if (!rc && !t->dead)
        rc = keytab_reserve(&t->index, plan.fresh);
    int full = 0;
    pthread_mutex_lock(&s->acct);
    s->reserved -= (uint64_t)p->reserved;
    if (!rc && !t->dead) {
        full = plan.growth > p->reserved && !fits_locked(s, plan.growth);
        if (!full) {
            s->used += (uint64_t)plan.growth;
            s->count += plan.fresh;
        }
    }
    pthread_mutex_unlock(&s->acct);
    if (t->dead) /* dropped meanwhile: the slots went with it */
        return rc;
    for (size_t i = 0; !wrote && i < p->n; i++)
        if (p->take[i])
            slot_fill(&t->files[p->file[i]], p->slot[i]);
    if (rc || full) {
        for (size_t i = 0; i < p->n; i++)
            if (p->take[i])
                slot_forget(&t->files[p->file[i]], p->slot[i]);
        return rc ? rc : PEER_ST_FULL;
    }
    for (size_t i = 0; i < p->n; i++) {
        if (!p->take[i])
            continue;
        struct slotfile *f = &t->files[p->file[i]];
        if (p->again[i] != PEER_ST_OK) { /* a newer version came meanwhile */
            p->statuses[i] = PEER_ST_STALE;
            slot_forget(f, p->slot[i]);
            continue;
        }
        int fresh;
        struct chunk *e = keytab_insert(&t->index, p->keys[i], &fresh); /* room reserved */
        if (!fresh) {
            struct slotfile *old = &t->files[e->file];
            t->bytes -= old->len;
            slot_forget(old, e->slot); /* a crash before this is written: seq decides */
        }
        e->h.version = p->versions[i];
        e->seq = p->seq[i];
        e->file = p->file[i];
        e->slot = p->slot[i];
        t->bytes += f->len;
    }
    return PEER_ST_OK;
}

int chunk_store_put_batch(struct chunk_store *s, const char *ns, const char *owner, size_t n,
                          const uint64_t *keys, const uint64_t *versions,
                          const uint8_t *const *blobs, const uint32_t *lens, uint8_t *statuses)
{
    if (!name_ok(ns))
        return -EINVAL;
    for (size_t i = 0; i < n; i++)
        if (lens[i] > PEER_MAX_BLOB)
            return -EINVAL;
    struct put p = {.n = n, .keys = keys, .versions = versions, .blobs = blobs, .lens = lens,
                    .statuses = statuses};
    int rc = put_alloc(&p);
    struct cns *t = NULL;
    while (!rc) {
        t = ns_ref(s, ns);
        if (!t) {
            if (!n)
                break;
            /* FULL before anything is made on disk. */
            struct plan_result plan;
            rc = batch_plan(n, keys, versions, lens, NULL, held, NULL, statuses, &plan);
            if (!rc && !fits(s, plan.growth))
                rc = PEER_ST_FULL;
            if (!rc)
                rc = ns_create(s, ns, owner, &t);
            if (rc)
                break;
        }
        rc = ns_lock(s, t, owner, 1);
        if (rc == NS_GONE) { /* removed since we found it: look again */
            pthread_rwlock_unlock(&t->lock);
            ns_unref(t);
            t = NULL;
            rc = 0;
            continue;
        }
        if (!rc)
            rc = put_plan(s, t, &p);
        pthread_rwlock_unlock(&t->lock);
        if (!rc) {
            int wrote = put_write(s, &p);
            pthread_rwlock_wrlock(&t->lock);
            t->pending--;
            rc = put_install(s, t, &p, wrote);
            pthread_rwlock_unlock(&t->lock);
        }
        break;
    }
    if (t) {
        int stored = 0;
        for (size_t i = 0; rc == PEER_ST_OK && i < n && !stored; i++)
            stored = statuses[i] == PEER_ST_OK;
        if (!stored)
            ns_remove_if_empty(s, t); /* a new namespace whose put did not go in */
        ns_unref(t);
    }
    put_free(&p);
    return rc;
}

int chunk_store_put(struct chunk_store *s, const char *ns, const char *owner, uint64_t key,
                    uint64_t version, const uint8_t *blob, uint32_t len)
{
    uint8_t status;
    const uint8_t *blobs[1] = {blob};
    int rc = chunk_store_put_batch(s, ns, owner, 1, &key, &version, blobs, &len, &status);
    return rc == PEER_ST_OK ? status : rc;
}

/* ------------------------------------------------------------ the others */

int chunk_store_read(struct chunk_store *s, const char *ns, const char *owner, size_t n,
                     const uint64_t *keys, peer_room_fn room, void *arg)
{
    if (!name_ok(ns))
        return -EINVAL;
    struct cns *t = ns_ref(s, ns);
    int rc = t ? ns_lock(s, t, owner, 0) : NS_GONE;
    if (rc == NS_GONE) {
        for (size_t i = 0; i < n; i++)
            room(arg, 0, 0, 0);
        rc = PEER_ST_OK;
    } else if (rc == PEER_ST_OK) {
        for (size_t i = 0; !rc && i < n; i++) {
            const struct chunk *e = keytab_find(&t->index, keys[i]);
            if (!e) {
                room(arg, 0, 0, 0);
                continue;
            }
            const struct slotfile *f = &t->files[e->file];
            uint8_t *dst = room(arg, 1, e->h.version, f->len);
            rc = dst ? slot_read(f, e->slot, e, dst) : -ENOMEM;
        }
    }
    if (t) {
        pthread_rwlock_unlock(&t->lock);
        ns_unref(t);
    }
    return rc;
}

int chunk_store_get(struct chunk_store *s, const char *ns, const char *owner, uint64_t key,
                    uint64_t *version, uint8_t **copy, uint32_t *len)
{
    struct peer_copy c = {0};
    int rc = chunk_store_read(s, ns, owner, 1, &key, peer_room_malloc, &c);
    return peer_copy_result(rc, &c, version, copy, len);
}

/* fdatasync the files of fds[0..n) (taken under the lock, synced without). */
static int sync_fds(const int *fds, size_t n)
{
    int rc = 0;
    for (size_t i = 0; i < n; i++)
        if (fdatasync(fds[i]) < 0 && !rc)
            rc = -errno;
    return rc;
}

int chunk_store_delete(struct chunk_store *s, const char *ns, const char *owner, size_t n,
                       const uint64_t *keys, uint64_t *deleted)
{
    *deleted = 0;
    if (!name_ok(ns))
        return -EINVAL;
    struct cns *t = ns_ref(s, ns);
    if (!t)
        return PEER_ST_OK;
    int rc = ns_lock(s, t, owner, 1), err = 0;
    int *fds = NULL;
    size_t nfds = 0;
    if (rc == NS_GONE)
        rc = PEER_ST_OK;
    else if (rc == PEER_ST_OK) {
        uint64_t bytes = 0, count = 0;
        for (size_t i = 0; i < n; i++) {
            struct chunk *e = keytab_find(&t->index, keys[i]);
            if (!e)
                continue;
            struct slotfile *f = &t->files[e->file];
            int r = slot_punch(f, e->slot);
            if (r < 0 && !err)
                err = r;
            bytes += f->len;
            count++;
            keytab_remove(&t->index, e);
        }
        t->bytes -= bytes;
        pthread_mutex_lock(&s->acct);
        s->used -= bytes;
        s->count -= count;
        pthread_mutex_unlock(&s->acct);
        *deleted = count;
        /* Every file with frees not yet on disk: with them synced, no older
         * slot of a deleted key can come back after a crash. */
        if (count && s->fsync) {
            fds = malloc(t->nfiles * sizeof *fds);
            for (size_t i = 0; fds && i < t->nfiles; i++)
                if (t->files[i].unsynced) {
                    t->files[i].unsynced = 0;
                    fds[nfds++] = t->files[i].fd;
                }
            if (!fds && !err)
                err = -ENOMEM;
        }
    }
    pthread_rwlock_unlock(&t->lock);
    int synced = sync_fds(fds, nfds); /* t's reference keeps the fds open */
    free(fds);
    if (rc == PEER_ST_OK)
        ns_remove_if_empty(s, t);
    ns_unref(t);
    return rc ? rc : err ? err : synced;
}

int chunk_store_list(struct chunk_store *s, const char *ns, const char *owner, uint64_t after,
                     uint32_t limit, int first, uint64_t *keys, uint64_t *versions,
                     uint32_t *n, int *more)
{
    *n = 0;
    *more = 0;
    if (!name_ok(ns))
        return -EINVAL;
    struct cns *t = ns_ref(s, ns);
    if (!t)
        return PEER_ST_OK;
    int rc = ns_lock(s, t, owner, 0);
    if (rc == NS_GONE)
        rc = PEER_ST_OK;
    else if (rc == PEER_ST_OK)
        rc = keytab_list(&t->index, after, first, limit, keys, versions, n, more);
    pthread_rwlock_unlock(&t->lock);
    ns_unref(t);
    return rc;
}

int chunk_store_drop(struct chunk_store *s, const char *ns, const char *owner,
                     uint64_t *dropped)
{
    *dropped = 0;
    if (!name_ok(ns))
        return -EINVAL;
    char trash[64];
    size_t idx;
    pthread_rwlock_wrlock(&s->lock);
    struct cns *t = ns_find(s, ns, &idx);
    int rc = PEER_ST_OK, gone = 0;
    if (t) {
        rc = ns_lock(s, t, owner, 1); /* never NS_GONE: it is in the table */
        if (rc == PEER_ST_OK)
            rc = chunk_dir_to_trash(s, ns, trash, sizeof trash);
        if (rc == PEER_ST_OK) {
            *dropped = t->index.n;
            pthread_mutex_lock(&s->acct);
            s->used -= t->bytes;
            s->count -= t->index.n;
            pthread_mutex_unlock(&s->acct);
            t->dead = 1; /* puts under way finish into the trash */
            s->ns[idx] = s->ns[--s->nns];
            gone = 1;
        }
        pthread_rwlock_unlock(&t->lock);
    }
    pthread_rwlock_unlock(&s->lock);
    if (gone) {
        chunk_dir_remove(s->rootfd, trash);
        ns_unref(t);
    }
    return rc;
}

size_t chunk_store_namespaces(struct chunk_store *s, const char *owner,
                              struct peer_ns_info *out, size_t max)
{
    size_t m = 0;
    pthread_rwlock_rdlock(&s->lock);
    for (size_t i = 0; i < s->nns; i++) {
        struct cns *t = s->ns[i];
        pthread_rwlock_rdlock(&t->lock);
        if (t->index.n && (!owner || (t->owner && strcmp(t->owner, owner) == 0))) {
            if (m < max)
                peer_ns_info_fill(&out[m], t->name, t->owner, t->index.n, t->bytes);
            m++;
        }
        pthread_rwlock_unlock(&t->lock);
    }
    pthread_rwlock_unlock(&s->lock);
    return m;
}
