/*
 * One slot file of the chunk store (format in chunk_store.h): its slots'
 * headers, writes, checked reads, and freeing.
 */
#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <linux/magic.h>
#include <sys/stat.h>
#include <sys/vfs.h>
#include <sys/uio.h>
#include <unistd.h>

#include "chunk_store.h"
#include "crc32c.h"

#define BLOCK 4096 /* what a punched hole gives back, at most, per block */

/*
 * Reads copy slots out of a shared mapping of the file instead of
 * preadv(): here a 4 KiB slot costs 0.5-0.7 µs by memcpy against 1.5-2 µs
 * by preadv (the kernel's copy to user space is slow on this kind of VM,
 * and a syscall per block adds up: BENCHMARKS.md).  Writes go through the
 * same mapping (read-write where write_safe() allows it) into slots whose bytes
 * the file is known to hold (the `filled` bits: written by this process
 * and not punched since), so no write through it ever lands on a hole or
 * past the end of the file, where a fault could not be given space
 * (SIGBUS); other slots, and a header zeroed where no mapping can be had,
 * are written with pwritev(), which allocates.
 *
 * A mapping is made twice as long as the file when a read first needs it,
 * and replaced by a longer one when the file has outgrown it; replaced ones
 * stay mapped until the store closes (a reader may still be copying from
 * one; at most one per doubling of the file). Only bytes below the file
 * size seen by fstat() are read through it: a slot file never shrinks
 * while the store serves (slotfile_settle() truncates before the first
 * request), so nothing read can lie past its end. When no mapping can be
 * had, reads fall back to preadv().
 */
struct mapping {
    uint8_t *base;
    size_t len;
    int writable;           /* PROT_WRITE too (write_safe, and the file is open read-write) */
    struct mapping *older;
};

struct slotmap {
    pthread_mutex_t lock;   /* making a mapping */
    struct mapping *cur;    /* the newest (atomic) */
    uint64_t size;          /* file bytes known to exist (atomic, only grows) */
    int writes;             /* puts may go through it (write_safe) */
};

/*
 * Whether a store through a shared mapping into bytes the file already
 * holds can never need new space: true of tmpfs, ext4 and XFS (blocks stay
 * where they are), not of copy-on-write filesystems (btrfs, ZFS, bcachefs
 * allocate on every overwrite: a full one would answer the page fault with
 * SIGBUS where pwritev returns ENOSPC) nor of network and FUSE ones.  Slot
 * files elsewhere are written with pwritev only.
 */
static int write_safe(int fd)
{
    struct statfs fs;
    if (fstatfs(fd, &fs) < 0)
        return 0;
    switch ((unsigned long)fs.f_type) {
    case TMPFS_MAGIC:
    case EXT4_SUPER_MAGIC: /* also ext2 and ext3 */
    case XFS_SUPER_MAGIC:
        return 1;
    default:
        return 0;
    }
}

static void slotmap_free(struct slotmap *sm)
{
    if (!sm)
        return;
    for (struct mapping *m = sm->cur, *older; m; m = older) {
        older = m->older;
        munmap((void *)m->base, m->len);
        free(m);
    }
    pthread_mutex_destroy(&sm->lock);
    free(sm);
}

/* Bytes [off, off + n) of fd's file through sm's mapping, or NULL (use
 * preadv / pwritev); `write`: only from a writable mapping. */
static uint8_t *map_at(struct slotmap *sm, int fd, uint64_t off, uint64_t n, int write)
{
    uint64_t end = off + n;
    if (!sm)
        return NULL;
    struct mapping *m = __atomic_load_n(&sm->cur, __ATOMIC_ACQUIRE);
    if (m && end <= m->len && end <= __atomic_load_n(&sm->size, __ATOMIC_ACQUIRE))
        return write && !m->writable ? NULL : m->base + off;
    uint8_t *at = NULL;
    pthread_mutex_lock(&sm->lock);
    struct stat st;
    m = sm->cur;
    if (fstat(fd, &st) == 0 && (uint64_t)st.st_size >= end) {
        if ((uint64_t)st.st_size > sm->size)
            __atomic_store_n(&sm->size, (uint64_t)st.st_size, __ATOMIC_RELEASE);
        if (!m || end > m->len) {
            size_t page = (size_t)sysconf(_SC_PAGESIZE);
            size_t len = ((size_t)st.st_size * 2 + page - 1) / page * page;
            struct mapping *nm = malloc(sizeof *nm);
            void *p = MAP_FAILED;
            int writable = sm->writes;
            if (nm && writable)
                p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
            if (nm && p == MAP_FAILED) {
                writable = 0; /* opened read-only */
                p = mmap(NULL, len, PROT_READ, MAP_SHARED, fd, 0);
            }
            if (p != MAP_FAILED) {
                nm->base = p;
                nm->len = len;
                nm->writable = writable;
                nm->older = m;
                __atomic_store_n(&sm->cur, nm, __ATOMIC_RELEASE);
                m = nm;
            } else {
                free(nm);
                m = NULL;
            }
        }
        if (m && (!write || m->writable))
            at = m->base + off;
    }
    pthread_mutex_unlock(&sm->lock);
    return at;
}

static const uint8_t *mapped(const struct slotfile *f, uint64_t off, uint64_t n)
{
    return map_at(f->map, f->fd, off, n, 0);
}

uint64_t slot_stride(uint32_t len)
{
    return ((uint64_t)SLOT_HEAD + len + 7) & ~(uint64_t)7;
}

static void put_le32(uint8_t *p, uint32_t v) { v = htole32(v); memcpy(p, &v, 4); }
static void put_le64(uint8_t *p, uint64_t v) { v = htole64(v); memcpy(p, &v, 8); }
static uint32_t get_le32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return le32toh(v); }
static uint64_t get_le64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return le64toh(v); }

/* The header bytes of h with its crc over them and the blob. */
static void encode_head(uint8_t out[SLOT_HEAD], const struct slot_head *h, const uint8_t *blob)
{
    memset(out, 0, SLOT_HEAD);
    put_le32(out, SLOT_MAGIC);
    put_le64(out + 8, h->key);
    put_le64(out + 16, h->version);
    put_le64(out + 24, h->seq);
    put_le32(out + 32, h->len);
    put_le32(out + 4, crc32c(crc32c(0, out, SLOT_HEAD), blob, h->len));
}

/* Whether hdr and blob form a valid slot of blob length len (h filled). */
static int check_slot(const uint8_t *hdr, const uint8_t *blob, uint32_t len, struct slot_head *h)
{
    if (get_le32(hdr) != SLOT_MAGIC || get_le32(hdr + 32) != len || get_le32(hdr + 36) != 0)
        return 0;
    uint8_t zeroed[SLOT_HEAD];
    memcpy(zeroed, hdr, SLOT_HEAD);
    memset(zeroed + 4, 0, 4);
    if (crc32c(crc32c(0, zeroed, SLOT_HEAD), blob, len) != get_le32(hdr + 4))
        return 0;
    h->key = get_le64(hdr + 8);
    h->version = get_le64(hdr + 16);
    h->seq = get_le64(hdr + 24);
    h->len = len;
    return 1;
}

int slot_parse(const uint8_t *raw, uint32_t len, struct slot_head *h)
{
    return check_slot(raw, raw + SLOT_HEAD, len, h);
}

int slotfile_add(struct cns *t, uint32_t len, int fd, uint32_t nslots, uint32_t *file)
{
    if (t->nfiles == t->filecap) {
        size_t ncap = t->filecap ? t->filecap * 2 : 4;
        struct slotfile *p = realloc(t->files, ncap * sizeof *p);
        if (!p)
            return -ENOMEM;
        t->files = p;
        t->filecap = ncap;
    }
    int fresh;
    struct bylen *b = keytab_insert(&t->bylen, len, &fresh);
    if (!b)
        return -ENOMEM;
    struct slotfile *f = &t->files[t->nfiles];
    memset(f, 0, sizeof *f);
    f->len = len;
    f->stride = slot_stride(len);
    f->fd = fd;
    f->nslots = nslots;
    f->busywords = (nslots + 63) / 64;
    f->busy = calloc(f->busywords ? f->busywords : 1, sizeof *f->busy);
    f->map = calloc(1, sizeof *f->map);
    if (f->map)
        f->map->writes = write_safe(fd);
    if (!f->busy || !f->map || pthread_mutex_init(&f->map->lock, NULL) != 0) {
        free(f->busy);
        free(f->map);
        f->busy = NULL;
        f->map = NULL;
        keytab_remove(&t->bylen, b);
        return -ENOMEM;
    }
    b->file = (uint32_t)t->nfiles;
    *file = (uint32_t)t->nfiles++;
    return 0;
}

int slotfile_get(struct cns *t, uint32_t len, int create, int fsync, uint32_t *file)
{
    const struct bylen *b = keytab_find(&t->bylen, len);
    if (b) {
        *file = b->file;
        return 0;
    }
    if (!create)
        return -ENOENT;
    char name[32];
    snprintf(name, sizeof name, "slots-%u", len);
    int fd = openat(t->dirfd, name, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd < 0)
        return -errno;
    if (fsync && fdatasync(t->dirfd) < 0) {
        int e = -errno;
        unlinkat(t->dirfd, name, 0);
        close(fd);
        return e;
    }
    int rc = slotfile_add(t, len, fd, 0, file);
    if (rc < 0) {
        unlinkat(t->dirfd, name, 0);
        close(fd);
    }
    return rc;
}

void slotfile_close(struct slotfile *f)
{
    if (f->fd >= 0)
        close(f->fd);
    free(f->busy);
    free(f->free);
    free(f->filled);
    slotmap_free(f->map);
    f->map = NULL;
}

int slot_is_busy(const struct slotfile *f, uint32_t slot)
{
    return (f->busy[slot / 64] >> (slot % 64)) & 1;
}

/* Make *arr (of *cap elements of size bytes, new ones zeroed) hold at least
 * want, doubling from at least min. */
static int grow_array(void **arr, size_t *cap, size_t want, size_t size, size_t min)
{
    if (want <= *cap)
        return 0;
    size_t n = *cap ? *cap * 2 : min;
    while (n < want)
        n *= 2;
    unsigned char *p = realloc(*arr, n * size);
    if (!p)
        return -ENOMEM;
    memset(p + *cap * size, 0, (n - *cap) * size);
    *arr = p;
    *cap = n;
    return 0;
}

static int grow_busy(struct slotfile *f, uint32_t slot)
{
    return grow_array((void **)&f->busy, &f->busywords, slot / 64 + 1, sizeof *f->busy, 16);
}

int slot_mark(struct slotfile *f, uint32_t slot)
{
    int rc = grow_busy(f, slot);
    if (rc == 0)
        f->busy[slot / 64] |= 1ull << (slot % 64);
    return rc;
}

static void slot_unmark(struct slotfile *f, uint32_t slot)
{
    f->busy[slot / 64] &= ~(1ull << (slot % 64));
}

/* Put slot on the free list (room for it was made by slot_take or settle). */
static void give_back(struct slotfile *f, uint32_t slot)
{
    slot_unmark(f, slot);
    f->free[f->nfree++] = slot;
}

static int free_room(struct slotfile *f, size_t want)
{
    return grow_array((void **)&f->free, &f->freecap, want, sizeof *f->free, 64);
}

int slotfile_settle(struct slotfile *f)
{
    uint32_t end = f->nslots;
    while (end && !slot_is_busy(f, end - 1))
        end--;
    if (end < f->nslots && ftruncate(f->fd, (off_t)(end * f->stride)) < 0)
        return -errno;
    f->nslots = end;
    f->nfree = 0;
    if (free_room(f, end) < 0)
        return -ENOMEM;
    for (uint32_t i = end; i-- > 0;)
        if (!slot_is_busy(f, i))
            f->free[f->nfree++] = i;
    return 0;
}

int slot_take(struct slotfile *f, uint32_t *slot)
{
    /* Room to give every slot back later, so freeing never fails. */
    if (free_room(f, (size_t)f->nslots + 1) < 0)
        return -ENOMEM;
    if (f->nfree) {
        *slot = f->free[--f->nfree];
    } else {
        if (f->nslots == UINT32_MAX || (uint64_t)f->nslots * f->stride > (uint64_t)INT64_MAX / 2)
            return -EFBIG;
        *slot = f->nslots;
        if (grow_busy(f, *slot) < 0)
            return -ENOMEM;
        f->nslots++;
    }
    return slot_mark(f, *slot);
}

static off_t slot_offset(const struct slotfile *f, uint32_t slot)
{
    return (off_t)((uint64_t)slot * f->stride);
}

static int slot_filled(const struct slotfile *f, uint32_t slot)
{
    return slot / 64 < f->filledwords && (f->filled[slot / 64] >> (slot % 64)) & 1;
}

void slot_fill(struct slotfile *f, uint32_t slot)
{
    /* without memory for the bit the slot is written with pwritev next time */
    if (grow_array((void **)&f->filled, &f->filledwords, slot / 64 + 1, sizeof *f->filled,
                   16) == 0)
        f->filled[slot / 64] |= 1ull << (slot % 64);
}

void slot_dest(const struct slotfile *f, uint32_t slot, struct slot_dest *d)
{
    d->fd = f->fd;
    d->stride = f->stride;
    d->map = f->map;
    d->filled = slot_filled(f, slot);
}

/* Zero a slot's magic and crc: it no longer reads as valid. */
static int zero_head(struct slotfile *f, uint32_t slot)
{
    static const uint8_t zero[8];
    f->unsynced = 1;
    uint8_t *at = slot_filled(f, slot)
                      ? map_at(f->map, f->fd, (uint64_t)slot_offset(f, slot), sizeof zero, 1)
                      : NULL;
    if (at) {
        memcpy(at, zero, sizeof zero);
        return 0;
    }
    ssize_t w = pwrite(f->fd, zero, sizeof zero, slot_offset(f, slot));
    if (w < 0)
        return -errno;
    return w == (ssize_t)sizeof zero ? 0 : -EIO;
}

int slot_forget(struct slotfile *f, uint32_t slot)
{
    int rc = zero_head(f, slot);
    give_back(f, slot);
    return rc;
}

int slot_clear(struct slotfile *f, uint32_t slot)
{
    slot_unmark(f, slot);
    return zero_head(f, slot);
}

void slot_untake(struct slotfile *f, uint32_t slot)
{
    give_back(f, slot);
}

int slot_punch(struct slotfile *f, uint32_t slot)
{
    uint64_t lo = (uint64_t)slot_offset(f, slot), hi = lo + f->stride;
    /* Free neighbours' bytes in the blocks this slot shares with them may go
     * too: whole blocks come back instead of none for slots under 8 KiB. */
    if (slot > 0 && !slot_is_busy(f, slot - 1)) {
        uint64_t down = lo & ~(uint64_t)(BLOCK - 1);
        lo = down > lo - f->stride ? down : lo - f->stride;
    }
    if (slot + 1 >= f->nslots) {
        hi = (hi + BLOCK - 1) & ~(uint64_t)(BLOCK - 1);
    } else if (!slot_is_busy(f, slot + 1)) {
        uint64_t up = (hi + BLOCK - 1) & ~(uint64_t)(BLOCK - 1);
        hi = up < hi + f->stride ? up : hi + f->stride;
    }
    f->unsynced = 1;
    /* every slot with bytes in [lo, hi) may now lie over a hole */
    for (uint64_t k = lo / f->stride; k * f->stride < hi && k / 64 < f->filledwords; k++)
        f->filled[k / 64] &= ~(1ull << (k % 64));
    if (fallocate(f->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)lo,
                  (off_t)(hi - lo)) == 0) {
        give_back(f, slot);
        return 0;
    }
    /* No holes here (or none now): a zeroed header frees it all the same,
     * the space stays with the file for the next put of this length. */
    return slot_forget(f, slot);
}

/* Step the *nv iovecs at *v past n bytes done. */
static void iov_advance(struct iovec **v, int *nv, size_t n)
{
    for (; *nv && n >= (*v)->iov_len; (*nv)--, (*v)++)
        n -= (*v)->iov_len;
    if (*nv) {
        (*v)->iov_base = (uint8_t *)(*v)->iov_base + n;
        (*v)->iov_len -= n;
    }
}

int slot_write(const struct slot_dest *d, uint32_t slot, const struct slot_head *h,
               const uint8_t *blob)
{
    static const uint8_t pad[8];
    uint8_t head[SLOT_HEAD];
    encode_head(head, h, blob);
    off_t off = (off_t)((uint64_t)slot * d->stride);
    size_t tail = d->stride - SLOT_HEAD - h->len;
    uint8_t *at = d->filled ? map_at(d->map, d->fd, (uint64_t)off, d->stride, 1) : NULL;
    if (at) {
        memcpy(at, head, SLOT_HEAD);
        memcpy(at + SLOT_HEAD, blob, h->len);
        memset(at + SLOT_HEAD + h->len, 0, tail);
        return 0;
    }
    struct iovec iov[3] = {
        {head, SLOT_HEAD},
        {(void *)blob, h->len},
        {(void *)pad, tail},
    };
    struct iovec *v = iov;
    int nv = 3;
    while (nv) {
        ssize_t w = pwritev(d->fd, v, nv, off);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (w == 0)
            return -EIO;
        off += w;
        iov_advance(&v, &nv, (size_t)w);
    }
    return 0;
}

/* preadv a slot's header into head and its blob into blob. 0 or -errno
 * (-EBADMSG: the file ends inside the slot). */
static int slot_pread(const struct slotfile *f, uint32_t slot, uint8_t *head, uint8_t *blob)
{
    struct iovec iov[2] = {{head, SLOT_HEAD}, {blob, f->len}};
    struct iovec *v = iov;
    int nv = 2;
    off_t off = slot_offset(f, slot);
    while (nv) {
        ssize_t r = preadv(f->fd, v, nv, off);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (r == 0)
            return -EBADMSG;
        off += r;
        iov_advance(&v, &nv, (size_t)r);
    }
    return 0;
}

int slot_read(const struct slotfile *f, uint32_t slot, const struct chunk *e, uint8_t *blob)
{
    uint8_t head[SLOT_HEAD];
    const uint8_t *hdr = mapped(f, (uint64_t)slot_offset(f, slot), SLOT_HEAD + (uint64_t)f->len);
    if (hdr) {
        /* the crc is checked over the copy: what is sent is what was checked */
        memcpy(blob, hdr + SLOT_HEAD, f->len);
    } else {
        int rc = slot_pread(f, slot, head, blob);
        if (rc < 0)
            return rc;
        hdr = head;
    }
    struct slot_head h;
    if (!check_slot(hdr, blob, f->len, &h) || h.key != e->h.key ||
        h.version != e->h.version || h.seq != e->seq)
        return -EBADMSG;
    return 0;
}
