/*
 * How fast can ANY replicated backend move a sequential read on this box?
 *
 * The shortest pipeline the design allows for one 1 MiB read from a peer,
 * and the local backend's, in one run, with nothing else around them (no
 * NBD framing, no table, no cache, no locks, no second replica to keep):
 *
 *   local  server: sendfile() of the bytes from a memfd into a unix socket
 *          (what `omega netblock serve --memory` does for a long read);
 *          client: read() them.
 *   peer   each of P peer processes: pread() its sealed 4 KiB blocks
 *          (4096 + 29 bytes each) from a file in /dev/shm and SSL_write()
 *          them over loopback TCP (TLS 1.3, AES-128-GCM, as the peer
 *          links); the host: SSL_read() every peer's part (requests to all
 *          peers go out before any answer is read, and the next read's
 *          requests before this one is opened), open each block (the
 *          native sealer: ipsec-mb or OpenSSL), write() the plaintext into a
 *          unix socket; client: read() it.
 *
 * Every process is a real process (peers, host and client share the box's
 * CPUs as the benchmark's do). It prints GiB/s for each and their ratio:
 * an upper bound for what netblock's replicated backend can reach against
 * its local backend here. The client checks the first block of every read.
 *
 * Build and run (from the repository root):
 *   cc -O2 -DOMEGA_HAVE_IPSEC_MB -Inative/peerclient benchmarks/netblock_ceiling.c \
 *      native/peerclient/pc_seal.c native/peerclient/pc_frames.c -lIPSec_MB -lssl -lcrypto \
 *      -o /tmp/netblock_ceiling
 *   /tmp/netblock_ceiling [SECONDS] [PEERS]
 * CEILING_PLAIN=1 sends the sealed blocks over bare TCP instead (what the
 * TLS layer costs); CEILING_FRAMES=1 in pc_frames.c's AES-GCM frames after
 * the TLS handshake, as Omega's C peer connections do.
 * (without libipsec-mb-dev drop -DOMEGA_HAVE_IPSEC_MB and -lIPSec_MB).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/sendfile.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "bench_tls.h"
#include "peerclient.h"

#define BLOCK 4096u
#define SEALED (BLOCK + PC_SEAL_OVERHEAD)
#define READ_BYTES (1u << 20)
#define EXPORT (128u << 20)
#define NBLOCKS (EXPORT / BLOCK)
#define MAX_PEERS 4

static uint8_t key[32], aad[32];

static void die(const char *what)
{
    fprintf(stderr, "netblock_ceiling: %s\n", what);
    ERR_print_errors_fp(stderr);
    exit(1);
}

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static void fill(uint8_t *p, size_t n, uint64_t block)
{
    for (size_t i = 0; i < n; i += 8) {
        uint64_t v = block * 0x9E3779B97F4A7C15ull + i;
        memcpy(p + i, &v, 8);
    }
}

static void read_full(int fd, uint8_t *p, size_t n)
{
    while (n) {
        ssize_t r = read(fd, p, n);
        if (r <= 0)
            die("client read");
        p += r;
        n -= (size_t)r;
    }
}

/* The client: reads `reads` reads of READ_BYTES, checks each one's first block. */
static void client(int fd, long reads)
{
    uint8_t *buf = malloc(READ_BYTES), want[BLOCK];
    for (long k = 0; k < reads; k++) {
        read_full(fd, buf, READ_BYTES);
        uint64_t first = ((uint64_t)k * (READ_BYTES / BLOCK)) % NBLOCKS;
        fill(want, BLOCK, first);
        if (memcmp(buf, want, BLOCK) != 0)
            die("client: wrong data");
    }
    exit(0);
}

/* Time `reads` reads through the client at the other end of sv[1]. */
static double run_client(int sv[2], long reads, pid_t *pid)
{
    *pid = fork();
    if (*pid == 0) {
        close(sv[0]);
        client(sv[1], reads);
    }
    close(sv[1]);
    return now();
}

static double wait_client(pid_t pid, double t0)
{
    int st;
    if (waitpid(pid, &st, 0) < 0 || !WIFEXITED(st) || WEXITSTATUS(st))
        die("client failed");
    return now() - t0;
}

static double local(long reads)
{
    int mfd = memfd_create("export", 0);
    uint8_t *b = malloc(BLOCK);
    for (uint64_t i = 0; i < NBLOCKS; i++) {
        fill(b, BLOCK, i);
        if (pwrite(mfd, b, BLOCK, (off_t)(i * BLOCK)) != BLOCK)
            die("memfd write");
    }
    int sv[2];
    socketpair(AF_UNIX, SOCK_STREAM, 0, sv);
    pid_t pid;
    double t0 = run_client(sv, reads, &pid);
    for (long k = 0; k < reads; k++) {
        off_t off = (off_t)(((uint64_t)k * READ_BYTES) % EXPORT);
        size_t left = READ_BYTES;
        while (left) {
            ssize_t n = sendfile(sv[0], mfd, &off, left);
            if (n <= 0)
                die("sendfile");
            left -= (size_t)n;
        }
    }
    double t = wait_client(pid, t0);
    close(sv[0]);
    close(mfd);
    free(b);
    return t;
}

/* ------------------------------------------------------------------ TLS */

/* CEILING_PLAIN=1: the peer links carry the sealed blocks over bare TCP
 * (not a mode Omega has: it shows what TLS itself costs here).
 * CEILING_FRAMES=1: after the TLS handshake, pc_frames.c's AES-GCM frames
 * (what Omega's C peer connections use). */
static int plain_links, frame_links;

static int link_read(SSL *s, uint8_t *p, size_t n)
{
    if (frame_links)
        return (int)pc_frames_read(SSL_get_app_data(s), SSL_get_fd(s), p, n);
    return plain_links ? (int)read(SSL_get_fd(s), p, n) : SSL_read(s, p, (int)n);
}

/* After the handshake: switch ssl's link to frames when asked. */
static void link_ready(SSL *ssl, int server)
{
    if (!frame_links)
        return;
    struct pc_frames *f = pc_frames_new(ssl, server);
    if (!f)
        die("frames");
    SSL_set_app_data(ssl, f);
}

static void ssl_read_full(SSL *s, uint8_t *p, size_t n)
{
    while (n) {
        int r = link_read(s, p, n > (1u << 30) ? 1 << 30 : n);
        if (r <= 0)
            die("SSL_read");
        p += r;
        n -= (size_t)r;
    }
}

static void ssl_write_full(SSL *s, const uint8_t *p, size_t n)
{
    while (n) {
        if (frame_links) {
            if (pc_frames_write(SSL_get_app_data(s), SSL_get_fd(s), p, n) < 0)
                die("frames write");
            return;
        }
        int w = plain_links ? (int)write(SSL_get_fd(s), p, n) : SSL_write(s, p, (int)n);
        if (w <= 0)
            die("SSL_write");
        p += w;
        n -= (size_t)w;
    }
}

/* Peer `me` of `npeers`: holds every block b with b % npeers == me, sealed, in
 * a /dev/shm file; answers (first block, count) requests until EOF. */
static void peer(int lfd, int me, int npeers)
{
    char path[64];
    snprintf(path, sizeof path, "/dev/shm/omega-ceiling-%d-%d", (int)getpid(), me);
    int fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);
    unlink(path);
    if (fd < 0)
        die("slot file");
    /* The host seals; the peer only stores blobs. Sealing here with the same
     * key stands in for the writes that put them there. */
    struct pc_sealer s;
    if (pc_sealer_init(&s, key, aad, sizeof aad) < 0)
        die("sealer");
    uint8_t plain[BLOCK], blob[SEALED];
    for (uint64_t b = (uint64_t)me, slot = 0; b < NBLOCKS; b += (uint64_t)npeers, slot++) {
        fill(plain, BLOCK, b);
        if (pc_seal(&s, b, 1, plain, BLOCK, blob) < 0 ||
            pwrite(fd, blob, SEALED, (off_t)(slot * SEALED)) != SEALED)
            die("peer fill");
    }
    SSL_CTX *ctx = bench_tls_ctx(1);
    if (!ctx)
        die("server TLS context");
    int c = accept(lfd, NULL, NULL);
    int one = 1;
    setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    SSL *ssl = SSL_new(ctx);
    SSL_set_fd(ssl, c);
    if (!plain_links && SSL_accept(ssl) != 1)
        die("accept");
    link_ready(ssl, 1);
    uint8_t *out = malloc((size_t)(READ_BYTES / BLOCK) * SEALED);
    for (;;) {
        uint8_t req[16];
        int r = link_read(ssl, req, sizeof req);
        if (r <= 0)
            break;
        uint64_t first, count;
        memcpy(&first, req, 8);
        memcpy(&count, req + 8, 8);
        /* the blocks are this peer's consecutive slots */
        off_t at = (off_t)(first / (uint64_t)npeers) * SEALED;
        if (pread(fd, out, count * SEALED, at) != (ssize_t)(count * SEALED))
            die("peer pread");
        ssl_write_full(ssl, out, count * SEALED);
    }
    exit(0);
}

static double replicated(long reads, int npeers)
{
    pid_t peers[MAX_PEERS];
    SSL *ssl[MAX_PEERS];
    SSL_CTX *cctx = bench_tls_ctx(0);
    if (!cctx)
        die("client TLS context");
    for (int i = 0; i < npeers; i++) {
        int lfd = socket(AF_INET, SOCK_STREAM, 0);
        struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
        socklen_t al = sizeof a;
        if (bind(lfd, (struct sockaddr *)&a, sizeof a) < 0 || listen(lfd, 1) < 0 ||
            getsockname(lfd, (struct sockaddr *)&a, &al) < 0)
            die("listen");
        peers[i] = fork();
        if (peers[i] == 0)
            peer(lfd, i, npeers);
        close(lfd);
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        int one = 1;
        if (connect(fd, (struct sockaddr *)&a, sizeof a) < 0)
            die("connect");
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        ssl[i] = SSL_new(cctx);
        SSL_set_fd(ssl[i], fd);
        if (!plain_links && SSL_connect(ssl[i]) != 1)
            die("handshake");
        link_ready(ssl[i], 0);
    }
    struct pc_sealer s;
    if (pc_sealer_init(&s, key, aad, sizeof aad) < 0)
        die("sealer");
    const uint64_t per_read = READ_BYTES / BLOCK;
    uint8_t *in = malloc(per_read * SEALED), *plain = malloc(READ_BYTES);
    int sv[2];
    socketpair(AF_UNIX, SOCK_STREAM, 0, sv);
    /* one warm-up read per peer is not needed: the handshakes are done */
    pid_t pid;
    double t0 = run_client(sv, reads, &pid);
    /* Peer i holds blocks i, i+P, ...: a read of blocks [f, f+256) asks each
     * peer for its 256/P of them, as consecutive slots. */
    for (long k = -1; k < reads; k++) {
        if (k + 1 < reads) { /* ask for the next read before opening this one */
            uint64_t f = ((uint64_t)(k + 1) * per_read) % NBLOCKS;
            for (int i = 0; i < npeers; i++) {
                uint64_t req[2] = {f + (uint64_t)i, per_read / (uint64_t)npeers};
                ssl_write_full(ssl[i], (uint8_t *)req, sizeof req);
            }
        }
        if (k < 0)
            continue;
        uint64_t f = ((uint64_t)k * per_read) % NBLOCKS;
        for (int i = 0; i < npeers; i++)
            ssl_read_full(ssl[i], in + (size_t)i * (per_read / npeers) * SEALED,
                          (per_read / npeers) * SEALED);
        for (int i = 0; i < npeers; i++)
            for (uint64_t j = 0; j < per_read / (uint64_t)npeers; j++) {
                uint64_t b = f + (uint64_t)i + j * (uint64_t)npeers;
                const uint8_t *blob = in + ((size_t)i * (per_read / npeers) + j) * SEALED;
                if (pc_open(&s, b, 1, blob, SEALED, plain + (b - f) * BLOCK, BLOCK) < 0)
                    die("open");
            }
        size_t left = READ_BYTES;
        uint8_t *p = plain;
        while (left) {
            ssize_t n = write(sv[0], p, left);
            if (n <= 0)
                die("write");
            p += n;
            left -= (size_t)n;
        }
    }
    double t = wait_client(pid, t0);
    for (int i = 0; i < npeers; i++) {
        if (!plain_links && !frame_links)
            SSL_shutdown(ssl[i]);
        shutdown(SSL_get_fd(ssl[i]), SHUT_WR); /* later peers hold copies of the fd */
        close(SSL_get_fd(ssl[i]));
        SSL_free(ssl[i]);
        waitpid(peers[i], NULL, 0);
    }
    close(sv[0]);
    free(in);
    free(plain);
    SSL_CTX_free(cctx);
    return t;
}

int main(int argc, char **argv)
{
    double secs = argc > 1 ? atof(argv[1]) : 3;
    int npeers = argc > 2 ? atoi(argv[2]) : 2;
    if (npeers < 1 || npeers > MAX_PEERS || (READ_BYTES / BLOCK) % (unsigned)npeers)
        die("PEERS: 1, 2 or 4");
    signal(SIGPIPE, SIG_IGN);
    plain_links = getenv("CEILING_PLAIN") && atoi(getenv("CEILING_PLAIN"));
    frame_links = !plain_links && getenv("CEILING_FRAMES") && atoi(getenv("CEILING_FRAMES"));
    for (size_t i = 0; i < sizeof key; i++)
        key[i] = (uint8_t)(i * 7 + 1);
    memset(aad, 'a', sizeof aad);
    /* size each run to about `secs` from a short probe */
    double tl = local(64), tr = replicated(64, npeers);
    long nl = (long)(secs / (tl / 64)), nr = (long)(secs / (tr / 64));
    tl = local(nl);
    tr = replicated(nr, npeers);
    double gl = nl * (double)READ_BYTES / tl / (1 << 30);
    double gr = nr * (double)READ_BYTES / tr / (1 << 30);
    printf("{\"seal_engine\": \"%s\", \"peers\": %d, \"local_gib_s\": %.3f, "
           "\"replicated_gib_s\": %.3f, \"ratio\": %.3f, \"links\": \"%s\"}\n",
           pc_seal_engine(), npeers, gl, gr, gr / gl, plain_links ? "bare TCP" : frame_links ? "frames" : "TLS 1.3");
    return 0;
}
