/*
 * Waiting awake for a socket, only while the CPU has nothing better to do.
 *
 * A thread that sleeps on a socket takes tens of microseconds to be woken
 * on a virtual machine whose idle vCPU halts, as long as a whole answer from
 * a peer; so the peer links wait awake for a while first, checking and
 * calling sched_yield() between checks.  On an idle CPU a yield returns in
 * about a microsecond (0.5-1 µs here).  When other threads are runnable (a
 * busy NBD server, fio, the peers and a guest on two vCPUs) it returns only
 * after one of them has run: the CPU is not idle, so there is no halted vCPU
 * to avoid, and spinning on costs two context switches per check (with two
 * NBD connections at QD64 the spins made 7.6 yields and 3.4 context switches
 * per request).  So a yield that took longer than OMEGA_SPIN_CONTENDED_NS
 * counts as time given to others, and once a spin has given
 * OMEGA_SPIN_GIVEN_MAX_NS the waiter sleeps; the next wait spins again.
 * Holding spinning off for 0.5-5 ms after such a yield was tried and cost
 * QD1 its latency (two spinners sharing a vCPU see each other run for a few
 * microseconds); the budget lets those short runs of a pipeline's other
 * stages pass and still stops a spin beside a busy thread.
 */
#ifndef OMEGA_SPIN_H
#define OMEGA_SPIN_H

#include <sched.h>
#include <stdint.h>

#include "omega_clock.h"

#define OMEGA_SPIN_CONTENDED_NS 2000ull    /* a yield this long ran another thread */
#define OMEGA_SPIN_GIVEN_MAX_NS 20000ull   /* the others' run time that ends a spin */

/* Yield between two checks of a spin that ends at `until`; *given (0 at
 * the spin's start) sums the time the yields ran other threads. 1 = check
 * again, 0 = stop spinning (the deadline passed, or the others ran long). */
static inline int omega_spin_yield(uint64_t until, uint64_t *given)
{
    uint64_t before = omega_now_ns();
    sched_yield();
    uint64_t after = omega_now_ns();
    if (after - before > OMEGA_SPIN_CONTENDED_NS)
        *given += after - before;
    return *given <= OMEGA_SPIN_GIVEN_MAX_NS && after < until;
}

/*
 * The adaptive part of a connection's wait for its next request (the NBD
 * server's and the data port's): a spin that ran to its deadline means the
 * client pauses longer than the spin between bursts, so the following waits
 * sleep at once (*off = 1) and cost no spinning; once a request comes within
 * spin_ns of the moment the connection went to wait, requests come fast
 * again and the next wait spins (*off = 0).  A spin ended by a busy CPU
 * changes nothing.
 */
static inline void omega_spin_ran_out(uint64_t until, int *off)
{
    if (omega_now_ns() >= until)
        *off = 1;
}

static inline void omega_spin_request_came(uint64_t since, uint64_t spin_ns, int *off)
{
    if (*off && omega_now_ns() - since < spin_ns)
        *off = 0;
}

#endif
