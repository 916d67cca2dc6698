/*
 * The connection from the agent to the VM's DSM handler.
 *
 * agent_link_send() connects (retrying while the handler starts), sends the
 * hello with [uffd, memfd] by SCM_RIGHTS and waits for the handler's ACK.
 * agent_link_start_watch() starts one thread that blocks reading the
 * connection; when the handler goes away (EOF or error) it reconnects and
 * re-sends the same uffd, so a restarted handler picks up where the old one
 * stopped. Faults raised meanwhile simply wait in the kernel. If no handler
 * answers within the bound, QEMU exits: a guest must never run with evicted
 * pages reading as zeros.
 */
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "agent.h"
#include "agent_proto.h"

static int link_fd = -1; /* owned by the watch thread once it runs */

static long long now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Returns a connected socket, or -1 with errno set. */
static int link_connect(const char *path)
{
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    if (strlen(path) >= sizeof sa.sun_path) {
        errno = ENAMETOOLONG;
        return -1;
    }
    strcpy(sa.sun_path, path);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    if (connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0) {
        int saved = errno;
        close(fd);
        errno = saved;
        return -1;
    }
    return fd;
}

/* 0 ok, -1 error with errno set. */
static int link_send_hello(int fd, const struct agent_region *region, int resend)
{
    struct omega_dsm_hello hello = {
        .version = OMEGA_DSM_PROTO_VERSION,
        .flags = region->flags | (resend ? OMEGA_DSM_FLAG_RESEND : 0),
        .addr = (uint64_t)(uintptr_t)region->addr,
        .length = region->length,
        .offset = region->offset,
        .page_size = (uint64_t)sysconf(_SC_PAGESIZE),
        .pid = (int32_t)getpid(),
    };
    memcpy(hello.magic, OMEGA_DSM_MAGIC, sizeof hello.magic);
    int fds[2] = {region->uffd, region->memfd};
    char control[CMSG_SPACE(sizeof fds)];
    memset(control, 0, sizeof control);
    struct iovec iov = {.iov_base = &hello, .iov_len = sizeof hello};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1,
                         .msg_control = control, .msg_controllen = sizeof control};
    struct cmsghdr *cmsg = CMSG_FIRSTHDR(&msg);
    cmsg->cmsg_level = SOL_SOCKET;
    cmsg->cmsg_type = SCM_RIGHTS;
    cmsg->cmsg_len = CMSG_LEN(sizeof fds);
    memcpy(CMSG_DATA(cmsg), fds, sizeof fds);
    ssize_t n;
    do
        n = sendmsg(fd, &msg, MSG_NOSIGNAL);
    while (n < 0 && errno == EINTR);
    if (n < 0)
        return -1;
    if ((size_t)n != sizeof hello) {
        errno = EPROTO;
        return -1;
    }
    return 0;
}

/* Wait for the 8-byte answer. 0 = ACK, -1 = error/timeout/NAK (reason in buf). */
static int link_wait_ack(int fd, long long deadline, char *reason, size_t reason_len)
{
    char buf[160];
    size_t got = 0;
    reason[0] = '\0';
    while (got < 8) {
        long long left = deadline - now_ms();
        if (left <= 0) {
            snprintf(reason, reason_len, "no answer");
            return -1;
        }
        struct pollfd p = {.fd = fd, .events = POLLIN};
        int r = poll(&p, 1, (int)left);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0) {
            snprintf(reason, reason_len, "poll: %s", strerror(errno));
            return -1;
        }
        if (r == 0)
            continue;
        ssize_t n = recv(fd, buf + got, sizeof buf - 1 - got, 0);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0) {
            snprintf(reason, reason_len, "handler closed the connection");
            return -1;
        }
        got += (size_t)n;
    }
    if (memcmp(buf, OMEGA_DSM_ACK, 8) == 0)
        return 0;
    buf[got] = '\0';
    snprintf(reason, reason_len, "handler refused: %s",
             memcmp(buf, OMEGA_DSM_NAK, 8) == 0 ? buf + 8 : "bad answer");
    return -1;
}

/* 0 ok (link_fd set), -1 when no handler acknowledged within timeout_ms. */
int agent_link_send(const struct agent_settings *settings,
                    const struct agent_region *region, int timeout_ms, int resend)
{
    long long deadline = now_ms() + timeout_ms;
    char reason[200] = "not tried";
    for (;;) {
        int fd = link_connect(settings->socket_path);
        if (fd >= 0) {
            if (link_send_hello(fd, region, resend) == 0 &&
                link_wait_ack(fd, deadline, reason, sizeof reason) == 0) {
                link_fd = fd;
                return 0;
            }
            if (reason[0] == '\0')
                snprintf(reason, sizeof reason, "send: %s", strerror(errno));
            close(fd);
        } else {
            snprintf(reason, sizeof reason, "connect: %s", strerror(errno));
        }
        if (now_ms() >= deadline) {
            agent_log("no DSM handler answered on %s within %d ms (%s)",
                      settings->socket_path, timeout_ms, reason);
            return -1;
        }
        struct timespec pause = {.tv_sec = 0, .tv_nsec = 50 * 1000 * 1000};
        nanosleep(&pause, NULL);
    }
}

struct watch_args {
    struct agent_settings settings;
    struct agent_region region;
};

/* The watch thread: block until the handler connection ends, then re-send. */
static void *link_watch(void *arg)
{
    struct watch_args *w = arg;
    for (;;) {
        char buf[64];
        ssize_t n = recv(link_fd, buf, sizeof buf, 0);
        if (n > 0)
            continue; /* the handler has nothing to say after the ACK; ignore */
        if (n < 0 && errno == EINTR)
            continue;
        close(link_fd);
        link_fd = -1;
        agent_log("DSM handler on %s went away; re-sending the userfaultfd",
                  w->settings.socket_path);
        if (agent_link_send(&w->settings, &w->region, w->settings.reconnect_timeout_ms, 1) < 0)
            agent_fatal("DSM handler did not come back; stopping QEMU so the guest "
                        "never runs unbacked");
        agent_log("DSM handler on %s is back", w->settings.socket_path);
    }
    return NULL;
}

/* 0 ok, -1 error (message printed). */
int agent_link_start_watch(const struct agent_settings *settings,
                           const struct agent_region *region)
{
    static struct watch_args args; /* lives as long as QEMU */
    args.settings = *settings;
    args.region = *region;
    pthread_attr_t attr;
    pthread_t tid;
    sigset_t all, old;
    /* The thread takes no signals: QEMU's handlers expect its own threads. */
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    int err = pthread_attr_init(&attr);
    if (!err)
        err = pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    if (!err)
        err = pthread_create(&tid, &attr, link_watch, &args);
    pthread_attr_destroy(&attr);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (err) {
        agent_log("pthread_create: %s", strerror(err));
        return -1;
    }
    pthread_setname_np(tid, "omega-agent");
    return 0;
}
