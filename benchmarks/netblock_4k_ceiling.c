/*
 * How close can ANY replicated backend get to the local one on 4 KiB requests
 * on this box?  A bare NBD server that fio's nbd engine drives, in two modes:
 *
 *   local       WRITE copies into a memfd mapping, READ copies out of it.
 *   replicated  the shortest pipeline the design allows: every burst of
 *               requests the connection's one read() brings in becomes one
 *               message to each of two peer processes over loopback TCP in
 *               AES-GCM frames (pc_frames.c, keyed from a TLS 1.3 handshake,
 *               as Omega's C peer links); a WRITE's 4 KiB block is sealed
 *               once (pc_seal.c, AES-256-GCM, as at rest) and sent to both
 *               peers, which copy it into a shared mapping of a /dev/shm
 *               slot file and answer one ack per message; a READ asks one
 *               peer (block index mod 2) for the sealed block and opens it.
 *               All replies of the burst then leave in one send().
 *
 * Left out, each of which Omega's replicated backend pays for: the chunk
 * table and versions, the cache, placement and health, a third peer,
 * checksums on the peers, several connections sharing peer links, threads.
 * So what fio gets from `replicated` against `local` here is an upper bound
 * for the ratio on this box; benchmarks/netblock_4k_ceiling.py runs it
 * against Omega's servers in the same run.
 *
 * Every accepted connection gets its own process (and, replicated, its own
 * links to both peers, which also serve each link in its own process).
 * Requests: READ, WRITE (at most 1 MiB), FLUSH, DISC; simple replies only.
 *
 * Build (from the repository root):
 *   cc -O2 -DOMEGA_HAVE_IPSEC_MB -Inative/peerclient benchmarks/netblock_4k_ceiling.c \
 *      native/peerclient/pc_seal.c native/peerclient/pc_frames.c -lIPSec_MB -lssl -lcrypto \
 *      -o /tmp/netblock_4k_ceiling
 * Run: /tmp/netblock_4k_ceiling local|replicated SOCKET   (until SIGTERM)
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include "bench_tls.h"
#include "peerclient.h"

#define BLOCK 4096u
#define SEALED (BLOCK + PC_SEAL_OVERHEAD)
#define EXPORT (128ull << 20)
#define NBLOCKS (EXPORT / BLOCK)
#define MAX_REQ (1u << 20)
#define IN_CAP ((8u << 20) + MAX_REQ + 28)
#define MAX_BATCH_BLOCKS 4096u      /* blocks one burst may read or write */
#define MAX_BATCH_REQS (IN_CAP / 28)

static uint8_t key[32], aad[32];
static int replicated;
static struct sockaddr_in peer_addr[2];

static void die(const char *what)
{
    fprintf(stderr, "netblock_4k_ceiling: %s (%s)\n", what, strerror(errno));
    exit(1);
}

static void fill(uint8_t *p, uint64_t block)
{
    for (size_t i = 0; i < BLOCK; i += 8) {
        uint64_t v = block * 0x9E3779B97F4A7C15ull + i;
        memcpy(p + i, &v, 8);
    }
}

static void write_full(int fd, const void *p, size_t n)
{
    const uint8_t *b = p;
    while (n) {
        ssize_t w = write(fd, b, n);
        if (w <= 0)
            die("write");
        b += w;
        n -= (size_t)w;
    }
}

static int read_full(int fd, void *p, size_t n)
{
    uint8_t *b = p;
    while (n) {
        ssize_t r = read(fd, b, n);
        if (r <= 0)
            return -1;
        b += r;
        n -= (size_t)r;
    }
    return 0;
}

static void frames_read_full(struct pc_frames *f, int fd, void *p, size_t n)
{
    uint8_t *b = p;
    while (n) {
        long r = pc_frames_read(f, fd, b, n);
        if (r <= 0)
            die("frames read");
        b += r;
        n -= (size_t)r;
    }
}

/* ------------------------------------------------------------------ peers */

/* One peer link: put (index, sealed block) pairs into the slots, answer one
 * ack and the sealed blocks asked for. Message: u32 puts, u32 gets, puts x
 * (u64 index, SEALED bytes), gets x u64 index. Answer: u32 puts, gets x SEALED. */
static void peer_link(int c, SSL_CTX *ctx, uint8_t *slots)
{
    SSL *ssl = SSL_new(ctx);
    SSL_set_fd(ssl, c);
    if (SSL_accept(ssl) != 1)
        die("peer TLS accept");
    struct pc_frames *f = pc_frames_new(ssl, 1);
    if (!f)
        die("peer frames");
    uint8_t *in = malloc(MAX_BATCH_BLOCKS * (8 + SEALED)), *out = malloc(4 + MAX_BATCH_BLOCKS * SEALED);
    for (;;) {
        uint32_t hdr[2];
        long r = pc_frames_read(f, c, (uint8_t *)hdr, sizeof hdr);
        if (r <= 0)
            exit(0);  /* the host closed the link */
        if ((size_t)r < sizeof hdr)
            frames_read_full(f, c, (uint8_t *)hdr + r, sizeof hdr - (size_t)r);
        size_t need = (size_t)hdr[0] * (8 + SEALED) + (size_t)hdr[1] * 8;
        if (hdr[0] > MAX_BATCH_BLOCKS || hdr[1] > MAX_BATCH_BLOCKS)
            die("peer: oversized message");
        frames_read_full(f, c, in, need);
        const uint8_t *p = in;
        for (uint32_t i = 0; i < hdr[0]; i++, p += 8 + SEALED) {
            uint64_t idx;
            memcpy(&idx, p, 8);
            if (idx >= NBLOCKS)
                die("peer: bad index");
            memcpy(slots + idx * SEALED, p + 8, SEALED);
        }
        memcpy(out, &hdr[0], 4);
        uint8_t *o = out + 4;
        for (uint32_t i = 0; i < hdr[1]; i++, p += 8, o += SEALED) {
            uint64_t idx;
            memcpy(&idx, p, 8);
            if (idx >= NBLOCKS)
                die("peer: bad index");
            memcpy(o, slots + idx * SEALED, SEALED);
        }
        if (pc_frames_write(f, c, out, (size_t)(o - out)) < 0)
            die("peer frames write");
    }
}

/* A peer: every block sealed in its slot file, then a process per link. */
static void peer(int lfd, int me)
{
    char path[64];
    snprintf(path, sizeof path, "/dev/shm/omega-4k-ceiling-%d-%d", (int)getpid(), me);
    int fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);
    unlink(path);
    if (fd < 0 || ftruncate(fd, (off_t)(NBLOCKS * SEALED)) < 0)
        die("slot file");
    uint8_t *slots = mmap(NULL, NBLOCKS * SEALED, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (slots == MAP_FAILED)
        die("slot mmap");
    struct pc_sealer s;
    if (pc_sealer_init(&s, key, aad, sizeof aad) < 0)
        die("sealer");
    uint8_t plain[BLOCK];
    for (uint64_t b = 0; b < NBLOCKS; b++) {
        fill(plain, b);
        if (pc_seal(&s, b, 1, plain, BLOCK, slots + b * SEALED) < 0)
            die("peer fill");
    }
    SSL_CTX *ctx = bench_tls_ctx(1);
    if (!ctx)
        die("peer TLS context");
    signal(SIGCHLD, SIG_IGN);
    for (;;) {
        int c = accept(lfd, NULL, NULL);
        if (c < 0)
            continue;
        int one = 1;
        setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        if (fork() == 0) {
            close(lfd);
            peer_link(c, ctx, slots);
        }
        close(c);
    }
}

static void start_peers(void)
{
    for (int i = 0; i < 2; i++) {
        int lfd = socket(AF_INET, SOCK_STREAM, 0);
        struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
        socklen_t al = sizeof a;
        if (bind(lfd, (struct sockaddr *)&a, sizeof a) < 0 || listen(lfd, 16) < 0 ||
            getsockname(lfd, (struct sockaddr *)&a, &al) < 0)
            die("peer listen");
        peer_addr[i] = a;
        if (fork() == 0)
            peer(lfd, i);
        close(lfd);
    }
}

/* ------------------------------------------------------------------ NBD */

struct link {
    SSL *ssl;
    struct pc_frames *f;
    int fd;
};

static struct link connect_peer(SSL_CTX *cctx, int i)
{
    struct link l;
    l.fd = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    /* the peer may still be sealing its slots */
    while (connect(l.fd, (struct sockaddr *)&peer_addr[i], sizeof peer_addr[i]) < 0) {
        if (errno != ECONNREFUSED)
            die("connect to peer");
        usleep(10000);
    }
    setsockopt(l.fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    l.ssl = SSL_new(cctx);
    SSL_set_fd(l.ssl, l.fd);
    if (SSL_connect(l.ssl) != 1)
        die("peer TLS handshake");
    l.f = pc_frames_new(l.ssl, 0);
    if (!l.f)
        die("host frames");
    return l;
}

static void opt_reply(int fd, uint32_t opt, uint32_t type, const void *data, uint32_t len)
{
    uint8_t h[20];
    uint64_t magic = htobe64(0x3e889045565a9ull);
    uint32_t o = htobe32(opt), t = htobe32(type), l = htobe32(len);
    memcpy(h, &magic, 8);
    memcpy(h + 8, &o, 4);
    memcpy(h + 12, &t, 4);
    memcpy(h + 16, &l, 4);
    write_full(fd, h, 20);
    if (len)
        write_full(fd, data, len);
}

/* Fixed newstyle handshake; 0 once in transmission, -1 to drop the client. */
static int handshake(int fd)
{
    const uint16_t tflags = 1 | 4;  /* HAS_FLAGS, SEND_FLUSH */
    uint8_t hello[18];
    uint64_t m1 = htobe64(0x4e42444d41474943ull), m2 = htobe64(0x49484156454F5054ull);
    uint16_t hf = htobe16(1 | 2);  /* FIXED_NEWSTYLE, NO_ZEROES */
    memcpy(hello, &m1, 8);
    memcpy(hello + 8, &m2, 8);
    memcpy(hello + 16, &hf, 2);
    write_full(fd, hello, 18);
    uint32_t cflags;
    if (read_full(fd, &cflags, 4) < 0)
        return -1;
    cflags = be32toh(cflags);
    for (;;) {
        uint8_t h[16];
        if (read_full(fd, h, 16) < 0)
            return -1;
        uint32_t opt, len;
        memcpy(&opt, h + 8, 4);
        memcpy(&len, h + 12, 4);
        opt = be32toh(opt);
        len = be32toh(len);
        if (len > 65536)
            return -1;
        uint8_t data[65536];
        if (len && read_full(fd, data, len) < 0)
            return -1;
        uint64_t size = htobe64(EXPORT);
        uint16_t tf = htobe16(tflags);
        if (opt == 1) {  /* EXPORT_NAME */
            uint8_t r[10 + 124] = {0};
            memcpy(r, &size, 8);
            memcpy(r + 8, &tf, 2);
            write_full(fd, r, (cflags & 2) ? 10 : sizeof r);
            return 0;
        }
        if (opt == 6 || opt == 7) {  /* INFO, GO */
            uint8_t info[12];
            uint16_t kind = 0;  /* NBD_INFO_EXPORT */
            memcpy(info, &kind, 2);
            memcpy(info + 2, &size, 8);
            memcpy(info + 10, &tf, 2);
            opt_reply(fd, opt, 3, info, sizeof info);
            opt_reply(fd, opt, 1, NULL, 0);
            if (opt == 7)
                return 0;
            continue;
        }
        if (opt == 2) {  /* ABORT */
            opt_reply(fd, opt, 1, NULL, 0);
            return -1;
        }
        opt_reply(fd, opt, 0x80000001u, NULL, 0);  /* ERR_UNSUP */
    }
}

struct req {
    uint64_t handle, offset;
    uint32_t length;
    uint16_t type;
    const uint8_t *data;
};

static void serve(int fd, uint8_t *mem)
{
    SSL_CTX *cctx = NULL;
    struct link peers[2];
    struct pc_sealer s;
    if (replicated) {
        cctx = bench_tls_ctx(0);
        if (!cctx)
            die("client TLS context");
        for (int i = 0; i < 2; i++)
            peers[i] = connect_peer(cctx, i);
        if (pc_sealer_init(&s, key, aad, sizeof aad) < 0)
            die("sealer");
    }
    if (handshake(fd) < 0)
        exit(0);
    uint8_t *in = malloc(IN_CAP);
    uint8_t *out = malloc((size_t)MAX_BATCH_REQS * 16 + (size_t)MAX_BATCH_BLOCKS * BLOCK);
    size_t msg_cap = 8 + MAX_BATCH_BLOCKS * (8 + SEALED);
    uint8_t *puts = malloc(msg_cap), *gets[2] = {malloc(msg_cap), malloc(msg_cap)};
    uint8_t *answers[2] = {malloc(4 + MAX_BATCH_BLOCKS * SEALED), malloc(4 + MAX_BATCH_BLOCKS * SEALED)};
    uint64_t *get_idx[2] = {malloc(MAX_BATCH_BLOCKS * 8), malloc(MAX_BATCH_BLOCKS * 8)};
    struct req *reqs = malloc(sizeof(struct req) * (MAX_BATCH_REQS + 1));
    size_t have = 0;
    for (;;) {
        /* every complete request in the buffer (up to MAX_BATCH_BLOCKS) is this burst */
        size_t pos = 0, nreq = 0, blocks = 0;
        int disc = 0;
        while (have - pos >= 28) {
            const uint8_t *h = in + pos;
            uint32_t magic, len;
            uint16_t type;
            uint64_t handle, off;
            memcpy(&magic, h, 4);
            memcpy(&type, h + 6, 2);
            memcpy(&handle, h + 8, 8);
            memcpy(&off, h + 16, 8);
            memcpy(&len, h + 24, 4);
            if (be32toh(magic) != 0x25609513u)
                exit(1);
            type = be16toh(type);
            off = be64toh(off);
            len = be32toh(len);
            size_t payload = type == 1 ? len : 0;
            if (len > MAX_REQ || off + len > EXPORT || off % BLOCK || len % BLOCK)
                exit(1);  /* not a ceiling workload */
            if (have - pos < 28 + payload)
                break;
            if (type == 2) {
                disc = 1;
                break;
            }
            if (nreq && blocks + len / BLOCK > MAX_BATCH_BLOCKS)
                break;
            blocks += len / BLOCK;
            reqs[nreq++] = (struct req){handle, off, len, type, h + 28};
            pos += 28 + payload;
        }
        if (!nreq && !disc) {  /* nothing whole yet: wait for more */
            ssize_t n = read(fd, in + have, IN_CAP - have);
            if (n <= 0)
                exit(0);
            have += (size_t)n;
            continue;
        }
        /* the burst to the peers: writes to both, reads to block % 2 */
        uint32_t nputs = 0, ngets[2] = {0, 0};
        uint8_t *pp = puts + 8;
        if (replicated) {
            for (size_t k = 0; k < nreq; k++) {
                struct req *r = &reqs[k];
                for (uint32_t b = 0; b < r->length / BLOCK; b++) {
                    uint64_t idx = r->offset / BLOCK + b;
                    if (r->type == 1) {
                        memcpy(pp, &idx, 8);
                        if (pc_seal(&s, idx, 1, r->data + (size_t)b * BLOCK, BLOCK, pp + 8) < 0)
                            die("seal");
                        pp += 8 + SEALED;
                        nputs++;
                    } else if (r->type == 0) {
                        int p = (int)(idx % 2);
                        get_idx[p][ngets[p]++] = idx;
                    }
                }
            }
            for (int p = 0; p < 2; p++) {
                if (!nputs && !ngets[p])
                    continue;
                uint32_t hdr[2] = {nputs, ngets[p]};
                /* the puts are the same for both peers; each link seals its own frames */
                uint8_t *msg = gets[p];
                memcpy(msg, hdr, 8);
                memcpy(msg + 8, puts + 8, (size_t)(pp - puts - 8));
                memcpy(msg + 8 + (pp - puts - 8), get_idx[p], (size_t)ngets[p] * 8);
                if (pc_frames_write(peers[p].f, peers[p].fd, msg,
                                    8 + (size_t)(pp - puts - 8) + (size_t)ngets[p] * 8) < 0)
                    die("frames write");
            }
            for (int p = 0; p < 2; p++)
                if (nputs || ngets[p])
                    frames_read_full(peers[p].f, peers[p].fd, answers[p],
                                     4 + (size_t)ngets[p] * SEALED);
        }
        /* the replies, in request order, in one send */
        uint8_t *o = out;
        uint32_t next[2] = {0, 0};
        for (size_t k = 0; k < nreq; k++) {
            struct req *r = &reqs[k];
            uint32_t magic = htobe32(0x67446698u), err = 0;
            memcpy(o, &magic, 4);
            memcpy(o + 4, &err, 4);
            memcpy(o + 8, &r->handle, 8);
            o += 16;
            if (r->type == 1 && !replicated)
                memcpy(mem + r->offset, r->data, r->length);
            if (r->type != 0)
                continue;
            for (uint32_t b = 0; b < r->length / BLOCK; b++, o += BLOCK) {
                uint64_t idx = r->offset / BLOCK + b;
                if (!replicated) {
                    memcpy(o, mem + idx * BLOCK, BLOCK);
                    continue;
                }
                int p = (int)(idx % 2);
                const uint8_t *blob = answers[p] + 4 + (size_t)next[p]++ * SEALED;
                if (pc_open(&s, idx, 1, blob, SEALED, o, BLOCK) < 0)
                    die("open: a peer answered a wrong block");
            }
        }
        if (o > out)
            write_full(fd, out, (size_t)(o - out));
        if (disc)
            exit(0);
        memmove(in, in + pos, have - pos);
        have -= pos;
    }
}

int main(int argc, char **argv)
{
    if (argc != 3 || (strcmp(argv[1], "local") && strcmp(argv[1], "replicated"))) {
        fprintf(stderr, "usage: netblock_4k_ceiling local|replicated SOCKET\n");
        return 2;
    }
    replicated = !strcmp(argv[1], "replicated");
    for (size_t i = 0; i < sizeof key; i++)
        key[i] = (uint8_t)(i * 7 + 1);
    memset(aad, 'a', sizeof aad);
    signal(SIGPIPE, SIG_IGN);
    setpgid(0, 0);  /* SIGTERM to the group ends peers and links too */
    uint8_t *mem = NULL;
    if (replicated) {
        start_peers();
    } else {
        int mfd = memfd_create("export", 0);
        if (mfd < 0 || ftruncate(mfd, (off_t)EXPORT) < 0)
            die("memfd");
        mem = mmap(NULL, EXPORT, PROT_READ | PROT_WRITE, MAP_SHARED, mfd, 0);
        if (mem == MAP_FAILED)
            die("mmap");
        for (uint64_t b = 0; b < NBLOCKS; b++)
            fill(mem + b * BLOCK, b);
    }
    int lfd = socket(AF_UNIX, SOCK_STREAM, 0);
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    snprintf(a.sun_path, sizeof a.sun_path, "%s", argv[2]);
    unlink(argv[2]);
    if (bind(lfd, (struct sockaddr *)&a, sizeof a) < 0 || listen(lfd, 16) < 0)
        die("listen");
    printf("ready\n");
    fflush(stdout);
    signal(SIGCHLD, SIG_IGN);
    for (;;) {
        int c = accept(lfd, NULL, NULL);
        if (c < 0)
            continue;
        if (fork() == 0) {
            close(lfd);
            serve(c, mem);
        }
        close(c);
    }
}
