/* One function per NBD command, executed on the export's file descriptor.
 *
 * Each mirrors the Python backends (hypervisor/netblock/backend.py
 * SparseFileBackend, hypervisor/netblock/memfd.py MemfdBackend): same
 * syscalls, same fallbacks, same NBD errno and error text, so a client sees
 * the same replies whichever path served it.  Requests arrive validated
 * (nbd_serve.c check_request): ranges are inside the export and READ/WRITE
 * lengths are at most max_block.
 *
 * Return convention (nbd_op_*): 0 = the connection goes on, whether the
 * request succeeded or got an NBD error reply; -1 = a reply could not be sent
 * or a buffer could not be allocated, the connection ends (result set).
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <linux/magic.h>
#include <sys/mman.h>
#include <sys/sendfile.h>
#include <sys/vfs.h>
#include <sys/socket.h>
#include <linux/falloc.h>

#include "nbd_internal.h"

#define ZERO_STEP (1u << 20)
#define SENDFILE_MIN (64u << 10)   /* READs this long skip the copy (< DATA_CAP) */
static const uint8_t zero_block[ZERO_STEP];

static int fail(struct nbd_conn *c, const struct nbd_request *r, int err, const char *what)
{
    char message[MAX_MESSAGE];
    if (what)
        snprintf(message, sizeof message, "%s: %s", what, strerror(err));
    else
        snprintf(message, sizeof message, "%s", strerror(err));
    return nbd_reply_error(c, r, NBD_EIO, message);
}

/* pread until `len` bytes or end of file; the rest reads as zeroes.
 * 0 = ok, -1 = error (errno set). */
static int pread_full(int fd, uint8_t *buf, size_t len, uint64_t offset)
{
    size_t done = 0;
    while (done < len) {
        ssize_t n = pread(fd, buf + done, len - done, (off_t)(offset + done));
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        if (n == 0) {   /* past the end of a shrunken file */
            memset(buf + done, 0, len - done);
            break;
        }
        done += (size_t)n;
    }
    return 0;
}

/* pwrite all of `len` bytes. 0 = ok, -1 = error (errno set). */
static int pwrite_full(int fd, const uint8_t *buf, size_t len, uint64_t offset)
{
    size_t done = 0;
    while (done < len) {
        ssize_t n = pwrite(fd, buf + done, len - done, (off_t)(offset + done));
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        done += (size_t)n;
    }
    return 0;
}

/* fdatasync when the request carries FUA. 0 = ok, -1 = error (errno set). */
static int fua_sync(struct nbd_conn *c, const struct nbd_request *r)
{
    if (!(r->flags & NBD_CMD_FLAG_FUA))
        return 0;
    return fdatasync(c->cfg->file_fd);
}

/* A long READ leaves by sendfile(): the kernel passes the file's pages to
 * the socket without copying them through this process.  The reply header
 * goes first, so a failure after it cannot become an NBD error reply: the
 * connection ends instead (the client retries on a new one).  -1 = ended. */
static int read_by_sendfile(struct nbd_conn *c, const struct nbd_request *r)
{
    if (nbd_reply_read_header(c, r) < 0 || nbd_reply_flush(c) < 0)
        return -1;
    off_t offset = (off_t)r->offset;
    size_t left = r->length;
    while (left) {
        ssize_t n = sendfile(c->cfg->sock_fd, c->cfg->file_fd, &offset, left);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            nbd_end(c, OMEGA_NBD_END_SOCKET, errno, "sendfile of a %u-byte read: %s",
                    r->length, strerror(errno));
            return -1;
        }
        if (n == 0)   /* past the end of a shrunken file: the rest is zeroes */
            break;
        left -= (size_t)n;
    }
    while (left) {
        size_t step = left < ZERO_STEP ? left : ZERO_STEP;
        ssize_t n = send(c->cfg->sock_fd, zero_block, step, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            nbd_end(c, OMEGA_NBD_END_SOCKET, errno, "send: %s", strerror(errno));
            return -1;
        }
        left -= (size_t)n;
    }
    return 0;
}

int nbd_op_read(struct nbd_conn *c, const struct nbd_request *r)
{
    if (r->length >= SENDFILE_MIN)
        return read_by_sendfile(c, r);
    if (nbd_reply_room(c, 28, 2, r->length) < 0)
        return -1;
    uint8_t *buf = nbd_reply_take_data(c, r->length);
    if (pread_full(c->cfg->file_fd, buf, r->length, r->offset) < 0)
        return fail(c, r, errno, NULL);
    return nbd_reply_read(c, r, buf);
}

/*
 * A memory export's WRITEs are copied through a shared mapping of its memfd
 * instead of pwrite(): no syscall, no page-cache lookup per request (on this
 * box ≈ 10 % of the serving thread's time in 4 KiB random writes).  Only
 * where a store through the mapping can never fault with SIGBUS: a memfd
 * (on the kernel's internal shmem mount, which has no size limit, and not
 * hugetlbfs, whose pool can run dry) sealed against shrinking and growing,
 * so every byte below the export's size stays in the file.  Writing into a
 * hole allocates a page as pwrite() would; where memory cannot be had the
 * cgroup's OOM handling applies instead of an NBD error.  READs stay with
 * pread(): a read fault on a hole of a shared shmem mapping would allocate
 * the page (and the export would stop being sparse).
 */
uint8_t *nbd_write_map(const struct omega_nbd_config *cfg)
{
    struct statfs fs;
    int seals = fcntl(cfg->file_fd, F_GET_SEALS);
    if (cfg->read_only || cfg->size == 0 || cfg->size > SIZE_MAX || seals < 0 ||
        (seals & (F_SEAL_SHRINK | F_SEAL_GROW)) != (F_SEAL_SHRINK | F_SEAL_GROW) ||
        fstatfs(cfg->file_fd, &fs) < 0 || (unsigned long)fs.f_type != TMPFS_MAGIC)
        return NULL;
    void *p = mmap(NULL, (size_t)cfg->size, PROT_READ | PROT_WRITE, MAP_SHARED, cfg->file_fd, 0);
    return p == MAP_FAILED ? NULL : p;
}

int nbd_op_write_piece(struct nbd_conn *c, const uint8_t *buf, size_t len, uint64_t offset)
{
    if (c->wmap) { /* the range is inside the export (checked) */
        memcpy(c->wmap + offset, buf, len);
        return 0;
    }
    if (pwrite_full(c->cfg->file_fd, buf, len, offset) < 0)
        return errno;
    return 0;
}

int nbd_op_write_done(struct nbd_conn *c, const struct nbd_request *r, int failed_errno)
{
    if (failed_errno)
        return fail(c, r, failed_errno, NULL);
    if (fua_sync(c, r) < 0)
        return fail(c, r, errno, NULL);
    return nbd_reply_ok(c, r);
}

int nbd_op_flush(struct nbd_conn *c, const struct nbd_request *r)
{
    if (fdatasync(c->cfg->file_fd) < 0)
        return fail(c, r, errno, NULL);
    return nbd_reply_ok(c, r);
}

int nbd_op_trim(struct nbd_conn *c, const struct nbd_request *r)
{
    if (fallocate(c->cfg->file_fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                  (off_t)r->offset, (off_t)r->length) < 0 && errno != EOPNOTSUPP)
        return fail(c, r, errno, "trim");
    if (fua_sync(c, r) < 0)
        return fail(c, r, errno, NULL);
    return nbd_reply_ok(c, r);
}

int nbd_op_write_zeroes(struct nbd_conn *c, const struct nbd_request *r)
{
    int fd = c->cfg->file_fd;
    int rc;
    /* shmem (memfd, tmpfs) has no ZERO_RANGE: NO_HOLE then writes zeroes */
    if (r->flags & NBD_CMD_FLAG_NO_HOLE)
        rc = fallocate(fd, FALLOC_FL_ZERO_RANGE, (off_t)r->offset, (off_t)r->length);
    else
        rc = fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)r->offset,
                       (off_t)r->length);
    if (rc < 0) {
        if (errno != EOPNOTSUPP && errno != ENOSYS)
            return fail(c, r, errno, "write_zeroes");
        if (r->flags & NBD_CMD_FLAG_FAST_ZERO)
            return nbd_reply_error(c, r, NBD_ENOTSUP, "zeroing would be slow");
        for (uint64_t pos = r->offset; pos < r->offset + r->length; pos += ZERO_STEP) {
            uint64_t left = r->offset + r->length - pos;
            if (pwrite_full(fd, zero_block, left < ZERO_STEP ? left : ZERO_STEP, pos) < 0)
                return fail(c, r, errno, NULL);
        }
    }
    if (fua_sync(c, r) < 0)
        return fail(c, r, errno, NULL);
    return nbd_reply_ok(c, r);
}

int nbd_op_cache(struct nbd_conn *c, const struct nbd_request *r)
{
    int err = posix_fadvise(c->cfg->file_fd, (off_t)r->offset, (off_t)r->length,
                            POSIX_FADV_WILLNEED);
    if (err)   /* posix_fadvise returns the error number, errno is untouched */
        return fail(c, r, err, NULL);
    return nbd_reply_ok(c, r);
}

/* Append (length, flags), merging with an equal-flagged predecessor while
 * the sum fits in 32 bits (protocol.clip_extents).  Returns the new count. */
static size_t add_extent(struct nbd_extent *ext, size_t n, uint64_t length, uint32_t flags)
{
    if (n && ext[n - 1].flags == flags && ext[n - 1].length + length <= UINT32_MAX) {
        ext[n - 1].length += (uint32_t)length;
        return n;
    }
    ext[n].length = (uint32_t)length;   /* length <= request length < 2^32 */
    ext[n].flags = flags;
    return n + 1;
}

int nbd_op_block_status(struct nbd_conn *c, const struct nbd_request *r)
{
    int fd = c->cfg->file_fd;
    size_t max = (r->flags & NBD_CMD_FLAG_REQ_ONE) ? 1 : OMEGA_NBD_MAX_EXTENTS;
    size_t n = 0;
    uint64_t pos = r->offset;
    uint64_t stop = r->offset + r->length;
    if (stop > c->cfg->size)
        stop = c->cfg->size;
    while (pos < stop) {
        off_t data_at = lseek(fd, (off_t)pos, SEEK_DATA);
        if (data_at < 0) {
            if (errno != ENXIO)
                return fail(c, r, errno, "SEEK_DATA");
            data_at = (off_t)stop;
        }
        uint64_t end;
        uint32_t flags;
        if ((uint64_t)data_at > pos) {
            end = (uint64_t)data_at < stop ? (uint64_t)data_at : stop;
            flags = NBD_STATE_HOLE | NBD_STATE_ZERO;
        } else {
            off_t hole_at = lseek(fd, (off_t)pos, SEEK_HOLE);
            if (hole_at < 0)
                return fail(c, r, errno, NULL);
            end = (uint64_t)hole_at < stop ? (uint64_t)hole_at : stop;
            flags = 0;
        }
        if (end <= pos)   /* the file changed under us; report the rest as data */
            end = stop;
        size_t before = n;
        n = add_extent(c->extents, n, end - pos, flags);
        if (n > before && n > max) {   /* a new descriptor past the cap: stop before it */
            n--;
            break;
        }
        pos = end;
    }
    if (n == 0)
        return nbd_reply_error(c, r, NBD_EIO, "backend returned no extents");
    return nbd_reply_block_status(c, r, c->extents, n);
}
