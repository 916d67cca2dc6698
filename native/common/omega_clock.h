/* The monotonic clock in nanoseconds, one reading for every native module
 * (pc_now_ns, dsm_now_ns and nbd_now_ns are this; the spins time their
 * yields with it). */
#ifndef OMEGA_CLOCK_H
#define OMEGA_CLOCK_H

#include <stdint.h>
#include <time.h>

/* CLOCK_MONOTONIC cannot fail with a valid pointer; 0 if it ever did. */
static inline uint64_t omega_now_ns(void)
{
    struct timespec ts = {0, 0};
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

#endif
