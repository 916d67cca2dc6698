/* Shared by nbd_repl.c and nbd_repl_batch.c (not part of the cffi API). */
#ifndef OMEGA_NBD_REPL_INTERNAL_H
#define OMEGA_NBD_REPL_INTERNAL_H

#include <pthread.h>
#include <stdint.h>

#include "nbd_repl.h"
#include "peerclient.h"

#define NBR_LOCKS 1024                        /* chunk stripe locks */
#define NBR_DEAD_BACKOFF_NS 1000000000ull     /* a peer that failed is skipped this long */
#define NBR_STATE_HOLE 1u
#define NBR_STATE_ZERO 2u

struct nbr_peer {
    char name[256];
    char host[256];
    char port[8];
    uint64_t name_hash;                       /* nbr_fnv1a64(name): placement */
    int configured;
    int reachable;                            /* has an address (else only a name in the table) */
    int healthy;                              /* the Python monitor's view */
    uint64_t rtt_ns;                          /* smoothed RTT; UINT64_MAX unmeasured */
    uint64_t weight;                          /* placement weight; 0: no new chunks */
    uint64_t dead_until;                      /* failed here: skipped until then */
    struct nbr_peer_stats st;
};

struct nbr_cache {
    pthread_mutex_t lock;
    uint32_t chunk_size;                      /* bytes per entry (a block) */
    size_t slots;                             /* capacity in blocks (0: no cache) */
    uint64_t *index;                          /* block in each slot, UINT64_MAX empty */
    uint64_t *version;                        /* its version */
    uint8_t *ref;                             /* CLOCK referenced bits */
    uint8_t *data;                            /* slots * chunk_size */
    uint32_t *map;                            /* hash: slot + 1, 0 empty */
    size_t mapcap;
    size_t hand;
};

struct nbr_export {
    struct nbr_config cfg;
    uint64_t nchunks;
    uint64_t nblocks;
    uint32_t bpc;                             /* blocks per chunk */
    struct pc_tls tls;
    struct nbr_peer peers[NBR_MAX_PEERS];
    int npeers;
    uint64_t *version;                        /* per block: current version (0: never
                                               * written; NBR_TRIMMED: trimmed) */
    uint16_t *holders;                        /* per chunk: peers holding it (bit i) */
    pthread_mutex_t locks[NBR_LOCKS];         /* writers of chunk i hold locks[i % NBR_LOCKS] */
    pthread_mutex_t dlock;                    /* the dirty list */
    uint8_t *dirty_flag;
    uint64_t *dirty_list;
    size_t ndirty;
    pthread_mutex_t flock;                    /* one persistence at a time */
    int (*flush_hook)(void *);
    void *flush_arg;
    struct nbr_cache cache;
    struct nbr_stats st;
};

static inline void nbr_count(uint64_t *counter, uint64_t n)
{
    __atomic_add_fetch(counter, n, __ATOMIC_RELAXED);
}

/* nbd_repl.c */
uint64_t nbr_mix64(uint64_t x);
uint64_t nbr_fnv1a64(const char *s);
uint64_t nbr_placement_hash(uint64_t seed, uint64_t index, uint64_t peer_hash);
int nbr_peer_usable(struct nbr_export *e, int i, uint64_t now);
void nbr_peer_failed(struct nbr_export *e, int i);
void nbr_latency(struct nbr_export *e, int i, uint64_t ns);
int nbr_place(struct nbr_export *e, uint64_t index, uint16_t exclude, int k, uint64_t now,
              uint16_t *chosen);
int nbr_read_order(struct nbr_export *e, uint64_t chunk, uint16_t holders, uint64_t now,
                   int *order);
/* A chunk's table entries changed (it is persisted on the next flush). */
void nbr_dirty(struct nbr_export *e, uint64_t chunk);
/* A block reads as zeroes without asking a peer. */
static inline int nbr_is_hole(uint64_t version, uint16_t holders)
{
    return !holders || !version || (version & NBR_TRIMMED);
}
int nbr_persist(struct nbr_export *e);
int nbr_cache_init(struct nbr_cache *c, size_t slots, uint32_t chunk_size);
void nbr_cache_free(struct nbr_cache *c);
/* 1 and the block copied to out (its version in *version) when a copy at
 * least min_version new is cached; 0 otherwise. */
int nbr_cache_get(struct nbr_cache *c, uint64_t index, uint64_t min_version, uint8_t *out,
                  uint64_t *version);
void nbr_cache_put(struct nbr_cache *c, uint64_t index, uint64_t version, const uint8_t *data);
void nbr_cache_drop(struct nbr_cache *c, uint64_t index);

#endif
