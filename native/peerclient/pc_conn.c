/*
 * Mutual-TLS connections to a node's data port and the framing of requests
 * and answers (peerclient.h). Frame: u32 length (of what follows it) | u8 op
 * | u8 status | u16 0 | u64 request id | payload.
 */
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#include "peerclient.h"
#include "omega_spin.h"

uint64_t pc_now_ns(void)
{
    return omega_now_ns();
}

static void tls_error(char *err, size_t errlen, const char *what)
{
    unsigned long e = ERR_get_error();
    char msg[256] = "";
    if (e)
        ERR_error_string_n(e, msg, sizeof msg);
    ERR_clear_error();
    snprintf(err, errlen, "%s: %s", what, e ? msg : "failed");
}

/* 0 ok, -EPROTO (the identity could not be loaded; reason in err). */
int pc_tls_init(struct pc_tls *t, const char *ca, const char *cert, const char *keyfile,
                char *err, size_t errlen)
{
    t->ctx = SSL_CTX_new(TLS_client_method());
    if (!t->ctx || SSL_CTX_set_min_proto_version(t->ctx, TLS1_3_VERSION) != 1 ||
        SSL_CTX_load_verify_locations(t->ctx, ca, NULL) != 1 ||
        SSL_CTX_use_certificate_chain_file(t->ctx, cert) != 1 ||
        SSL_CTX_use_PrivateKey_file(t->ctx, keyfile, SSL_FILETYPE_PEM) != 1 ||
        SSL_CTX_check_private_key(t->ctx) != 1) {
        tls_error(err, errlen, "TLS identity");
        if (t->ctx)
            SSL_CTX_free(t->ctx);
        t->ctx = NULL;
        return -EPROTO;
    }
    SSL_CTX_set_verify(t->ctx, SSL_VERIFY_PEER, NULL);
    SSL_CTX_set_read_ahead(t->ctx, 1); /* one read per answer, not two per record */
    /* Blobs are already sealed (AES-256-GCM under a key nodes never see):
     * the transport authenticates the node and hides which blobs move, so
     * it uses TLS 1.3's cheapest AEAD (the Python node prefers AES-256
     * when offered a choice; AES-128 made page-in ~30% faster here). */
    SSL_CTX_set_ciphersuites(t->ctx, "TLS_AES_128_GCM_SHA256");
    return 0;
}

void pc_tls_free(struct pc_tls *t)
{
    if (t->ctx)
        SSL_CTX_free(t->ctx);
    t->ctx = NULL;
}

void pc_conn_init(struct pc_conn *c)
{
    memset(c, 0, sizeof *c);
    c->fd = -1;
    c->next_id = 1;
}

int pc_conn_is_open(const struct pc_conn *c)
{
    return c->ssl != NULL;
}

static void drop(struct pc_conn *c)
{
    pc_frames_free(c->fr);
    c->fr = NULL;
    if (c->ssl) {
        SSL_free(c->ssl);
        c->ssl = NULL;
    }
    if (c->fd >= 0) {
        close(c->fd);
        c->fd = -1;
    }
}

void pc_conn_close(struct pc_conn *c)
{
    drop(c);
    free(c->buf);
    c->buf = NULL;
    c->cap = 0;
}

/* OMEGA_PEER_FRAMES=0 keeps connections in TLS records (for comparisons). */
static int frames_wanted(void)
{
    const char *v = getenv("OMEGA_PEER_FRAMES");
    return !v || strcmp(v, "0") != 0;
}

/*
 * Ask the node, inside TLS, to carry this connection in pc_frames.c's
 * frames from now on. 1 switched; 0 the node refused or does not know the
 * request (the connection is closed: reopen it without); < 0 the node
 * agreed but the keys could not be made (closed).
 */
static int switch_to_frames(struct pc_conn *c)
{
    uint8_t status;
    long n = pc_call(c, PC_OP_FRAMES, NULL, 0, 0, &status);
    if (n != 0 || status != PC_ST_OK) {
        drop(c);
        return 0;
    }
    /* The node sends and expects frames from its OK on: nothing of TLS's
     * may be left unread here (it sent nothing after the OK). */
    if (SSL_has_pending(c->ssl) || !(c->fr = pc_frames_new(c->ssl, 0))) {
        drop(c);
        return -EPROTO;
    }
    return 1;
}

int pc_conn_open(struct pc_tls *t, struct pc_conn *c, const char *name, const char *host,
                 const char *port, int timeout_ms, char *err, size_t errlen)
{
    drop(c);
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM};
    struct addrinfo *ai = NULL;
    int e = getaddrinfo(host, port, &hints, &ai);
    if (e) {
        snprintf(err, errlen, "resolve %s: %s", host, gai_strerror(e));
        return -EHOSTUNREACH;
    }
    int fd = -1, saved = 0;
    for (struct addrinfo *a = ai; a && fd < 0; a = a->ai_next) {
        fd = socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol);
        if (fd < 0) {
            saved = errno;
            continue;
        }
        struct timeval tv = {.tv_sec = timeout_ms / 1000, .tv_usec = (timeout_ms % 1000) * 1000};
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv); /* bounds connect too */
        if (connect(fd, a->ai_addr, a->ai_addrlen) < 0) {
            saved = errno;
            close(fd);
            fd = -1;
        }
    }
    freeaddrinfo(ai);
    if (fd < 0) {
        snprintf(err, errlen, "connect %s:%s: %s", host, port, strerror(saved));
        return -ECONNREFUSED;
    }
    SSL *ssl = SSL_new(t->ctx);
    if (!ssl || SSL_set_fd(ssl, fd) != 1 || SSL_set1_host(ssl, name) != 1 ||
        SSL_set_tlsext_host_name(ssl, name) != 1 || SSL_connect(ssl) != 1) {
        tls_error(err, errlen, "TLS handshake");
        if (ssl)
            SSL_free(ssl);
        close(fd);
        return -ECONNABORTED;
    }
    c->fd = fd;
    c->ssl = ssl;
    if (c->no_frames || !frames_wanted())
        return 0;
    int rc = switch_to_frames(c);
    if (rc > 0)
        return 0;
    if (rc < 0) {
        snprintf(err, errlen, "%s: the switch to frames failed", name);
        drop(c);
        return rc;
    }
    /* A node without FRAMES (it answers an unknown opcode and hangs up):
     * TLS records with it from now on. */
    c->no_frames = 1;
    return pc_conn_open(t, c, name, host, port, timeout_ms, err, errlen);
}

static int grow(struct pc_conn *c, size_t want)
{
    if (c->cap >= want)
        return 0;
    size_t n = c->cap ? c->cap : 65536;
    while (n < want)
        n *= 2;
    uint8_t *p = realloc(c->buf, n);
    if (!p)
        return -ENOMEM;
    c->buf = p;
    c->cap = n;
    return 0;
}

/* A failed SSL_read/SSL_write that a signal interrupted: try again. (A
 * receive timeout, SO_RCVTIMEO, reads the same to OpenSSL but leaves EAGAIN
 * in errno: that one fails.) */
static int interrupted(SSL *ssl, int ret)
{
    int err = SSL_get_error(ssl, ret);
    return errno == EINTR &&
           (err == SSL_ERROR_WANT_READ || err == SSL_ERROR_WANT_WRITE || err == SSL_ERROR_SYSCALL);
}

static int write_all(struct pc_conn *c, const uint8_t *p, size_t n)
{
    if (c->fr)
        return pc_frames_write(c->fr, c->fd, p, n) < 0 ? -EIO : 0;
    SSL *ssl = c->ssl;
    while (n) {
        errno = 0;
        int w = SSL_write(ssl, p, n > (1u << 30) ? 1 << 30 : (int)n);
        if (w <= 0) {
            if (interrupted(ssl, w))
                continue;
            return -EIO;
        }
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

static int read_all(struct pc_conn *c, uint8_t *p, size_t n)
{
    if (c->fr) {
        while (n) {
            long got = pc_frames_read(c->fr, c->fd, p, n);
            if (got <= 0)
                return -EIO; /* an end, a broken or a forged frame */
            p += got;
            n -= (size_t)got;
        }
        return 0;
    }
    SSL *ssl = c->ssl;
    while (n) {
        errno = 0;
        int got = SSL_read(ssl, p, n > (1u << 30) ? 1 << 30 : (int)n);
        if (got <= 0) {
            if (interrupted(ssl, got))
                continue;
            return -EIO;
        }
        p += got;
        n -= (size_t)got;
    }
    return 0;
}

int64_t pc_send(struct pc_conn *c, uint8_t op, const struct iovec *iov, int niov)
{
    if (!c->ssl)
        return -ENOTCONN;
    size_t plen = 0;
    for (int i = 0; i < niov; i++)
        plen += iov[i].iov_len;
    if (plen + PC_HEADER - 4 > PC_MAX_FRAME)
        return -E2BIG;
    if (grow(c, PC_HEADER + plen) < 0)
        return -ENOMEM;
    uint64_t id = c->next_id++;
    pc_put32(c->buf, (uint32_t)(PC_HEADER - 4 + plen));
    c->buf[4] = op;
    c->buf[5] = c->buf[6] = c->buf[7] = 0;
    pc_put64(c->buf + 8, id);
    size_t at = PC_HEADER;
    for (int i = 0; i < niov; i++) {
        memcpy(c->buf + at, iov[i].iov_base, iov[i].iov_len);
        at += iov[i].iov_len;
    }
    if (write_all(c, c->buf, at) < 0) { /* one record: header and payload together */
        drop(c);
        return -EIO;
    }
    return (int64_t)id;
}

/*
 * Wait for an answer awake for up to spin_ns before the blocking read
 * sleeps on the socket. On this kind of machine a thread that sleeps takes
 * tens of microseconds to be woken (an idle vCPU halts), as long as the
 * node's whole answer. Each check yields the CPU, so a thread woken on it
 * (a vCPU, a node sharing the machine) runs at once instead of after the
 * spin: with a plain pause loop the spin held those up and the p99 tripled;
 * and a yield that ran another thread ends the spin (omega_spin.h).
 */
static void await_answer(struct pc_conn *c, uint64_t spin_ns)
{
    if (!spin_ns)
        return;
    uint64_t until = omega_now_ns() + spin_ns, given = 0;
    do {
        char b;
        if (c->fr ? pc_frames_pending(c->fr) : SSL_has_pending(c->ssl))
            return;
        /* bytes, end of file or an error: the read that follows sees which */
        if (recv(c->fd, &b, 1, MSG_PEEK | MSG_DONTWAIT) >= 0 || errno != EAGAIN)
            return;
    } while (omega_spin_yield(until, &given));
}

long pc_recv(struct pc_conn *c, uint64_t spin_ns, uint8_t *op, uint8_t *status, uint64_t *id)
{
    if (!c->ssl)
        return -ENOTCONN;
    uint8_t head[PC_HEADER];
    await_answer(c, spin_ns);
    if (read_all(c, head, PC_HEADER) < 0)
        goto broken;
    uint32_t len = pc_get32(head);
    if (len < PC_HEADER - 4 || len > PC_MAX_FRAME)
        goto malformed;
    size_t body = len - (PC_HEADER - 4);
    if (grow(c, body) < 0) {
        drop(c);
        return -ENOMEM;
    }
    if (read_all(c, c->buf, body) < 0)
        goto broken;
    *op = head[4];
    *status = head[5];
    *id = pc_get64(head + 8);
    return (long)body;
malformed:
    drop(c);
    return -EPROTO;
broken:
    drop(c);
    return -EIO;
}

long pc_call(struct pc_conn *c, uint8_t op, const struct iovec *iov, int niov,
             uint64_t spin_ns, uint8_t *status)
{
    int64_t id = pc_send(c, op, iov, niov);
    if (id < 0)
        return (long)id;
    uint8_t aop;
    uint64_t aid;
    long n = pc_recv(c, spin_ns, &aop, status, &aid);
    if (n < 0)
        return n;
    if (aop != op || aid != (uint64_t)id) {
        drop(c);
        return -EPROTO;
    }
    return n;
}
