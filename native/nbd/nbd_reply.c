/* The reply queue: encode reply headers, collect iovecs, send them in one go.
 *
 * Headers go to a small arena, READ data and extent lists to a data arena;
 * iovecs point into both (and at most one oversized READ buffer).  Nothing
 * is sent until nbd_reply_flush(), which the request loop calls before it
 * blocks for more input, so a pipelined batch of requests costs one
 * sendmsg().  Encodings match hypervisor/netblock/protocol.py byte for byte.
 */
#include <endian.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include "nbd_internal.h"

static void put16(uint8_t *p, uint16_t v) { v = htobe16(v); memcpy(p, &v, 2); }
static void put32(uint8_t *p, uint32_t v) { v = htobe32(v); memcpy(p, &v, 4); }
static void put64(uint8_t *p, uint64_t v) { v = htobe64(v); memcpy(p, &v, 8); }

/* Send every queued iovec; 0 = ok, -1 = the socket failed (result set). */
int nbd_reply_flush(struct nbd_conn *c)
{
    struct iovec *iov = c->iov;
    int n = c->niov;
    while (n > 0) {
        struct msghdr msg = { .msg_iov = iov, .msg_iovlen = (size_t)n };
        ssize_t sent = sendmsg(c->cfg->sock_fd, &msg, MSG_NOSIGNAL);
        if (sent < 0) {
            if (errno == EINTR)
                continue;
            nbd_end(c, OMEGA_NBD_END_SOCKET, errno, "send: %s", strerror(errno));
            return -1;
        }
        while (n > 0 && (size_t)sent >= iov->iov_len) {
            sent -= (ssize_t)iov->iov_len;
            iov++;
            n--;
        }
        if (n > 0) {
            iov->iov_base = (uint8_t *)iov->iov_base + sent;
            iov->iov_len -= (size_t)sent;
        }
    }
    c->niov = 0;
    c->hlen = 0;
    c->dlen = 0;
    return 0;
}

/* Make room for `hlen` header bytes, `niov` iovecs and `dlen` data bytes,
 * sending what is queued if they do not fit; after it returns 0, take_hdr()
 * and nbd_reply_take_data() of those sizes cannot send.  0 / -1 (send failed). */
int nbd_reply_room(struct nbd_conn *c, size_t hlen, int niov, size_t dlen)
{
    if (c->hlen + hlen > HDR_CAP || c->niov + niov > IOV_CAP || c->dlen + dlen > DATA_CAP)
        return nbd_reply_flush(c);
    return 0;
}

static uint8_t *take_hdr(struct nbd_conn *c, size_t hlen)
{
    uint8_t *p = c->hdr + c->hlen;
    c->hlen += hlen;
    return p;
}

/* Data space reserved by a preceding nbd_reply_room(). */
uint8_t *nbd_reply_take_data(struct nbd_conn *c, size_t dlen)
{
    uint8_t *p = c->data + c->dlen;
    c->dlen += dlen;
    return p;
}

static uint8_t *reserve(struct nbd_conn *c, size_t hlen, int niov)
{
    if (nbd_reply_room(c, hlen, niov, 0) < 0)
        return NULL;
    return take_hdr(c, hlen);
}

static void queue(struct nbd_conn *c, const void *base, size_t len)
{
    if (len == 0)
        return;
    struct iovec *last = c->niov ? &c->iov[c->niov - 1] : NULL;
    if (last && (const uint8_t *)last->iov_base + last->iov_len == (const uint8_t *)base) {
        last->iov_len += len;   /* contiguous with the previous entry */
        return;
    }
    c->iov[c->niov].iov_base = (void *)base;
    c->iov[c->niov].iov_len = len;
    c->niov++;
}

static void structured_header(uint8_t *p, uint16_t flags, uint16_t type, uint64_t cookie,
                              uint32_t length)
{
    put32(p, NBD_STRUCTURED_REPLY_MAGIC);
    put16(p + 4, flags);
    put16(p + 6, type);
    put64(p + 8, cookie);
    put32(p + 16, length);
}

static void simple_header(uint8_t *p, uint32_t err, uint64_t cookie)
{
    put32(p, NBD_SIMPLE_REPLY_MAGIC);
    put32(p + 4, err);
    put64(p + 8, cookie);
}

/* Success without data: a simple reply or a NONE chunk with DONE. 0 / -1. */
int nbd_reply_ok(struct nbd_conn *c, const struct nbd_request *r)
{
    size_t len = c->cfg->structured ? 20 : 16;
    uint8_t *p = reserve(c, len, 1);
    if (!p)
        return -1;
    if (c->cfg->structured)
        structured_header(p, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE, r->cookie, 0);
    else
        simple_header(p, 0, r->cookie);
    queue(c, p, len);
    return 0;
}

/* An error: a simple reply with `err`, or an ERROR chunk (DONE) carrying the
 * message. 0 / -1. */
int nbd_reply_error(struct nbd_conn *c, const struct nbd_request *r, uint32_t err,
                    const char *message)
{
    if (c->shared_counters)
        __atomic_add_fetch(&c->ctr->errors, 1, __ATOMIC_RELAXED);
    else
        __atomic_store_n(&c->ctr->errors,
                         __atomic_load_n(&c->ctr->errors, __ATOMIC_RELAXED) + 1,
                         __ATOMIC_RELAXED);
    if (!c->cfg->structured) {
        uint8_t *p = reserve(c, 16, 1);
        if (!p)
            return -1;
        simple_header(p, err, r->cookie);
        queue(c, p, 16);
        return 0;
    }
    size_t mlen = strnlen(message, MAX_MESSAGE);
    size_t len = 20 + 6 + mlen;
    uint8_t *p = reserve(c, len, 1);
    if (!p)
        return -1;
    structured_header(p, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_ERROR, r->cookie,
                      (uint32_t)(6 + mlen));
    put32(p + 20, err);
    put16(p + 24, (uint16_t)mlen);
    memcpy(p + 26, message, mlen);
    queue(c, p, len);
    return 0;
}

/* The header of a successful READ reply whose r->length data bytes the
 * caller sends next (simple header, or an OFFSET_DATA chunk with DONE; a
 * zero-length read is a NONE chunk, as in the Python server). 0 / -1. */
int nbd_reply_read_header(struct nbd_conn *c, const struct nbd_request *r)
{
    if (!c->cfg->structured) {
        uint8_t *p = reserve(c, 16, 2);
        if (!p)
            return -1;
        simple_header(p, 0, r->cookie);
        queue(c, p, 16);
        return 0;
    }
    if (r->length == 0)
        return nbd_reply_ok(c, r);
    uint8_t *p = reserve(c, 28, 2);
    if (!p)
        return -1;
    structured_header(p, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_OFFSET_DATA, r->cookie,
                      r->length + 8);
    put64(p + 20, r->offset);
    queue(c, p, 28);
    return 0;
}

/* A READ reply whose data is at `buf` (reply data space). 0 / -1. */
int nbd_reply_read(struct nbd_conn *c, const struct nbd_request *r, const uint8_t *buf)
{
    if (nbd_reply_read_header(c, r) < 0)
        return -1;
    queue(c, buf, r->length);
    return 0;
}

/* One BLOCK_STATUS chunk (DONE) for the negotiated context. 0 / -1. */
int nbd_reply_block_status(struct nbd_conn *c, const struct nbd_request *r,
                           const struct nbd_extent *ext, size_t n)
{
    size_t body = 4 + 8 * n;
    if (nbd_reply_room(c, 20, 2, body) < 0)
        return -1;
    uint8_t *p = take_hdr(c, 20);
    uint8_t *d = nbd_reply_take_data(c, body);
    structured_header(p, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_BLOCK_STATUS, r->cookie,
                      (uint32_t)body);
    put32(d, c->cfg->meta_context_id);
    for (size_t i = 0; i < n; i++) {
        put32(d + 4 + 8 * i, ext[i].length);
        put32(d + 8 + 8 * i, ext[i].flags);
    }
    queue(c, p, 20);
    queue(c, d, body);
    return 0;
}
