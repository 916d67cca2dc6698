/*
 * Eviction without losing a write.
 *
 * begin:  LOCAL -> EVICTING, write-protect the pages, copy them out (pread).
 * (the caller seals the copies and stores them on peers)
 * commit: EVICTING -> PUNCHING -> hole punched -> REMOTE.
 * A guest write after begin takes a write-protect fault; the reader thread
 * moves the page EVICTING -> LOCAL and lifts the protection, so commit skips
 * it and the (now stale) copy on peers is never used: the directory keeps
 * the page local. Both sides decide with one compare-and-swap, so exactly one
 * of "write goes through" and "page is punched" happens.
 */
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <unistd.h>

#include "dsm.h"

/* Apply fn to each run of consecutive selected pages (ok[i] != 0). */
typedef int (*run_fn)(struct dsm_handler *h, const uint64_t *pages, size_t first,
                      size_t count, uint8_t *ok, void *arg);

static int for_each_run(struct dsm_handler *h, const uint64_t *pages, size_t n,
                        uint8_t *ok, run_fn fn, void *arg)
{
    size_t i = 0;
    int err = 0;
    while (i < n) {
        if (!ok[i]) {
            i++;
            continue;
        }
        size_t j = i + 1;
        while (j < n && ok[j] && pages[j] == pages[j - 1] + 1)
            j++;
        int r = fn(h, pages, i, j - i, ok, arg);
        if (r < 0 && !err)
            err = r;
        i = j;
    }
    return err;
}

static int protect_run(struct dsm_handler *h, const uint64_t *pages, size_t first,
                       size_t count, uint8_t *ok, void *arg)
{
    (void)arg;
    int r = dsm_protect(h, pages[first], count, 1);
    if (r < 0)
        for (size_t k = first; k < first + count; k++) {
            dsm_cas(h, pages[k], DSM_EVICTING, DSM_LOCAL);
            ok[k] = 0;
        }
    return r;
}

static int read_run(struct dsm_handler *h, const uint64_t *pages, size_t first,
                    size_t count, uint8_t *ok, void *arg)
{
    char *out = (char *)arg + first * h->page_size;
    size_t len = count * h->page_size;
    off_t off = (off_t)(h->file_offset + pages[first] * h->page_size);
    size_t got = 0;
    while (got < len) {
        /* pread of shmem never faults the guest mapping and reads holes as zeros */
        ssize_t n = pread(h->memfd, out + got, len - got, off + (off_t)got);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0) {
            int err = n < 0 ? errno : EIO;
            dsm_log("omega-dsm: pread memory file at %lld: %s", (long long)off, strerror(err));
            for (size_t k = first; k < first + count; k++)
                ok[k] = 0;
            dsm_count(&h->st.errors, 1);
            return -err;
        }
        got += (size_t)n;
    }
    return 0;
}

/*
 * Start evicting pages[0..n): ok[i] = 1 when page i is now EVICTING and its
 * content is at out + i * page_size. Pages not LOCAL are skipped (ok = 0).
 * Returns the number started, or -errno when write-protect is unavailable.
 */
int dsm_evict_begin(struct dsm_handler *h, const uint64_t *pages, size_t n,
                    uint8_t *ok, void *out)
{
    if (!h->wp)
        return -EOPNOTSUPP;
    for (size_t i = 0; i < n; i++)
        ok[i] = pages[i] < h->npages && dsm_cas(h, pages[i], DSM_LOCAL, DSM_EVICTING);
    for_each_run(h, pages, n, ok, protect_run, NULL);
    int err = for_each_run(h, pages, n, ok, read_run, out);
    int started = 0;
    for (size_t i = 0; i < n; i++) {
        if (ok[i]) {
            started++;
        } else if (pages[i] < h->npages && dsm_state(h, pages[i]) == DSM_EVICTING) {
            /* read failed after protecting: give the page back */
            if (dsm_cas(h, pages[i], DSM_EVICTING, DSM_LOCAL))
                dsm_protect(h, pages[i], 1, 0);
        }
    }
    (void)err;
    return started;
}

static int punch_run(struct dsm_handler *h, const uint64_t *pages, size_t first,
                     size_t count, uint8_t *ok, void *arg)
{
    (void)arg;
    off_t off = (off_t)(h->file_offset + pages[first] * h->page_size);
    if (fallocate(h->memfd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off,
                  (off_t)(count * h->page_size)) < 0) {
        int err = errno;
        dsm_log("omega-dsm: punch hole at %lld: %s", (long long)off, strerror(err));
        dsm_count(&h->st.errors, 1);
        for (size_t k = first; k < first + count; k++) {
            dsm_set(h, pages[k], DSM_LOCAL); /* still present and protected */
            dsm_protect(h, pages[k], 1, 0);
            ok[k] = 0;
        }
        return -err;
    }
    for (size_t k = first; k < first + count; k++)
        dsm_set(h, pages[k], DSM_REMOTE);
    dsm_count(&h->st.evicted_pages, count);
    __atomic_sub_fetch(&h->st.resident, count, __ATOMIC_RELAXED);
    dsm_count(&h->st.remote, count);
    /* A write fault that raced the punch waits on the old protection: wake it
     * so it faults again as missing and is fetched back. */
    dsm_wake(h, pages[first], count);
    return 0;
}

/*
 * Finish evicting: pages whose copy is safely stored are punched out. On
 * return ok[i] = 1 when page i is now REMOTE, 0 when a guest write cancelled
 * it (or the punch failed) and it stayed LOCAL. Returns the number punched.
 */
int dsm_evict_commit(struct dsm_handler *h, const uint64_t *pages, size_t n, uint8_t *ok)
{
    for (size_t i = 0; i < n; i++)
        if (ok[i]) {
            ok[i] = dsm_cas(h, pages[i], DSM_EVICTING, DSM_PUNCHING);
            if (!ok[i])
                dsm_count(&h->st.evict_cancelled, 1);
        }
    for_each_run(h, pages, n, ok, punch_run, NULL);
    int punched = 0;
    for (size_t i = 0; i < n; i++)
        punched += ok[i];
    return punched;
}

/* Give up evicting (the copy could not be stored): EVICTING -> LOCAL and
 * lift the protection. Returns 0. */
int dsm_evict_abort(struct dsm_handler *h, const uint64_t *pages, size_t n, const uint8_t *ok)
{
    for (size_t i = 0; i < n; i++)
        if (ok[i] && dsm_cas(h, pages[i], DSM_EVICTING, DSM_LOCAL))
            dsm_protect(h, pages[i], 1, 0);
    return 0;
}
