/*
 * A chunk namespace's directory (layout in chunk_store.h): read at open,
 * its owner file, its removal.
 *
 * Reading a directory scans every slot file with its checks (a torn or
 * zeroed slot is free; of a key's valid slots the higher (version, seq)
 * wins and the others are zeroed), then converts the chunk files of the
 * old layout (`<key:016x>`: "OMCH", u64 version, u32 length, big-endian,
 * then the blob) into slots and deletes them, so an upgraded peer keeps
 * its chunks. Files it does not recognise are left alone and not served;
 * dot-files (interrupted writes) are deleted.
 */
#include <dirent.h>
#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "chunk_store.h"
#include "peer.h"

#define OLD_HEAD 16
#define OWNER_TMP ".owner.tmp"
#define SCAN_BYTES (1u << 20) /* read this much of a slot file at a time */

static int fail(char *err, size_t errlen, int rc, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
    if (n >= 0 && (size_t)n < errlen)
        snprintf(err + n, errlen - (size_t)n, ": %s", strerror(-rc));
    return rc;
}

int chunk_rwlock_init(pthread_rwlock_t *lock)
{
    pthread_rwlockattr_t attr;
    if (pthread_rwlockattr_init(&attr) != 0)
        return -ENOMEM;
    pthread_rwlockattr_setkind_np(&attr, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
    int rc = pthread_rwlock_init(lock, &attr);
    pthread_rwlockattr_destroy(&attr);
    return -rc;
}

/* A namespace with nothing in it yet (refs 1), over directory dirfd. */
static struct cns *cns_new(const char *name, int dirfd)
{
    struct cns *t = calloc(1, sizeof *t);
    if (!t)
        return NULL;
    t->name = strdup(name);
    if (!t->name || chunk_rwlock_init(&t->lock) != 0) {
        free(t->name);
        free(t);
        return NULL;
    }
    keytab_init(&t->index, sizeof(struct chunk));
    keytab_init(&t->bylen, sizeof(struct bylen));
    t->dirfd = dirfd;
    t->refs = 1;
    return t;
}

void cns_free(struct cns *t)
{
    for (size_t i = 0; i < t->nfiles; i++)
        slotfile_close(&t->files[i]);
    free(t->files);
    keytab_destroy(&t->index);
    keytab_destroy(&t->bylen);
    if (t->dirfd >= 0)
        close(t->dirfd);
    pthread_rwlock_destroy(&t->lock);
    free(t->name);
    free(t->owner);
    free(t);
}

static int read_all(int fd, void *buf, size_t n, off_t off, size_t *got)
{
    *got = 0;
    while (*got < n) {
        ssize_t r = pread(fd, (uint8_t *)buf + *got, n - *got, off + (off_t)*got);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (r == 0)
            break;
        *got += (size_t)r;
    }
    return 0;
}

/* The owner file, surrounding white space stripped; none or empty: NULL. */
static int read_owner(struct cns *t)
{
    int fd = openat(t->dirfd, OWNER_FILE, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return errno == ENOENT ? 0 : -errno;
    char buf[PEER_NAME_MAX + 64];
    size_t n;
    int rc = read_all(fd, buf, sizeof buf - 1, 0, &n);
    close(fd);
    if (rc < 0)
        return rc;
    buf[n] = 0;
    char *p = buf;
    while (*p == ' ' || *p == '\n' || *p == '\t' || *p == '\r')
        p++;
    size_t len = strlen(p);
    while (len && (p[len - 1] == ' ' || p[len - 1] == '\n' || p[len - 1] == '\t' ||
                   p[len - 1] == '\r'))
        p[--len] = 0;
    if (!len)
        return 0;
    t->owner = strdup(p);
    return t->owner ? 0 : -ENOMEM;
}

int chunk_dir_set_owner(struct chunk_store *s, struct cns *t, const char *owner)
{
    char *copy = strdup(owner);
    if (!copy)
        return -ENOMEM;
    int fd = openat(t->dirfd, OWNER_TMP, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0)
        goto fail;
    size_t n = strlen(owner);
    errno = 0;
    if (write(fd, owner, n) != (ssize_t)n || (s->fsync && fsync(fd) < 0)) {
        int e = errno ? errno : EIO;
        close(fd);
        errno = e;
        goto fail;
    }
    if (close(fd) < 0 || renameat(t->dirfd, OWNER_TMP, t->dirfd, OWNER_FILE) < 0 ||
        (s->fsync && fsync(t->dirfd) < 0))
        goto fail;
    free(t->owner);
    t->owner = copy;
    return 0;
fail:;
    int rc = -errno;
    unlinkat(t->dirfd, OWNER_TMP, 0);
    free(copy);
    return rc;
}

/* Take the valid slot (file, slot) holding h into t's index, unless the
 * key's current slot is newer; the loser's header is zeroed. */
static int consider(struct chunk_store *s, struct cns *t, uint32_t file, uint32_t slot,
                    const struct slot_head *h)
{
    if (h->seq > s->seq)
        s->seq = h->seq;
    int fresh;
    struct chunk *e = keytab_insert(&t->index, h->key, &fresh);
    if (!e)
        return -ENOMEM;
    if (!fresh) {
        if (e->h.version > h->version || (e->h.version == h->version && e->seq > h->seq))
            return slot_clear(&t->files[file], slot);
        t->bytes -= t->files[e->file].len;
        int rc = slot_clear(&t->files[e->file], e->slot);
        if (rc < 0)
            return rc;
    }
    e->h.version = h->version;
    e->seq = h->seq;
    e->file = file;
    e->slot = slot;
    t->bytes += h->len;
    return slot_mark(&t->files[file], slot);
}

/* Read slot file `name` (blob length len) into t. */
static int scan_file(struct chunk_store *s, struct cns *t, const char *name, uint32_t len)
{
    int fd = openat(t->dirfd, name, O_RDWR | O_CLOEXEC);
    if (fd < 0)
        return -errno;
    struct stat st;
    if (fstat(fd, &st) < 0) {
        int rc = -errno;
        close(fd);
        return rc;
    }
    uint64_t stride = slot_stride(len);
    uint64_t nslots = (uint64_t)st.st_size / stride; /* a torn last slot is left out */
    uint32_t file;
    int rc = nslots > UINT32_MAX ? -EFBIG : slotfile_add(t, len, fd, (uint32_t)nslots, &file);
    if (rc < 0) {
        close(fd);
        return rc;
    }
    uint64_t per = stride >= SCAN_BYTES ? 1 : SCAN_BYTES / stride;
    uint8_t *buf = malloc(per * stride);
    if (!buf)
        return -ENOMEM;
    for (uint64_t base = 0; !rc && base < nslots; base += per) {
        uint64_t k = nslots - base < per ? nslots - base : per;
        size_t got;
        rc = read_all(fd, buf, k * stride, (off_t)(base * stride), &got);
        for (uint64_t i = 0; !rc && i < got / stride; i++) {
            struct slot_head h;
            if (slot_parse(buf + i * stride, len, &h))
                rc = consider(s, t, file, (uint32_t)(base + i), &h);
        }
    }
    free(buf);
    return rc;
}

static int parse_slots_name(const char *name, uint32_t *len)
{
    char *end;
    if (strncmp(name, "slots-", 6) != 0 || name[6] < '0' || name[6] > '9')
        return 0;
    errno = 0;
    unsigned long v = strtoul(name + 6, &end, 10);
    char again[32];
    snprintf(again, sizeof again, "slots-%lu", v);
    if (*end || errno || v > PEER_MAX_BLOB || strcmp(again, name) != 0)
        return 0;
    *len = (uint32_t)v;
    return 1;
}

static int parse_old_name(const char *name, uint64_t *key)
{
    if (strlen(name) != 16)
        return 0;
    for (int i = 0; i < 16; i++)
        if (!((name[i] >= '0' && name[i] <= '9') || (name[i] >= 'a' && name[i] <= 'f')))
            return 0;
    *key = strtoull(name, NULL, 16);
    return 1;
}

struct names {
    char **v;
    size_t n, cap;
};

static int names_add(struct names *l, const char *name)
{
    if (l->n == l->cap) {
        size_t ncap = l->cap ? l->cap * 2 : 16;
        char **p = realloc(l->v, ncap * sizeof *p);
        if (!p)
            return -ENOMEM;
        l->v = p;
        l->cap = ncap;
    }
    l->v[l->n] = strdup(name);
    return l->v[l->n] ? (l->n++, 0) : -ENOMEM;
}

static void names_free(struct names *l)
{
    for (size_t i = 0; i < l->n; i++)
        free(l->v[i]);
    free(l->v);
}

/* Convert one old-layout chunk file into a slot. Returns 1 when the file
 * is done with (converted, or older than what t holds), 0 when it is not a
 * chunk file, or -errno. */
static int convert_one(struct chunk_store *s, struct cns *t, const char *name, uint64_t key)
{
    int fd = openat(t->dirfd, name, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -errno;
    uint8_t head[OLD_HEAD];
    uint8_t *blob = NULL;
    struct stat st;
    size_t got = 0;
    int rc = fstat(fd, &st) < 0 ? -errno : read_all(fd, head, OLD_HEAD, 0, &got);
    if (rc < 0 || got < OLD_HEAD || memcmp(head, "OMCH", 4) != 0)
        goto out;
    uint64_t version;
    uint32_t len;
    memcpy(&version, head + 4, 8);
    memcpy(&len, head + 12, 4);
    version = be64toh(version);
    len = be32toh(len);
    if (len > PEER_MAX_BLOB || (uint64_t)st.st_size != OLD_HEAD + (uint64_t)len)
        goto out;
    const struct chunk *cur = keytab_find(&t->index, key);
    if (cur && cur->h.version >= version) { /* converted before a crash, or superseded */
        rc = 1;
        goto out;
    }
    blob = malloc(len ? len : 1);
    if (!blob) {
        rc = -ENOMEM;
        goto out;
    }
    rc = read_all(fd, blob, len, OLD_HEAD, &got);
    if (rc < 0 || got != len)
        goto out;
    uint32_t file, slot;
    rc = slotfile_get(t, len, 1, s->fsync, &file);
    if (rc < 0 || (rc = slot_take(&t->files[file], &slot)) < 0)
        goto out;
    struct slot_head h = {key, version, ++s->seq, len};
    struct slot_dest d;
    slot_dest(&t->files[file], slot, &d);
    rc = slot_write(&d, slot, &h, blob);
    if (rc < 0) {
        slot_forget(&t->files[file], slot);
        goto out;
    }
    rc = consider(s, t, file, slot, &h); /* newer than cur: it wins */
    if (rc == 0)
        rc = 1;
out:
    free(blob);
    close(fd);
    return rc;
}

/* A listing of t's directory from its start (closedir when done), or NULL
 * with a message in err. */
static DIR *list_dir(struct cns *t, char *err, size_t errlen)
{
    int dfd = dup(t->dirfd);
    DIR *d = dfd < 0 ? NULL : fdopendir(dfd);
    if (!d) {
        fail(err, errlen, -errno, "namespace %s", t->name);
        if (dfd >= 0)
            close(dfd);
        return NULL;
    }
    rewinddir(d);
    return d;
}

/* Convert t's old-layout files, then delete them and its dot-files. */
static int convert_old(struct chunk_store *s, struct cns *t, char *err, size_t errlen)
{
    DIR *d = list_dir(t, err, errlen);
    if (!d)
        return -EIO;
    struct names done = {0};
    int rc = 0, converted = 0;
    struct dirent *de;
    while (!rc && (de = readdir(d))) {
        uint64_t key;
        if (!strcmp(de->d_name, ".") || !strcmp(de->d_name, ".."))
            continue;
        if (de->d_name[0] == '.') {
            rc = names_add(&done, de->d_name);
        } else if (parse_old_name(de->d_name, &key)) {
            int r = convert_one(s, t, de->d_name, key);
            if (r > 0) {
                converted = 1;
                r = names_add(&done, de->d_name);
            }
            if (r < 0)
                rc = fail(err, errlen, r, "namespace %s: converting %s", t->name, de->d_name);
        }
    }
    closedir(d);
    /* The slots are on disk before the files they replace go. */
    for (size_t i = 0; !rc && converted && s->fsync && i < t->nfiles; i++)
        if (fdatasync(t->files[i].fd) < 0)
            rc = fail(err, errlen, -errno, "namespace %s: sync", t->name);
    for (size_t i = 0; !rc && i < done.n; i++)
        unlinkat(t->dirfd, done.v[i], 0);
    if (!rc && done.n && s->fsync && fsync(t->dirfd) < 0)
        rc = fail(err, errlen, -errno, "namespace %s: sync", t->name);
    names_free(&done);
    return rc;
}

/* Scan every slot file of t. */
static int scan_slots(struct chunk_store *s, struct cns *t, char *err, size_t errlen)
{
    DIR *d = list_dir(t, err, errlen);
    if (!d)
        return -EIO;
    int rc = 0;
    struct dirent *de;
    while (!rc && (de = readdir(d))) {
        uint32_t len;
        if (parse_slots_name(de->d_name, &len)) {
            rc = scan_file(s, t, de->d_name, len);
            if (rc < 0)
                fail(err, errlen, rc, "namespace %s: %s", t->name, de->d_name);
        }
    }
    closedir(d);
    return rc;
}

int chunk_dir_load(struct chunk_store *s, const char *name, int create, struct cns **out,
                   char *err, size_t errlen)
{
    if (create && mkdirat(s->rootfd, name, 0700) < 0 && errno != EEXIST)
        return fail(err, errlen, -errno, "namespace %s", name);
    int dirfd = openat(s->rootfd, name, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dirfd < 0)
        return fail(err, errlen, -errno, "namespace %s", name);
    struct cns *t = cns_new(name, dirfd);
    if (!t) {
        close(dirfd);
        return fail(err, errlen, -ENOMEM, "namespace %s", name);
    }
    int rc = read_owner(t);
    if (rc < 0)
        fail(err, errlen, rc, "namespace %s: owner", name);
    if (!rc)
        rc = scan_slots(s, t, err, errlen);
    if (!rc)
        rc = convert_old(s, t, err, errlen);
    for (size_t i = 0; !rc && i < t->nfiles; i++)
        if ((rc = slotfile_settle(&t->files[i])) < 0)
            fail(err, errlen, rc, "namespace %s: slots-%u", name, t->files[i].len);
    if (rc < 0) {
        cns_free(t);
        return rc;
    }
    *out = t;
    return 0;
}

int chunk_dir_to_trash(struct chunk_store *s, const char *name, char *trash, size_t len)
{
    for (int tries = 0; tries < 1000; tries++) {
        unsigned long long n = __atomic_add_fetch(&s->trash, 1, __ATOMIC_RELAXED);
        snprintf(trash, len, ".trash-%llu", n);
        if (renameat(s->rootfd, name, s->rootfd, trash) == 0)
            return s->fsync && fsync(s->rootfd) < 0 ? -errno : 0;
        if (errno != EEXIST && errno != ENOTEMPTY)
            return -errno;
    }
    return -EEXIST;
}

void chunk_dir_remove(int rootfd, const char *name)
{
    int fd = openat(rootfd, name, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    DIR *d = fd < 0 ? NULL : fdopendir(fd);
    if (d) {
        struct dirent *de;
        while ((de = readdir(d)))
            if (strcmp(de->d_name, ".") && strcmp(de->d_name, ".."))
                unlinkat(fd, de->d_name, 0);
        closedir(d);
    } else if (fd >= 0) {
        close(fd);
    }
    unlinkat(rootfd, name, AT_REMOVEDIR);
}
