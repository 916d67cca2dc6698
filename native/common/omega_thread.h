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

#endif
