/*
 * The native fetch path: pages held by peers, fetched without the Python side.
 *
 * A demand fault on a REMOTE page is served by the reader thread that read
 * it: one GET to the page's first live holder over that thread's own mutual
 * TLS connection (OpenSSL, the node's certificate, the cluster CA, the peer's
 * name checked against its certificate), AES-256-GCM opened here with the
 * VM's key and the same associated data as hypervisor/sealing.py (kind, VM
 * id, page, version: a stale or swapped page fails), one UFFDIO_COPY. No
 * eventfd hop, no interpreter, no event loop on the fault's path.
 *
 * Prefetch stays a Python policy (policies/prefetch.py): the Python side is
 * told about every natively served fault (a DSM_QUEUE_SEEN queue entry),
 * claims the pages it wants and submits them here as jobs; worker threads
 * fetch each job with pipelined BATCH_GETs and install it in runs.
 *
 * Anything unusual goes back to the Python path, which owns the retries,
 * the pause-and-retry loop and the logging: a page whose every holder failed
 * (dead, stale, tampered, not found), no room under the hard limit, an
 * install that failed. Such a page stays FETCHING and is pushed on the
 * ordinary fetch queue, exactly as if the native path did not exist.
 *
 * The "memory" source (holder bit DSM_HOLDER_MEMORY) keeps evicted pages in
 * this process: the benchmark's floor, the same path without the network.
 *
 * Wire format: hypervisor/node/wire.py (GET 0x11, BATCH_GET 0x13), spoken
 * through native/peerclient (connections, framing, AES-GCM).
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "dsm.h"
#include "peerclient.h"
#include "omega_thread.h"

#define DEAD_BACKOFF_NS 1000000000ull /* a failed peer is skipped this long */
#define IO_TIMEOUT_MS 5000 /* as the Python pool's request timeout */

struct dsm_peer {
    char name[256];
    char host[256];
    char port[8];
    uint64_t dead_until; /* ns (dsm_now_ns); 0: alive */
};

struct dsm_job {
    struct dsm_job *next;
    size_t n;
    uint64_t pages[];
};

struct dsm_remote {
    int memory;            /* the in-process source only (no peers) */
    struct pc_tls tls;
    uint8_t key[32];
    uint8_t aad[PC_AAD_MAX];  /* build_aad prefix; page and version appended */
    size_t aad_len;
    uint8_t ns[258];       /* the encoded namespace (wire.py _ns_bytes) */
    size_t ns_len;
    struct dsm_peer peers[DSM_MAX_PEERS];
    int npeers;
    uint64_t *version;     /* per page: the version peers must return */
    uint16_t *holders;     /* per page: bit i = peers[i], DSM_HOLDER_MEMORY */
    uint8_t *mem;          /* memory source: npages pages, MAP_NORESERVE */
    pthread_mutex_t jlock;
    pthread_cond_t jcond;
    struct dsm_job *jhead, *jtail;
    int nworkers;
    pthread_t workers[DSM_MAX_THREADS];
    uint64_t inflight;     /* prefetch pages submitted and not yet settled */
    uint64_t spin_ns;      /* wait for an answer this long awake before sleeping */
    pthread_mutex_t elock; /* one dsm_remote_store at a time */
    struct dsm_fetcher *evict; /* its connections and cipher context (lazily made) */
    uint8_t *sealed;       /* its sealed pages */
    size_t sealedcap;
};

/* Per thread: its connections, cipher context and buffer. */
struct dsm_fetcher {
    struct pc_conn conn[DSM_MAX_PEERS];
    struct pc_sealer sealer;
    int sealing;   /* sealer initialised */
    uint8_t *out;  /* opened pages */
    size_t outcap;
};

/* ------------------------------------------------------------------ fetcher */

static int fetcher_init(struct dsm_handler *h, struct dsm_fetcher *f)
{
    memset(f, 0, sizeof *f);
    for (int i = 0; i < DSM_MAX_PEERS; i++)
        pc_conn_init(&f->conn[i]);
    struct dsm_remote *r = h->remote;
    if (r->memory)
        return 0;
    if (pc_sealer_init(&f->sealer, r->key, r->aad, r->aad_len) < 0) {
        dsm_log("omega-dsm: AES-GCM context: out of memory");
        return -ENOMEM;
    }
    f->sealing = 1;
    return 0;
}

static void fetcher_free(struct dsm_fetcher *f)
{
    for (int i = 0; i < DSM_MAX_PEERS; i++)
        pc_conn_close(&f->conn[i]);
    if (f->sealing)
        pc_sealer_free(&f->sealer);
    free(f->out);
    memset(f, 0, sizeof *f);
}

static int grow(uint8_t **buf, size_t *cap, size_t want)
{
    if (*cap >= want)
        return 0;
    uint8_t *p = realloc(*buf, want);
    if (!p)
        return -ENOMEM;
    *buf = p;
    *cap = want;
    return 0;
}

static int peer_alive(struct dsm_remote *r, int i, uint64_t now)
{
    return __atomic_load_n(&r->peers[i].dead_until, __ATOMIC_RELAXED) <= now;
}

static void peer_failed(struct dsm_handler *h, int i)
{
    struct dsm_remote *r = h->remote;
    __atomic_store_n(&r->peers[i].dead_until, dsm_now_ns() + DEAD_BACKOFF_NS, __ATOMIC_RELAXED);
    dsm_count(&h->st.native_peer_errors, 1);
}

/* The first peer in mask whose backoff is over, else the first at all (a
 * peer may be back before its backoff ends); -1 when mask names none. Only
 * peer bits are looked at, never DSM_HOLDER_MEMORY. */
static int next_holder(struct dsm_remote *r, uint16_t mask, uint64_t now)
{
    int first = -1;
    for (int i = 0; i < r->npeers; i++)
        if (mask & (1u << i)) {
            if (peer_alive(r, i, now))
                return i;
            if (first < 0)
                first = i;
        }
    return first;
}

/* Connect f's connection to peer i unless it is open (a failure is logged
 * and marks the peer failed). 0 or -errno. */
static int open_conn(struct dsm_handler *h, struct dsm_fetcher *f, int i)
{
    struct dsm_remote *r = h->remote;
    struct dsm_peer *p = &r->peers[i];
    struct pc_conn *c = &f->conn[i];
    if (pc_conn_is_open(c))
        return 0;
    char err[300];
    int rc = pc_conn_open(&r->tls, c, p->name, p->host, p->port, IO_TIMEOUT_MS, err, sizeof err);
    if (rc < 0) {
        dsm_log("omega-dsm: peer %s: %s", p->name, err);
        peer_failed(h, i);
    }
    return rc;
}

/*
 * Send one request (op, payload) to peer i and read its answer's payload into
 * f->conn[i].buf. Returns the payload length (>= 0) with *status set, or < 0
 * when the connection could not be made or broke (it is closed and the peer
 * marked failed) or memory ran out.
 */
static long call(struct dsm_handler *h, struct dsm_fetcher *f, int i, uint8_t op,
                 const uint8_t *payload, size_t plen, uint8_t *status)
{
    struct dsm_remote *r = h->remote;
    struct dsm_peer *p = &r->peers[i];
    struct pc_conn *c = &f->conn[i];
    int rc = open_conn(h, f, i);
    if (rc < 0)
        return rc;
    struct iovec iov = {.iov_base = (void *)payload, .iov_len = plen};
    long n = pc_call(c, op, &iov, 1, __atomic_load_n(&r->spin_ns, __ATOMIC_RELAXED), status);
    if (n < 0) {
        if (n == -EPROTO)
            dsm_log("omega-dsm: peer %s: malformed answer", p->name);
        if (n != -ENOMEM)
            peer_failed(h, i);
    }
    return n;
}

/* GET one page from peer i into out. 0 ok, -EIO connection, -ENOENT/-ESTALE/-EBADMSG. */
static int get_one(struct dsm_handler *h, struct dsm_fetcher *f, int i, uint64_t page,
                   uint64_t version, uint8_t *out)
{
    struct dsm_remote *r = h->remote;
    uint8_t req[258 + 8];
    memcpy(req, r->ns, r->ns_len);
    pc_put64(req + r->ns_len, page);
    uint8_t status = 0;
    long n = call(h, f, i, PC_OP_GET, req, r->ns_len + 8, &status);
    const uint8_t *ans = f->conn[i].buf;
    if (n < 0)
        return (int)n;
    if (status != PC_ST_OK)
        return status == PC_ST_NOT_FOUND ? -ENOENT : -EPROTO;
    if (n < 12 || pc_get32(ans + 8) != (uint64_t)n - 12)
        return -EPROTO;
    if (pc_get64(ans) != version) {
        dsm_log("omega-dsm: peer %s holds page %llu version %llu, want %llu: stale",
                r->peers[i].name, (unsigned long long)page,
                (unsigned long long)pc_get64(ans), (unsigned long long)version);
        return -ESTALE;
    }
    if (pc_open(&f->sealer, page, version, ans + 12, (size_t)n - 12, out, h->page_size) < 0) {
        dsm_log("omega-dsm: peer %s page %llu failed authentication", r->peers[i].name,
                (unsigned long long)page);
        return -EBADMSG;
    }
    dsm_count(&h->st.native_bytes_in, (uint64_t)n);
    return 0;
}

/* The caller holds the page FETCHING; hand it to the Python side. */
static void fall_back(struct dsm_handler *h, uint64_t page)
{
    dsm_count(&h->st.native_fallbacks, 1);
    dsm_queue_push(h, page);
}

/*
 * Serve a demand fault natively. The page is FETCHING (claimed by the
 * caller). Returns 0 when installed; < 0 when the caller must queue it for
 * the Python side (nothing reserved, the page still FETCHING).
 */
int dsm_remote_fetch(struct dsm_handler *h, struct dsm_fetcher *f, uint64_t page)
{
    struct dsm_remote *r = h->remote;
    uint16_t holders = __atomic_load_n(&r->holders[page], __ATOMIC_ACQUIRE);
    uint64_t version = __atomic_load_n(&r->version[page], __ATOMIC_ACQUIRE);
    if (!holders)
        return -ENOENT;
    if (dsm_reserve(h, 1) < 0)
        return -EAGAIN;
    const uint8_t *src = NULL;
    if (holders & DSM_HOLDER_MEMORY) {
        src = r->mem + page * h->page_size;
    } else if (grow(&f->out, &f->outcap, h->page_size) == 0) {
        uint64_t now = dsm_now_ns();
        /* live holders first, then the others; each holder is asked once */
        uint16_t left = holders;
        int i;
        while (!src && (i = next_holder(r, left, now)) >= 0) {
            left &= (uint16_t)~(1u << i);
            if (get_one(h, f, i, page, version, f->out) == 0)
                src = f->out;
        }
    }
    /* Counted before the install wakes the guest thread, so whoever it
     * resumes sees the count; taken back if the install fails. */
    dsm_count(&h->st.native_fetches, 1);
    int rc = src ? dsm_install(h, page, src, 1) : -EIO;
    if (rc < 0) {
        __atomic_sub_fetch(&h->st.native_fetches, 1, __ATOMIC_RELAXED);
        dsm_unreserve(h, 1);
        return rc;
    }
    return 0;
}

/* ------------------------------------------------------------------ prefetch jobs */

/* Give pages back for a later demand fault: FETCHING -> REMOTE, waiters woken. */
static void give_back(struct dsm_handler *h, uint64_t page)
{
    if (dsm_cas(h, page, DSM_FETCHING, DSM_REMOTE)) {
        __atomic_store_n(&h->t_fault[page], 0, __ATOMIC_RELEASE);
        dsm_wake(h, page, 1);
    }
}

/* Fetch job pages [lo, hi) that peer i holds into f->out slots; set done[k]. */
static void batch_from(struct dsm_handler *h, struct dsm_fetcher *f, int i,
                       const struct dsm_job *job, const uint64_t *versions,
                       const size_t *idx, size_t m, uint8_t *done)
{
    struct dsm_remote *r = h->remote;
    size_t plen = r->ns_len + 4 + 8 * m;
    uint8_t *req = malloc(plen);
    if (!req)
        return;
    memcpy(req, r->ns, r->ns_len);
    pc_put32(req + r->ns_len, (uint32_t)m);
    for (size_t k = 0; k < m; k++)
        pc_put64(req + r->ns_len + 4 + 8 * k, job->pages[idx[k]]);
    uint8_t status = 0;
    long n = call(h, f, i, PC_OP_BATCH_GET, req, plen, &status);
    const uint8_t *ans = f->conn[i].buf;
    free(req);
    if (n < 0)
        return;
    if (status != PC_ST_OK || n < 4 || pc_get32(ans) != m)
        return;
    size_t pos = 4;
    for (size_t k = 0; k < m; k++) {
        struct pc_item it;
        if (pc_next_item(ans, (size_t)n, &pos, &it) < 0)
            return;
        size_t j = idx[k];
        if (it.found && it.version == versions[j] &&
            pc_open(&f->sealer, job->pages[j], it.version, it.blob, it.len,
                    f->out + j * h->page_size, h->page_size) == 0)
            done[j] = 1;
    }
    dsm_count(&h->st.native_bytes_in, (uint64_t)n);
}

static void run_job(struct dsm_handler *h, struct dsm_fetcher *f, struct dsm_job *job)
{
    struct dsm_remote *r = h->remote;
    size_t n = job->n, ps = h->page_size;
    uint8_t *done = calloc(n, 1);
    uint16_t *tried = calloc(n, sizeof *tried);
    uint64_t *versions = calloc(n, sizeof *versions);
    size_t *idx = calloc(n, sizeof *idx);
    int8_t *pick = calloc(n, sizeof *pick);
    if (!done || !tried || !versions || !idx || !pick || grow(&f->out, &f->outcap, n * ps) < 0) {
        for (size_t k = 0; k < n; k++)
            fall_back(h, job->pages[k]);
        goto out;
    }
    for (size_t k = 0; k < n; k++)
        versions[k] = __atomic_load_n(&r->version[job->pages[k]], __ATOMIC_ACQUIRE);
    /* Each round asks every page's next untried holder (live ones first). */
    for (int round = 0; round <= r->npeers; round++) {
        uint64_t now = dsm_now_ns();
        int any = 0;
        /* this round, each page asks its next untried holder */
        for (size_t k = 0; k < n; k++) {
            uint16_t hs = __atomic_load_n(&r->holders[job->pages[k]], __ATOMIC_ACQUIRE);
            pick[k] = done[k] ? -1 : (int8_t)next_holder(r, hs & (uint16_t)~tried[k], now);
        }
        for (int i = 0; i < r->npeers; i++) {
            size_t m = 0;
            for (size_t k = 0; k < n; k++)
                if (pick[k] == i)
                    idx[m++] = k;
            if (!m)
                continue;
            any = 1;
            for (size_t k = 0; k < m; k++)
                tried[idx[k]] |= (uint16_t)(1u << i);
            batch_from(h, f, i, job, versions, idx, m, done);
        }
        for (size_t k = 0; k < n; k++) /* the floor's source */
            if (!done[k] && (r->holders[job->pages[k]] & DSM_HOLDER_MEMORY)) {
                memcpy(f->out + k * ps, r->mem + job->pages[k] * ps, ps);
                done[k] = 1;
            }
        if (!any)
            break;
    }
    size_t got = 0;
    for (size_t k = 0; k < n; k++)
        got += done[k];
    if (got && dsm_reserve(h, got) < 0) {
        /* No room now: the pages go back to REMOTE; a demand fault fetches them. */
        for (size_t k = 0; k < n; k++)
            if (done[k]) {
                give_back(h, job->pages[k]);
                done[k] = 0;
            }
        dsm_count(&h->st.native_prefetch_dropped, got);
        got = 0;
    }
    /* Install runs of consecutive fetched pages (job pages are sorted). */
    size_t k = 0;
    while (k < n) {
        if (!done[k]) {
            fall_back(h, job->pages[k]);
            k++;
            continue;
        }
        size_t j = k + 1;
        while (j < n && done[j] && job->pages[j] == job->pages[j - 1] + 1)
            j++;
        if (dsm_install(h, job->pages[k], f->out + k * ps, j - k) < 0) {
            for (size_t q = k; q < j; q++)
                if (dsm_state(h, job->pages[q]) == DSM_FETCHING) {
                    dsm_unreserve(h, 1);
                    got--;
                    fall_back(h, job->pages[q]);
                }
        }
        k = j;
    }
    dsm_count(&h->st.native_prefetched, got);
out:
    __atomic_sub_fetch(&r->inflight, n, __ATOMIC_RELAXED);
    dsm_queue_note(h, DSM_QUEUE_LANDED | n);
    free(done);
    free(tried);
    free(versions);
    free(idx);
    free(pick);
}

static void *worker_main(void *arg)
{
    struct dsm_handler *h = arg;
    struct dsm_remote *r = h->remote;
    struct dsm_fetcher f;
    /* Without a cipher context every job goes to the Python side, so no
     * claimed page waits for a worker that cannot fetch it. */
    int usable = fetcher_init(h, &f) == 0;
    for (;;) {
        pthread_mutex_lock(&r->jlock);
        while (!r->jhead && !__atomic_load_n(&h->stop, __ATOMIC_ACQUIRE))
            pthread_cond_wait(&r->jcond, &r->jlock);
        struct dsm_job *job = __atomic_load_n(&h->stop, __ATOMIC_ACQUIRE) ? NULL : r->jhead;
        if (job) {
            r->jhead = job->next;
            if (!r->jhead)
                r->jtail = NULL;
        }
        pthread_mutex_unlock(&r->jlock);
        if (!job)
            break; /* stopping */
        if (usable) {
            run_job(h, &f, job);
        } else {
            for (size_t k = 0; k < job->n; k++)
                fall_back(h, job->pages[k]);
            __atomic_sub_fetch(&r->inflight, job->n, __ATOMIC_RELAXED);
            dsm_queue_note(h, DSM_QUEUE_LANDED | job->n);
        }
        free(job);
    }
    fetcher_free(&f);
    return NULL;
}

/* ------------------------------------------------------------------ reader side */

struct dsm_fetcher *dsm_fetcher_new(struct dsm_handler *h)
{
    if (!h->remote)
        return NULL;
    struct dsm_fetcher *f = malloc(sizeof *f);
    if (f && fetcher_init(h, f) < 0) {
        fetcher_free(f);
        free(f);
        f = NULL;
    }
    return f;
}

void dsm_fetcher_free(struct dsm_fetcher *f)
{
    if (f) {
        fetcher_free(f);
        free(f);
    }
}

/* ------------------------------------------------------------------ set-up (Python) */

static struct dsm_remote *remote_new(struct dsm_handler *h, int *err)
{
    struct dsm_remote *r = calloc(1, sizeof *r);
    if (!r) {
        *err = -ENOMEM;
        return NULL;
    }
    r->version = calloc(h->npages, sizeof *r->version);
    r->holders = calloc(h->npages, sizeof *r->holders);
    if (!r->version || !r->holders) {
        free(r->version);
        free(r->holders);
        free(r);
        *err = -ENOMEM;
        return NULL;
    }
    pthread_mutex_init(&r->jlock, NULL);
    pthread_cond_init(&r->jcond, NULL);
    pthread_mutex_init(&r->elock, NULL);
    return r;
}

static int start_workers(struct dsm_handler *h, int nworkers)
{
    struct dsm_remote *r = h->remote;
    for (int i = 0; i < nworkers && i < DSM_MAX_THREADS; i++) {
        int e = omega_thread_create(&r->workers[i], worker_main, h);
        if (e)
            return -e;
        pthread_setname_np(r->workers[i], "omega-dsm-pf");
        r->nworkers = i + 1;
    }
    return 0;
}

/*
 * Serve remote faults from peers natively. Call before dsm_start. key: the
 * VM's 32-byte sealing key; aad: build_aad(...) without its index and
 * version; ns: the encoded page namespace; ca/cert/keyfile: PEM paths of the
 * cluster CA and this node's identity; nworkers: prefetch threads.
 * 0 ok, -errno (-EPROTO: the TLS identity could not be loaded).
 */
int dsm_remote_setup(struct dsm_handler *h, const uint8_t *key, size_t key_len,
                     const uint8_t *aad, size_t aad_len, const uint8_t *ns, size_t ns_len,
                     const char *ca, const char *cert, const char *keyfile, int nworkers)
{
    if (h->remote || key_len != 32 || aad_len > PC_AAD_MAX || ns_len > 257 || nworkers < 0)
        return -EINVAL;
    int err = 0;
    struct dsm_remote *r = remote_new(h, &err);
    if (!r)
        return err;
    memcpy(r->key, key, 32);
    memcpy(r->aad, aad, aad_len);
    r->aad_len = aad_len;
    memcpy(r->ns, ns, ns_len);
    r->ns_len = ns_len;
    char why[300];
    if (pc_tls_init(&r->tls, ca, cert, keyfile, why, sizeof why) < 0) {
        dsm_log("omega-dsm: native fetch path: %s", why);
        free(r->version);
        free(r->holders);
        free(r);
        return -EPROTO;
    }
    h->remote = r;
    return start_workers(h, nworkers);
}

/* The floor: serve remote faults from pages kept in this process
 * (dsm_remote_memory_put). 0 ok, -errno. */
int dsm_remote_setup_memory(struct dsm_handler *h, int nworkers)
{
    if (h->remote || nworkers < 0)
        return -EINVAL;
    int err = 0;
    struct dsm_remote *r = remote_new(h, &err);
    if (!r)
        return err;
    r->memory = 1;
    r->mem = mmap(NULL, h->npages * h->page_size, PROT_READ | PROT_WRITE,
                  MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (r->mem == MAP_FAILED) {
        err = -errno;
        free(r->version);
        free(r->holders);
        free(r);
        return err;
    }
    h->remote = r;
    return start_workers(h, nworkers);
}

/* Peer index i (0..DSM_MAX_PEERS-1) is name at host:port. 0 ok, -EINVAL. */
int dsm_remote_peer(struct dsm_handler *h, int i, const char *name, const char *host, int port)
{
    struct dsm_remote *r = h->remote;
    if (!r || r->memory || i < 0 || i >= DSM_MAX_PEERS || strlen(name) >= 256 ||
        strlen(host) >= 256 || port <= 0 || port > 65535)
        return -EINVAL;
    struct dsm_peer *p = &r->peers[i];
    snprintf(p->name, sizeof p->name, "%s", name);
    snprintf(p->host, sizeof p->host, "%s", host);
    snprintf(p->port, sizeof p->port, "%d", port);
    p->dead_until = 0;
    if (i >= r->npeers)
        r->npeers = i + 1;
    return 0;
}

/* Record where pages are: their version and holder bits. 0 ok, -EINVAL. */
int dsm_remote_locate(struct dsm_handler *h, const uint64_t *pages, size_t n,
                      const uint64_t *versions, const uint16_t *holders)
{
    struct dsm_remote *r = h->remote;
    if (!r)
        return -EINVAL;
    for (size_t i = 0; i < n; i++) {
        if (pages[i] >= h->npages)
            return -EINVAL;
        __atomic_store_n(&r->version[pages[i]], versions[i], __ATOMIC_RELEASE);
        __atomic_store_n(&r->holders[pages[i]], holders[i], __ATOMIC_RELEASE);
    }
    return 0;
}

/* Keep copies of pages in the memory source (data: n pages back to back). */
int dsm_remote_memory_put(struct dsm_handler *h, const uint64_t *pages, size_t n,
                          const void *data)
{
    struct dsm_remote *r = h->remote;
    if (!r || !r->memory)
        return -EINVAL;
    for (size_t i = 0; i < n; i++) {
        if (pages[i] >= h->npages)
            return -EINVAL;
        memcpy(r->mem + pages[i] * h->page_size, (const uint8_t *)data + i * h->page_size,
               h->page_size);
    }
    return 0;
}

/* Prefetch pages (claimed FETCHING by the caller, sorted) on a worker.
 * 0 ok, -errno (the pages are then still the caller's). */
int dsm_remote_submit(struct dsm_handler *h, const uint64_t *pages, size_t n)
{
    struct dsm_remote *r = h->remote;
    if (!r || !r->nworkers || n == 0)
        return -EINVAL;
    struct dsm_job *job = malloc(sizeof *job + n * sizeof job->pages[0]);
    if (!job)
        return -ENOMEM;
    job->next = NULL;
    job->n = n;
    memcpy(job->pages, pages, n * sizeof pages[0]);
    __atomic_add_fetch(&r->inflight, n, __ATOMIC_RELAXED);
    pthread_mutex_lock(&r->jlock);
    if (r->jtail)
        r->jtail->next = job;
    else
        r->jhead = job;
    r->jtail = job;
    pthread_cond_signal(&r->jcond);
    pthread_mutex_unlock(&r->jlock);
    return 0;
}

/* ------------------------------------------------------------------ eviction */

/* The pages k whose targets[k] name peer i, into idx; how many. */
static size_t targeted(const uint16_t *targets, size_t n, int i, size_t *idx)
{
    size_t m = 0;
    for (size_t k = 0; k < n; k++)
        if (targets[k] & (1u << i))
            idx[m++] = k;
    return m;
}

/*
 * Seal n pages being evicted (data: n pages back to back) under their new
 * versions and store page k on the peers named by the bits of targets[k]:
 * one BATCH_PUT per peer (at most PC_MAX_BATCH pages each) over this call's
 * connections to the data ports, every request sent before any answer is
 * read. ok[k] gets the peers that took page k; *full the peers that
 * answered FULL (they took nothing); a peer whose connection failed is
 * marked failed and took nothing. One call at a time (the Python side runs
 * it on a worker thread). 0, or -errno (nothing was sent).
 */
int dsm_remote_store(struct dsm_handler *h, const uint64_t *pages, const uint64_t *versions,
                     size_t n, const void *data, const uint16_t *targets, uint16_t *ok,
                     uint16_t *full)
{
    struct dsm_remote *r = h->remote;
    if (!r || r->memory || n > 8 * (size_t)PC_MAX_BATCH) /* 8 requests per peer */
        return -EINVAL;
    size_t ps = h->page_size, bl = ps + PC_SEAL_OVERHEAD;
    int rc = 0;
    *full = 0;
    memset(ok, 0, n * sizeof *ok);
    pthread_mutex_lock(&r->elock);
    if (!r->evict && !(r->evict = dsm_fetcher_new(h))) {
        rc = -ENOMEM;
        goto out;
    }
    struct dsm_fetcher *f = r->evict;
    size_t need = n * bl;
    if (grow(&r->sealed, &r->sealedcap, need) < 0) {
        rc = -ENOMEM;
        goto out;
    }
    for (size_t k = 0; k < n; k++)
        if (pages[k] >= h->npages ||
            pc_seal(&f->sealer, pages[k], versions[k], (const uint8_t *)data + k * ps, ps,
                    r->sealed + k * bl) < 0) {
            rc = pages[k] >= h->npages ? -EINVAL : -EIO;
            goto out;
        }
    int64_t ids[DSM_MAX_PEERS][8];
    size_t firsts[DSM_MAX_PEERS][8], counts[DSM_MAX_PEERS][8];
    int nreq[DSM_MAX_PEERS] = {0};
    size_t *idx = malloc(n * sizeof *idx);
    uint8_t *req = malloc(r->ns_len + 4 + (n < PC_MAX_BATCH ? n : PC_MAX_BATCH) * (20 + bl));
    if (!idx || !req) {
        free(idx);
        free(req);
        rc = -ENOMEM;
        goto out;
    }
    /* send: every peer's requests first */
    for (int i = 0; i < r->npeers; i++) {
        size_t m = targeted(targets, n, i, idx);
        if (!m || open_conn(h, f, i) < 0)
            continue;
        struct pc_conn *c = &f->conn[i];
        for (size_t off = 0; off < m; off += PC_MAX_BATCH) {
            size_t cnt = m - off < PC_MAX_BATCH ? m - off : PC_MAX_BATCH, at = r->ns_len;
            memcpy(req, r->ns, r->ns_len);
            pc_put32(req + at, (uint32_t)cnt);
            at += 4;
            for (size_t q = 0; q < cnt; q++) {
                size_t k = idx[off + q];
                pc_put64(req + at, pages[k]);
                pc_put64(req + at + 8, versions[k]);
                pc_put32(req + at + 16, (uint32_t)bl);
                memcpy(req + at + 20, r->sealed + k * bl, bl);
                at += 20 + bl;
            }
            struct iovec iov = {.iov_base = req, .iov_len = at};
            int64_t id = pc_send(c, PC_OP_BATCH_PUT, &iov, 1);
            if (id < 0) {
                peer_failed(h, i);
                break;
            }
            ids[i][nreq[i]] = id;
            firsts[i][nreq[i]] = off;
            counts[i][nreq[i]] = cnt;
            nreq[i]++;
        }
    }
    /* read every answer: item statuses into ok, FULL into full */
    uint64_t spin = __atomic_load_n(&r->spin_ns, __ATOMIC_RELAXED);
    for (int i = 0; i < r->npeers; i++) {
        if (!nreq[i])
            continue;
        targeted(targets, n, i, idx);
        struct pc_conn *c = &f->conn[i];
        for (int q = 0; q < nreq[i]; q++) {
            uint8_t op, status;
            uint64_t id;
            long len = pc_recv(c, spin, &op, &status, &id);
            if (len < 0 || op != PC_OP_BATCH_PUT || id != (uint64_t)ids[i][q]) {
                if (len >= 0)
                    pc_conn_close(c);
                peer_failed(h, i);
                break;
            }
            if (status == PC_ST_FULL) {
                *full |= (uint16_t)(1u << i);
                continue;
            }
            size_t cnt = counts[i][q];
            if (status != PC_ST_OK || len < 4 || pc_get32(c->buf) != cnt ||
                (size_t)len < 4 + cnt) {
                peer_failed(h, i);
                continue;
            }
            for (size_t k = 0; k < cnt; k++)
                if (c->buf[4 + k] == PC_ST_OK)
                    ok[idx[firsts[i][q] + k]] |= (uint16_t)(1u << i);
        }
    }
    free(idx);
    free(req);
out:
    pthread_mutex_unlock(&r->elock);
    return rc;
}

/* How long a thread waits awake for a peer's answer before it sleeps
 * (0: never spins). 0 ok, -EINVAL without a native path. */
int dsm_remote_set_spin(struct dsm_handler *h, uint64_t ns)
{
    if (!h->remote)
        return -EINVAL;
    __atomic_store_n(&h->remote->spin_ns, ns, __ATOMIC_RELAXED);
    return 0;
}

/* Prefetch pages submitted and not yet installed or handed back. */
uint64_t dsm_remote_inflight(struct dsm_handler *h)
{
    return h->remote ? __atomic_load_n(&h->remote->inflight, __ATOMIC_RELAXED) : 0;
}

/* Stop the workers and free everything (after the readers stopped). Pages
 * of jobs never run stay FETCHING: the core is going away with them. */
void dsm_remote_close(struct dsm_handler *h)
{
    struct dsm_remote *r = h->remote;
    if (!r)
        return;
    pthread_mutex_lock(&r->jlock);
    pthread_cond_broadcast(&r->jcond);
    pthread_mutex_unlock(&r->jlock);
    for (int i = 0; i < r->nworkers; i++)
        pthread_join(r->workers[i], NULL);
    while (r->jhead) {
        struct dsm_job *j = r->jhead;
        r->jhead = j->next;
        free(j);
    }
    dsm_fetcher_free(r->evict);
    free(r->sealed);
    pc_tls_free(&r->tls);
    if (r->mem)
        munmap(r->mem, h->npages * h->page_size);
    OPENSSL_cleanse(r->key, sizeof r->key);
    pthread_mutex_destroy(&r->jlock);
    pthread_cond_destroy(&r->jcond);
    pthread_mutex_destroy(&r->elock);
    free(r->version);
    free(r->holders);
    free(r);
    h->remote = NULL;
}

const char *dsm_seal_engine(void)
{
    return pc_seal_engine();
}
