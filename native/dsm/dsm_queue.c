/*
 * The fetch queue: pages whose fault needs peers, handed to the Python side.
 *
 * A page enters only on its REMOTE -> FETCHING transition, so it is queued
 * at most once: at most npages fetch entries. Notes (dsm_queue_note) are
 * best effort and only added while fewer than npages entries wait, so a ring
 * of 2 * npages entries never overflows. Pushing writes the eventfd the
 * Python event loop watches.
 */
#include <errno.h>
#include <stdint.h>
#include <unistd.h>

#include "dsm.h"

/* 0 ok, -errno when the eventfd could not be signalled (the page stays queued). */
int dsm_queue_push(struct dsm_handler *h, uint64_t page)
{
    pthread_mutex_lock(&h->qlock);
    h->queue[(h->qhead + h->qlen) % (2 * h->npages)] = page;
    h->qlen++;
    pthread_mutex_unlock(&h->qlock);
    uint64_t one = 1;
    if (write(h->evfd, &one, sizeof one) != sizeof one && errno != EAGAIN) {
        dsm_count(&h->st.errors, 1);
        return -errno;
    }
    return 0;
}

/* Add a note for the Python side's policies (dropped when the ring is busy). */
void dsm_queue_note(struct dsm_handler *h, uint64_t entry)
{
    pthread_mutex_lock(&h->qlock);
    int room = h->qlen < h->npages;
    if (room) {
        h->queue[(h->qhead + h->qlen) % (2 * h->npages)] = entry;
        h->qlen++;
    }
    pthread_mutex_unlock(&h->qlock);
    uint64_t one = 1;
    if (room)
        (void)!write(h->evfd, &one, sizeof one);
}

/* Move up to max queued pages into pages[]; returns how many. Also clears
 * the eventfd so the next push wakes the reader again. */
int dsm_take_fetches(struct dsm_handler *h, uint64_t *pages, size_t max)
{
    uint64_t drained;
    (void)!read(h->evfd, &drained, sizeof drained); /* EAGAIN when already clear */
    pthread_mutex_lock(&h->qlock);
    size_t n = h->qlen < max ? (size_t)h->qlen : max;
    for (size_t i = 0; i < n; i++)
        pages[i] = h->queue[(h->qhead + i) % (2 * h->npages)];
    h->qhead = (h->qhead + n) % (2 * h->npages);
    h->qlen -= n;
    int more = h->qlen > 0;
    pthread_mutex_unlock(&h->qlock);
    if (more) {
        uint64_t one = 1; /* leave the eventfd readable for the rest */
        (void)!write(h->evfd, &one, sizeof one);
    }
    return (int)n;
}

/* Claim pages for a prefetch: REMOTE -> FETCHING. ok[i] = 1 when claimed.
 * Returns the number claimed. */
int dsm_claim(struct dsm_handler *h, const uint64_t *pages, size_t n, uint8_t *ok)
{
    int claimed = 0;
    for (size_t i = 0; i < n; i++) {
        ok[i] = pages[i] < h->npages && dsm_cas(h, pages[i], DSM_REMOTE, DSM_FETCHING);
        claimed += ok[i];
    }
    return claimed;
}
