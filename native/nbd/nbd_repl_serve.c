/* The request loop of a connection to a replicated export (nbd_repl.h).
 *
 * A replicated request waits for peers, so one connection keeps more than
 * one batch in flight: the connection's thread (the reader) gathers the
 * pipelined requests already received into batches and, while the queue is
 * deep, hands them to worker threads (up to REPL_WORKERS - 1 batches wait
 * on peers at once) and goes back to receiving; with every worker busy, or
 * for a lone request (no hand-over between threads at QD1), it runs the
 * batch itself.  A batch holds at most BATCH_BYTES of data (one larger
 * request alone), so a few 1 MiB reads spread over the threads.  Each batch
 * runs with nbr_exec (pipelined BATCH_GETs and BATCH_PUTs per peer for the
 * whole batch, over the executor's own peer connections) and its replies
 * leave with one sendmsg under the connection's send lock.  NBD lets a server
 * answer in-flight requests in any order; a client never overlaps requests
 * that must be ordered without waiting for the first reply, and FLUSH
 * covers what was replied to before it was sent: a write is only replied
 * to once it is stored.
 *
 * A batch holds consecutive READs and WRITEs (their payloads are copied
 * into the batch, so the receive buffer can take the next requests); any
 * other command (FLUSH, TRIM, WRITE_ZEROES, CACHE, BLOCK_STATUS) is a batch
 * of its own.  Validation, errno values and reply encodings are
 * nbd_serve.c's (the same as the Python server's).  On DISC, end of file or
 * an error the reader waits for every batch in flight to be answered.
 */
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>

#include "nbd_internal.h"
#include "nbd_repl.h"
#include "omega_thread.h"

#define REPL_WORKERS 4             /* the reader and three worker threads */
#define REPL_BATCH 256             /* requests per batch */
#define BATCH_BYTES (1u << 20)     /* payload and read data gathered into one batch (was
                                      16 MiB: eight 1 MiB reads made two batches) */
#define CMD_NONE 0xffff            /* a refused request: nbr_exec does nothing with it */

struct batch {
    struct nbd_request nbd[REPL_BATCH];
    struct nbr_req req[REPL_BATCH];
    uint32_t check[REPL_BATCH];    /* nbd_check_request's verdict */
    size_t off[REPL_BATCH];        /* each request's data in buf */
    size_t n;
    uint8_t *buf;                  /* WRITE payloads and READ data */
    size_t len, cap;
};

struct repl_conn;

struct worker {
    struct repl_conn *rc;
    pthread_t thread;
    int started;
    struct nbr_client *cl;
    struct nbd_conn out;           /* this worker's reply arenas (shares cfg, counters) */
    struct batch b;
    int busy;                      /* a batch is handed over and not yet answered */
};

struct repl_conn {
    struct nbd_conn *c;            /* the reader's connection */
    pthread_mutex_t lock;          /* busy flags, failed, stopping */
    pthread_cond_t cond;
    pthread_mutex_t send;          /* one sendmsg at a time on the socket */
    int failed;                    /* a worker could not send or run a batch */
    int stopping;
    struct worker w[REPL_WORKERS];
};

static void to_req(const struct nbd_request *r, uint32_t check, struct nbr_req *q)
{
    memset(q, 0, sizeof *q);
    q->cmd = check ? CMD_NONE : r->cmd;
    q->flags = check ? 0 : r->flags;
    q->offset = r->offset;
    q->length = check ? 0 : r->length;
}

/* Queue the reply of one executed request on the worker's arenas. 0 / -1. */
static int reply(struct nbd_conn *o, const struct nbd_request *r, uint32_t check,
                 const struct nbr_req *q)
{
    if (check)
        return nbd_reply_error(o, r, check, "invalid request");
    if (q->err)
        return nbd_reply_error(o, r, q->err, q->msg);
    if (r->cmd == NBD_CMD_READ)
        return nbd_reply_read(o, r, q->rdata);
    return nbd_reply_ok(o, r);
}

/* Run one batch and send its replies. 0 / -1 (the connection must end). */
static int run(struct worker *w)
{
    struct batch *b = &w->b;
    struct nbd_conn *o = &w->out;
    uint64_t t0 = nbd_now_ns();
    const struct nbd_request *first = &b->nbd[0];
    int rc = 0;
    /* pointers into buf are set now: buf does not move once gathered */
    for (size_t k = 0; k < b->n; k++) {
        if (b->check[k])
            continue;
        if (b->nbd[k].cmd == NBD_CMD_WRITE)
            b->req[k].wdata = b->buf + b->off[k];
        else if (b->nbd[k].cmd == NBD_CMD_READ)
            b->req[k].rdata = b->buf + b->off[k];
    }
    if (b->n == 1 && first->cmd == NBD_CMD_FLUSH && !b->check[0]) {
        b->req[0].err = nbr_flush(w->cl) < 0 ? NBD_EIO : 0;
        if (b->req[0].err)
            strcpy(b->req[0].msg, "could not persist the chunk table");
    } else if (b->n == 1 && first->cmd == NBD_CMD_BLOCK_STATUS && !b->check[0]) {
        size_t max = (first->flags & NBD_CMD_FLAG_REQ_ONE) ? 1 : OMEGA_NBD_MAX_EXTENTS;
        size_t n = nbr_extents(o->cfg->repl, first->offset, first->length,
                               (uint32_t *)o->extents, max);
        pthread_mutex_lock(&w->rc->send);
        rc = n ? nbd_reply_block_status(o, first, o->extents, n)
               : nbd_reply_error(o, first, NBD_EIO, "backend returned no extents");
        rc = rc < 0 || nbd_reply_flush(o) < 0 ? -1 : 0;
        pthread_mutex_unlock(&w->rc->send);
        nbd_count(o, first, nbd_now_ns() - t0);
        return rc;
    } else if (nbr_exec(w->cl, b->req, b->n) < 0) {
        nbd_end(o, OMEGA_NBD_END_INTERNAL, ENOMEM, "no memory to execute a batch");
        return -1;
    }
    uint64_t elapsed = nbd_now_ns() - t0;
    pthread_mutex_lock(&w->rc->send);
    for (size_t k = 0; k < b->n && rc == 0; k++)
        rc = reply(o, &b->nbd[k], b->check[k], &b->req[k]);
    if (rc == 0)
        rc = nbd_reply_flush(o);
    pthread_mutex_unlock(&w->rc->send);
    for (size_t k = 0; k < b->n; k++)
        if (!b->check[k])
            nbd_count(o, &b->nbd[k], elapsed);
    return rc;
}

static void *worker_main(void *arg)
{
    struct worker *w = arg;
    struct repl_conn *rc = w->rc;
    (void)prctl(PR_SET_NAME, "nbd-fastpath", 0, 0, 0);
    omega_thread_batch();
    pthread_mutex_lock(&rc->lock);
    for (;;) {
        while (!w->busy && !rc->stopping)
            pthread_cond_wait(&rc->cond, &rc->lock);
        if (!w->busy)
            break; /* stopping, nothing handed over */
        pthread_mutex_unlock(&rc->lock);
        int failed = run(w) < 0;
        pthread_mutex_lock(&rc->lock);
        if (failed && !rc->failed) {
            rc->failed = 1;
            /* the reader may be blocked in recv: make it see the end */
            shutdown(rc->c->cfg->sock_fd, SHUT_RDWR);
        }
        w->b.n = 0;
        w->b.len = 0;
        w->busy = 0;
        pthread_cond_broadcast(&rc->cond);
    }
    pthread_mutex_unlock(&rc->lock);
    return NULL;
}

/* Requests complete in the receive buffer (header and payload), up to max. */
static size_t ready(const struct nbd_conn *c, size_t max)
{
    size_t n = 0, pos = c->rpos;
    while (n < max && c->rend - pos >= NBD_REQUEST_SIZE) {
        struct nbd_request r;
        uint32_t magic;
        nbd_parse(c->rbuf + pos, &magic, &r);
        size_t len = NBD_REQUEST_SIZE + (r.cmd == NBD_CMD_WRITE ? (size_t)r.length : 0);
        if (magic != NBD_REQUEST_MAGIC || c->rend - pos < len)
            break;
        pos += len;
        n++;
    }
    return n;
}

static void hand_over(struct repl_conn *rc, struct worker *w)
{
    pthread_mutex_lock(&rc->lock);
    w->busy = 1;
    pthread_cond_broadcast(&rc->cond);
    pthread_mutex_unlock(&rc->lock);
}

/* Wait until every handed-over batch is answered. 0, or -1 if one failed. */
static int drain(struct repl_conn *rc)
{
    pthread_mutex_lock(&rc->lock);
    for (;;) {
        int busy = 0;
        for (int i = 0; i < REPL_WORKERS; i++)
            busy |= rc->w[i].busy;
        if (!busy)
            break;
        pthread_cond_wait(&rc->cond, &rc->lock);
    }
    int failed = rc->failed;
    pthread_mutex_unlock(&rc->lock);
    return failed ? -1 : 0;
}

/* Room for `more` bytes in the batch buffer. 0 / -1. */
static int batch_room(struct batch *b, size_t more)
{
    if (b->len + more <= b->cap)
        return 0;
    size_t cap = b->cap ? b->cap : 1u << 20;
    while (cap < b->len + more)
        cap *= 2;
    uint8_t *p = realloc(b->buf, cap);
    if (!p)
        return -1;
    b->buf = p;
    b->cap = cap;
    return 0;
}

/* Add a request to the batch (its payload, if a WRITE, is at `payload`).
 * 0 / -1 (no memory). */
static int add(struct batch *b, const struct nbd_request *r, uint32_t check,
               const uint8_t *payload)
{
    size_t k = b->n;
    size_t need = (!check && (r->cmd == NBD_CMD_READ || r->cmd == NBD_CMD_WRITE)) ? r->length : 0;
    if (batch_room(b, need) < 0)
        return -1;
    b->nbd[k] = *r;
    b->check[k] = check;
    to_req(r, check, &b->req[k]);
    b->off[k] = b->len;
    if (need && r->cmd == NBD_CMD_WRITE && payload)
        memcpy(b->buf + b->len, payload, need);
    b->len += need;
    b->n++;
    return 0;
}

/* Receive until the buffer holds `want` bytes past rpos (a payload that
 * fits).  1 = there, 0 = end of file, -1 = error. */
static int receive_until(struct nbd_conn *c, size_t want)
{
    while (c->rend - c->rpos < want) {
        int got = nbd_receive(c);
        if (got <= 0)
            return got;
    }
    return 1;
}

/* A WRITE whose payload does not fit the receive buffer: stream it into
 * the batch.  1 = done, 0 = end of file, -1 = error. */
static int gather_long_write(struct nbd_conn *c, struct batch *b, const struct nbd_request *r,
                             uint32_t check)
{
    if (add(b, r, check, NULL) < 0) {
        nbd_end(c, OMEGA_NBD_END_INTERNAL, ENOMEM, "no memory for a %u-byte write", r->length);
        return -1;
    }
    size_t at = b->off[b->n - 1], have = 0;
    while (have < r->length) {
        if (c->rend == c->rpos) {
            int got = nbd_receive(c);
            if (got <= 0)
                return got;
        }
        size_t take = c->rend - c->rpos;
        if (take > r->length - have)
            take = r->length - have;
        if (!check)
            memcpy(b->buf + at + have, c->rbuf + c->rpos, take);
        c->rpos += take;
        have += take;
    }
    return 1;
}

/*
 * Gather into w's batch, up to cap requests, what the receive buffer holds
 * (receiving when it holds nothing yet, or only part of a WRITE's payload
 * and the batch is empty).  Returns 0 to go on, 1 on DISC or end of file,
 * -1 on an error (result set).
 */
static int gather(struct nbd_conn *c, struct batch *b, size_t cap)
{
    for (;;) {
        if (c->rend - c->rpos < NBD_REQUEST_SIZE) {
            if (b->n)
                return 0; /* run what we have while more arrives */
            int got = nbd_receive(c);
            if (got <= 0)
                return got == 0 ? 1 : -1;
            continue;
        }
        struct nbd_request r;
        uint32_t magic;
        nbd_parse(c->rbuf + c->rpos, &magic, &r);
        if (magic != NBD_REQUEST_MAGIC) {
            nbd_end(c, OMEGA_NBD_END_PROTOCOL, 0, "bad request magic %#x", magic);
            return -1;
        }
        if (r.cmd == NBD_CMD_DISC) {
            c->rpos += NBD_REQUEST_SIZE;
            nbd_end(c, OMEGA_NBD_END_DISC, 0, "client disconnected");
            return 1;
        }
        int data = r.cmd == NBD_CMD_READ || r.cmd == NBD_CMD_WRITE;
        if (b->n && (!data || b->n >= cap || b->len + r.length > BATCH_BYTES))
            return 0; /* others run alone; a full batch runs now */
        uint32_t check = nbd_check_request(c, &r);
        if (r.cmd == NBD_CMD_WRITE) {
            if (r.length > c->cfg->max_write_payload) {
                nbd_end(c, OMEGA_NBD_END_PROTOCOL, 0, "write of %u bytes exceeds %u",
                        r.length, c->cfg->max_write_payload);
                return -1;
            }
            size_t whole = (size_t)NBD_REQUEST_SIZE + r.length;
            if (c->rend - c->rpos < whole) {
                if (b->n)
                    return 0;
                if (whole > RBUF_CAP) {
                    c->rpos += NBD_REQUEST_SIZE;
                    int got = gather_long_write(c, b, &r, check);
                    return got > 0 ? 0 : got == 0 ? 1 : -1; /* runs alone */
                }
                int got = receive_until(c, whole);
                if (got <= 0)
                    return got == 0 ? 1 : -1;
                continue; /* parse it again, whole */
            }
            if (add(b, &r, check, c->rbuf + c->rpos + NBD_REQUEST_SIZE) < 0) {
                nbd_end(c, OMEGA_NBD_END_INTERNAL, ENOMEM, "no memory for a batch");
                return -1;
            }
            c->rpos += whole;
            continue;
        }
        c->rpos += NBD_REQUEST_SIZE;
        if (add(b, &r, check, NULL) < 0) {
            nbd_end(c, OMEGA_NBD_END_INTERNAL, ENOMEM, "no memory for a batch");
            return -1;
        }
        if (!data)
            return 0; /* runs alone */
    }
}

/* A worker thread without a batch, or NULL (none free, or one failed);
 * *inflight = how many batches the worker threads are running. */
static struct worker *idle_thread(struct repl_conn *rc, int *inflight)
{
    struct worker *w = NULL;
    *inflight = 0;
    pthread_mutex_lock(&rc->lock);
    for (int i = 1; i < REPL_WORKERS; i++) {
        if (rc->w[i].busy)
            (*inflight)++;
        else if (!w && !rc->failed)
            w = &rc->w[i];
    }
    pthread_mutex_unlock(&rc->lock);
    return w;
}

/*
 * The reader: gather batches until DISC, end of file or an error.  While a
 * worker thread is idle and the queue is deep (more than one request ready,
 * or a batch already in flight), the reader hands what is ready to it and
 * goes back to receiving, so up to REPL_WORKERS - 1 batches wait on peers at
 * once; with every worker busy it runs the next batch itself (w[0], no
 * thread), which also holds back a client that sends faster than the peers
 * answer.  A lone request (QD1) runs on the reader: no hand-over between
 * threads.  0 = ended cleanly, -1 = ended by an error.
 */
static int read_loop(struct repl_conn *rc)
{
    struct nbd_conn *c = rc->c;
    struct worker *self = &rc->w[0];
    for (;;) {
        size_t avail = ready(c, (size_t)REPL_BATCH * REPL_WORKERS);
        int inflight = 0;
        struct worker *w = idle_thread(rc, &inflight);
        if (w && avail <= 1 && !inflight)
            w = NULL;
        /* the first of a burst splits it, so two threads start at once */
        size_t cap = w && !inflight && avail > 1 ? (avail + 1) / 2 : REPL_BATCH;
        struct batch *b = w ? &w->b : &self->b;
        int end = gather(c, b, cap < REPL_BATCH ? cap : REPL_BATCH);
        int failed = 0;
        if (b->n) {
            if (w) {
                hand_over(rc, w);
            } else {
                failed = run(self) < 0;
                b->n = 0;
                b->len = 0;
            }
        }
        pthread_mutex_lock(&rc->lock);
        failed |= rc->failed;
        pthread_mutex_unlock(&rc->lock);
        if (failed && !end)
            end = -1;
        if (end)
            return drain(rc) < 0 || end < 0 || failed ? -1 : 0;
    }
}

static int worker_init(struct repl_conn *rc, struct worker *w, int thread)
{
    struct nbd_conn *c = rc->c;
    w->rc = rc;
    w->out.cfg = c->cfg;
    w->out.ctr = c->ctr;
    w->out.result = c->result;
    w->out.shared_counters = 1;
    w->out.hdr = malloc(HDR_CAP);
    w->out.data = malloc(DATA_CAP);
    w->out.extents = malloc(sizeof(struct nbd_extent) * (OMEGA_NBD_MAX_EXTENTS + 1));
    w->cl = nbr_client_new(c->cfg->repl);
    if (!w->out.hdr || !w->out.data || !w->out.extents || !w->cl)
        return -1;
    if (!thread)
        return 0; /* the reader's own executor */
    if (omega_thread_create(&w->thread, worker_main, w) != 0)
        return -1;
    w->started = 1;
    return 0;
}

static void worker_free(struct worker *w)
{
    nbr_client_free(w->cl);
    free(w->out.hdr);
    free(w->out.data);
    free(w->out.extents);
    free(w->b.buf);
}

int nbd_serve_replicated(struct nbd_conn *c)
{
    struct repl_conn *rc = calloc(1, sizeof *rc);
    if (!rc) {
        nbd_end(c, OMEGA_NBD_END_INTERNAL, ENOMEM, "no memory for the replicated connection");
        return -1;
    }
    rc->c = c;
    c->shared_counters = 1;
    pthread_mutex_init(&rc->lock, NULL);
    pthread_cond_init(&rc->cond, NULL);
    pthread_mutex_init(&rc->send, NULL);
    int ret = -1;
    for (int i = 0; i < REPL_WORKERS; i++)
        if (worker_init(rc, &rc->w[i], i > 0) < 0) {
            nbd_end(c, OMEGA_NBD_END_INTERNAL, ENOMEM, "cannot start the connection's workers");
            goto out;
        }
    ret = read_loop(rc);
out:
    pthread_mutex_lock(&rc->lock);
    rc->stopping = 1;
    pthread_cond_broadcast(&rc->cond);
    pthread_mutex_unlock(&rc->lock);
    for (int i = 0; i < REPL_WORKERS; i++) {
        if (rc->w[i].started)
            pthread_join(rc->w[i].thread, NULL);
        worker_free(&rc->w[i]);
    }
    pthread_mutex_destroy(&rc->lock);
    pthread_cond_destroy(&rc->cond);
    pthread_mutex_destroy(&rc->send);
    free(rc);
    return ret;
}
