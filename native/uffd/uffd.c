/* userfaultfd(2): create, handshake, register ranges, resolve faults, read events.
 *
 * Return conventions and thread model: see uffd.h (0 or a count = ok,
 * -1 = error with errno from the failing syscall; no state, any thread).
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "uffd.h"

/* Returns a new uffd (always O_CLOEXEC), or -1. */
int omega_uffd_create(int nonblocking, int user_mode_only)
{
    int flags = O_CLOEXEC;

    if (nonblocking)
        flags |= O_NONBLOCK;
    if (user_mode_only)
        flags |= UFFD_USER_MODE_ONLY;
    return (int)syscall(SYS_userfaultfd, flags);
}

/* UFFDIO_API handshake asking for `features`.  On success fills the features
 * the kernel supports and the ioctls valid on the fd.  Returns 0 or -1
 * (EINVAL when a requested feature is unknown to the kernel). */
int omega_uffd_api(int fd, uint64_t features, uint64_t *features_out, uint64_t *ioctls_out)
{
    struct uffdio_api api = { .api = UFFD_API, .features = features };

    if (ioctl(fd, UFFDIO_API, &api) == -1)
        return -1;
    *features_out = api.features;
    *ioctls_out = api.ioctls;
    return 0;
}

/* Every feature this kernel offers, found with a throwaway uffd (a uffd's
 * handshake can be done once, so the real one must not be spent probing).
 * Returns 0 or -1. */
int omega_uffd_supported_features(int user_mode_only, uint64_t *features_out)
{
    uint64_t ioctls;
    int fd = omega_uffd_create(1, user_mode_only);
    int rc, saved;

    if (fd == -1)
        return -1;
    rc = omega_uffd_api(fd, 0, features_out, &ioctls);
    saved = errno;
    close(fd);
    errno = saved;
    return rc;
}

/* Registers [start, start+len) in UFFDIO_REGISTER_MODE_* `mode`; fills the
 * mask of ioctls (1 << _UFFDIO_*) valid on the range.  Returns 0 or -1. */
int omega_uffd_register(int fd, uint64_t start, uint64_t len, uint64_t mode,
                        uint64_t *ioctls_out)
{
    struct uffdio_register reg = { .range = { .start = start, .len = len }, .mode = mode };

    if (ioctl(fd, UFFDIO_REGISTER, &reg) == -1)
        return -1;
    *ioctls_out = reg.ioctls;
    return 0;
}

/* Returns 0 or -1. */
int omega_uffd_unregister(int fd, uint64_t start, uint64_t len)
{
    struct uffdio_range range = { .start = start, .len = len };

    return ioctl(fd, UFFDIO_UNREGISTER, &range);
}

/* UFFDIO_COPY of `len` bytes from our `src` to `dst` in the uffd's mm.
 * *copied_out = bytes installed (0 when none).  Returns 0 when all of `len`
 * was installed; -1 otherwise: errno EAGAIN with *copied_out > 0 means the
 * kernel stopped part way (a page already present, or the mm changing) and
 * the caller decides about the rest. */
int omega_uffd_copy(int fd, uint64_t dst, uint64_t src, uint64_t len, uint64_t mode,
                    int64_t *copied_out)
{
    struct uffdio_copy copy = { .dst = dst, .src = src, .len = len, .mode = mode };
    int rc = ioctl(fd, UFFDIO_COPY, &copy);

    *copied_out = copy.copy > 0 ? copy.copy : 0;
    return rc;
}

/* UFFDIO_ZEROPAGE over [start, start+len); same partial rule as copy. */
int omega_uffd_zeropage(int fd, uint64_t start, uint64_t len, uint64_t mode,
                        int64_t *zeroed_out)
{
    struct uffdio_zeropage zp = { .range = { .start = start, .len = len }, .mode = mode };
    int rc = ioctl(fd, UFFDIO_ZEROPAGE, &zp);

    *zeroed_out = zp.zeropage > 0 ? zp.zeropage : 0;
    return rc;
}

/* Wakes threads waiting on faults in the range.  Returns 0 or -1. */
int omega_uffd_wake(int fd, uint64_t start, uint64_t len)
{
    struct uffdio_range range = { .start = start, .len = len };

    return ioctl(fd, UFFDIO_WAKE, &range);
}

/* Sets (mode has UFFDIO_WRITEPROTECT_MODE_WP) or clears write protection;
 * clearing wakes waiters unless MODE_DONTWAKE.  Returns 0 or -1. */
int omega_uffd_writeprotect(int fd, uint64_t start, uint64_t len, uint64_t mode)
{
    struct uffdio_writeprotect wp = { .range = { .start = start, .len = len }, .mode = mode };

    return ioctl(fd, UFFDIO_WRITEPROTECT, &wp);
}

static void decode_msg(const struct uffd_msg *msg, struct omega_uffd_event *ev)
{
    memset(ev, 0, sizeof(*ev));
    ev->kind = msg->event;
    switch (msg->event) {
    case UFFD_EVENT_PAGEFAULT:
        ev->flags = msg->arg.pagefault.flags;
        ev->address = msg->arg.pagefault.address;
        ev->ptid = msg->arg.pagefault.feat.ptid;
        break;
    case UFFD_EVENT_FORK:
        ev->arg0 = msg->arg.fork.ufd;
        break;
    case UFFD_EVENT_REMAP:
        ev->arg0 = msg->arg.remap.from;
        ev->arg1 = msg->arg.remap.to;
        ev->arg2 = msg->arg.remap.len;
        break;
    case UFFD_EVENT_REMOVE:
    case UFFD_EVENT_UNMAP:
        ev->arg0 = msg->arg.remove.start;
        ev->arg1 = msg->arg.remove.end;
        break;
    default:
        break;
    }
}

/* Reads up to `max` (capped at OMEGA_UFFD_MAX_EVENTS) pending events in one
 * read(2).  Returns the number decoded into `out`: 0 when none is pending on
 * a non-blocking uffd; -1 on error.  On a blocking uffd it waits for the
 * first event only. */
int omega_uffd_read_events(int fd, struct omega_uffd_event *out, int max)
{
    struct uffd_msg msgs[OMEGA_UFFD_MAX_EVENTS];
    ssize_t n;
    int i, count;

    if (max <= 0) {
        errno = EINVAL;
        return -1;
    }
    if (max > OMEGA_UFFD_MAX_EVENTS)
        max = OMEGA_UFFD_MAX_EVENTS;
    do {
        n = read(fd, msgs, (size_t)max * sizeof(msgs[0]));
    } while (n == -1 && errno == EINTR);
    if (n == -1)
        return errno == EAGAIN ? 0 : -1;
    count = (int)(n / (ssize_t)sizeof(msgs[0]));
    for (i = 0; i < count; i++)
        decode_msg(&msgs[i], &out[i]);
    return count;
}
