/*
 * The data port: the data opcodes of hypervisor/node/wire.py served by C
 * threads straight from the page store and the chunk store.
 *
 * One acceptor thread; one thread per connection (mutual TLS 1.3 with the
 * cluster CA; the client certificate's common name, else its first DNS
 * name, is the member every request acts as, as in the Python daemon). A
 * connection thread reads whatever has arrived, answers every whole frame in
 * it into one output buffer and writes that in one go: pipelined requests
 * cost one TLS record and one wake-up per burst, not per request.
 *
 * Served here: PING, and GET, BATCH_GET, PUT, BATCH_PUT, DELETE on page and
 * chunk namespaces. Anything else (STAT, LIST, DROP_NS, LIST_NS) belongs on
 * the daemon's main port; it is answered BAD_REQUEST and, like malformed
 * bytes, closes the connection. Nothing one connection sends affects
 * another. Chunk requests read and write the disk on the connection's
 * thread (a put with fsync waits for its fdatasync there); a disk error is
 * answered INTERNAL and the connection stays open.
 */
#include <arpa/inet.h>
#include <endian.h>
#include <errno.h>
#include <limits.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#include "peer.h"
#include "omega_spin.h"
#include "omega_thread.h"
#include "peerclient.h" /* pc_frames */

#define HEADER 16
#define MAX_CONNS 256
#define HANDSHAKE_TIMEOUT_S 10
#define SEND_TIMEOUT_S 30
#define STOP_GRACE_S 2 /* seconds connections get to finish at a stop */
#define FLUSH_AT (4u << 20) /* answers buffered before a write mid-burst */
#define NS_PAGE 0
#define NS_CHUNK 1

enum { OP_PING = 0x01, OP_STAT = 0x02, OP_PUT = 0x10, OP_GET = 0x11, OP_DELETE = 0x12,
       OP_BATCH_GET = 0x13, OP_BATCH_PUT = 0x14, OP_LIST = 0x15, OP_DROP_NS = 0x16,
       OP_LIST_NS = 0x17, OP_FRAMES = 0x18 };

struct conn {
    struct conn *next;
    struct peer_server *srv;
    int fd;
    int spin_off;        /* the last spin ran out: sleep at once until requests come fast */
    SSL *ssl;
    struct pc_frames *fr; /* after FRAMES: AES-GCM frames instead of TLS records */
    int to_frames;       /* FRAMES answered: switch once the OK is sent */
    pthread_t thread;
    int done;            /* the thread has finished (atomic) */
    char owner[PEER_NAME_MAX + 1];
    uint8_t *in;
    size_t incap, inlen;
    uint8_t *out;
    size_t outcap, outlen;
    /* scratch for batch requests */
    uint64_t *keys, *versions;
    const uint8_t **blobs;
    uint32_t *lens;
    uint8_t *statuses;
};

struct peer_server {
    struct peer_store *pages;
    struct chunk_store *chunks;
    SSL_CTX *ctx;
    int lfd, wakefd;
    pthread_t acceptor;
    pthread_mutex_t lock;
    struct conn *conns;
    int nconns;
    int stopping;
    uint64_t spin_ns;    /* an idle connection waits awake this long before it sleeps */
    uint64_t counters[PEER_C_COUNT];
};

static void count(struct peer_server *srv, int which, uint64_t n)
{
    __atomic_add_fetch(&srv->counters[which], n, __ATOMIC_RELAXED);
}

static void put_be64(uint8_t *p, uint64_t v) { v = htobe64(v); memcpy(p, &v, 8); }
static void put_be32(uint8_t *p, uint32_t v) { v = htobe32(v); memcpy(p, &v, 4); }
static uint64_t get_be64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return be64toh(v); }
static uint32_t get_be32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return be32toh(v); }

static int grow(void **buf, size_t *cap, size_t want)
{
    if (*cap >= want)
        return 0;
    size_t n = *cap ? *cap : 65536;
    while (n < want)
        n *= 2;
    void *p = realloc(*buf, n);
    if (!p)
        return -ENOMEM;
    *buf = p;
    *cap = n;
    return 0;
}

/* ------------------------------------------------------------ the payload */

struct reader {
    const uint8_t *p;
    size_t left;
    int bad;
};

static const uint8_t *take(struct reader *r, size_t n)
{
    if (r->bad || r->left < n) {
        r->bad = 1;
        return NULL;
    }
    const uint8_t *p = r->p;
    r->p += n;
    r->left -= n;
    return p;
}

static uint64_t take64(struct reader *r)
{
    const uint8_t *p = take(r, 8);
    return p ? get_be64(p) : 0;
}

static uint32_t take32(struct reader *r)
{
    const uint8_t *p = take(r, 4);
    return p ? get_be32(p) : 0;
}

/* Strict UTF-8 (no overlong forms, surrogates or code points past U+10FFFF),
 * as Python's decoder. */
static int utf8_ok(const uint8_t *s, size_t n)
{
    size_t i = 0;
    while (i < n) {
        uint8_t c = s[i];
        size_t k;
        uint32_t cp;
        if (c < 0x80) {
            i++;
            continue;
        } else if ((c & 0xE0) == 0xC0) {
            k = 1;
            cp = c & 0x1F;
        } else if ((c & 0xF0) == 0xE0) {
            k = 2;
            cp = c & 0x0F;
        } else if ((c & 0xF8) == 0xF0) {
            k = 3;
            cp = c & 0x07;
        } else {
            return 0;
        }
        if (i + k >= n)
            return 0;
        for (size_t j = 1; j <= k; j++) {
            if ((s[i + j] & 0xC0) != 0x80)
                return 0;
            cp = (cp << 6) | (s[i + j] & 0x3F);
        }
        if ((k == 1 && cp < 0x80) || (k == 2 && cp < 0x800) || (k == 3 && cp < 0x10000) ||
            cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))
            return 0;
        i += k + 1;
    }
    return 1;
}

/* A namespace's kind and name into out (NUL-terminated); the rules of
 * wire.Namespace. Returns 0, or -1 with *why set. */
static int take_ns(struct reader *r, const struct peer_server *srv, int *kind, char *out,
                   const char **why)
{
    const uint8_t *h = take(r, 2);
    if (!h) {
        *why = "payload truncated";
        return -1;
    }
    const uint8_t *name = take(r, h[1]);
    if (!name) {
        *why = "payload truncated";
        return -1;
    }
    if (h[0] > 1) {
        *why = "unknown namespace kind";
        return -1;
    }
    if ((h[0] == NS_PAGE && !srv->pages) || (h[0] == NS_CHUNK && !srv->chunks)) {
        *why = "no store of this namespace kind on this port";
        return -1;
    }
    if (h[1] < 1 || name[0] == '.' || memchr(name, '/', h[1]) || memchr(name, 0, h[1]) ||
        !utf8_ok(name, h[1])) {
        *why = "bad namespace name";
        return -1;
    }
    memcpy(out, name, h[1]);
    out[h[1]] = 0;
    *kind = h[0];
    return 0;
}

/* ------------------------------------------------------------- the stores */

static int store_read(struct conn *c, int kind, const char *ns, size_t n, const uint64_t *keys,
                      peer_room_fn room, void *arg)
{
    struct peer_server *srv = c->srv;
    if (kind == NS_CHUNK)
        return chunk_store_read(srv->chunks, ns, c->owner, n, keys, room, arg);
    return peer_store_read(srv->pages, ns, c->owner, n, keys, room, arg);
}

static int store_put(struct conn *c, int kind, const char *ns, size_t n)
{
    struct peer_server *srv = c->srv;
    if (kind == NS_CHUNK)
        return chunk_store_put_batch(srv->chunks, ns, c->owner, n, c->keys, c->versions,
                                     c->blobs, c->lens, c->statuses);
    return peer_store_put_batch(srv->pages, ns, c->owner, n, c->keys, c->versions, c->blobs,
                                c->lens, c->statuses);
}

static int store_delete(struct conn *c, int kind, const char *ns, size_t n, uint64_t *deleted)
{
    struct peer_server *srv = c->srv;
    if (kind == NS_CHUNK)
        return chunk_store_delete(srv->chunks, ns, c->owner, n, c->keys, deleted);
    return peer_store_delete(srv->pages, ns, c->owner, n, c->keys, deleted);
}

/* The counter of op on a namespace of kind. */
static int op_counter(uint8_t op, int kind)
{
    static const int page[] = {[OP_GET] = PEER_C_GET, [OP_BATCH_GET] = PEER_C_BATCH_GET,
                               [OP_PUT] = PEER_C_PUT, [OP_BATCH_PUT] = PEER_C_BATCH_PUT,
                               [OP_DELETE] = PEER_C_DELETE};
    static const int chunk[] = {[OP_GET] = PEER_C_CHUNK_GET,
                                [OP_BATCH_GET] = PEER_C_CHUNK_BATCH_GET,
                                [OP_PUT] = PEER_C_CHUNK_PUT,
                                [OP_BATCH_PUT] = PEER_C_CHUNK_BATCH_PUT,
                                [OP_DELETE] = PEER_C_CHUNK_DELETE};
    return kind == NS_CHUNK ? chunk[op] : page[op];
}

/* ------------------------------------------------------------ the answers */

/* Reserve room for an answer of body bytes; returns its body or NULL. */
static uint8_t *answer(struct conn *c, uint8_t op, uint64_t id, uint8_t status, size_t body)
{
    if (grow((void **)&c->out, &c->outcap, c->outlen + HEADER + body) < 0)
        return NULL;
    uint8_t *h = c->out + c->outlen;
    put_be32(h, (uint32_t)(HEADER - 4 + body));
    h[4] = op;
    h[5] = status;
    h[6] = h[7] = 0;
    put_be64(h + 8, id);
    c->outlen += HEADER + body;
    return h + HEADER;
}

static int answer_text(struct conn *c, uint8_t op, uint64_t id, uint8_t status, const char *msg)
{
    size_t n = strlen(msg);
    uint8_t *b = answer(c, op, id, status, n);
    if (!b)
        return -ENOMEM;
    memcpy(b, msg, n);
    return 0;
}

struct batch_out {
    struct conn *c;
    uint64_t bytes;
    int missing;    /* GET: the key is not held */
    int oom;
};

/* Room for one found/not-found item: (u8 found) u64 version, u32 len, blob. */
static uint8_t *room_item(struct batch_out *b, int found, uint64_t version, uint32_t len,
                          int with_flag)
{
    struct conn *c = b->c;
    size_t need = (with_flag ? 13 : 12) + (found ? len : 0);
    if (b->oom || grow((void **)&c->out, &c->outcap, c->outlen + need) < 0) {
        b->oom = 1;
        return NULL;
    }
    uint8_t *p = c->out + c->outlen;
    if (with_flag)
        *p++ = (uint8_t)(found != 0);
    put_be64(p, found ? version : 0);
    put_be32(p + 8, found ? len : 0);
    c->outlen += need;
    b->bytes += found ? len : 0;
    return p + 12;
}

static uint8_t *room_batch_item(void *arg, int found, uint64_t version, uint32_t len)
{
    return room_item(arg, found, version, len, 1);
}

static uint8_t *room_get(void *arg, int found, uint64_t version, uint32_t len)
{
    struct batch_out *b = arg;
    if (found)
        return room_item(b, found, version, len, 0);
    b->missing = 1;
    return NULL;
}

/* Finish an answer whose body was appended after a header at `at`. */
static void seal_header(struct conn *c, size_t at, uint8_t op, uint64_t id, uint8_t status)
{
    uint8_t *h = c->out + at;
    put_be32(h, (uint32_t)(c->outlen - at - 4));
    h[4] = op;
    h[5] = status;
    h[6] = h[7] = 0;
    put_be64(h + 8, id);
}

static int ensure_scratch(struct conn *c)
{
    if (c->keys)
        return 0;
    c->keys = malloc(PEER_MAX_BATCH * sizeof *c->keys);
    c->versions = malloc(PEER_MAX_BATCH * sizeof *c->versions);
    c->blobs = malloc(PEER_MAX_BATCH * sizeof *c->blobs);
    c->lens = malloc(PEER_MAX_BATCH * sizeof *c->lens);
    c->statuses = malloc(PEER_MAX_BATCH);
    return (c->keys && c->versions && c->blobs && c->lens && c->statuses) ? 0 : -ENOMEM;
}

static int forbidden(struct conn *c, uint8_t op, uint64_t id, const char *ns)
{
    char msg[320];
    count(c->srv, PEER_C_FORBIDDEN, 1);
    snprintf(msg, sizeof msg, "namespace '%s' belongs to another cluster member", ns);
    return answer_text(c, op, id, PEER_ST_FORBIDDEN, msg);
}

/*
 * The answer to a store call that did not return OK: FORBIDDEN, INTERNAL
 * for a disk error (the connection stays usable). Returns 0, or -ENOMEM
 * (out of memory: the connection closes).
 */
static int refused(struct conn *c, uint8_t op, uint64_t id, const char *ns, int rc)
{
    if (rc == PEER_ST_FORBIDDEN)
        return forbidden(c, op, id, ns);
    if (rc == -ENOMEM)
        return -ENOMEM;
    char msg[400];
    count(c->srv, PEER_C_STORE_ERRORS, 1);
    snprintf(msg, sizeof msg, "namespace '%s': %s", ns,
             rc == -EBADMSG ? "a chunk failed its check on disk" : strerror(-rc));
    return answer_text(c, op, id, PEER_ST_INTERNAL, msg);
}

/*
 * Answer one request. Returns 0, 1 when the connection must close after the
 * answers so far (a BAD_REQUEST was queued), or -ENOMEM.
 */
static int serve(struct conn *c, uint8_t op, uint64_t id, const uint8_t *payload, size_t plen)
{
    struct peer_server *srv = c->srv;
    struct reader r = {payload, plen, 0};
    const char *why = "payload truncated";
    char ns[PEER_NAME_MAX + 1];
    int kind, rc;

    if (op == OP_PING) {
        if (plen)
            goto bad_trailing;
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        uint8_t *b = answer(c, op, id, PEER_ST_OK, 8);
        if (!b)
            return -ENOMEM;
        put_be64(b, (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec);
        count(srv, PEER_C_PING, 1);
        return 0;
    }
    if (op == OP_FRAMES) {
        /* From the OK on, both ends send pc_frames.c frames (keys from this
         * TLS session's exporter); the switch happens once it is sent. */
        if (plen)
            goto bad_trailing;
        if (c->fr) {
            why = "already in frames";
            goto bad;
        }
        if (!answer(c, op, id, PEER_ST_OK, 0))
            return -ENOMEM;
        c->to_frames = 1;
        return 0;
    }
    if (op == OP_STAT || op == OP_LIST || op == OP_DROP_NS || op == OP_LIST_NS) {
        why = "opcode served on the node's main port only";
        goto bad;
    }
    if (take_ns(&r, srv, &kind, ns, &why) < 0)
        goto bad;
    size_t bytes_out = kind == NS_CHUNK ? PEER_C_CHUNK_BYTES_OUT : PEER_C_BYTES_OUT;

    if (op == OP_GET) {
        uint64_t key = take64(&r);
        if (r.bad)
            goto bad;
        if (r.left)
            goto bad_trailing;
        size_t at = c->outlen;
        if (!answer(c, op, id, PEER_ST_OK, 0))
            return -ENOMEM;
        struct batch_out b = {c, 0, 0, 0};
        rc = store_read(c, kind, ns, 1, &key, room_get, &b);
        if (b.oom)
            return -ENOMEM;
        if (rc != PEER_ST_OK) {
            c->outlen = at;
            return refused(c, op, id, ns, rc);
        }
        if (b.missing) {
            seal_header(c, at, op, id, PEER_ST_NOT_FOUND);
        } else {
            seal_header(c, at, op, id, PEER_ST_OK);
            count(srv, bytes_out, b.bytes);
        }
        count(srv, op_counter(op, kind), 1);
        return 0;
    }
    if (op == OP_BATCH_GET || op == OP_DELETE) {
        uint32_t n = take32(&r);
        if (r.bad)
            goto bad;
        if (n > PEER_MAX_BATCH) {
            why = "count exceeds the batch limit";
            goto bad;
        }
        const uint8_t *raw = take(&r, 8ull * n);
        if (r.bad)
            goto bad;
        if (r.left)
            goto bad_trailing;
        if (ensure_scratch(c) < 0)
            return -ENOMEM;
        for (uint32_t i = 0; i < n; i++)
            c->keys[i] = get_be64(raw + 8ull * i);
        if (op == OP_DELETE) {
            uint64_t deleted;
            rc = store_delete(c, kind, ns, n, &deleted);
            if (rc != PEER_ST_OK)
                return refused(c, op, id, ns, rc);
            uint8_t *b = answer(c, op, id, PEER_ST_OK, 4);
            if (!b)
                return -ENOMEM;
            put_be32(b, (uint32_t)deleted);
            count(srv, op_counter(op, kind), 1);
            return 0;
        }
        size_t at = c->outlen;
        uint8_t *b = answer(c, op, id, PEER_ST_OK, 4);
        if (!b)
            return -ENOMEM;
        put_be32(b, n);
        struct batch_out out = {c, 0, 0, 0};
        rc = store_read(c, kind, ns, n, c->keys, room_batch_item, &out);
        if (out.oom)
            return -ENOMEM;
        if (rc != PEER_ST_OK) {
            c->outlen = at;
            return refused(c, op, id, ns, rc);
        }
        if (c->outlen - at - 4 > PEER_MAX_FRAME) {
            c->outlen = at;
            why = "answer would exceed the frame limit";
            goto bad;
        }
        seal_header(c, at, op, id, PEER_ST_OK);
        count(srv, op_counter(op, kind), 1);
        count(srv, bytes_out, out.bytes);
        return 0;
    }
    if (op == OP_PUT || op == OP_BATCH_PUT) {
        uint32_t n = 1;
        if (op == OP_BATCH_PUT) {
            n = take32(&r);
            if (r.bad)
                goto bad;
            if (n > PEER_MAX_BATCH) {
                why = "count exceeds the batch limit";
                goto bad;
            }
        }
        if (ensure_scratch(c) < 0)
            return -ENOMEM;
        uint64_t bytes = 0;
        for (uint32_t i = 0; i < n; i++) {
            c->keys[i] = take64(&r);
            c->versions[i] = take64(&r);
            c->lens[i] = take32(&r);
            if (r.bad)
                goto bad;
            if (c->lens[i] > PEER_MAX_BLOB) {
                why = "blob exceeds the size limit";
                goto bad;
            }
            c->blobs[i] = take(&r, c->lens[i]);
            if (r.bad)
                goto bad;
        }
        if (r.left)
            goto bad_trailing;
        rc = store_put(c, kind, ns, n);
        if (rc != PEER_ST_OK && rc != PEER_ST_FULL)
            return refused(c, op, id, ns, rc);
        for (uint32_t i = 0; rc == PEER_ST_OK && i < n; i++)
            if (c->statuses[i] == PEER_ST_OK)
                bytes += c->lens[i];
        count(srv, kind == NS_CHUNK ? PEER_C_CHUNK_BYTES_IN : PEER_C_BYTES_IN, bytes);
        count(srv, op_counter(op, kind), 1);
        if (op == OP_PUT)
            return answer(c, op, id, rc == PEER_ST_OK ? c->statuses[0] : (uint8_t)rc, 0)
                       ? 0 : -ENOMEM;
        if (rc != PEER_ST_OK)
            return answer(c, op, id, (uint8_t)rc, 0) ? 0 : -ENOMEM;
        uint8_t *b = answer(c, op, id, PEER_ST_OK, 4 + n);
        if (!b)
            return -ENOMEM;
        put_be32(b, n);
        memcpy(b + 4, c->statuses, n);
        return 0;
    }
    why = "unknown opcode";
    goto bad;
bad_trailing:
    why = "trailing bytes in payload";
bad:
    count(srv, PEER_C_BAD_REQUEST, 1);
    return answer_text(c, op, id, PEER_ST_BAD_REQUEST, why) < 0 ? -ENOMEM : 1;
}

/* ------------------------------------------------------------ connections */

/* Read what has arrived (at least a byte): > 0, or <= 0 at an end or error. */
static int conn_read(struct conn *c, uint8_t *p, size_t n)
{
    if (n > INT_MAX)
        n = INT_MAX;
    if (c->fr) {
        long got = pc_frames_read(c->fr, c->fd, p, n);
        if (got == -EBADMSG || got == -EPROTO)
            count(c->srv, PEER_C_BAD_REQUEST, 1); /* a forged or broken frame */
        return got > 0 ? (int)got : -1;
    }
    return SSL_read(c->ssl, p, (int)n);
}

/* Bytes of a request already here, decrypted or whole. */
static int conn_pending(struct conn *c)
{
    return c->fr ? pc_frames_pending(c->fr) : SSL_has_pending(c->ssl);
}

static int flush_out(struct conn *c)
{
    size_t off = 0;
    if (c->fr && c->outlen) {
        if (pc_frames_write(c->fr, c->fd, c->out, c->outlen) < 0)
            return -EIO;
        off = c->outlen;
    }
    while (off < c->outlen) {
        size_t n = c->outlen - off;
        int w = SSL_write(c->ssl, c->out + off, n > (1u << 30) ? 1 << 30 : (int)n);
        if (w <= 0)
            return -EIO;
        off += (size_t)w;
    }
    c->outlen = 0;
    if (c->outcap > (8u << 20)) { /* a huge burst is over: give the memory back */
        free(c->out);
        c->out = NULL;
        c->outcap = 0;
    }
    return 0;
}

static int known_op(uint8_t op)
{
    return op == OP_PING || op == OP_STAT || (op >= OP_PUT && op <= OP_FRAMES);
}

/* The member a verified client certificate names: its common name, else its
 * first DNS subjectAltName. */
static int identity(SSL *ssl, char *out, size_t cap)
{
    X509 *cert = SSL_get1_peer_certificate(ssl);
    if (!cert)
        return -1;
    int rc = -1;
    int n = X509_NAME_get_text_by_NID(X509_get_subject_name(cert), NID_commonName, out,
                                      (int)cap);
    if (n > 0) {
        rc = 0;
    } else {
        GENERAL_NAMES *sans = X509_get_ext_d2i(cert, NID_subject_alt_name, NULL, NULL);
        for (int i = 0; sans && i < sk_GENERAL_NAME_num(sans); i++) {
            GENERAL_NAME *g = sk_GENERAL_NAME_value(sans, i);
            if (g->type == GEN_DNS) {
                const unsigned char *d = ASN1_STRING_get0_data(g->d.dNSName);
                int len = ASN1_STRING_length(g->d.dNSName);
                if (len > 0 && (size_t)len < cap) {
                    memcpy(out, d, (size_t)len);
                    out[len] = 0;
                    rc = 0;
                    break;
                }
            }
        }
        GENERAL_NAMES_free(sans);
    }
    X509_free(cert);
    return rc;
}

/*
 * After a burst, wait for the next request awake for up to spin_ns before
 * sleeping in poll(). A sleeping thread takes tens of microseconds to be
 * woken on a virtual machine whose idle vCPU halts, as long as the whole
 * answer; a client faulting pages one after another sends its next request
 * well within the spin. Each check yields the CPU to any thread woken on
 * it, and a yield that ran another thread ends the spin (omega_spin.h):
 * waiting awake only pays while the CPU would otherwise idle. The spin
 * adapts too: once it runs out, the connection sleeps at once after each
 * burst until a request comes within spin_ns of the last answer again, so
 * a client sending batches far apart costs no spinning. Returns 1 when
 * bytes (or an end) arrived, 0 when the spin ran out or met a busy CPU (or
 * is off) or a stop was asked for.
 */
static int spin_for_request(struct conn *c, uint64_t spin_ns)
{
    if (!spin_ns || c->spin_off)
        return 0;
    uint64_t until = omega_now_ns() + spin_ns, given = 0;
    do {
        char b;
        if (recv(c->fd, &b, 1, MSG_PEEK | MSG_DONTWAIT) >= 0 || errno != EAGAIN)
            return 1;
        if (__atomic_load_n(&c->srv->stopping, __ATOMIC_ACQUIRE))
            return 0;
    } while (omega_spin_yield(until, &given));
    omega_spin_ran_out(until, &c->spin_off);
    return 0;
}

static void set_timeouts(int fd, int recv_s, int send_s)
{
    struct timeval rt = {.tv_sec = recv_s}, st = {.tv_sec = send_s};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &rt, sizeof rt);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &st, sizeof st);
}

static void serve_conn(struct conn *c)
{
    struct peer_server *srv = c->srv;
    set_timeouts(c->fd, HANDSHAKE_TIMEOUT_S, HANDSHAKE_TIMEOUT_S);
    c->ssl = SSL_new(srv->ctx);
    if (!c->ssl || SSL_set_fd(c->ssl, c->fd) != 1 || SSL_accept(c->ssl) != 1 ||
        identity(c->ssl, c->owner, sizeof c->owner) < 0) {
        ERR_clear_error();
        count(srv, PEER_C_HANDSHAKE_FAILED, 1);
        return;
    }
    set_timeouts(c->fd, 0, SEND_TIMEOUT_S);  /* an idle client may stay */
    count(srv, PEER_C_CONNECTIONS, 1);
    count(srv, PEER_C_OPEN, 1);
    int closing = 0;
    while (!closing) {
        if (grow((void **)&c->in, &c->incap, c->inlen + 65536) < 0)
            break;
        uint64_t spin_ns = __atomic_load_n(&srv->spin_ns, __ATOMIC_RELAXED);
        uint64_t idle_from = omega_now_ns();
        if (!conn_pending(c) && !spin_for_request(c, spin_ns)) {
            /* Sleep on the socket and on the server's stop signal: a stop
             * ends the connection with a TLS close_notify. */
            struct pollfd pfd[2] = {{.fd = c->fd, .events = POLLIN},
                                    {.fd = srv->wakefd, .events = POLLIN}};
            if (poll(pfd, 2, -1) < 0 && errno != EINTR)
                break;
            if (pfd[1].revents)
                break;
            if (!pfd[0].revents)
                continue;
            omega_spin_request_came(idle_from, spin_ns, &c->spin_off);
        }
        int got = conn_read(c, c->in + c->inlen, c->incap - c->inlen);
        if (got <= 0)
            break;
        c->inlen += (size_t)got;
        size_t pos = 0;
        while (!closing && c->inlen - pos >= HEADER) {
            const uint8_t *h = c->in + pos;
            uint32_t len = get_be32(h);
            uint8_t op = h[4];
            uint64_t id = get_be64(h + 8);
            const char *bad = NULL;
            if (len < HEADER - 4 || len > PEER_MAX_FRAME)
                bad = "frame length out of range";
            else if (!known_op(op))
                bad = "unknown opcode";
            else if (h[6] || h[7])
                bad = "reserved header field is not zero";
            else if (h[5])
                bad = "request with a non-zero status";
            if (bad) {
                count(srv, PEER_C_BAD_REQUEST, 1);
                if (answer_text(c, op, id, PEER_ST_BAD_REQUEST, bad) < 0)
                    goto out;
                closing = 1;
                break;
            }
            size_t end = pos + 4 + len;
            if (end > c->inlen) {
                /* make room for the whole frame, then read the rest */
                if (grow((void **)&c->in, &c->incap, end - pos + 65536) < 0)
                    goto out;
                break;
            }
            int rc = serve(c, op, id, c->in + pos + HEADER, len - (HEADER - 4));
            if (rc < 0)
                goto out;
            if (rc > 0)
                closing = 1;
            pos = end;
            if (c->to_frames)
                break; /* nothing may follow FRAMES in TLS */
            if (c->outlen >= FLUSH_AT && flush_out(c) < 0)
                goto out;
        }
        if (pos) {
            memmove(c->in, c->in + pos, c->inlen - pos);
            c->inlen -= pos;
        }
        if (c->to_frames) {
            /* The OK goes out in TLS; a client that sent more after FRAMES
             * broke the protocol. */
            c->to_frames = 0;
            if (flush_out(c) < 0 || c->inlen || SSL_has_pending(c->ssl) ||
                !(c->fr = pc_frames_new(c->ssl, 1)))
                goto out;
            continue;
        }
        /* More of this burst already decrypted: answer it in the same write. */
        if (!closing && conn_pending(c))
            continue;
        if (c->outlen && flush_out(c) < 0)
            break;
        if (c->incap > (8u << 20) && c->inlen < 65536) {
            uint8_t *p = realloc(c->in, 65536);
            if (p) {
                c->in = p;
                c->incap = 65536;
            }
        }
    }
out:
    if (c->outlen)
        flush_out(c);
    if (!c->fr)
        SSL_shutdown(c->ssl); /* in frames a TLS record would be read as a broken frame */
    count(srv, PEER_C_OPEN, (uint64_t)-1);
}

static void *conn_main(void *arg)
{
    struct conn *c = arg;
    serve_conn(c);
    __atomic_store_n(&c->done, 1, __ATOMIC_RELEASE);
    return NULL;
}

static void conn_free(struct conn *c)
{
    pc_frames_free(c->fr);
    if (c->ssl)
        SSL_free(c->ssl);
    if (c->fd >= 0)
        close(c->fd);
    free(c->in);
    free(c->out);
    free(c->keys);
    free(c->versions);
    free(c->blobs);
    free(c->lens);
    free(c->statuses);
    free(c);
}

/* Join and free finished connections (srv->lock held). */
static void reap(struct peer_server *srv, int all)
{
    struct conn **pp = &srv->conns;
    while (*pp) {
        struct conn *c = *pp;
        if (all || __atomic_load_n(&c->done, __ATOMIC_ACQUIRE)) {
            pthread_join(c->thread, NULL);
            *pp = c->next;
            srv->nconns--;
            conn_free(c);
        } else {
            pp = &c->next;
        }
    }
}

static void *accept_main(void *arg)
{
    struct peer_server *srv = arg;
    struct pollfd pfd[2] = {{.fd = srv->lfd, .events = POLLIN},
                            {.fd = srv->wakefd, .events = POLLIN}};
    for (;;) {
        if (poll(pfd, 2, 1000) < 0 && errno != EINTR)
            break;
        if (__atomic_load_n(&srv->stopping, __ATOMIC_ACQUIRE))
            break;
        pthread_mutex_lock(&srv->lock);
        reap(srv, 0);
        pthread_mutex_unlock(&srv->lock);
        if (!(pfd[0].revents & POLLIN))
            continue;
        int fd = accept4(srv->lfd, NULL, NULL, SOCK_CLOEXEC);
        if (fd < 0)
            continue;
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        pthread_mutex_lock(&srv->lock);
        struct conn *c = srv->nconns < MAX_CONNS ? calloc(1, sizeof *c) : NULL;
        if (c) {
            c->srv = srv;
            c->fd = fd;
            if (omega_thread_create(&c->thread, conn_main, c) == 0) {
                c->next = srv->conns;
                srv->conns = c;
                srv->nconns++;
                fd = -1;
            } else {
                free(c);
            }
        }
        pthread_mutex_unlock(&srv->lock);
        if (fd >= 0)
            close(fd);
    }
    return NULL;
}

static void server_error(char *err, size_t errlen, const char *what)
{
    unsigned long e = ERR_get_error();
    char msg[256] = "";
    if (e)
        ERR_error_string_n(e, msg, sizeof msg);
    ERR_clear_error();
    snprintf(err, errlen, "%s%s%s", what, e ? ": " : "", msg);
}

static int listen_on(const char *host, int port, int *bound, char *err, size_t errlen)
{
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM,
                             .ai_flags = AI_PASSIVE};
    struct addrinfo *ai = NULL;
    char ports[8];
    snprintf(ports, sizeof ports, "%d", port);
    int e = getaddrinfo(host, ports, &hints, &ai);
    if (e) {
        snprintf(err, errlen, "resolve %s: %s", host, gai_strerror(e));
        return -1;
    }
    int fd = -1;
    int saved = 0;
    for (struct addrinfo *a = ai; a && fd < 0; a = a->ai_next) {
        fd = socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol);
        if (fd < 0)
            continue;
        int one = 1;
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        if (bind(fd, a->ai_addr, a->ai_addrlen) < 0 || listen(fd, 512) < 0) {
            saved = errno;
            close(fd);
            fd = -1;
        }
    }
    freeaddrinfo(ai);
    if (fd < 0) {
        snprintf(err, errlen, "cannot listen on %s:%d: %s", host, port, strerror(saved));
        return -1;
    }
    struct sockaddr_storage ss;
    socklen_t sl = sizeof ss;
    getsockname(fd, (struct sockaddr *)&ss, &sl);
    *bound = ntohs(ss.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&ss)->sin6_port
                                            : ((struct sockaddr_in *)&ss)->sin_port);
    return fd;
}

struct peer_server *peer_server_start(struct peer_store *pages, struct chunk_store *chunks,
                                      const char *host, int port, const char *ca,
                                      const char *cert, const char *keyfile, int *bound,
                                      char *err, size_t errlen)
{
    struct peer_server *srv = calloc(1, sizeof *srv);
    if (!srv) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    srv->pages = pages;
    srv->chunks = chunks;
    srv->lfd = srv->wakefd = -1;
    pthread_mutex_init(&srv->lock, NULL);
    srv->ctx = SSL_CTX_new(TLS_server_method());
    if (!srv->ctx || SSL_CTX_set_min_proto_version(srv->ctx, TLS1_3_VERSION) != 1 ||
        SSL_CTX_load_verify_locations(srv->ctx, ca, NULL) != 1 ||
        SSL_CTX_use_certificate_chain_file(srv->ctx, cert) != 1 ||
        SSL_CTX_use_PrivateKey_file(srv->ctx, keyfile, SSL_FILETYPE_PEM) != 1 ||
        SSL_CTX_check_private_key(srv->ctx) != 1) {
        server_error(err, errlen, "TLS identity");
        goto fail;
    }
    /* Only the cluster CA: its file is the whole trust store; a client
     * without a certificate it signed fails the handshake. */
    SSL_CTX_set_verify(srv->ctx, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, NULL);
    SSL_CTX_set_session_cache_mode(srv->ctx, SSL_SESS_CACHE_OFF);
    SSL_CTX_set_num_tickets(srv->ctx, 0);
    SSL_CTX_set_read_ahead(srv->ctx, 1); /* one read per burst, not two per record */
    srv->lfd = listen_on(host, port, bound, err, errlen);
    if (srv->lfd < 0)
        goto fail;
    srv->wakefd = eventfd(0, EFD_CLOEXEC);
    if (srv->wakefd < 0 || omega_thread_create(&srv->acceptor, accept_main, srv) != 0) {
        snprintf(err, errlen, "cannot start the acceptor: %s", strerror(errno));
        goto fail;
    }
    return srv;
fail:
    if (srv->lfd >= 0)
        close(srv->lfd);
    if (srv->wakefd >= 0)
        close(srv->wakefd);
    if (srv->ctx)
        SSL_CTX_free(srv->ctx);
    pthread_mutex_destroy(&srv->lock);
    free(srv);
    return NULL;
}

void peer_server_stop(struct peer_server *srv, uint64_t *final)
{
    if (!srv)
        return;
    __atomic_store_n(&srv->stopping, 1, __ATOMIC_RELEASE);
    uint64_t one = 1;
    if (write(srv->wakefd, &one, sizeof one) < 0) {
        /* the acceptor still sees `stopping` within its 1 s poll */
    }
    pthread_join(srv->acceptor, NULL);
    close(srv->lfd);
    pthread_mutex_lock(&srv->lock);
    /* Each thread finishes the burst it is answering and closes with a
     * close_notify when it next waits (the eventfd stays readable). One that
     * is still stuck after the grace period (a client that stopped reading
     * its answers) has its socket shut down under it. */
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (;;) {
        int busy = 0;
        for (struct conn *c = srv->conns; c; c = c->next)
            busy |= !__atomic_load_n(&c->done, __ATOMIC_ACQUIRE);
        clock_gettime(CLOCK_MONOTONIC, &t1);
        if (!busy || t1.tv_sec - t0.tv_sec >= STOP_GRACE_S)
            break;
        struct timespec pause = {0, 10 * 1000 * 1000};
        nanosleep(&pause, NULL);
    }
    for (struct conn *c = srv->conns; c; c = c->next)
        if (!__atomic_load_n(&c->done, __ATOMIC_ACQUIRE))
            shutdown(c->fd, SHUT_RDWR);
    reap(srv, 1);
    pthread_mutex_unlock(&srv->lock);
    if (final)
        peer_server_counters(srv, final);
    close(srv->wakefd);
    SSL_CTX_free(srv->ctx);
    pthread_mutex_destroy(&srv->lock);
    free(srv);
}

void peer_server_set_spin(struct peer_server *srv, uint64_t spin_ns)
{
    __atomic_store_n(&srv->spin_ns, spin_ns, __ATOMIC_RELAXED);
}

void peer_server_counters(struct peer_server *srv, uint64_t *out)
{
    for (int i = 0; i < PEER_C_COUNT; i++)
        out[i] = __atomic_load_n(&srv->counters[i], __ATOMIC_RELAXED);
}
