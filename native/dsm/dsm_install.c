/*
 * Placing pages into the guest: UFFDIO_COPY over runs, UFFDIO_ZEROPAGE,
 * UFFDIO_WAKE and UFFDIO_WRITEPROTECT, each with its EEXIST / EAGAIN cases.
 *
 * EEXIST means the page is already there (a racing fault was served another
 * way): the waiter is woken and the page counts as installed. EAGAIN means
 * the address space is changing under us: retried a bounded number of times.
 */
#include <errno.h>
#include <linux/userfaultfd.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>

#include "dsm.h"

#define DSM_EAGAIN_RETRIES 200

static void dsm_pause_us(long us)
{
    struct timespec ts = {.tv_sec = 0, .tv_nsec = us * 1000};
    nanosleep(&ts, NULL);
}

static uint64_t page_addr(struct dsm_handler *h, uint64_t page)
{
    return h->base + page * h->page_size;
}

/* 0 ok, -errno. */
int dsm_wake(struct dsm_handler *h, uint64_t page, uint64_t npages)
{
    struct uffdio_range r = {.start = page_addr(h, page), .len = npages * h->page_size};
    if (ioctl(h->uffd, UFFDIO_WAKE, &r) < 0) {
        dsm_count(&h->st.errors, 1);
        return -errno;
    }
    return 0;
}

/* Set (enable=1) or clear write protection; clearing also wakes. 0 ok, -errno. */
int dsm_protect(struct dsm_handler *h, uint64_t page, uint64_t npages, int enable)
{
    struct uffdio_writeprotect wp = {
        .range = {.start = page_addr(h, page), .len = npages * h->page_size},
        .mode = enable ? UFFDIO_WRITEPROTECT_MODE_WP : 0,
    };
    for (int i = 0; i < DSM_EAGAIN_RETRIES; i++) {
        if (ioctl(h->uffd, UFFDIO_WRITEPROTECT, &wp) == 0)
            return 0;
        if (errno != EAGAIN)
            break;
        dsm_count(&h->st.eagain, 1);
        dsm_pause_us(50);
    }
    int err = errno;
    dsm_count(&h->st.errors, 1);
    dsm_log("omega-dsm: UFFDIO_WRITEPROTECT page %llu+%llu: %s", (unsigned long long)page,
            (unsigned long long)npages, strerror(err));
    return -err;
}

/* Install a zero page without waking its waiter: the caller updates the
 * page's state first and then calls dsm_wake, so a resumed guest thread
 * never sees a state older than the page it is touching. 0 ok (also when it
 * was already there), -errno. */
int dsm_zero_page(struct dsm_handler *h, uint64_t page)
{
    struct uffdio_zeropage z = {.range = {.start = page_addr(h, page), .len = h->page_size},
                                .mode = UFFDIO_ZEROPAGE_MODE_DONTWAKE};
    for (int i = 0; i < DSM_EAGAIN_RETRIES; i++) {
        if (ioctl(h->uffd, UFFDIO_ZEROPAGE, &z) == 0 || errno == EEXIST)
            return 0;
        if (errno != EAGAIN)
            break;
        dsm_count(&h->st.eagain, 1);
        dsm_pause_us(50);
    }
    int err = errno;
    dsm_count(&h->st.errors, 1);
    dsm_log("omega-dsm: UFFDIO_ZEROPAGE page %llu: %s", (unsigned long long)page, strerror(err));
    return -err;
}

/* Mark pages [first, first+n) placed: LOCAL, referenced, latency recorded. */
static void installed(struct dsm_handler *h, uint64_t first, uint64_t n)
{
    uint64_t now = dsm_now_ns();
    for (uint64_t p = first; p < first + n; p++) {
        uint64_t t = __atomic_exchange_n(&h->t_fault[p], 0, __ATOMIC_ACQ_REL);
        if (t)
            dsm_record_latency(h->st.lat_remote, now - t);
        /* Prefetched pages too: they are about to be used, and an untouched
         * one still loses its bit on the next sweep. */
        h->ref[p] = 1;
        dsm_set(h, p, DSM_LOCAL);
    }
    /* resident was counted when the caller reserved room (dsm_reserve) */
    __atomic_sub_fetch(&h->st.remote, n, __ATOMIC_RELAXED);
    dsm_count(&h->st.installed_pages, n);
}

/*
 * Copy npages pages from data into the guest at first_page with one
 * UFFDIO_COPY (more only after a partial copy), waking every thread waiting
 * on any page of the run. The pages must be FETCHING (claimed by this
 * caller) and their room reserved (dsm_reserve). Returns 0 ok, -errno
 * (pages not installed stay FETCHING, their reservation held).
 */
int dsm_install(struct dsm_handler *h, uint64_t first_page, const void *data, uint64_t npages)
{
    if (first_page >= h->npages || npages > h->npages - first_page)
        return -EINVAL;
    uint64_t done = 0;
    int tries = 0;
    while (done < npages) {
        struct uffdio_copy c = {
            .dst = page_addr(h, first_page + done),
            .src = (uint64_t)(uintptr_t)data + done * h->page_size,
            .len = (npages - done) * h->page_size,
            /* woken below, once the pages are marked LOCAL */
            .mode = UFFDIO_COPY_MODE_DONTWAKE,
        };
        dsm_count(&h->st.install_calls, 1);
        int r = ioctl(h->uffd, UFFDIO_COPY, &c);
        int err = r < 0 ? errno : 0;
        uint64_t copied = c.copy > 0 ? (uint64_t)c.copy / h->page_size : 0;
        if (copied) {
            installed(h, first_page + done, copied);
            dsm_wake(h, first_page + done, copied);
            done += copied;
        }
        if (r == 0)
            continue;
        if (err == EEXIST) {
            /* The page at done is already present: wake its waiter, skip it. */
            installed(h, first_page + done, 1);
            dsm_wake(h, first_page + done, 1);
            done++;
        } else if (err == EAGAIN) {
            dsm_count(&h->st.eagain, 1);
            if (++tries > DSM_EAGAIN_RETRIES)
                return -EAGAIN;
            dsm_pause_us(50);
        } else {
            dsm_count(&h->st.errors, 1);
            dsm_log("omega-dsm: UFFDIO_COPY page %llu+%llu: %s",
                    (unsigned long long)(first_page + done),
                    (unsigned long long)(npages - done), strerror(err));
            return -err;
        }
    }
    return 0;
}

/* Install a deferred zero fault (queued with DSM_QUEUE_ZERO): the page must
 * be FETCHING. Reserves its own room. 0 ok, -EAGAIN no room, -errno (the
 * page stays FETCHING). */
int dsm_install_zero(struct dsm_handler *h, uint64_t page)
{
    if (page >= h->npages || dsm_state(h, page) != DSM_FETCHING)
        return -EINVAL;
    if (dsm_reserve(h, 1) < 0)
        return -EAGAIN;
    int r = dsm_zero_page(h, page);
    if (r < 0) {
        dsm_unreserve(h, 1);
        return r;
    }
    uint64_t t = __atomic_exchange_n(&h->t_fault[page], 0, __ATOMIC_ACQ_REL);
    if (t)
        dsm_record_latency(h->st.lat_zero, dsm_now_ns() - t);
    h->ref[page] = 1;
    dsm_count(&h->st.faults_zero, 1);
    dsm_set(h, page, DSM_LOCAL);
    dsm_wake(h, page, 1);
    return 0;
}
