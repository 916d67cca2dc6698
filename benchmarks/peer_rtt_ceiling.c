/*
 * The shortest round trip a remote page fault can make on this box: a
 * 48-byte request and a 4,153-byte answer (a sealed 4 KiB page and its
 * header) between two processes over loopback TCP, each end waiting awake
 * as the DSM fetch path and the peer's data port do (a MSG_PEEK poll and
 * sched_yield() between checks), with nothing else: no store, no opening,
 * no userfaultfd. Once with TLS 1.3 (AES-128-GCM, as the peer links), once
 * over bare TCP (not a mode Omega has: it shows what TLS costs).
 *
 * The DSM target is a remote fault p50 within 2x of the floor (the same
 * handler serving from its own memory); the floor p50 is 15-25 us here, so
 * this round trip alone decides whether that can hold.
 *
 * Build and run (from the repository root):
 *   cc -O2 benchmarks/peer_rtt_ceiling.c -lssl -lcrypto -o /tmp/peer_rtt_ceiling
 *   /tmp/peer_rtt_ceiling [ROUND_TRIPS]
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/evp.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "bench_tls.h"

#define REQUEST 48
#define ANSWER (4096 + 29 + 28)

static int plain; /* bare TCP instead of TLS */

static uint64_t now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

static void die(const char *what)
{
    fprintf(stderr, "peer_rtt_ceiling: %s\n", what);
    exit(1);
}

/* Wait awake for bytes on fd (or TLS bytes already decrypted). */
static void await_bytes(SSL *s, int fd)
{
    for (;;) {
        char b;
        if (!plain && SSL_has_pending(s))
            return;
        if (recv(fd, &b, 1, MSG_PEEK | MSG_DONTWAIT) >= 0 || errno != EAGAIN)
            return;
        sched_yield();
    }
}

static int read_full(SSL *s, int fd, char *p, int n)
{
    for (int got = 0; got < n;) {
        int r = plain ? (int)read(fd, p + got, (size_t)(n - got)) : SSL_read(s, p + got, n - got);
        if (r <= 0)
            return -1;
        got += r;
    }
    return 0;
}

static void write_full(SSL *s, int fd, const char *p, int n)
{
    if ((plain ? (int)write(fd, p, (size_t)n) : SSL_write(s, p, n)) != n)
        die("write");
}

static SSL_CTX *ctx_for(int server)
{
    SSL_CTX *c = bench_tls_ctx(server);
    if (!c)
        die("TLS context");
    return c;
}

static int by_value(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static void measure(int n)
{
    int one = 1, lfd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t al = sizeof a;
    if (bind(lfd, (struct sockaddr *)&a, sizeof a) < 0 || listen(lfd, 1) < 0 ||
        getsockname(lfd, (struct sockaddr *)&a, &al) < 0)
        die("listen");
    pid_t pid = fork();
    if (pid == 0) { /* the peer: answer every request */
        static char ans[ANSWER];
        char req[REQUEST];
        SSL_CTX *c = ctx_for(1);
        int fd = accept(lfd, NULL, NULL);
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        SSL *s = SSL_new(c);
        SSL_set_fd(s, fd);
        if (!plain && SSL_accept(s) != 1)
            die("accept");
        for (;;) {
            await_bytes(s, fd);
            if (read_full(s, fd, req, REQUEST) < 0)
                _exit(0);
            write_full(s, fd, ans, ANSWER);
        }
    }
    close(lfd);
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (connect(fd, (struct sockaddr *)&a, sizeof a) < 0)
        die("connect");
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    SSL *s = SSL_new(ctx_for(0));
    SSL_set_fd(s, fd);
    if (!plain && SSL_connect(s) != 1)
        die("handshake");
    static char ans[ANSWER];
    char req[REQUEST] = {0};
    uint64_t *lat = malloc(sizeof *lat * (size_t)n);
    for (int i = 0; i < n; i++) {
        uint64_t t = now_ns();
        write_full(s, fd, req, REQUEST);
        await_bytes(s, fd);
        if (read_full(s, fd, ans, ANSWER) < 0)
            die("answer");
        lat[i] = now_ns() - t;
    }
    qsort(lat, (size_t)n, sizeof *lat, by_value);
    printf("{\"links\": \"%s\", \"round_trips\": %d, \"p50_us\": %.1f, \"p99_us\": %.1f}\n",
           plain ? "bare TCP" : "TLS 1.3", n, lat[n / 2] / 1e3, lat[(size_t)n * 99 / 100] / 1e3);
    fflush(stdout); /* before the next fork copies the buffer */
    free(lat);
    if (!plain)
        SSL_shutdown(s);
    close(fd);
    waitpid(pid, NULL, 0);
}

int main(int argc, char **argv)
{
    int n = argc > 1 ? atoi(argv[1]) : 20000;
    if (n < 100)
        die("ROUND_TRIPS: at least 100");
    plain = 0;
    measure(n);
    plain = 1;
    measure(n);
    return 0;
}
