/* Passing file descriptors with a payload over a unix socket (SCM_RIGHTS).
 *
 * Return conventions and thread model: see uffd.h (a count >= 0 = ok,
 * -1 = error with errno; no state, any thread).  Meant for blocking sockets:
 * on a non-blocking one EAGAIN is returned as an error.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include "uffd.h"

/* Sends `len` payload bytes (at least one: a stream socket carries
 * descriptors only alongside data) and `nfds` descriptors, which travel with
 * the first byte.  Loops until the whole payload is sent.
 * Returns `len` or -1. */
long omega_send_fds(int sock, const void *data, uint64_t len, const int *fds, int nfds)
{
    union {
        struct cmsghdr align;
        char buf[CMSG_SPACE(sizeof(int) * OMEGA_FDPASS_MAX)];
    } control;
    struct iovec iov = { .iov_base = (void *)data, .iov_len = (size_t)len };
    struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1 };
    uint64_t sent = 0;
    ssize_t n;

    if (len == 0 || nfds < 0 || nfds > OMEGA_FDPASS_MAX) {
        errno = EINVAL;
        return -1;
    }
    if (nfds > 0) {
        struct cmsghdr *cmsg;

        memset(&control, 0, sizeof(control));
        msg.msg_control = control.buf;
        msg.msg_controllen = CMSG_SPACE(sizeof(int) * (size_t)nfds);
        cmsg = CMSG_FIRSTHDR(&msg);
        cmsg->cmsg_level = SOL_SOCKET;
        cmsg->cmsg_type = SCM_RIGHTS;
        cmsg->cmsg_len = CMSG_LEN(sizeof(int) * (size_t)nfds);
        memcpy(CMSG_DATA(cmsg), fds, sizeof(int) * (size_t)nfds);
    }
    while (sent < len) {
        iov.iov_base = (char *)data + sent;
        iov.iov_len = (size_t)(len - sent);
        n = sendmsg(sock, &msg, MSG_NOSIGNAL);
        if (n == -1) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        sent += (uint64_t)n;
        /* The descriptors went with the first chunk. */
        msg.msg_control = NULL;
        msg.msg_controllen = 0;
    }
    return (long)sent;
}

static void close_all(const int *fds, int n)
{
    int i;

    for (i = 0; i < n; i++)
        close(fds[i]);
}

/* Receives up to `len` payload bytes and up to `max_fds` descriptors (opened
 * O_CLOEXEC here).  *nfds_out = descriptors received.  Returns the payload
 * bytes (0: the peer closed the connection) or -1.  When the sender sent
 * more descriptors than fit, the ones received are closed again and errno
 * is EMSGSIZE, so a short buffer never leaks descriptors. */
long omega_recv_fds(int sock, void *buf, uint64_t len, int *fds, int max_fds,
                    int *nfds_out)
{
    union {
        struct cmsghdr align;
        char buf[CMSG_SPACE(sizeof(int) * OMEGA_FDPASS_MAX)];
    } control;
    struct iovec iov = { .iov_base = buf, .iov_len = (size_t)len };
    struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1 };
    struct cmsghdr *cmsg;
    ssize_t n;
    int count = 0;

    *nfds_out = 0;
    if (len == 0 || max_fds < 0 || max_fds > OMEGA_FDPASS_MAX) {
        errno = EINVAL;
        return -1;
    }
    msg.msg_control = control.buf;
    msg.msg_controllen = CMSG_SPACE(sizeof(int) * (size_t)(max_fds > 0 ? max_fds : 1));
    do {
        n = recvmsg(sock, &msg, MSG_CMSG_CLOEXEC);
    } while (n == -1 && errno == EINTR);
    if (n == -1)
        return -1;
    for (cmsg = CMSG_FIRSTHDR(&msg); cmsg != NULL; cmsg = CMSG_NXTHDR(&msg, cmsg)) {
        int got, room;

        if (cmsg->cmsg_level != SOL_SOCKET || cmsg->cmsg_type != SCM_RIGHTS)
            continue;
        got = (int)((cmsg->cmsg_len - CMSG_LEN(0)) / sizeof(int));
        room = max_fds - count;
        if (got > room) {
            /* Cannot happen with a matching control buffer, but never leak. */
            close_all((const int *)CMSG_DATA(cmsg) + room, got - room);
            got = room;
            msg.msg_flags |= MSG_CTRUNC;
        }
        memcpy(fds + count, CMSG_DATA(cmsg), sizeof(int) * (size_t)got);
        count += got;
    }
    if (msg.msg_flags & MSG_CTRUNC) {
        close_all(fds, count);
        errno = EMSGSIZE;
        return -1;
    }
    *nfds_out = count;
    return (long)n;
}
