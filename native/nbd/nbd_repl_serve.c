/* The request loop of a connection to a replicated export (nbd_repl.h).
 *
 * The pipelined READs and WRITEs already in the receive buffer are gathered
 * into one batch and executed together by nbr_exec, so a queue of 64
 * requests costs one round trip per peer instead of 64; their replies are
 * queued in request order and leave with one sendmsg before the thread
 * blocks in recv() again.  A batch ends at the first request that is not
 * complete in the buffer, at any other command (FLUSH, TRIM, WRITE_ZEROES,
 * CACHE, BLOCK_STATUS run alone, in order), or when the reply data arena is
 * full.  READs write straight into the reply arena; WRITE payloads are
 * read where they lie in the receive buffer, which is not touched until the
 * batch has run.  A READ longer than the arena, or a WRITE longer than the
 * receive buffer, gets a buffer of its own and runs alone.
 *
 * Validation, errno values and reply encodings are nbd_serve.c's (the same
 * as the Python server's).
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include "nbd_internal.h"
#include "nbd_repl.h"

#define REPL_BATCH 256             /* requests per batch */
#define REPLY_HDR_MAX (26 + MAX_MESSAGE)

struct batch {
    struct nbd_request nbd[REPL_BATCH];
    struct nbr_req req[REPL_BATCH];
    uint32_t check[REPL_BATCH];    /* nbd_check_request's verdict */
    size_t n;
};

/* Queue the reply of one executed request. 0 / -1. */
static int reply(struct nbd_conn *c, const struct nbd_request *r, uint32_t check,
                 const struct nbr_req *q)
{
    if (check)
        return nbd_reply_error(c, r, check, "invalid request");
    if (q->err)
        return nbd_reply_error(c, r, q->err, q->msg);
    if (r->cmd == NBD_CMD_READ)
        return nbd_reply_read(c, r, q->rdata);
    return nbd_reply_ok(c, r);
}

#define CMD_NONE 0xffff           /* a refused request: nbr_exec does nothing with it */

static void to_req(const struct nbd_request *r, uint32_t check, struct nbr_req *q)
{
    memset(q, 0, sizeof *q);
    q->cmd = check ? CMD_NONE : r->cmd;
    q->flags = check ? 0 : r->flags;
    q->offset = r->offset;
    q->length = check ? 0 : r->length;
}

/* Run the gathered batch and queue its replies. 0 / -1. */
static int run_batch(struct nbd_conn *c, struct nbr_client *cl, struct batch *b)
{
    if (!b->n)
        return 0;
    uint64_t t0 = nbd_now_ns();
    if (nbr_exec(cl, b->req, b->n) < 0) {
        nbd_end(c, OMEGA_NBD_END_INTERNAL, ENOMEM, "no memory to execute a batch");
        return -1;
    }
    uint64_t elapsed = nbd_now_ns() - t0;
    for (size_t k = 0; k < b->n; k++) {
        if (reply(c, &b->nbd[k], b->check[k], &b->req[k]) < 0)
            return -1;
        if (!b->check[k])
            nbd_count(c, &b->nbd[k], elapsed);
    }
    b->n = 0;
    return 0;
}

/* A command that runs alone (everything but READ and WRITE). 0 / -1. */
static int run_alone(struct nbd_conn *c, struct nbr_client *cl, const struct nbd_request *r)
{
    uint32_t err = nbd_check_request(c, r);
    if (err)
        return nbd_reply_error(c, r, err, "invalid request");
    uint64_t t0 = nbd_now_ns();
    int rc;
    if (r->cmd == NBD_CMD_FLUSH) {
        rc = nbr_flush(cl) < 0 ? nbd_reply_error(c, r, NBD_EIO, "could not persist the chunk table")
                               : nbd_reply_ok(c, r);
    } else if (r->cmd == NBD_CMD_BLOCK_STATUS) {
        size_t max = (r->flags & NBD_CMD_FLAG_REQ_ONE) ? 1 : OMEGA_NBD_MAX_EXTENTS;
        uint32_t *pairs = (uint32_t *)c->extents;   /* (length, flags) pairs, same layout */
        size_t n = nbr_extents(c->cfg->repl, r->offset, r->length, pairs, max);
        rc = n ? nbd_reply_block_status(c, r, c->extents, n)
               : nbd_reply_error(c, r, NBD_EIO, "backend returned no extents");
    } else {
        struct nbr_req q;
        to_req(r, 0, &q);
        if (nbr_exec(cl, &q, 1) < 0) {
            nbd_end(c, OMEGA_NBD_END_INTERNAL, ENOMEM, "no memory to execute a request");
            return -1;
        }
        rc = reply(c, r, 0, &q);
    }
    nbd_count(c, r, nbd_now_ns() - t0);
    return rc;
}

/* A READ too long for the reply arena: its own buffer, sent at once. */
static int read_alone(struct nbd_conn *c, struct nbr_client *cl, const struct nbd_request *r)
{
    uint64_t t0 = nbd_now_ns();
    struct nbr_req q;
    to_req(r, 0, &q);
    q.rdata = malloc(r->length);
    if (!q.rdata) {
        nbd_end(c, OMEGA_NBD_END_INTERNAL, ENOMEM, "no memory for a %u-byte read", r->length);
        return -1;
    }
    int rc = nbr_exec(cl, &q, 1);
    if (rc < 0)
        nbd_end(c, OMEGA_NBD_END_INTERNAL, ENOMEM, "no memory to execute a request");
    else
        rc = reply(c, r, 0, &q) < 0 || nbd_reply_flush(c) < 0 ? -1 : 0;
    free(q.rdata);
    if (rc == 0)
        nbd_count(c, r, nbd_now_ns() - t0);
    return rc;
}

/* A WRITE whose payload is longer than the receive buffer: gather it into
 * a buffer of its own.  0 = go on, 1 = end of file inside the payload,
 * -1 = error. */
static int write_alone(struct nbd_conn *c, struct nbr_client *cl, const struct nbd_request *r,
                       uint32_t check)
{
    uint8_t *buf = malloc(r->length);
    if (!buf) {
        nbd_end(c, OMEGA_NBD_END_INTERNAL, ENOMEM, "no memory for a %u-byte write", r->length);
        return -1;
    }
    size_t have = 0;
    while (have < r->length) {
        if (c->rend == c->rpos) {
            int got = nbd_receive(c);
            if (got <= 0) {
                free(buf);
                return got == 0 ? 1 : -1;
            }
        }
        size_t take = c->rend - c->rpos;
        if (take > r->length - have)
            take = r->length - have;
        memcpy(buf + have, c->rbuf + c->rpos, take);
        c->rpos += take;
        have += take;
    }
    int rc;
    if (check) {
        rc = nbd_reply_error(c, r, check, "invalid request");
    } else {
        uint64_t t0 = nbd_now_ns();
        struct nbr_req q;
        to_req(r, 0, &q);
        q.wdata = buf;
        rc = nbr_exec(cl, &q, 1);
        if (rc < 0)
            nbd_end(c, OMEGA_NBD_END_INTERNAL, ENOMEM, "no memory to execute a request");
        else
            rc = reply(c, r, 0, &q);
        if (rc == 0)
            nbd_count(c, r, nbd_now_ns() - t0);
    }
    free(buf);
    return rc;
}

/*
 * Gather and run what the buffer holds, batch after batch.  Returns 1 to
 * receive more bytes, 0 when the connection ended cleanly (DISC, or end of
 * file inside a payload), -1 on an error.
 */
static int serve_buffer(struct nbd_conn *c, struct nbr_client *cl, struct batch *b)
{
    for (;;) {
        /* room for every reply of a full batch (sends what is queued) */
        if (nbd_reply_room(c, REPL_BATCH * REPLY_HDR_MAX, 2 * REPL_BATCH, 0) < 0)
            return -1;
        int more = 0; /* stopped before the end of what was received */
        while (c->rend - c->rpos >= NBD_REQUEST_SIZE) {
            if (b->n == REPL_BATCH) {
                more = 1;
                break;
            }
            struct nbd_request r;
            uint32_t magic;
            nbd_parse(c->rbuf + c->rpos, &magic, &r);
            if (magic != NBD_REQUEST_MAGIC) {
                if (run_batch(c, cl, b) < 0)
                    return -1;
                nbd_reply_flush(c);
                nbd_end(c, OMEGA_NBD_END_PROTOCOL, 0, "bad request magic %#x", magic);
                return -1;
            }
            if (r.cmd == NBD_CMD_DISC) {
                if (run_batch(c, cl, b) < 0 || nbd_reply_flush(c) < 0)
                    return -1;
                c->rpos += NBD_REQUEST_SIZE;
                nbd_end(c, OMEGA_NBD_END_DISC, 0, "client disconnected");
                return 0;
            }
            uint32_t check = nbd_check_request(c, &r);
            if (r.cmd == NBD_CMD_WRITE) {
                if (r.length > c->cfg->max_write_payload) {
                    if (run_batch(c, cl, b) < 0)
                        return -1;
                    nbd_reply_flush(c);
                    nbd_end(c, OMEGA_NBD_END_PROTOCOL, 0, "write of %u bytes exceeds %u",
                            r.length, c->cfg->max_write_payload);
                    return -1;
                }
                if (c->rend - c->rpos - NBD_REQUEST_SIZE < r.length) {
                    if (b->n || (size_t)r.length + NBD_REQUEST_SIZE <= RBUF_CAP)
                        break; /* run what we have, then receive the rest */
                    c->rpos += NBD_REQUEST_SIZE;
                    int rc = write_alone(c, cl, &r, check);
                    if (rc != 0)
                        return rc > 0 ? 0 : -1;
                    more = 1;
                    break;
                }
                size_t k = b->n++;
                b->nbd[k] = r;
                b->check[k] = check;
                to_req(&r, check, &b->req[k]);
                b->req[k].wdata = c->rbuf + c->rpos + NBD_REQUEST_SIZE;
                c->rpos += NBD_REQUEST_SIZE + r.length;
                continue;
            }
            if (r.cmd == NBD_CMD_READ) {
                if (!check && c->dlen + r.length > DATA_CAP) {
                    if (b->n) {
                        more = 1; /* the arena is spoken for: run, send, go on */
                        break;
                    }
                    if (nbd_reply_flush(c) < 0)
                        return -1;
                    if (r.length > DATA_CAP) {
                        c->rpos += NBD_REQUEST_SIZE;
                        if (read_alone(c, cl, &r) < 0)
                            return -1;
                        more = 1;
                        break;
                    }
                }
                size_t k = b->n++;
                b->nbd[k] = r;
                b->check[k] = check;
                to_req(&r, check, &b->req[k]);
                if (!check)
                    b->req[k].rdata = nbd_reply_take_data(c, r.length);
                c->rpos += NBD_REQUEST_SIZE;
                continue;
            }
            if (b->n) {
                more = 1; /* other commands run alone, after what came before them */
                break;
            }
            c->rpos += NBD_REQUEST_SIZE;
            if (run_alone(c, cl, &r) < 0)
                return -1;
            more = 1;
            break;
        }
        if (run_batch(c, cl, b) < 0)
            return -1;
        if (!more)
            return 1;
    }
}

int nbd_serve_replicated(struct nbd_conn *c)
{
    struct nbr_client *cl = nbr_client_new(c->cfg->repl);
    struct batch *b = calloc(1, sizeof *b);
    int rc = -1;
    if (!cl || !b) {
        nbd_end(c, OMEGA_NBD_END_INTERNAL, ENOMEM, "no memory for the replicated client");
        goto out;
    }
    for (;;) {
        rc = serve_buffer(c, cl, b);
        if (rc <= 0)
            break;
        int got = nbd_receive(c);
        if (got <= 0) {
            rc = got;
            break;
        }
    }
out:
    nbr_client_free(cl);
    free(b);
    return rc;
}
