/* The request loop of one connection (thread model: see nbd_fast.h).
 *
 * receive -> frame requests out of the buffer -> validate (check_request,
 * the same rules in the same order as protocol.check_request) -> execute
 * (nbd_ops.c) -> queue the reply (nbd_reply.c); when the buffer holds no
 * complete request, send every queued reply, then block in recv() again.
 * WRITE payloads are written straight from the receive buffer.
 */
#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <time.h>

#include "nbd_internal.h"
#include "omega_clock.h"
#include "omega_spin.h"
#include "omega_thread.h"

void nbd_end(struct nbd_conn *c, int status, int sys_errno, const char *fmt, ...)
{
    va_list ap;
    c->result->status = status;
    c->result->sys_errno = sys_errno;
    va_start(ap, fmt);
    vsnprintf(c->result->reason, sizeof c->result->reason, fmt, ap);
    va_end(ap);
}

uint64_t nbd_now_ns(void)
{
    return omega_now_ns();
}

/* Counter update: one writer uses a relaxed load and store (no locked insn);
 * a replicated connection's workers share the counters and add atomically. */
static void bump(const struct nbd_conn *c, uint64_t *counter, uint64_t by)
{
    if (c->shared_counters)
        __atomic_add_fetch(counter, by, __ATOMIC_RELAXED);
    else
        __atomic_store_n(counter, __atomic_load_n(counter, __ATOMIC_RELAXED) + by,
                         __ATOMIC_RELAXED);
}

void nbd_count(struct nbd_conn *c, const struct nbd_request *r, uint64_t elapsed)
{
    struct omega_nbd_counters *ctr = c->ctr;
    const uint64_t *bounds = c->cfg->latency_bounds_ns;
    int b = 0;
    while (b < OMEGA_NBD_NBOUNDS && elapsed > bounds[b])
        b++;
    bump(c, &ctr->ops[r->cmd], 1);
    bump(c, &ctr->latency[r->cmd][b], 1);
    bump(c, &ctr->latency_total_ns[r->cmd], elapsed);
    if (r->cmd == NBD_CMD_READ)
        bump(c, &ctr->bytes_read, r->length);
    else if (r->cmd == NBD_CMD_WRITE)
        bump(c, &ctr->bytes_written, r->length);
}

void omega_nbd_counters_read(const struct omega_nbd_counters *src,
                             struct omega_nbd_counters *dst)
{
    const uint64_t *from = (const uint64_t *)src;
    uint64_t *to = (uint64_t *)dst;
    for (size_t i = 0; i < sizeof *src / sizeof(uint64_t); i++)
        to[i] = __atomic_load_n(&from[i], __ATOMIC_RELAXED);
}

/* The flags a command accepts (protocol._KNOWN_FLAGS).
 * 0 = known command (*allowed set), -1 = unknown command. */
static int known_flags(uint16_t cmd, uint32_t *allowed)
{
    const uint32_t fua = NBD_CMD_FLAG_FUA;
    switch (cmd) {
    case NBD_CMD_READ: *allowed = fua | NBD_CMD_FLAG_DF; return 0;
    case NBD_CMD_WRITE:
    case NBD_CMD_DISC:
    case NBD_CMD_FLUSH:
    case NBD_CMD_TRIM:
    case NBD_CMD_CACHE: *allowed = fua; return 0;
    case NBD_CMD_WRITE_ZEROES:
        *allowed = fua | NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FAST_ZERO;
        return 0;
    case NBD_CMD_BLOCK_STATUS: *allowed = fua | NBD_CMD_FLAG_REQ_ONE; return 0;
    default: return -1;
    }
}

/* 0 when the request may run, else the NBD errno (protocol.check_request). */
uint32_t nbd_check_request(const struct nbd_conn *c, const struct nbd_request *r)
{
    const struct omega_nbd_config *cfg = c->cfg;
    uint32_t allowed;
    if (known_flags(r->cmd, &allowed) < 0 || (r->flags & ~allowed))
        return NBD_EINVAL;
    if ((r->flags & NBD_CMD_FLAG_DF) && !cfg->structured)
        return NBD_EINVAL;
    if (r->cmd == NBD_CMD_FLUSH)
        return r->offset == 0 && r->length == 0 ? 0 : NBD_EINVAL;
    if (r->cmd == NBD_CMD_DISC)
        return 0;
    int writes = r->cmd == NBD_CMD_WRITE || r->cmd == NBD_CMD_TRIM ||
                 r->cmd == NBD_CMD_WRITE_ZEROES;
    if (writes && cfg->read_only)
        return NBD_EPERM;
    if (r->cmd == NBD_CMD_WRITE_ZEROES && (r->flags & NBD_CMD_FLAG_FAST_ZERO) &&
        !cfg->can_fast_zero)
        return NBD_ENOTSUP;
    if (r->cmd == NBD_CMD_BLOCK_STATUS && (!cfg->meta_context_id || r->length == 0))
        return NBD_EINVAL;
    if (r->offset > cfg->size || r->length > cfg->size - r->offset)
        return r->cmd == NBD_CMD_WRITE || r->cmd == NBD_CMD_WRITE_ZEROES ? NBD_ENOSPC
                                                                          : NBD_EINVAL;
    if (r->length > cfg->max_block && r->cmd == NBD_CMD_READ)
        return NBD_EOVERFLOW;
    if (r->length > cfg->max_block && r->cmd == NBD_CMD_WRITE)
        return NBD_EINVAL;
    return 0;
}

void nbd_parse(const uint8_t *p, uint32_t *magic, struct nbd_request *r)
{
    uint16_t v16;
    uint32_t v32;
    uint64_t v64;
    memcpy(&v32, p, 4);
    *magic = be32toh(v32);
    memcpy(&v16, p + 4, 2);
    r->flags = be16toh(v16);
    memcpy(&v16, p + 6, 2);
    r->cmd = be16toh(v16);
    memcpy(&v64, p + 8, 8);
    r->cookie = be64toh(v64);   /* echoed back as raw bytes, order preserved */
    memcpy(&v64, p + 16, 8);
    r->offset = be64toh(v64);
    memcpy(&v32, p + 24, 4);
    r->length = be32toh(v32);
}

/* Send queued replies, then receive more bytes after [rpos, rend) (moved to
 * the front).  1 = got bytes, 0 = end of file, -1 = socket error (result set). */
int nbd_receive(struct nbd_conn *c)
{
    if (nbd_reply_flush(c) < 0)
        return -1;
    if (c->rpos) {
        memmove(c->rbuf, c->rbuf + c->rpos, c->rend - c->rpos);
        c->rend -= c->rpos;
        c->rpos = 0;
    }
    /* Wait awake first (MSG_DONTWAIT and a yield between tries), as the
     * peer links do: a thread asleep in recv() takes tens of microseconds to
     * be woken on a virtual machine whose idle vCPU halts, which at QD1 was
     * most of a 4 KiB read's round trip.  The spin stops at once on a busy
     * CPU (omega_spin.h); once it runs out, the connection sleeps at once
     * until a request comes within busy_poll_ns of the last answer again, so
     * a client pausing between bursts costs one spin, not one per request. */
    uint64_t spin = c->cfg->busy_poll_ns, since = spin ? omega_now_ns() : 0;
    uint64_t until = since + spin, given = 0;
    int flags = spin && !c->spin_off ? MSG_DONTWAIT : 0;
    for (;;) {
        ssize_t n = recv(c->cfg->sock_fd, c->rbuf + c->rend, RBUF_CAP - c->rend, flags);
        if (n < 0 && errno == EAGAIN && flags) {
            if (!omega_spin_yield(until, &given)) {
                flags = 0;
                omega_spin_ran_out(until, &c->spin_off);
            }
            continue;
        }
        if (n > 0) {
            omega_spin_request_came(since, spin, &c->spin_off);
            c->rend += (size_t)n;
            return 1;
        }
        if (n == 0) {
            nbd_end(c, OMEGA_NBD_END_EOF, 0, "client closed the connection");
            return 0;
        }
        if (errno == EINTR)
            continue;
        if (errno == ECONNRESET) {
            nbd_end(c, OMEGA_NBD_END_EOF, errno, "client reset the connection");
            return 0;
        }
        nbd_end(c, OMEGA_NBD_END_SOCKET, errno, "recv: %s", strerror(errno));
        return -1;
    }
}

/* Consume a WRITE's payload (already validated or refused with `err`) and
 * reply.  0 = go on, 1 = end of file inside the payload, -1 = error. */
static int serve_write(struct nbd_conn *c, const struct nbd_request *r, uint32_t err)
{
    uint32_t left = r->length;
    uint64_t offset = r->offset;
    int failed = 0;
    if (left <= RBUF_CAP) {   /* whole payload in the buffer: one pwrite */
        while (c->rend - c->rpos < left) {
            /* receive() moves [rpos, rend) to the front, so the payload fits */
            int got = nbd_receive(c);
            if (got <= 0)
                return got == 0 ? 1 : -1;
        }
    }
    uint64_t t0 = nbd_now_ns();
    while (left) {
        if (c->rend == c->rpos) {
            int got = nbd_receive(c);
            if (got <= 0)
                return got == 0 ? 1 : -1;
        }
        size_t take = c->rend - c->rpos;
        if (take > left)
            take = left;
        if (!err && !failed)
            failed = nbd_op_write_piece(c, c->rbuf + c->rpos, take, offset);
        c->rpos += take;
        offset += take;
        left -= (uint32_t)take;
    }
    if (err)
        return nbd_reply_error(c, r, err, "invalid request");
    int rc = nbd_op_write_done(c, r, failed);
    nbd_count(c, r, nbd_now_ns() - t0);
    return rc;
}

static int dispatch(struct nbd_conn *c, const struct nbd_request *r)
{
    uint32_t err = nbd_check_request(c, r);
    if (err)
        return nbd_reply_error(c, r, err, "invalid request");
    uint64_t t0 = nbd_now_ns();
    int rc;
    switch (r->cmd) {
    case NBD_CMD_READ: rc = nbd_op_read(c, r); break;
    case NBD_CMD_FLUSH: rc = nbd_op_flush(c, r); break;
    case NBD_CMD_TRIM: rc = nbd_op_trim(c, r); break;
    case NBD_CMD_CACHE: rc = nbd_op_cache(c, r); break;
    case NBD_CMD_WRITE_ZEROES: rc = nbd_op_write_zeroes(c, r); break;
    case NBD_CMD_BLOCK_STATUS: rc = nbd_op_block_status(c, r); break;
    default:   /* WRITE and DISC are handled by the loop; nothing else passes check */
        return nbd_reply_error(c, r, NBD_EINVAL, "invalid request");
    }
    nbd_count(c, r, nbd_now_ns() - t0);
    return rc;
}

/* The loop.  0 = ended by DISC or end of file, -1 = ended by an error. */
static int serve(struct nbd_conn *c)
{
    for (;;) {
        while (c->rend - c->rpos >= NBD_REQUEST_SIZE) {
            struct nbd_request r;
            uint32_t magic;
            nbd_parse(c->rbuf + c->rpos, &magic, &r);
            if (magic != NBD_REQUEST_MAGIC) {
                nbd_reply_flush(c);
                nbd_end(c, OMEGA_NBD_END_PROTOCOL, 0, "bad request magic %#x", magic);
                return -1;
            }
            c->rpos += NBD_REQUEST_SIZE;
            if (r.cmd == NBD_CMD_DISC) {
                if (nbd_reply_flush(c) < 0)
                    return -1;
                nbd_end(c, OMEGA_NBD_END_DISC, 0, "client disconnected");
                return 0;
            }
            int rc;
            if (r.cmd == NBD_CMD_WRITE) {
                if (r.length > c->cfg->max_write_payload) {
                    nbd_reply_flush(c);
                    nbd_end(c, OMEGA_NBD_END_PROTOCOL, 0, "write of %u bytes exceeds %u",
                            r.length, c->cfg->max_write_payload);
                    return -1;
                }
                rc = serve_write(c, &r, nbd_check_request(c, &r));
                if (rc == 1)
                    return 0;   /* end of file inside a payload: result says EOF */
            } else {
                rc = dispatch(c, &r);
            }
            if (rc < 0)
                return -1;
        }
        int got = nbd_receive(c);
        if (got <= 0)
            return got;
    }
}

/* Serve one connection until DISC, end of file or an error.
 * `initial` holds bytes the handshake read past its end (the first requests).
 * Returns 0 = ended cleanly (DISC / EOF), -1 = ended by an error; `result`
 * says which and why either way. */
int omega_nbd_serve(const struct omega_nbd_config *cfg, const uint8_t *initial,
                    size_t initial_len, struct omega_nbd_counters *counters,
                    struct omega_nbd_result *result)
{
    struct nbd_conn c = { .cfg = cfg, .ctr = counters, .result = result };
    memset(result, 0, sizeof *result);
    int rc = -1;
    c.rbuf = malloc(RBUF_CAP);
    c.hdr = malloc(HDR_CAP);
    c.data = malloc(DATA_CAP);
    c.extents = malloc(sizeof(struct nbd_extent) * (OMEGA_NBD_MAX_EXTENTS + 1));
    if (!c.rbuf || !c.hdr || !c.data || !c.extents) {
        nbd_end(&c, OMEGA_NBD_END_INTERNAL, ENOMEM, "no memory for connection buffers");
        goto out;
    }
    if (initial_len > RBUF_CAP) {
        nbd_end(&c, OMEGA_NBD_END_INTERNAL, E2BIG, "%zu bytes left over from the handshake",
                initial_len);
        goto out;
    }
    memcpy(c.rbuf, initial, initial_len);
    c.rend = initial_len;
    /* The socket may be non-blocking (it came from asyncio); this thread blocks. */
    int fl = fcntl(cfg->sock_fd, F_GETFL);
    if (fl < 0 || (fl & O_NONBLOCK && fcntl(cfg->sock_fd, F_SETFL, fl & ~O_NONBLOCK) < 0)) {
        nbd_end(&c, OMEGA_NBD_END_SOCKET, errno, "fcntl: %s", strerror(errno));
        goto out;
    }
    /* visible in top -H and /proc/PID/task/TID/comm (the tests look for it);
     * failure is deliberately ignored: the thread keeps its old name and serves */
    (void)prctl(PR_SET_NAME, "nbd-fastpath", 0, 0, 0);
    struct sched_param was_param;
    int was = sched_getscheduler(0);
    if (was >= 0 && sched_getparam(0, &was_param) < 0)
        was = -1;
    omega_thread_batch(); /* and back below: the caller's thread */
    if (!cfg->repl)
        c.wmap = nbd_write_map(cfg);
    rc = cfg->repl ? nbd_serve_replicated(&c) : serve(&c);
    if (c.wmap)
        munmap(c.wmap, (size_t)cfg->size);
    if (was >= 0)
        (void)sched_setscheduler(0, was, &was_param);
out:
    free(c.rbuf);
    free(c.hdr);
    free(c.data);
    free(c.extents);
    return rc;
}
