/* The replicated export object (nbd_repl.h): chunk table, placement, peer
 * health, the plaintext cache, the dirty list and the counters.  Executing
 * requests is nbd_repl_batch.c's job.
 */
#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "nbd_repl_internal.h"

/* ------------------------------------------------------------ hashing */

uint64_t nbr_mix64(uint64_t x)
{
    /* splitmix64's finalizer: every input bit moves every output bit */
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ull;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebull;
    x ^= x >> 31;
    return x;
}

uint64_t nbr_fnv1a64(const char *s)
{
    uint64_t h = 0xcbf29ce484222325ull;
    for (; *s; s++) {
        h ^= (uint8_t)*s;
        h *= 0x100000001b3ull;
    }
    return h;
}

/* ------------------------------------------------------------ open / close */

static void free_export(struct nbr_export *e)
{
    nbr_cache_free(&e->cache);
    pc_tls_free(&e->tls);
    free(e->version);
    free(e->holders);
    free(e->dirty_flag);
    free(e->dirty_list);
    for (int i = 0; i < NBR_LOCKS; i++)
        pthread_mutex_destroy(&e->locks[i]);
    pthread_mutex_destroy(&e->dlock);
    pthread_mutex_destroy(&e->flock);
    OPENSSL_cleanse(e->cfg.key, sizeof e->cfg.key);
    free(e);
}

struct nbr_export *nbr_open(const struct nbr_config *cfg, char *err, size_t errlen)
{
    if (!cfg->chunk_size || !cfg->block_size || cfg->chunk_size % cfg->block_size ||
        cfg->chunk_size / cfg->block_size > 65536 || !cfg->replicas ||
        cfg->replicas > NBR_MAX_PEERS || cfg->aad_len > PC_AAD_MAX ||
        cfg->ns_len > sizeof cfg->ns || !cfg->size) {
        snprintf(err, errlen, "bad export configuration");
        return NULL;
    }
    struct nbr_export *e = calloc(1, sizeof *e);
    if (!e) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    e->cfg = *cfg;
    e->nchunks = (cfg->size + cfg->chunk_size - 1) / cfg->chunk_size;
    e->nblocks = (cfg->size + cfg->block_size - 1) / cfg->block_size;
    e->bpc = cfg->chunk_size / cfg->block_size;
    for (int i = 0; i < NBR_LOCKS; i++)
        pthread_mutex_init(&e->locks[i], NULL);
    pthread_mutex_init(&e->dlock, NULL);
    pthread_mutex_init(&e->flock, NULL);
    e->version = calloc(e->nblocks, sizeof *e->version);
    e->holders = calloc(e->nchunks, sizeof *e->holders);
    e->dirty_flag = calloc(e->nchunks, 1);
    e->dirty_list = malloc(e->nchunks * sizeof *e->dirty_list);
    if (!e->version || !e->holders || !e->dirty_flag || !e->dirty_list ||
        nbr_cache_init(&e->cache, cfg->cache_bytes / cfg->block_size, cfg->block_size) < 0) {
        snprintf(err, errlen, "out of memory for a table of %llu chunks",
                 (unsigned long long)e->nchunks);
        free_export(e);
        return NULL;
    }
    if (pc_tls_init(&e->tls, cfg->ca, cfg->cert, cfg->keyfile, err, errlen) < 0) {
        free_export(e);
        return NULL;
    }
    return e;
}

void nbr_close(struct nbr_export *e)
{
    if (e)
        free_export(e);
}

/* ------------------------------------------------------------ peers */

int nbr_set_peer(struct nbr_export *e, int i, const char *name, const char *host, int port)
{
    if (i < 0 || i >= NBR_MAX_PEERS || strlen(name) >= sizeof e->peers[i].name ||
        strlen(host) >= sizeof e->peers[i].host || port < 0 || port > 65535 ||
        (port == 0) != (host[0] == 0))
        return -EINVAL;
    struct nbr_peer *p = &e->peers[i];
    snprintf(p->name, sizeof p->name, "%s", name);
    snprintf(p->host, sizeof p->host, "%s", host);
    snprintf(p->port, sizeof p->port, "%d", port);
    p->name_hash = nbr_fnv1a64(name);
    p->reachable = port != 0;
    __atomic_store_n(&p->rtt_ns, UINT64_MAX, __ATOMIC_RELAXED);
    __atomic_store_n(&p->configured, 1, __ATOMIC_RELEASE);
    if (i >= e->npeers)
        e->npeers = i + 1;
    return 0;
}

int nbr_set_peer_state(struct nbr_export *e, int i, int healthy, double rtt_s, double weight)
{
    if (i < 0 || i >= e->npeers)
        return -EINVAL;
    struct nbr_peer *p = &e->peers[i];
    uint64_t rtt = rtt_s < 0 ? UINT64_MAX : (uint64_t)(rtt_s * 1e9);
    /* placement weight in millionths: compared, never summed */
    uint64_t w = weight <= 0 ? 0 : weight > 1e18 ? (uint64_t)1e18 : (uint64_t)weight;
    __atomic_store_n(&p->rtt_ns, rtt, __ATOMIC_RELAXED);
    __atomic_store_n(&p->weight, w, __ATOMIC_RELAXED);
    __atomic_store_n(&p->healthy, healthy ? 1 : 0, __ATOMIC_RELAXED);
    if (healthy) /* the monitor reached it: a failure seen here is over */
        __atomic_store_n(&p->dead_until, 0, __ATOMIC_RELAXED);
    return 0;
}

int nbr_peer_usable(struct nbr_export *e, int i, uint64_t now)
{
    struct nbr_peer *p = &e->peers[i];
    return __atomic_load_n(&p->configured, __ATOMIC_ACQUIRE) && p->reachable &&
           __atomic_load_n(&p->healthy, __ATOMIC_RELAXED) &&
           __atomic_load_n(&p->dead_until, __ATOMIC_RELAXED) <= now;
}

void nbr_peer_failed(struct nbr_export *e, int i)
{
    struct nbr_peer *p = &e->peers[i];
    __atomic_store_n(&p->dead_until, pc_now_ns() + NBR_DEAD_BACKOFF_NS, __ATOMIC_RELAXED);
    nbr_count(&p->st.failures, 1);
    nbr_count(&p->st.errors, 1);
}

void nbr_peer_stats(struct nbr_export *e, int i, struct nbr_peer_stats *out)
{
    memset(out, 0, sizeof *out);
    if (i < 0 || i >= NBR_MAX_PEERS)
        return;
    const uint64_t *from = (const uint64_t *)&e->peers[i].st;
    uint64_t *to = (uint64_t *)out;
    for (size_t k = 0; k < sizeof *out / sizeof(uint64_t); k++)
        to[k] = __atomic_load_n(&from[k], __ATOMIC_RELAXED);
}

void nbr_stats(struct nbr_export *e, struct nbr_stats *out)
{
    const uint64_t *from = (const uint64_t *)&e->st;
    uint64_t *to = (uint64_t *)out;
    for (size_t k = 0; k < sizeof *out / sizeof(uint64_t); k++)
        to[k] = __atomic_load_n(&from[k], __ATOMIC_RELAXED);
    pthread_mutex_lock(&e->dlock);
    out->dirty = e->ndirty;
    pthread_mutex_unlock(&e->dlock);
}

void nbr_latency(struct nbr_export *e, int i, uint64_t ns)
{
    struct nbr_peer_stats *st = &e->peers[i].st;
    int b = 0;
    while (b < NBR_NBOUNDS && ns > e->cfg.latency_bounds_ns[b])
        b++;
    nbr_count(&st->latency[b], 1);
    nbr_count(&st->latency_total_ns, ns);
}

/*
 * Weighted rendezvous hashing (replicated.py ChunkPlacement, same function):
 * each usable peer with a weight scores weight / -ln(u), u in (0, 1) from a
 * hash of (export, chunk, peer name); the k highest scores win.  The choice
 * is stable while the peers do not change and spreads chunks in proportion
 * to weight.  Writes the chosen peers' bits into *chosen; returns how many.
 */
int nbr_place(struct nbr_export *e, uint64_t index, uint16_t exclude, int k, uint64_t now,
              uint16_t *chosen)
{
    double score[NBR_MAX_PEERS];
    int cand[NBR_MAX_PEERS], n = 0;
    for (int i = 0; i < e->npeers; i++) {
        uint64_t w = __atomic_load_n(&e->peers[i].weight, __ATOMIC_RELAXED);
        if ((exclude & (1u << i)) || !w || !nbr_peer_usable(e, i, now))
            continue;
        uint64_t h = nbr_placement_hash(e->cfg.placement_seed, index, e->peers[i].name_hash);
        double u = ((double)(h >> 11) + 0.5) / 9007199254740992.0; /* 2^53 */
        score[i] = (double)w / -log(u);
        cand[n++] = i;
    }
    int got = 0;
    *chosen = 0;
    while (got < k && n > 0) {
        int best = 0;
        for (int j = 1; j < n; j++)
            if (score[cand[j]] > score[cand[best]] ||
                (score[cand[j]] == score[cand[best]] && cand[j] < cand[best]))
                best = j;
        *chosen |= (uint16_t)(1u << cand[best]);
        cand[best] = cand[--n];
        got++;
    }
    return got;
}

uint64_t nbr_placement_hash(uint64_t seed, uint64_t index, uint64_t peer_hash)
{
    return nbr_mix64(seed ^ nbr_mix64(index + 0x9e3779b97f4a7c15ull) ^ nbr_mix64(peer_hash));
}

/*
 * Holders of a chunk in the order to read them: usable holders whose RTT is
 * within 1.5x of the nearest count as equally near and the chunk index
 * rotates among them (reads spread over replicas); then the other usable
 * holders; then the rest (tried only when nothing else answers).  The chunk
 * index (not the block's) rotates, so a chunk's blocks come from one peer.
 */
int nbr_read_order(struct nbr_export *e, uint64_t chunk, uint16_t holders, uint64_t now,
                   int *order)
{
    int near[NBR_MAX_PEERS], far[NBR_MAX_PEERS], down[NBR_MAX_PEERS];
    int nn = 0, nf = 0, nd = 0;
    uint64_t best = UINT64_MAX;
    for (int i = 0; i < e->npeers; i++)
        if ((holders & (1u << i)) && nbr_peer_usable(e, i, now)) {
            uint64_t r = __atomic_load_n(&e->peers[i].rtt_ns, __ATOMIC_RELAXED);
            if (r < best)
                best = r;
        }
    for (int i = 0; i < e->npeers; i++) {
        if (!(holders & (1u << i)))
            continue;
        if (!nbr_peer_usable(e, i, now)) {
            down[nd++] = i;
            continue;
        }
        uint64_t r = __atomic_load_n(&e->peers[i].rtt_ns, __ATOMIC_RELAXED);
        if (best == UINT64_MAX || r <= best + best / 2)
            near[nn++] = i;
        else
            far[nf++] = i;
    }
    int n = 0;
    for (int j = 0; j < nn; j++)
        order[n++] = near[(j + chunk) % (uint64_t)nn];
    for (int j = 0; j < nf; j++)
        order[n++] = far[j];
    for (int j = 0; j < nd; j++)
        order[n++] = down[j];
    return n;
}

/* ------------------------------------------------------------ chunk table */

int nbr_load(struct nbr_export *e, const uint64_t *chunks, const uint16_t *holders,
             const uint64_t *versions, size_t n)
{
    for (size_t k = 0; k < n; k++)
        if (chunks[k] >= e->nchunks)
            return -EINVAL;
    for (size_t k = 0; k < n; k++) {
        uint64_t first = chunks[k] * e->bpc;
        for (uint32_t b = 0; b < e->bpc && first + b < e->nblocks; b++)
            __atomic_store_n(&e->version[first + b], versions[k * e->bpc + b], __ATOMIC_RELEASE);
        __atomic_store_n(&e->holders[chunks[k]], holders[k], __ATOMIC_RELEASE);
    }
    return 0;
}

void nbr_dirty(struct nbr_export *e, uint64_t chunk)
{
    pthread_mutex_lock(&e->dlock);
    if (!e->dirty_flag[chunk]) {
        e->dirty_flag[chunk] = 1;
        e->dirty_list[e->ndirty++] = chunk;
    }
    pthread_mutex_unlock(&e->dlock);
}

size_t nbr_take_dirty(struct nbr_export *e, uint64_t *chunks, uint16_t *holders,
                      uint64_t *versions, size_t max)
{
    pthread_mutex_lock(&e->dlock);
    size_t n = e->ndirty < max ? e->ndirty : max;
    for (size_t k = 0; k < n; k++) {
        uint64_t i = e->dirty_list[e->ndirty - 1 - k];
        e->dirty_flag[i] = 0;
        chunks[k] = i;
        /* read under dlock: a change after this is dirty again */
        holders[k] = __atomic_load_n(&e->holders[i], __ATOMIC_ACQUIRE);
        for (uint32_t b = 0; b < e->bpc; b++) {
            uint64_t blk = i * e->bpc + b;
            versions[k * e->bpc + b] =
                blk < e->nblocks ? __atomic_load_n(&e->version[blk], __ATOMIC_ACQUIRE) : 0;
        }
    }
    e->ndirty -= n;
    pthread_mutex_unlock(&e->dlock);
    return n;
}

void nbr_mark_dirty(struct nbr_export *e, const uint64_t *chunks, size_t n)
{
    for (size_t k = 0; k < n; k++)
        if (chunks[k] < e->nchunks)
            nbr_dirty(e, chunks[k]);
}

size_t nbr_under_replicated(struct nbr_export *e, uint64_t *out, size_t max)
{
    uint64_t now = pc_now_ns();
    uint16_t usable = 0;
    for (int i = 0; i < e->npeers; i++)
        if (nbr_peer_usable(e, i, now))
            usable |= (uint16_t)(1u << i);
    size_t n = 0;
    for (uint64_t i = 0; i < e->nchunks; i++) {
        uint16_t h = __atomic_load_n(&e->holders[i], __ATOMIC_ACQUIRE);
        if (h && (uint32_t)__builtin_popcount(h & usable) < e->cfg.replicas) {
            if (n < max)
                out[n] = i;
            n++;
        }
    }
    return n;
}

void nbr_table(struct nbr_export *e, uint64_t *versions, uint16_t *holders)
{
    for (uint64_t i = 0; i < e->nblocks; i++)
        versions[i] = __atomic_load_n(&e->version[i], __ATOMIC_ACQUIRE);
    for (uint64_t i = 0; i < e->nchunks; i++)
        holders[i] = __atomic_load_n(&e->holders[i], __ATOMIC_ACQUIRE);
}

void nbr_set_flush_hook(struct nbr_export *e, int (*hook)(void *), void *arg)
{
    pthread_mutex_lock(&e->flock);
    e->flush_hook = hook;
    e->flush_arg = arg;
    pthread_mutex_unlock(&e->flock);
}

/* Persist the table through the hook (one flush at a time). 0 / -EIO. */
int nbr_persist(struct nbr_export *e)
{
    pthread_mutex_lock(&e->flock);
    int rc = e->flush_hook ? e->flush_hook(e->flush_arg) : 0;
    pthread_mutex_unlock(&e->flock);
    return rc < 0 ? -EIO : 0;
}

static void add_extent(uint32_t *out, size_t *n, size_t max, uint64_t len, uint32_t flags,
                       int *full)
{
    while (len) {
        uint32_t take = len > UINT32_MAX ? UINT32_MAX : (uint32_t)len;
        if (*n && out[2 * (*n - 1) + 1] == flags && (uint64_t)out[2 * (*n - 1)] + take <= UINT32_MAX) {
            out[2 * (*n - 1)] += take;
        } else if (*n < max) {
            out[2 * *n] = take;
            out[2 * *n + 1] = flags;
            (*n)++;
        } else {
            *full = 1;
            return;
        }
        len -= take;
    }
}

size_t nbr_extents(struct nbr_export *e, uint64_t offset, uint64_t length, uint32_t *out,
                   size_t max)
{
    size_t n = 0;
    int full = 0;
    uint64_t bs = e->cfg.block_size, end = offset + length;
    if (end > e->cfg.size)
        end = e->cfg.size;
    for (uint64_t pos = offset; pos < end && !full;) {
        uint64_t b = pos / bs;
        uint64_t stop = (b + 1) * bs < end ? (b + 1) * bs : end;
        uint16_t h = __atomic_load_n(&e->holders[b / e->bpc], __ATOMIC_ACQUIRE);
        uint64_t v = __atomic_load_n(&e->version[b], __ATOMIC_ACQUIRE);
        add_extent(out, &n, max, stop - pos,
                   nbr_is_hole(v, h) ? (NBR_STATE_HOLE | NBR_STATE_ZERO) : 0, &full);
        pos = stop;
    }
    return n;
}

/* ------------------------------------------------------------ plaintext cache */

/* Open addressing (linear probing, backward-shift deletion) from chunk
 * index to slot; CLOCK picks the slot to reuse. */
int nbr_cache_init(struct nbr_cache *c, size_t slots, uint32_t chunk_size)
{
    memset(c, 0, sizeof *c);
    pthread_mutex_init(&c->lock, NULL);
    c->chunk_size = chunk_size;
    if (!slots)
        return 0;
    size_t cap = 16;
    while (cap < 2 * slots)
        cap *= 2;
    c->slots = slots;
    c->mapcap = cap;
    c->index = malloc(slots * sizeof *c->index);
    c->version = calloc(slots, sizeof *c->version);
    c->ref = calloc(slots, 1);
    c->map = calloc(cap, sizeof *c->map);
    c->data = malloc(slots * (size_t)chunk_size);
    if (!c->index || !c->version || !c->ref || !c->map || !c->data)
        return -ENOMEM;
    for (size_t s = 0; s < slots; s++)
        c->index[s] = UINT64_MAX;
    return 0;
}

void nbr_cache_free(struct nbr_cache *c)
{
    free(c->index);
    free(c->version);
    free(c->ref);
    free(c->map);
    free(c->data);
    pthread_mutex_destroy(&c->lock);
    memset(c, 0, sizeof *c);
}

static size_t home(const struct nbr_cache *c, uint64_t index)
{
    return nbr_mix64(index) & (c->mapcap - 1);
}

/* Map position of index, or SIZE_MAX. Under the lock. */
static size_t find(const struct nbr_cache *c, uint64_t index)
{
    for (size_t h = home(c, index);; h = (h + 1) & (c->mapcap - 1)) {
        uint32_t s = c->map[h];
        if (!s)
            return SIZE_MAX;
        if (c->index[s - 1] == index)
            return h;
    }
}

static void unmap(struct nbr_cache *c, size_t h)
{
    size_t mask = c->mapcap - 1;
    c->map[h] = 0;
    for (size_t j = (h + 1) & mask; c->map[j]; j = (j + 1) & mask) {
        size_t want = home(c, c->index[c->map[j] - 1]);
        /* move j back to the hole when its home is not between them */
        if (((j - want) & mask) >= ((j - h) & mask)) {
            c->map[h] = c->map[j];
            c->map[j] = 0;
            h = j;
        }
    }
}

int nbr_cache_get(struct nbr_cache *c, uint64_t index, uint64_t min_version, uint8_t *out,
                  uint64_t *version)
{
    if (!c->slots)
        return 0;
    pthread_mutex_lock(&c->lock);
    size_t h = find(c, index);
    int hit = 0;
    if (h != SIZE_MAX) {
        size_t s = c->map[h] - 1;
        if (c->version[s] >= min_version) {
            memcpy(out, c->data + s * (size_t)c->chunk_size, c->chunk_size);
            c->ref[s] = 1;
            *version = c->version[s];
            hit = 1;
        }
    }
    pthread_mutex_unlock(&c->lock);
    return hit;
}

void nbr_cache_put(struct nbr_cache *c, uint64_t index, uint64_t version, const uint8_t *data)
{
    if (!c->slots)
        return;
    pthread_mutex_lock(&c->lock);
    size_t h = find(c, index);
    size_t s;
    if (h != SIZE_MAX) {
        s = c->map[h] - 1;
        if (c->version[s] > version) { /* a newer copy is already here */
            pthread_mutex_unlock(&c->lock);
            return;
        }
    } else {
        for (;;) { /* CLOCK: the first slot without its referenced bit */
            s = c->hand;
            c->hand = (c->hand + 1) % c->slots;
            if (!c->ref[s])
                break;
            c->ref[s] = 0;
        }
        if (c->index[s] != UINT64_MAX)
            unmap(c, find(c, c->index[s]));
        c->index[s] = index;
        size_t p = home(c, index);
        while (c->map[p])
            p = (p + 1) & (c->mapcap - 1);
        c->map[p] = (uint32_t)(s + 1);
    }
    memcpy(c->data + s * (size_t)c->chunk_size, data, c->chunk_size);
    c->version[s] = version;
    c->ref[s] = 1;
    pthread_mutex_unlock(&c->lock);
}

void nbr_cache_clear(struct nbr_export *e)
{
    struct nbr_cache *c = &e->cache;
    if (!c->slots)
        return;
    pthread_mutex_lock(&c->lock);
    memset(c->map, 0, c->mapcap * sizeof *c->map);
    memset(c->ref, 0, c->slots);
    for (size_t s = 0; s < c->slots; s++)
        c->index[s] = UINT64_MAX;
    pthread_mutex_unlock(&c->lock);
}

void nbr_cache_drop(struct nbr_cache *c, uint64_t index)
{
    if (!c->slots)
        return;
    pthread_mutex_lock(&c->lock);
    size_t h = find(c, index);
    if (h != SIZE_MAX) {
        size_t s = c->map[h] - 1;
        unmap(c, h);
        c->index[s] = UINT64_MAX;
        c->ref[s] = 0;
    }
    pthread_mutex_unlock(&c->lock);
}

int nbr_probe_seal_nonce(uint8_t *nonce)
{
    static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
    static struct pc_sealer sealer;
    static int made;
    static const uint8_t key[32], aad[16];
    static uint8_t plain[4096], blob[4096 + PC_SEAL_OVERHEAD];
    int rc = 0;
    pthread_mutex_lock(&lock);
    if (!made && pc_sealer_init(&sealer, key, aad, sizeof aad) < 0)
        rc = -1;
    made = made || rc == 0;
    if (rc == 0 && pc_seal(&sealer, 0, 1, plain, sizeof plain, blob) < 0)
        rc = -1;
    if (rc == 0)
        memcpy(nonce, blob + 1, 12);
    pthread_mutex_unlock(&lock);
    return rc;
}
