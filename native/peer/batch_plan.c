/*
 * The batch replay of batch_plan.h.
 */
#include <errno.h>
#include <stdlib.h>

#include "batch_plan.h"
#include "peer.h"

struct order {
    uint64_t key;
    size_t pos;
};

static int cmp_order(const void *a, const void *b)
{
    const struct order *x = a, *y = b;
    if (x->key != y->key)
        return x->key < y->key ? -1 : 1;
    return x->pos < y->pos ? -1 : x->pos > y->pos;
}

/* Replay the items o[0..m) of one key. */
static void replay_key(const struct order *o, size_t m, const uint64_t *versions,
                       const uint32_t *lens, plan_held_fn held, void *arg, uint8_t *statuses,
                       struct plan_result *out)
{
    uint64_t ver = 0;
    uint32_t len = 0;
    int have = held(arg, o[0].key, &ver, &len);
    int64_t size = have ? len : 0;
    if (!have)
        out->fresh++; /* its first item cannot be stale */
    for (size_t i = 0; i < m; i++) {
        size_t p = o[i].pos;
        if (have && ver > versions[p]) {
            statuses[p] = PEER_ST_STALE;
            continue;
        }
        statuses[p] = PEER_ST_OK;
        out->growth += (int64_t)lens[p] - size;
        have = 1;
        ver = versions[p];
        size = lens[p];
    }
}

int batch_plan(size_t n, const uint64_t *keys, const uint64_t *versions, const uint32_t *lens,
               const uint8_t *take, plan_held_fn held, void *arg, uint8_t *statuses,
               struct plan_result *out)
{
    out->growth = 0;
    out->fresh = 0;
    if (n == 1) { /* the common PUT: no sorting */
        if (!take || take[0]) {
            struct order one = {keys[0], 0};
            replay_key(&one, 1, versions, lens, held, arg, statuses, out);
        }
        return 0;
    }
    struct order *o = malloc((n ? n : 1) * sizeof *o);
    if (!o)
        return -ENOMEM;
    size_t m = 0;
    for (size_t i = 0; i < n; i++)
        if (!take || take[i])
            o[m++] = (struct order){keys[i], i};
    qsort(o, m, sizeof *o, cmp_order);
    for (size_t i = 0; i < m;) {
        size_t j = i;
        while (j < m && o[j].key == o[i].key)
            j++;
        replay_key(o + i, j - i, versions, lens, held, arg, statuses, out);
        i = j;
    }
    free(o);
    return 0;
}
