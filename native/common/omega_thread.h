/*
 * Threads C starts inside a Python process (fault readers, prefetch and
 * data-port workers, replicated NBD workers) run with every signal blocked,
 * so the kernel delivers the process's signals (SIGTERM, SIGCHLD, ...) to a
 * thread that handles them (Python's) instead of interrupting a blocking
 * socket call or ioctl here with EINTR.
 */
#ifndef OMEGA_THREAD_H
#define OMEGA_THREAD_H

#include <pthread.h>
#include <sched.h>
#include <signal.h>

/* pthread_create with every signal blocked in the new thread. 0 or an errno. */
static inline int omega_thread_create(pthread_t *thread, void *(*fn)(void *), void *arg)
{
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old); /* the new thread inherits it */
    int e = pthread_create(thread, NULL, fn, arg);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    return e;
}

/*
 * Put the calling thread in SCHED_BATCH: its wake-ups no longer preempt the
 * thread running on that CPU.  For the NBD server's threads, whose client
 * sends a burst of requests as it takes a burst of replies: a server
 * thread woken by the first request of a burst used to preempt the client
 * before it sent the rest, answer that one request alone, and wake again
 * for the next; on two vCPUs shared with the client and the peers that
 * settled into batches of one or two requests and a starved client (two
 * fio connections at QD64: 28-74k IOPS, against 161-177k in SCHED_BATCH,
 * QD1 latency the same; BENCHMARKS.md, netblock session 6).  It changes
 * nothing on an idle CPU, so a lone request is served as fast.
 */
static inline void omega_thread_batch(void)
{
    struct sched_param sp = {0};
    (void)sched_setscheduler(0, SCHED_BATCH, &sp); /* this thread only (Linux) */
}

#endif
