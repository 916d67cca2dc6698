/*
 * AES-256-GCM frames on a connection whose TLS 1.3 handshake is done.
 *
 * After a native client and a node's data port agree on it (the FRAMES
 * request, answered OK inside TLS), both stop sending TLS records and
 * protect their frames themselves, as QUIC protects its packets after a TLS
 * handshake and Ceph's msgr2 its frames in secure mode:
 *
 *   frame  = u32 big-endian n | ciphertext (n bytes) | 16-byte tag
 *   key/iv = per direction, from the TLS exporter (RFC 8446 section 7.5,
 *            label "EXPORTER-omega-frames"): 2 x (32-byte key, 12-byte iv),
 *            the client's direction first
 *   nonce  = iv XOR the frame's sequence number in that direction (its
 *            last 8 bytes, big-endian), as TLS 1.3 builds record nonces
 *   aad    = the 4 length bytes
 *
 * So the keys are bound to the authenticated handshake (mutual, cluster CA),
 * each direction has its own key and nonce sequence, a frame dropped,
 * repeated, reordered, cut or changed fails its tag, and the connection is
 * then closed. Why not stay in TLS: OpenSSL 3.0's record layer costs about
 * 2 µs a record here beyond the cipher (BENCHMARKS.md, "the round trip
 * alone"), four records per remote page fault; ipsec-mb's VAES GCM (where
 * the CPU has it, pc_seal.c) also runs bulk data at twice OpenSSL 3.0's rate.
 */
#include <errno.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "peerclient.h"

#define LABEL "EXPORTER-omega-frames"
#define KEY 32
#define IV 12
#define TAG 16
#define RAW_MIN (256u << 10) /* the receive buffer: several whole frames */
_Static_assert(RAW_MIN > 4 + PC_FRAMES_MAX + TAG, "a whole frame fits the receive buffer");

struct direction {
    struct pc_gcm gcm;   /* the sealer's cipher code (pc_seal.c) */
    uint8_t iv[IV];
    uint64_t seq;        /* frames sealed or opened so far */
};

struct pc_frames {
    struct direction tx, rx;
    uint8_t *raw;        /* bytes received: [pos, len) not yet consumed */
    size_t cap, pos, len;
    size_t pcur, pend;   /* the opened frame's plaintext not yet read: raw[pcur, pend) */
    uint8_t *out;        /* the frame being sent */
    size_t outcap;
};

static int direction_init(struct direction *d, const uint8_t *key, const uint8_t *iv)
{
    memcpy(d->iv, iv, IV);
    d->seq = 0;
    return pc_gcm_init(&d->gcm, key);
}

static void direction_free(struct direction *d)
{
    pc_gcm_free(&d->gcm);
    OPENSSL_cleanse(d, sizeof *d);
}

/* The next nonce of d. -EOVERFLOW after 2^64 - 1 frames. */
static int next_nonce(struct direction *d, uint8_t nonce[IV])
{
    if (d->seq == UINT64_MAX)
        return -EOVERFLOW;
    memcpy(nonce, d->iv, IV);
    for (int i = 0; i < 8; i++)
        nonce[IV - 1 - i] ^= (uint8_t)(d->seq >> (8 * i));
    d->seq++;
    return 0;
}

struct pc_frames *pc_frames_new(SSL *ssl, int server)
{
    uint8_t km[2 * (KEY + IV)];
    struct pc_frames *f = calloc(1, sizeof *f);
    if (!f)
        return NULL;
    if (SSL_version(ssl) != TLS1_3_VERSION ||
        SSL_export_keying_material(ssl, km, sizeof km, LABEL, sizeof LABEL - 1, NULL, 0,
                                   0) != 1) {
        ERR_clear_error();
        free(f);
        return NULL;
    }
    const uint8_t *c2s = km, *s2c = km + KEY + IV;
    const uint8_t *tx = server ? s2c : c2s, *rx = server ? c2s : s2c;
    int rc = direction_init(&f->tx, tx, tx + KEY);
    if (!rc)
        rc = direction_init(&f->rx, rx, rx + KEY);
    OPENSSL_cleanse(km, sizeof km);
    if (rc < 0) {
        pc_frames_free(f);
        return NULL;
    }
    return f;
}

void pc_frames_free(struct pc_frames *f)
{
    if (!f)
        return;
    direction_free(&f->tx);
    direction_free(&f->rx);
    free(f->raw);
    free(f->out);
    free(f);
}

int pc_frames_write(struct pc_frames *f, int fd, const uint8_t *p, size_t n)
{
    /* every frame of the write sealed into one buffer, sent by one write */
    size_t frames = (n + PC_FRAMES_MAX - 1) / PC_FRAMES_MAX;
    size_t want = n + frames * (4 + TAG);
    if (want > f->outcap) {
        uint8_t *o = realloc(f->out, want);
        if (!o)
            return -ENOMEM;
        f->out = o;
        f->outcap = want;
    }
    uint8_t *o = f->out;
    while (n) {
        size_t part = n > PC_FRAMES_MAX ? PC_FRAMES_MAX : n;
        uint8_t nonce[IV];
        pc_put32(o, (uint32_t)part);
        int rc = next_nonce(&f->tx, nonce);
        if (!rc)
            rc = pc_gcm_seal(&f->tx.gcm, nonce, o, 4, p, part, o + 4, o + 4 + part);
        if (rc < 0)
            return rc;
        o += 4 + part + TAG;
        p += part;
        n -= part;
    }
    for (size_t off = 0; off < want;) {
        ssize_t w = write(fd, f->out + off, want - off);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return -EIO;
        off += (size_t)w;
    }
    if (f->outcap > (8u << 20)) { /* a huge answer is sent: give the memory back */
        free(f->out);
        f->out = NULL;
        f->outcap = 0;
    }
    return 0;
}

/* Open the next whole frame in the buffer, if there is one: straight into
 * dst when its plaintext is not empty and fits the room there (no copy
 * through the buffer: *got = its length), else in place.  2 opened into
 * dst, 1 opened in place, 0 none whole yet, -EPROTO / -EBADMSG. */
static int open_next(struct pc_frames *f, uint8_t *dst, size_t room, size_t *got)
{
    if (f->len - f->pos < 4)
        return 0;
    uint32_t n = pc_get32(f->raw + f->pos);
    if (n > PC_FRAMES_MAX)
        return -EPROTO;
    if (f->len - f->pos < 4 + (size_t)n + TAG)
        return 0;
    uint8_t *body = f->raw + f->pos + 4, nonce[IV];
    uint8_t *out = dst && n && n <= room ? dst : body;
    if (next_nonce(&f->rx, nonce) < 0 ||
        pc_gcm_open(&f->rx.gcm, nonce, f->raw + f->pos, 4, body, n, out, body + n) < 0)
        return -EBADMSG;
    f->pos += 4 + (size_t)n + TAG;
    if (out == dst) {
        *got = n;
        return 2;
    }
    f->pcur = (size_t)(body - f->raw);
    f->pend = f->pcur + n;
    return 1;
}

int pc_frames_pending(struct pc_frames *f)
{
    if (f->pcur < f->pend)
        return 1;
    return open_next(f, NULL, 0, NULL) != 0; /* an error is reported by the read that follows */
}

long pc_frames_read(struct pc_frames *f, int fd, uint8_t *p, size_t n)
{
    for (;;) {
        if (f->pcur < f->pend) {
            size_t k = f->pend - f->pcur < n ? f->pend - f->pcur : n;
            memcpy(p, f->raw + f->pcur, k);
            f->pcur += k;
            return (long)k;
        }
        size_t direct = 0;
        int rc = open_next(f, p, n, &direct);
        if (rc < 0)
            return rc;
        if (rc == 2)
            return (long)direct; /* a whole frame the caller had room for */
        if (rc)
            continue;
        /* Need more bytes: move the partial frame to the front, read what
         * has arrived. */
        if (f->pos) {
            memmove(f->raw, f->raw + f->pos, f->len - f->pos);
            f->len -= f->pos;
            f->pcur = f->pend = f->pos = 0;
        }
        if (!f->raw) { /* RAW_MIN holds any whole frame (open_next checks) */
            if (!(f->raw = malloc(RAW_MIN)))
                return -ENOMEM;
            f->cap = RAW_MIN;
        }
        ssize_t got = read(fd, f->raw + f->len, f->cap - f->len);
        if (got < 0 && errno == EINTR)
            continue;
        if (got == 0)
            return 0;
        if (got < 0)
            return -EIO;
        f->len += (size_t)got;
    }
}
