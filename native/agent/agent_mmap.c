/*
 * mmap interposition: the entry point of libomega_agent.
 *
 * QEMU 7.2 maps guest RAM of `-object memory-backend-memfd,share=on` with
 * mmap64(MAP_SHARED|MAP_FIXED, memfd). We let every call through to the
 * kernel (by syscall, so no dlsym and no recursion through malloc), then, for
 * the first shared mapping of a memfd at least OMEGA_DSM_MIN_BYTES long,
 * register a userfaultfd over it and hand it to the DSM handler before
 * returning to QEMU. A failure there ends QEMU with a message on stderr.
 *
 * Environment: OMEGA_DSM_SOCKET (unset: the agent does nothing),
 * OMEGA_DSM_MIN_BYTES (default 64 MiB), OMEGA_DSM_CONNECT_TIMEOUT_MS
 * (default 10000), OMEGA_DSM_RECONNECT_TIMEOUT_MS (default 120000).
 */
/* Define mmap and mmap64 as two symbols: meson's -D_FILE_OFFSET_BITS=64
 * would make the header rename one onto the other. */
#undef _FILE_OFFSET_BITS
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "agent.h"

static struct agent_settings settings;
static int agent_enabled;
static int region_taken;
static pthread_mutex_t region_lock = PTHREAD_MUTEX_INITIALIZER;

static long long env_number(const char *name, long long fallback)
{
    const char *v = getenv(name);
    if (!v || !*v)
        return fallback;
    char *end;
    errno = 0;
    long long n = strtoll(v, &end, 10);
    if (errno || *end || n <= 0)
        agent_fatal("%s=%s is not a positive integer", name, v);
    return n;
}

__attribute__((constructor)) static void agent_init(void)
{
    settings.socket_path = getenv("OMEGA_DSM_SOCKET");
    if (!settings.socket_path || !*settings.socket_path)
        return;
    settings.min_bytes = (uint64_t)env_number("OMEGA_DSM_MIN_BYTES", 64LL << 20);
    settings.connect_timeout_ms = (int)env_number("OMEGA_DSM_CONNECT_TIMEOUT_MS", 10000);
    settings.reconnect_timeout_ms = (int)env_number("OMEGA_DSM_RECONNECT_TIMEOUT_MS", 120000);
    agent_enabled = 1;
}

/* 1 when fd is a memfd (its /proc link reads "/memfd:<name> ..."), else 0. */
static int fd_is_memfd(int fd)
{
    char link[64], target[256];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, target, sizeof target - 1);
    if (n < 0)
        return 0;
    target[n] = '\0';
    return strncmp(target, "/memfd:", 7) == 0;
}

static void agent_take_region(void *addr, size_t length, int fd, off_t offset)
{
    struct agent_region region = {.addr = addr, .length = length,
                                  .offset = (uint64_t)offset, .memfd = fd, .uffd = -1};
    pthread_mutex_lock(&region_lock);
    if (region_taken) {
        pthread_mutex_unlock(&region_lock);
        agent_fatal("a second guest-RAM memfd mapping (%zu bytes) appeared; the DSM "
                    "agent serves one region per VM", length);
    }
    region_taken = 1;
    pthread_mutex_unlock(&region_lock);
    if (agent_uffd_register(&region) < 0)
        agent_fatal("cannot register guest RAM with userfaultfd; refusing to start "
                    "the guest without its DSM handler (socket %s)", settings.socket_path);
    if (agent_link_send(&settings, &region, settings.connect_timeout_ms, 0) < 0)
        agent_fatal("no DSM handler on %s; refusing to start the guest unbacked",
                    settings.socket_path);
    if (agent_link_start_watch(&settings, &region) < 0)
        agent_fatal("cannot start the handler watch thread");
    agent_log("guest RAM %p+%zu (memfd offset %lld) handed to the DSM handler on %s%s",
              addr, length, (long long)offset, settings.socket_path,
              (region.flags & 1u) ? " (write-protect eviction)" : "");
}

static void *agent_mmap(void *addr, size_t length, int prot, int flags, int fd, off_t offset)
{
    long r = syscall(SYS_mmap, addr, length, prot, flags, fd, offset);
    if (r == -1)
        return MAP_FAILED;
    void *mapped = (void *)r;
    if (agent_enabled && fd >= 0 && (flags & MAP_SHARED) && (prot & PROT_WRITE) &&
        length >= settings.min_bytes && fd_is_memfd(fd))
        agent_take_region(mapped, length, fd, offset);
    return mapped;
}

/* glibc exports mmap and mmap64 as one function on 64-bit; QEMU imports mmap64. */
__attribute__((visibility("default")))
void *mmap64(void *addr, size_t length, int prot, int flags, int fd, off_t offset)
{
    return agent_mmap(addr, length, prot, flags, fd, offset);
}

__attribute__((visibility("default")))
void *mmap(void *addr, size_t length, int prot, int flags, int fd, off_t offset)
{
    return agent_mmap(addr, length, prot, flags, fd, offset);
}
