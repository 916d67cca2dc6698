/*
 * What a PUT or BATCH_PUT will do, worked out before anything is stored:
 * both stores refuse a whole batch FULL when its growth does not fit, and
 * answer each other item OK or STALE.
 */
#ifndef OMEGA_BATCH_PLAN_H
#define OMEGA_BATCH_PLAN_H

#include <stddef.h>
#include <stdint.h>

/* What key holds now: 1 with its version and blob length, 0 when absent. */
typedef int (*plan_held_fn)(void *arg, uint64_t key, uint64_t *version, uint32_t *len);

struct plan_result {
    int64_t growth;  /* blob bytes the batch adds (negative: it shrinks) */
    size_t fresh;    /* keys it adds */
};

/*
 * Replay the batch key by key in its order (items sorted by key, stable):
 * an item older than its key's current version (held, or set by an earlier
 * item) is STALE and adds nothing; otherwise it replaces the current size.
 * Items with take[i] == 0 are left out (take NULL: every item). statuses[i]
 * gets PEER_ST_OK or PEER_ST_STALE for every item taken.
 * Returns 0 or -ENOMEM.
 */
int batch_plan(size_t n, const uint64_t *keys, const uint64_t *versions, const uint32_t *lens,
               const uint8_t *take, plan_held_fn held, void *arg, uint8_t *statuses,
               struct plan_result *out);

#endif
