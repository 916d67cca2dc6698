/* Counters, the latency histogram and logging for the DSM handler core. */
#include <stdarg.h>
#include <stdio.h>
#include <time.h>
#include <unistd.h>

#include "dsm.h"
#include "omega_clock.h"

uint64_t dsm_now_ns(void)
{
    return omega_now_ns();
}

/* Bucket b covers [lo(b), lo(b+1)): four linear steps per power of two of the
 * nanosecond count, so a percentile read back is within 19% of the truth.
 * Bucket 4*e + m (e >= 2) starts at (4 + m) << (e - 2). */
void dsm_record_latency(uint64_t *hist, uint64_t ns)
{
    unsigned b;
    if (ns < 4) {
        b = (unsigned)ns;
    } else {
        unsigned e = 63u - (unsigned)__builtin_clzll(ns);
        unsigned m = (unsigned)(ns >> (e - 2)) & 3u;
        b = 4u * e + m;
    }
    if (b >= DSM_LAT_BUCKETS)
        b = DSM_LAT_BUCKETS - 1;
    __atomic_add_fetch(&hist[b], 1, __ATOMIC_RELAXED);
}

void dsm_count(uint64_t *counter, uint64_t n)
{
    __atomic_add_fetch(counter, n, __ATOMIC_RELAXED);
}

void dsm_log(const char *fmt, ...)
{
    char line[400];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(line, sizeof line - 1, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    if ((size_t)n > sizeof line - 2)
        n = sizeof line - 2;
    line[n++] = '\n';
    (void)!write(STDERR_FILENO, line, (size_t)n);
}
