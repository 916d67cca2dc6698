/*
 * Reader threads: poll the userfaultfd, read fault events, resolve them.
 *
 * Several threads read the same descriptor; the kernel hands each event to
 * one of them. A missing fault on a never-written page is served here with
 * UFFDIO_ZEROPAGE; one on a page held by peers is queued for the Python side
 * (dsm_queue.c). A write-protect fault cancels an eviction in progress.
 */
#include <errno.h>
#include <linux/userfaultfd.h>
#include <sched.h>
#include <string.h>
#include <sys/epoll.h>
#include <unistd.h>

#include "dsm.h"

#define DSM_READ_BATCH 32

static void fault_missing(struct dsm_handler *h, struct dsm_fetcher *f, uint64_t page,
                          uint64_t t0)
{
    for (;;) {
        uint8_t s = dsm_state(h, page);
        switch (s) {
        case DSM_ZERO: {
            if (dsm_reserve(h, 1) < 0) {
                /* No room: the Python side installs it after reclaim. */
                if (!dsm_cas(h, page, DSM_ZERO, DSM_FETCHING))
                    continue;
                __atomic_store_n(&h->t_fault[page], t0, __ATOMIC_RELEASE);
                dsm_count(&h->st.faults_deferred, 1);
                dsm_queue_push(h, page | DSM_QUEUE_ZERO);
                return;
            }
            if (!dsm_cas(h, page, DSM_ZERO, DSM_INSTALLING)) {
                dsm_unreserve(h, 1);
                continue;
            }
            if (dsm_zero_page(h, page) == 0) {
                h->ref[page] = 1;
                dsm_count(&h->st.faults_zero, 1);
                dsm_record_latency(h->st.lat_zero, dsm_now_ns() - t0);
                /* everything the waiter may look at is settled before it runs */
                dsm_set(h, page, DSM_LOCAL);
                dsm_wake(h, page, 1);
            } else {
                dsm_unreserve(h, 1);
                dsm_set(h, page, DSM_ZERO); /* the waiter faults again and we retry */
                dsm_wake(h, page, 1);
            }
            return;
        }
        case DSM_LOCAL:
        case DSM_EVICTING:
            /* Present as far as we know. A missing fault here is either stale
             * (already served) or QEMU itself discarded the page (balloon,
             * reset), which reads as zeros: ZEROPAGE answers EEXIST (and
             * wakes) in the first case and fills the hole in the second. */
            dsm_count(&h->st.faults_spurious, 1);
            dsm_zero_page(h, page);
            dsm_wake(h, page, 1);
            return;
        case DSM_REMOTE:
            if (!dsm_cas(h, page, DSM_REMOTE, DSM_FETCHING))
                continue;
            __atomic_store_n(&h->t_fault[page], t0, __ATOMIC_RELEASE);
            dsm_count(&h->st.faults_remote, 1);
            if (f) {
                if (dsm_remote_fetch(h, f, page) == 0) {
                    if (!__atomic_load_n(&h->no_fault_notes, __ATOMIC_RELAXED))
                        dsm_queue_note(h, page | DSM_QUEUE_SEEN);
                    return;
                }
                dsm_count(&h->st.native_fallbacks, 1);
            }
            dsm_queue_push(h, page);
            return;
        case DSM_FETCHING: {
            /* A prefetch is in flight: its install wakes us. Start the clock
             * only if no earlier demand fault did. */
            uint64_t zero = 0;
            __atomic_compare_exchange_n(&h->t_fault[page], &zero, t0, 0,
                                        __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
            dsm_count(&h->st.faults_inflight, 1);
            /* The install may have finished between the state load and now. */
            if (dsm_state(h, page) == DSM_LOCAL)
                dsm_wake(h, page, 1);
            /* Tell the policies where the reader is: a stream that catches up
             * with its prefetch window faults only on in-flight pages, and
             * the window must keep moving ahead of it. */
            if (!__atomic_load_n(&h->no_fault_notes, __ATOMIC_RELAXED))
                dsm_queue_note(h, page | DSM_QUEUE_SEEN);
            return;
        }
        default: /* INSTALLING, PUNCHING: another thread is mid-step */
            sched_yield();
            continue;
        }
    }
}

static void fault_wp(struct dsm_handler *h, uint64_t page)
{
    dsm_count(&h->st.faults_wp, 1);
    for (;;) {
        uint8_t s = dsm_state(h, page);
        if (s == DSM_EVICTING) {
            if (!dsm_cas(h, page, DSM_EVICTING, DSM_LOCAL))
                continue;
            dsm_protect(h, page, 1, 0); /* lets the write through and wakes it */
            return;
        }
        if (s == DSM_PUNCHING || s == DSM_INSTALLING) {
            sched_yield();
            continue;
        }
        if (s == DSM_LOCAL || s == DSM_ZERO)
            dsm_protect(h, page, 1, 0); /* leftover protection: lift it */
        else
            dsm_wake(h, page, 1);       /* punched: retry faults as missing */
        return;
    }
}

/*
 * Thread body; arg is the handler. Returns NULL when h->stop is set.
 *
 * Each reader waits on its own epoll instance holding the uffd with
 * EPOLLEXCLUSIVE, so one fault wakes one idle reader instead of all of them
 * (poll(2) on a shared descriptor wakes every waiter; the losers only find
 * EAGAIN, but their wake-ups take CPU from the thread serving the fault).
 */
void *dsm_reader_main(void *arg)
{
    struct dsm_handler *h = arg;
    struct uffd_msg msgs[DSM_READ_BATCH];
    struct dsm_fetcher *f = dsm_fetcher_new(h); /* NULL: no native fetch path */
    int ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event ev = {.events = EPOLLIN | EPOLLEXCLUSIVE};
    if (ep < 0 || epoll_ctl(ep, EPOLL_CTL_ADD, h->uffd, &ev) < 0) {
        dsm_log("omega-dsm: reader: epoll on the userfaultfd: %s", strerror(errno));
        dsm_count(&h->st.errors, 1);
        if (ep >= 0)
            close(ep);
        dsm_fetcher_free(f);
        return NULL;
    }
    while (!__atomic_load_n(&h->stop, __ATOMIC_ACQUIRE)) {
        struct epoll_event got;
        int r = epoll_wait(ep, &got, 1, 100);
        if (r <= 0)
            continue; /* timeout (check stop) or EINTR */
        if (got.events & (EPOLLERR | EPOLLHUP))
            break;
        ssize_t n = read(h->uffd, msgs, sizeof msgs);
        if (n < 0)
            continue; /* EAGAIN: another reader took the events */
        uint64_t t0 = dsm_now_ns();
        for (size_t i = 0; i < (size_t)n / sizeof msgs[0]; i++) {
            if (msgs[i].event != UFFD_EVENT_PAGEFAULT)
                continue;
            uint64_t addr = msgs[i].arg.pagefault.address;
            dsm_count(&h->st.faults, 1);
            if (addr < h->base || addr >= h->base + h->length) {
                dsm_count(&h->st.errors, 1);
                continue;
            }
            uint64_t page = (addr - h->base) / h->page_size;
            if (msgs[i].arg.pagefault.flags & UFFD_PAGEFAULT_FLAG_WP)
                fault_wp(h, page);
            else
                fault_missing(h, f, page, t0);
        }
    }
    close(ep);
    dsm_fetcher_free(f);
    return NULL;
}
