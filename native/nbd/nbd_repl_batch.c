/* Executing requests on a replicated export (nbd_repl.h), a batch at a time.
 *
 * A batch is cut into passes whose blocks fit NBR_PASS_BYTES of plaintext.
 * One pass:
 *   1. plan     every request's block pieces; which blocks need their old
 *               contents (a read, or a write that does not cover the block)
 *   2. lock     the stripes of the chunks the pass modifies, in ascending
 *               order (two passes never deadlock), then capture each
 *               block's version and its chunk's holders
 *   3. fetch    old contents: a hole reads as zeroes, the cache answers what
 *               it holds, the rest comes with one BATCH_GET per peer (sent
 *               to every peer before any answer is read), holder after
 *               holder until an authentic, current copy opens
 *   4. apply    the requests in order on the blocks' plaintext: a READ sees
 *               the pass's earlier WRITEs to the same block
 *   5. store    every modified block: version + 1, sealed once, one
 *               BATCH_PUT per peer to its chunk's targets (the live holders;
 *               a new chunk, or one written whole, placed afresh up to R);
 *               discarded blocks become DELETEs and keep their version,
 *               flagged trimmed; a STALE target makes a block start over
 *               once, numbered above every copy; a chunk's writes are
 *               acknowledged when the write quorum of its targets took every
 *               block written to it, and only those targets hold it from now on
 *   6. record   the table, the dirty list and the cache; unlock
 * A request fails (EIO, with the reason) when any block it touches failed;
 * pieces on other blocks still happen, as in the Python backend.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "nbd_repl_internal.h"

#define NBR_PASS_BYTES (16u << 20)   /* block plaintext held by one pass */
/* Blocks fetched only for reads this long are not cached: a sequential
 * read bigger than the cache would only push out what random reads reuse,
 * and copying each block into the cache costs a pass over the data. */
#define NBR_STREAM_BYTES (256u << 10)
#define PUT_ITEMS 256                /* blocks per BATCH_PUT (as replicated.py) */
#define PUT_BYTES (16u << 20)
/* Answer bytes one BATCH_GET may ask for. A big read becomes several
 * pipelined GETs per peer, so this side opens one answer's blocks while the
 * peer reads and encrypts the next (one 2 MiB answer left both sides
 * waiting for each other: 1 MiB reads +10-25 %, BENCHMARKS.md). */
#define GET_BYTES (256u << 10)
#define CMD_READ 0
#define CMD_WRITE 1
#define CMD_TRIM 4
#define CMD_CACHE 5
#define CMD_WRITE_ZEROES 6
#define FLAG_FUA 1u
#define FLAG_NO_HOLE 2u
#define FLAG_FAST_ZERO 16u
#define NBD_EIO 5
#define NBD_ENOTSUP 95

struct slot {               /* one block the pass touches */
    uint64_t index;         /* the block */
    uint64_t chunk;
    uint64_t version;       /* the table's version when the pass captured it (flags cleared) */
    uint64_t base;          /* newest version seen (a copy may be newer than the table) */
    uint64_t new_version;
    uint16_t holders;       /* its chunk's, when captured */
    uint16_t tried;         /* holders asked in the fetch */
    uint16_t targets;
    uint16_t ok;            /* targets that took new_version */
    uint16_t stale;         /* targets that hold a newer version */
    uint8_t hole;           /* reads as zeroes (never written, trimmed, no holder) */
    uint8_t need_old;       /* old contents needed */
    uint8_t covered;        /* contents fully set by an earlier op of the pass */
    uint8_t modifies;       /* a write, zero or discard touches it */
    uint8_t have;           /* buf holds the contents */
    uint8_t failed;         /* old contents could not be read */
    uint8_t written;        /* a new version must be stored */
    uint8_t discard;        /* it must become a hole (its copies deleted) */
    uint8_t write_failed;
    uint8_t keep;           /* cache what is fetched (not only streaming reads touch it) */
    uint32_t buf;           /* plaintext: arena + buf * block_size, unless direct */
    uint32_t uses;          /* block ranges of the pass's requests that touch it */
    uint8_t *direct;        /* its only use is a READ of the whole block: the
                               plaintext goes straight to that request's buffer */
    uint32_t sealed;        /* sealed blob: c->sealed + sealed * blob_len */
    char why[120];
};

enum { PEND_GET, PEND_PUT, PEND_DELETE };

struct pending {
    int peer;
    int kind;
    uint64_t id;
    uint64_t t0;
    size_t first, count;    /* slot numbers in c->items[first .. first+count) */
};

struct nbr_client {
    struct nbr_export *e;
    struct pc_conn conn[NBR_MAX_PEERS];
    struct pc_sealer sealer;
    struct slot *slots;
    size_t nslots, slotcap;
    uint32_t *map;          /* chunk index -> slot + 1 (open addressing) */
    size_t mapcap;
    uint8_t *arena;         /* plaintext of the pass's chunks */
    size_t arenacap;
    uint8_t *sealed;        /* sealed blobs of the pass's written chunks */
    size_t sealedcap;
    uint8_t *payload;       /* the request being encoded */
    size_t paycap;
    struct pending *pend;
    size_t npend, pendcap;
    uint32_t *items;        /* slot numbers, per pending request */
    size_t nitems, itemcap;
    uint32_t *work;         /* scratch list of slot numbers */
    size_t workcap;
    int8_t *pick;           /* per slot: the peer asked this fetch round, -1 none */
    size_t pickcap;
};

static int grow(void **p, size_t *cap, size_t want, size_t elem)
{
    if (*cap >= want)
        return 0;
    size_t n = *cap ? *cap : 64;
    while (n < want)
        n *= 2;
    void *q = realloc(*p, n * elem);
    if (!q)
        return -ENOMEM;
    *p = q;
    *cap = n;
    return 0;
}

static uint32_t blob_len(const struct nbr_export *e)
{
    return e->cfg.block_size + PC_SEAL_OVERHEAD;
}

/* ------------------------------------------------------------ client */

struct nbr_client *nbr_client_new(struct nbr_export *e)
{
    struct nbr_client *c = calloc(1, sizeof *c);
    if (!c)
        return NULL;
    c->e = e;
    for (int i = 0; i < NBR_MAX_PEERS; i++)
        pc_conn_init(&c->conn[i]);
    if (pc_sealer_init(&c->sealer, e->cfg.key, e->cfg.aad_prefix, e->cfg.aad_len) < 0) {
        free(c);
        return NULL;
    }
    return c;
}

void nbr_client_free(struct nbr_client *c)
{
    if (!c)
        return;
    for (int i = 0; i < NBR_MAX_PEERS; i++)
        pc_conn_close(&c->conn[i]);
    pc_sealer_free(&c->sealer);
    free(c->slots);
    free(c->map);
    free(c->arena);
    free(c->sealed);
    free(c->payload);
    free(c->pend);
    free(c->items);
    free(c->work);
    free(c->pick);
    free(c);
}

/* ------------------------------------------------------------ slots */

static void reset_slots(struct nbr_client *c)
{
    if (c->nslots)
        memset(c->map, 0, c->mapcap * sizeof *c->map);
    c->nslots = 0;
}

static struct slot *lookup(struct nbr_client *c, uint64_t index)
{
    if (!c->mapcap)
        return NULL;
    for (size_t h = nbr_mix64(index) & (c->mapcap - 1); c->map[h];
         h = (h + 1) & (c->mapcap - 1))
        if (c->slots[c->map[h] - 1].index == index)
            return &c->slots[c->map[h] - 1];
    return NULL;
}

/* The pass's slot for a block, added when new; NULL without memory. */
static struct slot *slot_for(struct nbr_client *c, uint64_t index)
{
    struct slot *s = lookup(c, index);
    if (s)
        return s;
    size_t cs = c->e->cfg.block_size;
    if (grow((void **)&c->slots, &c->slotcap, c->nslots + 1, sizeof *c->slots) < 0 ||
        grow((void **)&c->arena, &c->arenacap, (c->nslots + 1) * cs, 1) < 0)
        return NULL;
    if (c->mapcap < 2 * (c->nslots + 1)) {
        size_t cap = c->mapcap ? c->mapcap : 256;
        while (cap < 2 * (c->nslots + 1))
            cap *= 2;
        uint32_t *m = calloc(cap, sizeof *m);
        if (!m)
            return NULL;
        free(c->map);
        c->map = m;
        c->mapcap = cap;
        for (size_t k = 0; k < c->nslots; k++) {
            size_t h = nbr_mix64(c->slots[k].index) & (cap - 1);
            while (m[h])
                h = (h + 1) & (cap - 1);
            m[h] = (uint32_t)(k + 1);
        }
    }
    s = &c->slots[c->nslots];
    memset(s, 0, sizeof *s);
    s->index = index;
    s->chunk = index / c->e->bpc;
    s->buf = (uint32_t)c->nslots;
    size_t h = nbr_mix64(index) & (c->mapcap - 1);
    while (c->map[h])
        h = (h + 1) & (c->mapcap - 1);
    c->map[h] = (uint32_t)(++c->nslots);
    return s;
}

static uint8_t *plain(struct nbr_client *c, const struct slot *s)
{
    return s->direct ? s->direct : c->arena + (size_t)s->buf * c->e->cfg.block_size;
}

/* ------------------------------------------------------------ talking to peers */

static int connect_peer(struct nbr_client *c, int i)
{
    struct nbr_export *e = c->e;
    if (pc_conn_is_open(&c->conn[i]))
        return 0;
    char err[300];
    struct nbr_peer *p = &e->peers[i];
    if (!p->reachable) {
        nbr_peer_failed(e, i);
        return -EHOSTUNREACH;
    }
    int rc = pc_conn_open(&e->tls, &c->conn[i], p->name, p->host, p->port,
                          (int)e->cfg.io_timeout_ms, err, sizeof err);
    if (rc < 0)
        nbr_peer_failed(e, i);
    return rc;
}

/* Queue a request to peer i for slots items[first..first+count) (already
 * appended to c->items). The payload is in c->payload[0..plen). */
static void send_request(struct nbr_client *c, int i, int kind, uint8_t op, size_t plen,
                         size_t first, size_t count)
{
    struct nbr_export *e = c->e;
    if (grow((void **)&c->pend, &c->pendcap, c->npend + 1, sizeof *c->pend) < 0)
        return; /* the slots stay unanswered: treated as failed */
    struct pending *p = &c->pend[c->npend];
    p->peer = i;
    p->kind = kind;
    p->first = first;
    p->count = count;
    p->id = 0;
    if (connect_peer(c, i) == 0) {
        struct iovec iov = {.iov_base = c->payload, .iov_len = plen};
        p->t0 = pc_now_ns();
        int64_t id = pc_send(&c->conn[i], op, &iov, 1);
        if (id > 0)
            p->id = (uint64_t)id;
        else
            nbr_peer_failed(e, i);
    }
    c->npend++;
}

static int payload_room(struct nbr_client *c, size_t want)
{
    return grow((void **)&c->payload, &c->paycap, want, 1);
}

static size_t put_ns(struct nbr_client *c)
{
    memcpy(c->payload, c->e->cfg.ns, c->e->cfg.ns_len);
    return c->e->cfg.ns_len;
}

static int add_items(struct nbr_client *c, const uint32_t *slots, size_t n)
{
    if (grow((void **)&c->items, &c->itemcap, c->nitems + n, sizeof *c->items) < 0)
        return -ENOMEM;
    memcpy(c->items + c->nitems, slots, n * sizeof *slots);
    c->nitems += n;
    return 0;
}

static void note(struct slot *s, const struct nbr_export *e, int peer, const char *what)
{
    snprintf(s->why, sizeof s->why, "%s: %s", e->peers[peer].name, what);
}

/* Handlers of one answer (payload in the peer's connection buffer). */
static void got_batch_get(struct nbr_client *c, struct pending *p, uint8_t status,
                          const uint8_t *ans, long n)
{
    struct nbr_export *e = c->e;
    uint32_t cs = e->cfg.block_size;
    size_t pos = 4;
    int bad = status != PC_ST_OK || n < 4 || pc_get32(ans) != p->count;
    for (size_t k = 0; k < p->count; k++) {
        struct slot *s = &c->slots[c->items[p->first + k]];
        struct pc_item it;
        if (bad || pc_next_item(ans, (size_t)n, &pos, &it) < 0) {
            note(s, e, p->peer, bad ? "refused the batch" : "truncated answer");
            bad = 1;
            continue;
        }
        uint64_t version = it.version;
        nbr_count(&e->peers[p->peer].st.bytes_in, it.len);
        if (!it.found) {
            note(s, e, p->peer, "missing");
        } else if (version < s->version) {
            char why[80];
            snprintf(why, sizeof why, "stale version %llu < %llu", (unsigned long long)version,
                     (unsigned long long)s->version);
            note(s, e, p->peer, why);
        } else if (pc_open(&c->sealer, s->index, version, it.blob, it.len, plain(c, s), cs) < 0) {
            note(s, e, p->peer, "failed authentication");
        } else {
            s->have = 1;
            if (version > s->base)
                s->base = version;
            if (version > s->version) {
                /* newer than recorded (the table was not persisted before a
                 * crash): record it, unless a writer moved the block on */
                uint64_t want = s->version;
                if (__atomic_compare_exchange_n(&e->version[s->index], &want, version, 0,
                                                __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
                    nbr_dirty(e, s->chunk);
            }
            if (s->keep)
                nbr_cache_put(&e->cache, s->index, version, plain(c, s));
        }
    }
    if (bad && status == PC_ST_OK)
        nbr_peer_failed(e, p->peer);
}

static void got_batch_put(struct nbr_client *c, struct pending *p, uint8_t status,
                          const uint8_t *ans, long n)
{
    struct nbr_export *e = c->e;
    int whole = status == PC_ST_OK && n >= 4 && pc_get32(ans) == p->count &&
                (size_t)n >= 4 + p->count;
    if (!whole)
        nbr_peer_failed(e, p->peer);
    for (size_t k = 0; k < p->count; k++) {
        struct slot *s = &c->slots[c->items[p->first + k]];
        uint8_t st = whole ? ans[4 + k] : status;
        if (whole && st == PC_ST_OK) {
            s->ok |= (uint16_t)(1u << p->peer);
            nbr_count(&e->peers[p->peer].st.puts, 1);
            nbr_count(&e->peers[p->peer].st.bytes_out, blob_len(e));
        } else if (whole && st == PC_ST_STALE) {
            s->stale |= (uint16_t)(1u << p->peer);
        } else {
            note(s, e, p->peer, status == PC_ST_FULL ? "full" : "refused the write");
        }
    }
}

/* Read every pending answer (any order per connection); fail what cannot
 * be read. */
static void collect(struct nbr_client *c)
{
    struct nbr_export *e = c->e;
    uint64_t spin = e->cfg.busy_poll_ns;
    for (size_t q = 0; q < c->npend; q++) {
        struct pending *first = &c->pend[q];
        if (first->id == 0 || first->kind < 0)
            continue;
        int i = first->peer;
        struct pc_conn *conn = &c->conn[i];
        /* answers of this peer's requests, in whatever order they come */
        for (;;) {
            int open = 0;
            for (size_t r = q; r < c->npend; r++)
                open += c->pend[r].peer == i && c->pend[r].id && c->pend[r].kind >= 0;
            if (!open)
                break;
            uint8_t op, status;
            uint64_t id;
            long n = pc_recv(conn, spin, &op, &status, &id);
            struct pending *p = NULL;
            for (size_t r = q; n >= 0 && r < c->npend; r++)
                if (c->pend[r].peer == i && c->pend[r].id == id && c->pend[r].kind >= 0)
                    p = &c->pend[r];
            if (n < 0 || !p) {
                pc_conn_close(conn);
                nbr_peer_failed(e, i);
                /* its other requests stay unanswered: failed below */
                for (size_t r = q; r < c->npend; r++)
                    if (c->pend[r].peer == i && c->pend[r].kind >= 0)
                        c->pend[r].id = 0;
                break;
            }
            nbr_latency(e, i, pc_now_ns() - p->t0);
            if (p->kind == PEND_GET)
                got_batch_get(c, p, status, conn->buf, n);
            else if (p->kind == PEND_PUT)
                got_batch_put(c, p, status, conn->buf, n);
            else
                nbr_count(&e->peers[i].st.deletes, p->count);
            p->kind = -1 - p->kind; /* answered */
        }
    }
    /* requests that were never sent or never answered */
    for (size_t q = 0; q < c->npend; q++) {
        struct pending *p = &c->pend[q];
        if (p->kind < 0)
            continue;
        for (size_t k = 0; k < p->count; k++)
            note(&c->slots[c->items[p->first + k]], e, p->peer, "connection failed");
    }
    c->npend = 0;
    c->nitems = 0;
}

/*
 * Send slots work[0..m) to peer i as requests of `kind`: BATCH_GET (their
 * blocks), BATCH_PUT (their sealed new versions) or DELETE; each is the
 * namespace, a count and one item per slot, and there are as many as the
 * wire's bounds need. Returns whether anything was sent.
 */
static int send_slots(struct nbr_client *c, int i, int kind, size_t m)
{
    struct nbr_export *e = c->e;
    uint32_t bl = blob_len(e);
    size_t item = kind == PEND_PUT ? 20 + (size_t)bl : 8;
    size_t per = kind == PEND_GET ? GET_BYTES / (bl + 13)
               : kind == PEND_PUT ? PUT_BYTES / item : PC_MAX_BATCH;
    size_t most = kind == PEND_PUT ? PUT_ITEMS : PC_MAX_BATCH;
    per = per > most ? most : per < 1 ? 1 : per;
    uint8_t op = kind == PEND_GET ? PC_OP_BATCH_GET
               : kind == PEND_PUT ? PC_OP_BATCH_PUT : PC_OP_DELETE;
    int sent = 0;
    for (size_t off = 0; off < m; off += per) {
        size_t cnt = m - off < per ? m - off : per;
        if (payload_room(c, e->cfg.ns_len + 4 + cnt * item) < 0 ||
            add_items(c, c->work + off, cnt) < 0)
            break;
        size_t at = put_ns(c);
        pc_put32(c->payload + at, (uint32_t)cnt);
        at += 4;
        for (size_t k = 0; k < cnt; k++) {
            struct slot *s = &c->slots[c->work[off + k]];
            pc_put64(c->payload + at, s->index);
            if (kind == PEND_PUT) {
                pc_put64(c->payload + at + 8, s->new_version);
                pc_put32(c->payload + at + 16, bl);
                memcpy(c->payload + at + 20, c->sealed + (size_t)s->sealed * bl, bl);
            } else if (kind == PEND_GET) {
                s->tried |= (uint16_t)(1u << i);
            }
            at += item;
        }
        if (kind == PEND_GET)
            nbr_count(&e->peers[i].st.gets, cnt);
        send_request(c, i, kind, op, at, c->nitems - cnt, cnt);
        sent = 1;
    }
    return sent;
}

/* ------------------------------------------------------------ fetch */

static void fetch(struct nbr_client *c)
{
    struct nbr_export *e = c->e;
    if (grow((void **)&c->work, &c->workcap, c->nslots, sizeof *c->work) < 0 ||
        grow((void **)&c->pick, &c->pickcap, c->nslots, 1) < 0)
        return;
    for (int round = 0; round <= e->npeers; round++) {
        uint64_t now = pc_now_ns();
        /* this round, each chunk still missing asks its next untried holder */
        for (size_t k = 0; k < c->nslots; k++) {
            struct slot *s = &c->slots[k];
            c->pick[k] = -1;
            if (!s->need_old || s->have || s->failed)
                continue;
            int order[NBR_MAX_PEERS];
            if (nbr_read_order(e, s->chunk, s->holders & (uint16_t)~s->tried, now, order))
                c->pick[k] = (int8_t)order[0];
            else
                s->failed = 1;
        }
        int sent = 0;
        for (int i = 0; i < e->npeers; i++) {
            size_t m = 0;
            for (size_t k = 0; k < c->nslots; k++)
                if (c->pick[k] == i)
                    c->work[m++] = (uint32_t)k;
            sent |= send_slots(c, i, PEND_GET, m);
        }
        if (!sent)
            break;
        collect(c);
    }
    for (size_t k = 0; k < c->nslots; k++) {
        struct slot *s = &c->slots[k];
        if (s->need_old && !s->have) {
            s->failed = 1;
            char why[sizeof s->why];
            snprintf(why, sizeof why, "block %llu: no current copy readable (%.60s)",
                     (unsigned long long)s->index, s->why[0] ? s->why : "no holder");
            memcpy(s->why, why, sizeof why);
        }
    }
}

/* ------------------------------------------------------------ store */

static int seal_slot(struct nbr_client *c, struct slot *s, uint32_t at)
{
    uint32_t bl = blob_len(c->e);
    s->sealed = at;
    return pc_seal(&c->sealer, s->index, s->new_version, plain(c, s), c->e->cfg.block_size,
                   c->sealed + (size_t)at * bl);
}

/* The newest version any of the peers in mask holds of a chunk (0: none). */
static uint64_t newest_copy(struct nbr_client *c, uint64_t index, uint16_t mask)
{
    struct nbr_export *e = c->e;
    uint64_t newest = 0;
    for (int i = 0; i < e->npeers; i++) {
        if (!(mask & (1u << i)) || connect_peer(c, i) < 0 ||
            payload_room(c, e->cfg.ns_len + 8) < 0)
            continue;
        size_t at = put_ns(c);
        pc_put64(c->payload + at, index);
        struct iovec iov = {.iov_base = c->payload, .iov_len = at + 8};
        uint8_t status;
        long n = pc_call(&c->conn[i], PC_OP_GET, &iov, 1, e->cfg.busy_poll_ns, &status);
        if (n < 0) {
            nbr_peer_failed(e, i);
            continue;
        }
        if (status == PC_ST_OK && n >= 12 && pc_get64(c->conn[i].buf) > newest)
            newest = pc_get64(c->conn[i].buf);
    }
    return newest;
}

/* Put every written slot to its targets: one round, then one more for the
 * chunks a target holds newer copies of. */
static void put_round(struct nbr_client *c, int retry)
{
    struct nbr_export *e = c->e;
    uint64_t now = pc_now_ns();
    for (int i = 0; i < e->npeers; i++) {
        size_t m = 0;
        for (size_t k = 0; k < c->nslots; k++) {
            struct slot *s = &c->slots[k];
            if (s->written && !s->write_failed && (s->targets & (1u << i)) &&
                (!retry || s->stale))
                c->work[m++] = (uint32_t)k;
        }
        if (m)
            send_slots(c, i, PEND_PUT, m);
        if (retry || !nbr_peer_usable(e, i, now))
            continue; /* a dead holder's copy stays behind, outranked by the tombstone */
        m = 0;
        for (size_t k = 0; k < c->nslots; k++) {
            struct slot *s = &c->slots[k];
            if (s->discard && (s->holders & (1u << i)))
                c->work[m++] = (uint32_t)k;
        }
        if (m)
            send_slots(c, i, PEND_DELETE, m);
    }
    collect(c);
}

static int by_chunk(const void *a, const void *b, void *arg)
{
    const struct slot *slots = arg;
    uint64_t x = slots[*(const uint32_t *)a].chunk, y = slots[*(const uint32_t *)b].chunk;
    if (x != y)
        return x < y ? -1 : 1;
    return *(const uint32_t *)a < *(const uint32_t *)b ? -1 : 1; /* stable: slot order */
}

/* The slots that are written (and, with discards, discarded), grouped by
 * chunk: their numbers in c->work, sorted by chunk. Returns how many. */
static size_t modified_by_chunk(struct nbr_client *c, int discards)
{
    size_t n = 0;
    for (size_t k = 0; k < c->nslots; k++)
        if (c->slots[k].written || (discards && c->slots[k].discard))
            c->work[n++] = (uint32_t)k;
    qsort_r(c->work, n, sizeof *c->work, by_chunk, c->slots);
    return n;
}

/* End of the group of c->work[g..n) that shares a chunk. */
static size_t group_end(struct nbr_client *c, size_t g, size_t n)
{
    size_t e = g + 1;
    while (e < n && c->slots[c->work[e]].chunk == c->slots[c->work[g]].chunk)
        e++;
    return e;
}

/*
 * Record what the pass stored, chunk by chunk. A chunk's writes stand when
 * at least the write quorum of its targets took every block written to it;
 * those targets are its holders from now on (one that missed a block is
 * dropped: it would serve an old version). Otherwise none of its writes
 * stand and the table keeps the old versions (copies of the new ones on
 * some targets are newer than the table, which reads accept). Discarded
 * blocks keep their version, flagged trimmed; a chunk left with no data
 * has no holders.
 */
static void record(struct nbr_client *c)
{
    struct nbr_export *e = c->e;
    uint32_t quorum = e->cfg.write_quorum ? e->cfg.write_quorum : 1;
    size_t n = modified_by_chunk(c, 1);
    for (size_t g = 0; g < n;) {
        size_t end = group_end(c, g, n);
        uint64_t chunk = c->slots[c->work[g]].chunk;
        uint16_t ok_all = 0xffff, targets = 0;
        int wrote = 0, failed = 0;
        for (size_t q = g; q < end; q++) {
            struct slot *o = &c->slots[c->work[q]];
            if (!o->written)
                continue;
            wrote = 1;
            failed |= o->write_failed;
            ok_all &= o->ok;
            targets = o->targets;
        }
        int stands = wrote && !failed && (uint32_t)__builtin_popcount(ok_all) >= quorum;
        for (size_t q = g; q < end; q++) {
            struct slot *o = &c->slots[c->work[q]];
            if (o->written && stands) {
                __atomic_store_n(&e->version[o->index], o->new_version, __ATOMIC_RELEASE);
                nbr_cache_put(&e->cache, o->index, o->new_version, plain(c, o));
                nbr_count(&e->st.chunks_written, 1);
            } else if (o->written) {
                if (!o->write_failed) {
                    char why[sizeof o->why];
                    snprintf(why, sizeof why,
                             "chunk %llu: %d of %d replicas took every block (%.50s)",
                             (unsigned long long)chunk, wrote && ok_all != 0xffff
                                 ? __builtin_popcount(ok_all) : 0,
                             __builtin_popcount(targets), o->why[0] ? o->why : "no answer");
                    memcpy(o->why, why, sizeof why);
                    o->write_failed = 1;
                }
                nbr_cache_drop(&e->cache, o->index);
            } else if (o->discard) {
                uint64_t v = __atomic_load_n(&e->version[o->index], __ATOMIC_ACQUIRE);
                if (!(v & NBR_TRIMMED) && v == o->version) {
                    __atomic_store_n(&e->version[o->index], v | NBR_TRIMMED, __ATOMIC_RELEASE);
                    nbr_cache_drop(&e->cache, o->index);
                }
            }
        }
        if (stands)
            __atomic_store_n(&e->holders[chunk], ok_all, __ATOMIC_RELEASE);
        /* a chunk left with no data has no holders */
        uint64_t first = chunk * e->bpc;
        int empty = 1;
        for (uint32_t b = 0; b < e->bpc && first + b < e->nblocks && empty; b++) {
            uint64_t bv = __atomic_load_n(&e->version[first + b], __ATOMIC_ACQUIRE);
            empty = !bv || (bv & NBR_TRIMMED);
        }
        if (empty)
            __atomic_store_n(&e->holders[chunk], 0, __ATOMIC_RELEASE);
        nbr_dirty(e, chunk);
        g = end;
    }
}

/* Where a chunk's written blocks go: its live holders; a chunk without
 * holders (new, or trimmed whole) or written whole is placed afresh, topped
 * up to R. 0: nowhere. */
static uint16_t chunk_targets(struct nbr_client *c, uint64_t chunk, uint16_t holders,
                              uint16_t usable, int whole, uint64_t now)
{
    struct nbr_export *e = c->e;
    uint16_t live = holders & usable, more = 0;
    if (holders && !whole)
        return live; /* a new peer would lack the blocks this write leaves alone */
    int missing = (int)e->cfg.replicas - __builtin_popcount(live);
    if (missing > 0)
        nbr_place(e, chunk, live, missing, now, &more);
    return live | more;
}

static void store(struct nbr_client *c)
{
    struct nbr_export *e = c->e;
    uint32_t bl = blob_len(e);
    uint64_t now = pc_now_ns();
    size_t nw = 0;
    if (grow((void **)&c->work, &c->workcap, c->nslots, sizeof *c->work) < 0)
        goto nomem;
    for (size_t k = 0; k < c->nslots; k++)
        nw += c->slots[k].written;
    if (grow((void **)&c->sealed, &c->sealedcap, nw * (size_t)bl, 1) < 0)
        goto nomem;
    uint16_t usable = 0;
    for (int i = 0; i < e->npeers; i++)
        if (nbr_peer_usable(e, i, now))
            usable |= (uint16_t)(1u << i);
    uint32_t at = 0;
    /* every written block of a chunk gets the chunk's targets */
    size_t n = modified_by_chunk(c, 0);
    for (size_t g = 0; g < n;) {
        size_t end = group_end(c, g, n);
        const struct slot *lead = &c->slots[c->work[g]];
        uint64_t first = lead->chunk * e->bpc;
        uint64_t blocks = first + e->bpc <= e->nblocks ? e->bpc : e->nblocks - first;
        uint16_t targets = chunk_targets(c, lead->chunk, lead->holders, usable,
                                         end - g == blocks, now);
        for (size_t q = g; q < end; q++) {
            struct slot *s = &c->slots[c->work[q]];
            s->targets = targets;
            s->new_version = (s->base > s->version ? s->base : s->version) + 1;
            if (!targets) {
                s->write_failed = 1;
                snprintf(s->why, sizeof s->why, "chunk %llu: no live holder to write to",
                         (unsigned long long)s->chunk);
            } else if (seal_slot(c, s, at++) < 0) {
                s->write_failed = 1;
                snprintf(s->why, sizeof s->why, "block %llu: sealing failed",
                         (unsigned long long)s->index);
            } else {
                s->why[0] = 0;
            }
        }
        g = end;
    }
    put_round(c, 0);
    /* Targets holding a newer copy (the table was not persisted before a
     * crash): start those blocks over once, above every copy. */
    int again = 0;
    for (size_t k = 0; k < c->nslots; k++) {
        struct slot *s = &c->slots[k];
        if (!s->written || s->write_failed || !s->stale)
            continue;
        uint64_t newest = newest_copy(c, s->index, s->stale);
        s->new_version = (newest > s->new_version ? newest : s->new_version) + 1;
        s->ok = 0;
        s->stale = s->targets; /* the retry goes to every target */
        nbr_count(&e->st.stale_retries, 1);
        if (seal_slot(c, s, s->sealed) < 0)
            s->write_failed = 1;
        else
            again = 1;
    }
    if (again)
        put_round(c, 1);
    record(c);
    return;
nomem:
    for (size_t k = 0; k < c->nslots; k++)
        if (c->slots[k].written) {
            c->slots[k].write_failed = 1;
            snprintf(c->slots[k].why, sizeof c->slots[k].why, "out of memory");
        }
}

/* ------------------------------------------------------------ a pass */

static void fail(struct nbr_req *r, uint32_t err, const char *why)
{
    if (r->err)
        return; /* the first reason stays */
    r->err = err;
    snprintf(r->msg, sizeof r->msg, "%s", why);
}

/* What a request does to the chunks it touches. */
enum { DO_READ, DO_CACHE, DO_WRITE, DO_ZERO, DO_DISCARD, DO_NOTHING };

static int action(const struct nbr_req *r)
{
    switch (r->cmd) {
    case CMD_READ: return DO_READ;
    case CMD_CACHE: return DO_CACHE;
    case CMD_WRITE: return DO_WRITE;
    case CMD_TRIM: return DO_DISCARD;
    case CMD_WRITE_ZEROES: return (r->flags & FLAG_NO_HOLE) ? DO_ZERO : DO_DISCARD;
    default: return DO_NOTHING;
    }
}

static int cmp_u32(const void *a, const void *b)
{
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return x < y ? -1 : x > y;
}

/* Stripe locks of the modified slots, ascending, without repeats; returns
 * how many are in c->work[0..n). */
static size_t stripes(struct nbr_client *c)
{
    size_t n = 0;
    for (size_t k = 0; k < c->nslots; k++)
        if (c->slots[k].modifies)
            c->work[n++] = (uint32_t)(c->slots[k].chunk % NBR_LOCKS);
    qsort(c->work, n, sizeof *c->work, cmp_u32);
    size_t u = 0;
    for (size_t k = 0; k < n; k++)
        if (!u || c->work[u - 1] != c->work[k])
            c->work[u++] = c->work[k];
    return u;
}

static int pass(struct nbr_client *c, struct nbr_req *reqs, size_t n)
{
    struct nbr_export *e = c->e;
    uint64_t cs = e->cfg.block_size;
    reset_slots(c);
    /* 1. plan */
    for (size_t q = 0; q < n; q++) {
        struct nbr_req *r = &reqs[q];
        int act = action(r);
        if (act == DO_NOTHING || !r->length)
            continue;
        if (act == DO_ZERO && (r->flags & FLAG_FAST_ZERO)) {
            fail(r, NBD_ENOTSUP, "storing zeroes is not fast");
            continue;
        }
        for (uint64_t pos = r->offset, end = r->offset + r->length; pos < end;) {
            uint64_t index = pos / cs, inner = pos % cs;
            uint64_t count = cs - inner < end - pos ? cs - inner : end - pos;
            struct slot *s = slot_for(c, index);
            if (!s)
                return -ENOMEM;
            int full = inner == 0 && count == cs;
            /* a block read whole by one request and touched by nothing else
             * is opened (or zeroed, or copied from the cache) in place */
            s->direct = !s->uses++ && act == DO_READ && full ? r->rdata + (pos - r->offset) : NULL;
            if (act == DO_READ || act == DO_CACHE) {
                if (!s->covered)
                    s->need_old = 1;
                if (act == DO_CACHE || r->length < NBR_STREAM_BYTES)
                    s->keep = 1;
            } else {
                s->modifies = 1;
                s->keep = 1;
                if (full)
                    s->covered = 1;
                else if (!s->covered)
                    s->need_old = 1;
            }
            pos += count;
        }
    }
    if (grow((void **)&c->work, &c->workcap, c->nslots + 1, sizeof *c->work) < 0)
        return -ENOMEM;
    /* 2. lock, capture */
    size_t nlocks = stripes(c);
    uint32_t held[NBR_LOCKS];
    memcpy(held, c->work, nlocks * sizeof *held);
    for (size_t k = 0; k < nlocks; k++)
        pthread_mutex_lock(&e->locks[held[k]]);
    for (size_t k = 0; k < c->nslots; k++) {
        struct slot *s = &c->slots[k];
        uint64_t raw = __atomic_load_n(&e->version[s->index], __ATOMIC_ACQUIRE);
        s->holders = __atomic_load_n(&e->holders[s->chunk], __ATOMIC_ACQUIRE);
        s->version = s->base = raw & ~NBR_TRIMMED;
        s->hole = (uint8_t)nbr_is_hole(raw, s->holders);
        if (!s->need_old)
            continue;
        uint64_t v;
        if (s->hole) {
            memset(plain(c, s), 0, cs);
            s->have = 1;
        } else if (nbr_cache_get(&e->cache, s->index, s->version, plain(c, s), &v)) {
            s->have = 1;
            s->base = v;
            nbr_count(&e->st.cache_hits, 1);
        } else {
            nbr_count(&e->st.cache_misses, 1);
        }
    }
    /* 3. fetch */
    fetch(c);
    /* 4. apply, in order */
    for (size_t q = 0; q < n; q++) {
        struct nbr_req *r = &reqs[q];
        int act = action(r);
        if (act == DO_NOTHING || !r->length || r->err)
            continue;
        for (uint64_t pos = r->offset, end = r->offset + r->length; pos < end;) {
            uint64_t index = pos / cs, inner = pos % cs;
            uint64_t count = cs - inner < end - pos ? cs - inner : end - pos;
            struct slot *s = lookup(c, index);
            uint8_t *buf = plain(c, s);
            int full = inner == 0 && count == cs;
            size_t at = pos - r->offset;
            pos += count;
            if (act == DO_CACHE)
                continue; /* fetching filled the cache; failures do not matter */
            if (act == DO_READ) {
                if (s->have && buf + inner != r->rdata + at)
                    memcpy(r->rdata + at, buf + inner, count);
                else if (!s->have)
                    fail(r, NBD_EIO, s->why);
                continue;
            }
            if (act == DO_DISCARD && s->hole && !s->written)
                continue; /* a hole already reads as zeroes */
            if (!full && !s->have) {
                fail(r, NBD_EIO, s->why);
                continue;
            }
            if (act == DO_WRITE)
                memcpy(buf + inner, r->wdata + at, count);
            else
                memset(buf + inner, 0, count);
            s->have = 1;
            if (act == DO_DISCARD && full) {
                /* a hole again: delete the copies (none: nothing to do) */
                s->written = 0;
                s->discard = !s->hole;
            } else {
                s->written = 1;
                s->discard = 0;
            }
        }
    }
    /* 5, 6. store, record */
    store(c);
    for (size_t k = 0; k < nlocks; k++)
        pthread_mutex_unlock(&e->locks[held[nlocks - 1 - k]]);
    for (size_t q = 0; q < n; q++) {
        struct nbr_req *r = &reqs[q];
        int act = action(r);
        if (act == DO_READ || act == DO_CACHE || act == DO_NOTHING || !r->length || r->err)
            continue;
        for (uint64_t pos = r->offset, end = r->offset + r->length; pos < end;) {
            uint64_t index = pos / cs, inner = pos % cs;
            pos += cs - inner < end - pos ? cs - inner : end - pos;
            struct slot *s = lookup(c, index);
            if (s->write_failed)
                fail(r, NBD_EIO, s->why);
        }
    }
    return 0;
}

int nbr_exec(struct nbr_client *c, struct nbr_req *reqs, size_t n)
{
    struct nbr_export *e = c->e;
    uint64_t cs = e->cfg.block_size;
    size_t limit = NBR_PASS_BYTES / cs ? NBR_PASS_BYTES / cs : 1;
    nbr_count(&e->st.batches, 1);
    size_t start = 0, chunks = 0;
    for (size_t q = 0; q < n; q++) {
        reqs[q].err = 0;
        reqs[q].msg[0] = 0;
        size_t span = reqs[q].length
            ? (size_t)((reqs[q].offset + reqs[q].length - 1) / cs - reqs[q].offset / cs + 1) : 0;
        if (q > start && chunks + span > limit) {
            int rc = pass(c, reqs + start, q - start);
            if (rc < 0)
                return rc;
            start = q;
            chunks = 0;
        }
        chunks += span;
    }
    if (n > start) {
        int rc = pass(c, reqs + start, n - start);
        if (rc < 0)
            return rc;
    }
    /* FUA: the table is persisted before the reply, as for FLUSH */
    int fua = 0;
    for (size_t q = 0; q < n; q++)
        fua |= !reqs[q].err && (reqs[q].flags & FLAG_FUA) && reqs[q].cmd != CMD_READ &&
               reqs[q].cmd != CMD_CACHE;
    if (fua && nbr_persist(e) < 0)
        for (size_t q = 0; q < n; q++)
            if (!reqs[q].err && (reqs[q].flags & FLAG_FUA) && reqs[q].cmd != CMD_READ &&
                reqs[q].cmd != CMD_CACHE)
                fail(&reqs[q], NBD_EIO, "could not persist the chunk table");
    return 0;
}

int nbr_flush(struct nbr_client *c)
{
    return nbr_persist(c->e);
}

/* ------------------------------------------------------------ re-replication */

int nbr_repair(struct nbr_client *c, uint64_t chunk)
{
    struct nbr_export *e = c->e;
    if (chunk >= e->nchunks)
        return -EINVAL;
    uint32_t bs = e->cfg.block_size, bl = blob_len(e);
    /* per block of the chunk: the block, the version wanted, the version got */
    uint64_t *blocks = malloc(3 * (size_t)e->bpc * sizeof *blocks);
    if (!blocks)
        return -ENOMEM;
    uint64_t *want = blocks + e->bpc, *got = want + e->bpc;
    pthread_mutex_t *lock = &e->locks[chunk % NBR_LOCKS];
    pthread_mutex_lock(lock);
    int rc = 0;
    uint64_t now = pc_now_ns();
    uint16_t holders = __atomic_load_n(&e->holders[chunk], __ATOMIC_ACQUIRE), live = 0;
    for (int i = 0; i < e->npeers; i++)
        if ((holders & (1u << i)) && nbr_peer_usable(e, i, now))
            live |= (uint16_t)(1u << i);
    int missing = (int)e->cfg.replicas - __builtin_popcount(live);
    if (!holders || missing <= 0)
        goto out;
    /* the blocks with data, and their versions */
    uint64_t first = chunk * e->bpc;
    uint32_t nb = 0;
    for (uint32_t b = 0; b < e->bpc && first + b < e->nblocks; b++) {
        uint64_t v = __atomic_load_n(&e->version[first + b], __ATOMIC_ACQUIRE);
        if (v && !(v & NBR_TRIMMED)) {
            blocks[nb] = first + b;
            want[nb++] = v;
        }
    }
    if (grow((void **)&c->sealed, &c->sealedcap, (size_t)nb * bl, 1) < 0 ||
        grow((void **)&c->arena, &c->arenacap, bs, 1) < 0 ||
        payload_room(c, e->cfg.ns_len + 4 + (size_t)nb * (20 + bl)) < 0) {
        rc = -ENOMEM;
        goto out;
    }
    /* every block, current and authentic, from one holder (the nearest that has them) */
    int order[NBR_MAX_PEERS], no = nbr_read_order(e, chunk, holders, now, order), from = -1;
    for (int k = 0; k < no && from < 0 && nb; k++) {
        int i = order[k];
        if (connect_peer(c, i) < 0)
            continue;
        size_t at = put_ns(c);
        pc_put32(c->payload + at, nb);
        at += 4;
        for (uint32_t b = 0; b < nb; b++, at += 8)
            pc_put64(c->payload + at, blocks[b]);
        struct iovec iov = {.iov_base = c->payload, .iov_len = at};
        uint8_t status;
        long n = pc_call(&c->conn[i], PC_OP_BATCH_GET, &iov, 1, e->cfg.busy_poll_ns, &status);
        if (n < 0) {
            nbr_peer_failed(e, i);
            continue;
        }
        const uint8_t *ans = c->conn[i].buf;
        if (status != PC_ST_OK || n < 4 || pc_get32(ans) != nb)
            continue;
        size_t pos = 4;
        uint32_t good = 0;
        struct pc_item it;
        for (uint32_t b = 0; b < nb && pc_next_item(ans, (size_t)n, &pos, &it) == 0; b++)
            if (it.found && it.version >= want[b] && it.len == bl &&
                pc_open(&c->sealer, blocks[b], it.version, it.blob, bl, c->arena, bs) == 0) {
                memcpy(c->sealed + (size_t)b * bl, it.blob, bl);
                got[b] = it.version;
                good++;
            }
        if (good == nb)
            from = i;
    }
    if (nb && from < 0) {
        rc = -EIO;
        goto out;
    }
    uint16_t more = 0, added = 0;
    nbr_place(e, chunk, live, missing, now, &more);
    if (!more) {
        rc = -ENOSPC;
        goto out;
    }
    for (int i = 0; i < e->npeers; i++) {
        if (!(more & (1u << i)))
            continue;
        if (!nb) { /* nothing to copy: only trimmed or unwritten blocks */
            added |= (uint16_t)(1u << i);
            continue;
        }
        if (connect_peer(c, i) < 0)
            continue;
        size_t at = put_ns(c);
        pc_put32(c->payload + at, nb);
        at += 4;
        for (uint32_t b = 0; b < nb; b++) {
            pc_put64(c->payload + at, blocks[b]);
            pc_put64(c->payload + at + 8, got[b]);
            pc_put32(c->payload + at + 16, bl);
            memcpy(c->payload + at + 20, c->sealed + (size_t)b * bl, bl);
            at += 20 + bl;
        }
        struct iovec iov = {.iov_base = c->payload, .iov_len = at};
        uint8_t status;
        long n = pc_call(&c->conn[i], PC_OP_BATCH_PUT, &iov, 1, e->cfg.busy_poll_ns, &status);
        if (n < 0) {
            nbr_peer_failed(e, i);
            continue;
        }
        const uint8_t *ans = c->conn[i].buf;
        int all = status == PC_ST_OK && n >= 4 && pc_get32(ans) == nb && (size_t)n >= 4 + nb;
        for (uint32_t b = 0; all && b < nb; b++)
            all = ans[4 + b] == PC_ST_OK;
        if (all) {
            added |= (uint16_t)(1u << i);
            nbr_count(&e->peers[i].st.puts, nb);
            nbr_count(&e->peers[i].st.bytes_out, (uint64_t)nb * bl);
        }
    }
    for (uint32_t b = 0; b < nb; b++) /* copies newer than the table were found */
        if (got[b] > want[b])
            __atomic_store_n(&e->version[blocks[b]], got[b], __ATOMIC_RELEASE);
    __atomic_store_n(&e->holders[chunk], live | added, __ATOMIC_RELEASE);
    nbr_dirty(e, chunk);
    if (__builtin_popcount(live | added) >= (int)e->cfg.replicas) {
        nbr_count(&e->st.repaired, 1);
        rc = 1;
    } else {
        rc = -EAGAIN;
    }
out:
    pthread_mutex_unlock(lock);
    free(blocks);
    return rc;
}
