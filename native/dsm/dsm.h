/*
 * The DSM fault handler core: serves the userfaultfd of one VM's guest RAM.
 *
 * Thread model: dsm_start() runs `nthreads` reader threads that poll the
 * userfaultfd and resolve what needs no network on their own (never-written
 * pages get UFFDIO_ZEROPAGE, write-protect faults on pages being evicted
 * cancel the eviction). A fault on a page held by peers moves the page to
 * FETCHING and, when the native fetch path is set up (dsm_remote.c), the
 * reader fetches it from a peer itself; otherwise, or when that fails, it
 * queues it: the queue is drained by the (single) Python thread that owns
 * the rest of the network, woken through an eventfd, which later installs
 * the data with dsm_install(). Every other function may be called from any
 * thread; page state changes are atomic compare-and-swaps on a per-page byte,
 * so a reader thread and the Python side never both act on one page.
 *
 * Return convention: 0 (or a count) = ok, negative errno = error.
 */
#ifndef OMEGA_DSM_H
#define OMEGA_DSM_H

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

enum dsm_page_state {
    DSM_ZERO = 0,       /* never written: reads as zero, no copy anywhere */
    DSM_LOCAL = 1,      /* present in the memory file */
    DSM_REMOTE = 2,     /* punched out; the data is on peers */
    DSM_FETCHING = 3,   /* a fetch from peers is in flight */
    DSM_EVICTING = 4,   /* write-protected, being copied out */
    DSM_PUNCHING = 5,   /* copy-out committed; hole being punched */
    DSM_INSTALLING = 6, /* a reader thread is installing a zero page */
};

#define DSM_LAT_BUCKETS 128 /* log-linear latency histogram, see dsm_stats.c */
#define DSM_MAX_THREADS 16
/* Queue entries with this bit are deferred zero faults, not fetches. */
#define DSM_QUEUE_ZERO (1ull << 63)
/* Notes for the Python side's policies (not fetches): a fault the native
 * fetch path served (page number below), a prefetch job that finished
 * (its page count below). */
#define DSM_QUEUE_SEEN (1ull << 62)
#define DSM_QUEUE_LANDED (1ull << 61)
/* A note: the resident set just grew past the reclaim mark. */
#define DSM_QUEUE_RECLAIM (1ull << 60)
/* Holder bits of the native fetch path: bit i = peer i; this bit = the
 * in-process memory source (the benchmark's floor). */
#define DSM_MAX_PEERS 15
#define DSM_HOLDER_MEMORY (1u << 15)

struct dsm_stats {
    uint64_t npages, page_size;
    uint64_t resident;          /* pages LOCAL or EVICTING (our count) */
    uint64_t remote;            /* pages REMOTE or FETCHING */
    uint64_t faults;            /* every pagefault event read */
    uint64_t faults_zero;       /* served with UFFDIO_ZEROPAGE */
    uint64_t faults_remote;     /* queued for a fetch */
    uint64_t faults_inflight;   /* fault on a page already being fetched */
    uint64_t faults_wp;         /* write-protect faults */
    uint64_t faults_spurious;   /* page already there: woken only */
    uint64_t evict_cancelled;   /* a guest write won over an eviction */
    uint64_t installed_pages;   /* pages placed by dsm_install */
    uint64_t install_calls;     /* UFFDIO_COPY ioctls issued */
    uint64_t evicted_pages;     /* pages punched out */
    uint64_t eagain;            /* EAGAIN retries */
    uint64_t errors;            /* failed ioctls (counted, logged to stderr) */
    uint64_t queue_len;         /* fetches waiting for the Python side */
    uint64_t faults_deferred;   /* zero faults held back: resident at the hard limit */
    uint64_t native_fetches;    /* demand faults served by the native fetch path */
    uint64_t native_prefetched; /* prefetched pages installed by its workers */
    uint64_t native_fallbacks;  /* pages it handed to the Python side */
    uint64_t native_peer_errors;      /* connections to peers that failed */
    uint64_t native_bytes_in;         /* answer bytes read from peers */
    uint64_t native_prefetch_dropped; /* fetched, no room: given back to REMOTE */
    uint64_t lat_remote[DSM_LAT_BUCKETS]; /* fault read -> data installed */
    uint64_t lat_zero[DSM_LAT_BUCKETS];   /* fault read -> zero page installed */
};

struct dsm_handler {
    int uffd, memfd, evfd;
    uint64_t base, length, file_offset, page_size, npages;
    int wp;
    uint8_t *state;        /* enum dsm_page_state per page */
    uint8_t *ref;          /* referenced bit for CLOCK, set on fault-in */
    uint64_t *t_fault;     /* ns of the demand fault waiting on a fetch, 0 = none */
    pthread_mutex_t qlock; /* guards the fetch queue ring */
    uint64_t *queue;       /* 2 * npages entries: fetches, then notes */
    uint64_t qhead, qlen;
    uint64_t hard_limit;   /* resident pages above which zero faults are deferred (0: none) */
    uint64_t reclaim_mark; /* growing past this many resident pages leaves a note (0: none) */
    int no_fault_notes;    /* no DSM_QUEUE_SEEN notes: no policy reads them */
    int nthreads;
    pthread_t threads[DSM_MAX_THREADS];
    volatile int stop;
    struct dsm_remote *remote; /* the native fetch path (dsm_remote.c), or NULL */
    struct dsm_stats st;   /* counters updated with __atomic_add_fetch */
};

/* --- cffi declarations begin: _build_dsm.py feeds the text between these
 * markers to ffi.cdef (with the types above declared partially there): the
 * API the Python side calls. */

/* dsm_handler.c */
struct dsm_handler *dsm_open(int uffd, int memfd, uint64_t base, uint64_t length,
                             uint64_t file_offset, int wp, int *err);
int dsm_start(struct dsm_handler *h, int nthreads);
void dsm_close(struct dsm_handler *h);
int dsm_scan_resident(struct dsm_handler *h);
int dsm_mark_remote(struct dsm_handler *h, const uint64_t *pages, size_t n);
int dsm_wake_all(struct dsm_handler *h);
void dsm_get_stats(struct dsm_handler *h, struct dsm_stats *out);
void dsm_set_limit(struct dsm_handler *h, uint64_t hard_limit);
void dsm_set_reclaim_mark(struct dsm_handler *h, uint64_t pages);
void dsm_set_fault_notes(struct dsm_handler *h, int on);
uint64_t dsm_resident(struct dsm_handler *h);
int dsm_reserve(struct dsm_handler *h, uint64_t n);
void dsm_unreserve(struct dsm_handler *h, uint64_t n);

/* dsm_queue.c */
int dsm_take_fetches(struct dsm_handler *h, uint64_t *pages, size_t max);
int dsm_claim(struct dsm_handler *h, const uint64_t *pages, size_t n, uint8_t *ok);

/* dsm_install.c */
int dsm_install(struct dsm_handler *h, uint64_t first_page, const void *data, uint64_t npages);
int dsm_install_zero(struct dsm_handler *h, uint64_t page);

/* dsm_remote.c */
int dsm_remote_setup(struct dsm_handler *h, const uint8_t *key, size_t key_len,
                     const uint8_t *aad, size_t aad_len, const uint8_t *ns, size_t ns_len,
                     const char *ca, const char *cert, const char *keyfile, int nworkers);
int dsm_remote_setup_memory(struct dsm_handler *h, int nworkers);
int dsm_remote_peer(struct dsm_handler *h, int i, const char *name, const char *host, int port);
int dsm_remote_locate(struct dsm_handler *h, const uint64_t *pages, size_t n,
                      const uint64_t *versions, const uint16_t *holders);
int dsm_remote_memory_put(struct dsm_handler *h, const uint64_t *pages, size_t n,
                          const void *data);
int dsm_remote_submit(struct dsm_handler *h, const uint64_t *pages, size_t n);
uint64_t dsm_remote_inflight(struct dsm_handler *h);
int dsm_remote_set_spin(struct dsm_handler *h, uint64_t ns);
int dsm_remote_store(struct dsm_handler *h, const uint64_t *pages, const uint64_t *versions,
                     size_t n, const void *data, const uint16_t *targets, uint16_t *ok,
                     uint16_t *full);
/* "ipsec-mb" or "openssl": the AES-GCM code a core set up now seals with. */
const char *dsm_seal_engine(void);

/* dsm_evict.c */
int dsm_evict_begin(struct dsm_handler *h, const uint64_t *pages, size_t n,
                    uint8_t *ok, void *out);
int dsm_evict_commit(struct dsm_handler *h, const uint64_t *pages, size_t n, uint8_t *ok);
int dsm_evict_abort(struct dsm_handler *h, const uint64_t *pages, size_t n, const uint8_t *ok);

/* --- cffi declarations end */

/* Internal to the handler core. */

/* dsm_queue.c */
int dsm_queue_push(struct dsm_handler *h, uint64_t page);
void dsm_queue_note(struct dsm_handler *h, uint64_t entry);

/* dsm_remote.c */
struct dsm_fetcher;
struct dsm_fetcher *dsm_fetcher_new(struct dsm_handler *h);
void dsm_fetcher_free(struct dsm_fetcher *f);
int dsm_remote_fetch(struct dsm_handler *h, struct dsm_fetcher *f, uint64_t page);
void dsm_remote_close(struct dsm_handler *h);

/* dsm_install.c */
int dsm_zero_page(struct dsm_handler *h, uint64_t page);
int dsm_wake(struct dsm_handler *h, uint64_t page, uint64_t npages);
int dsm_protect(struct dsm_handler *h, uint64_t page, uint64_t npages, int enable);

/* dsm_fault.c */
void *dsm_reader_main(void *arg);

/* dsm_stats.c */
uint64_t dsm_now_ns(void);
void dsm_record_latency(uint64_t *hist, uint64_t ns);
void dsm_count(uint64_t *counter, uint64_t n);
void dsm_log(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

static inline int dsm_cas(struct dsm_handler *h, uint64_t page, uint8_t from, uint8_t to)
{
    return __atomic_compare_exchange_n(&h->state[page], &from, to, 0,
                                       __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
}

static inline uint8_t dsm_state(struct dsm_handler *h, uint64_t page)
{
    return __atomic_load_n(&h->state[page], __ATOMIC_ACQUIRE);
}

static inline void dsm_set(struct dsm_handler *h, uint64_t page, uint8_t s)
{
    __atomic_store_n(&h->state[page], s, __ATOMIC_RELEASE);
}

#endif
