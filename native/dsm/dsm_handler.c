/*
 * Life cycle of a DSM handler core: open (tables), scan, start readers, stats,
 * close. See dsm.h for the thread model.
 */
#include <errno.h>
#include <linux/userfaultfd.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include "dsm.h"
#include "omega_thread.h"

/* Takes ownership of uffd and memfd (closed by dsm_close). NULL on error,
 * with *err = -errno. */
struct dsm_handler *dsm_open(int uffd, int memfd, uint64_t base, uint64_t length,
                             uint64_t file_offset, int wp, int *err)
{
    long ps = sysconf(_SC_PAGESIZE);
    if (ps <= 0 || length == 0 || length % (uint64_t)ps || base % (uint64_t)ps) {
        *err = -EINVAL;
        return NULL;
    }
    struct dsm_handler *h = calloc(1, sizeof *h);
    if (!h) {
        *err = -ENOMEM;
        return NULL;
    }
    h->uffd = uffd;
    h->memfd = memfd;
    h->base = base;
    h->length = length;
    h->file_offset = file_offset;
    h->page_size = (uint64_t)ps;
    h->npages = length / (uint64_t)ps;
    h->wp = wp;
    h->state = calloc(h->npages, 1);
    h->ref = calloc(h->npages, 1);
    h->t_fault = calloc(h->npages, sizeof *h->t_fault);
    h->queue = calloc(2 * h->npages, sizeof *h->queue);
    h->evfd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (!h->state || !h->ref || !h->t_fault || !h->queue || h->evfd < 0) {
        *err = h->evfd < 0 ? -errno : -ENOMEM;
        if (h->evfd >= 0)
            close(h->evfd);
        free(h->state);
        free(h->ref);
        free(h->t_fault);
        free(h->queue);
        free(h);
        return NULL;
    }
    pthread_mutex_init(&h->qlock, NULL);
    h->st.npages = h->npages;
    h->st.page_size = h->page_size;
    *err = 0;
    return h;
}

/* Mark every page that has data in the memory file LOCAL (SEEK_DATA/HOLE).
 * Call before dsm_start. Returns the number of resident pages or -errno. */
int dsm_scan_resident(struct dsm_handler *h)
{
    off_t end = (off_t)(h->file_offset + h->length);
    off_t pos = (off_t)h->file_offset;
    uint64_t count = 0;
    while (pos < end) {
        off_t data = lseek(h->memfd, pos, SEEK_DATA);
        if (data < 0) {
            if (errno == ENXIO)
                break; /* no data after pos */
            return -errno;
        }
        if (data >= end)
            break;
        off_t hole = lseek(h->memfd, data, SEEK_HOLE);
        if (hole < 0)
            return -errno;
        if (hole > end)
            hole = end;
        for (off_t o = data; o < hole; o += (off_t)h->page_size) {
            uint64_t page = ((uint64_t)o - h->file_offset) / h->page_size;
            if (dsm_state(h, page) != DSM_LOCAL) {
                dsm_set(h, page, DSM_LOCAL);
                count++;
            }
        }
        pos = hole;
    }
    h->st.resident = count;
    return (int)count;
}

/* ZERO -> REMOTE for pages the directory says peers hold (not present here).
 * Returns the number marked. */
int dsm_mark_remote(struct dsm_handler *h, const uint64_t *pages, size_t n)
{
    int marked = 0;
    for (size_t i = 0; i < n; i++)
        if (pages[i] < h->npages && dsm_cas(h, pages[i], DSM_ZERO, DSM_REMOTE))
            marked++;
    dsm_count(&h->st.remote, (uint64_t)marked);
    return marked;
}

/* Wake every thread waiting on the range: after a handler restart, faults
 * the old handler read but never served would otherwise wait forever; woken,
 * they fault again and reach us. 0 ok, -errno. */
int dsm_wake_all(struct dsm_handler *h)
{
    return dsm_wake(h, 0, h->npages);
}

/* 0 ok, -errno (threads already started stay running until dsm_close). */
int dsm_start(struct dsm_handler *h, int nthreads)
{
    if (nthreads < 1 || nthreads > DSM_MAX_THREADS)
        return -EINVAL;
    for (int i = 0; i < nthreads; i++) {
        int e = omega_thread_create(&h->threads[i], dsm_reader_main, h);
        if (e)
            return -e;
        pthread_setname_np(h->threads[i], "omega-dsm-rd");
        h->nthreads = i + 1;
    }
    return 0;
}

/* Pages resident now (cheap: no stats copy). */
uint64_t dsm_resident(struct dsm_handler *h)
{
    return __atomic_load_n(&h->st.resident, __ATOMIC_RELAXED);
}

/* Take n pages of room under the hard limit: resident += n unless that
 * would pass the limit (0 = no limit). 0 ok, -EAGAIN no room. Every page
 * placed into the guest is reserved first, so resident never passes it. */
int dsm_reserve(struct dsm_handler *h, uint64_t n)
{
    uint64_t limit = __atomic_load_n(&h->hard_limit, __ATOMIC_RELAXED);
    uint64_t cur = __atomic_load_n(&h->st.resident, __ATOMIC_RELAXED);
    do {
        if (limit && cur + n > limit)
            return -EAGAIN;
    } while (!__atomic_compare_exchange_n(&h->st.resident, &cur, cur + n, 1,
                                          __ATOMIC_ACQ_REL, __ATOMIC_RELAXED));
    /* Crossing the reclaim mark wakes the Python side's reclaim loop, which
     * otherwise sleeps: an idle guest costs its handler nothing. */
    uint64_t mark = __atomic_load_n(&h->reclaim_mark, __ATOMIC_RELAXED);
    if (mark && cur < mark && cur + n >= mark)
        dsm_queue_note(h, DSM_QUEUE_RECLAIM);
    return 0;
}

void dsm_unreserve(struct dsm_handler *h, uint64_t n)
{
    __atomic_sub_fetch(&h->st.resident, n, __ATOMIC_RELAXED);
}

/* Leave a DSM_QUEUE_RECLAIM note whenever a reservation takes the resident
 * count to pages or past it from below (0 disables). */
void dsm_set_reclaim_mark(struct dsm_handler *h, uint64_t pages)
{
    __atomic_store_n(&h->reclaim_mark, pages, __ATOMIC_RELAXED);
}

/* Whether faults the reader threads serve themselves, and faults on pages
 * already in flight, leave DSM_QUEUE_SEEN notes (on by default). They feed
 * the prefetch policy; without one each note is only a wake-up of the
 * Python side per fault. */
void dsm_set_fault_notes(struct dsm_handler *h, int on)
{
    __atomic_store_n(&h->no_fault_notes, !on, __ATOMIC_RELAXED);
}

/* Defer zero faults while resident >= hard_limit pages (0 disables). */
void dsm_set_limit(struct dsm_handler *h, uint64_t hard_limit)
{
    __atomic_store_n(&h->hard_limit, hard_limit, __ATOMIC_RELAXED);
}

void dsm_get_stats(struct dsm_handler *h, struct dsm_stats *out)
{
    pthread_mutex_lock(&h->qlock);
    h->st.queue_len = h->qlen;
    pthread_mutex_unlock(&h->qlock);
    memcpy(out, &h->st, sizeof *out);
}

/* Stop the readers, close the descriptors, free the tables. */
void dsm_close(struct dsm_handler *h)
{
    if (!h)
        return;
    __atomic_store_n(&h->stop, 1, __ATOMIC_RELEASE);
    for (int i = 0; i < h->nthreads; i++)
        pthread_join(h->threads[i], NULL);
    dsm_remote_close(h);
    close(h->evfd);
    close(h->uffd);
    close(h->memfd);
    pthread_mutex_destroy(&h->qlock);
    free(h->state);
    free(h->ref);
    free(h->t_fault);
    free(h->queue);
    free(h);
}
