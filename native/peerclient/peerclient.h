/*
 * The client side of the peer wire (hypervisor/node/wire.py), in C: what a
 * cluster member needs to talk to nodes' data ports without the
 * interpreter. Shared by the DSM fault handler (native/dsm) and the
 * replicated NBD backend (native/nbd); compiled into both modules.
 *
 *   pc_conn.c   mutual-TLS connections to a node (OpenSSL: this node's
 *               certificate, the cluster CA as the only trust anchor, the
 *               node's name checked against its certificate), framed
 *               requests and answers, an optional busy-poll before sleeping
 *   pc_frames.c after the TLS handshake, AES-256-GCM frames under keys from
 *               the TLS exporter instead of TLS records (cheaper per
 *               message; the node's data port agrees with a FRAMES request)
 *   pc_seal.c   AES-256-GCM sealing and opening of blobs (OpenSSL, or Intel's
 *               ipsec-mb library where the CPU has VAES), byte-compatible
 *               with hypervisor/sealing.py (01 | nonce | ciphertext | tag,
 *               associated data = build_aad(kind, owner, index, version))
 *
 * Thread model: a struct pc_tls is shared and read-only after pc_tls_new;
 * a struct pc_conn or struct pc_sealer belongs to one thread at a time.
 *
 * Return conventions: 0 or a length on success, a negative errno on failure.
 */
#ifndef OMEGA_PEERCLIENT_H
#define OMEGA_PEERCLIENT_H

#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>

#include <openssl/evp.h>
#include <openssl/ssl.h>

/* Wire constants (hypervisor/node/wire.py). */
#define PC_HEADER 16
#define PC_MAX_FRAME (64u << 20)
#define PC_MAX_BATCH 4096
#define PC_OP_PING 0x01
#define PC_OP_PUT 0x10
#define PC_OP_GET 0x11
#define PC_OP_DELETE 0x12
#define PC_OP_BATCH_GET 0x13
#define PC_OP_BATCH_PUT 0x14
#define PC_OP_FRAMES 0x18    /* switch this connection to pc_frames.c */
#define PC_ST_OK 0
#define PC_ST_NOT_FOUND 1
#define PC_ST_FULL 2
#define PC_ST_STALE 3
#define PC_NS_PAGE 0
#define PC_NS_CHUNK 1

/* Sealed blob layout (hypervisor/sealing.py). */
#define PC_SEAL_FORMAT 0x01
#define PC_SEAL_NONCE 12
#define PC_SEAL_TAG 16
#define PC_SEAL_OVERHEAD (1 + PC_SEAL_NONCE + PC_SEAL_TAG)
#define PC_AAD_MAX 600

/* A TLS client identity: this node's certificate and key, the cluster CA. */
struct pc_tls {
    SSL_CTX *ctx;
};

/* Plaintext bytes per frame of pc_frames.c (a frame adds 20). */
#define PC_FRAMES_MAX (64u << 10)
struct pc_frames;

/* One connection to one node. fd < 0: not connected. */
struct pc_conn {
    int fd;
    SSL *ssl;
    struct pc_frames *fr; /* after the FRAMES switch: the frames, not TLS records */
    int no_frames;        /* the node refused FRAMES: stay in TLS on reconnects */
    uint8_t *buf;        /* the last answer's payload (and the request being sent) */
    size_t cap;
    uint64_t next_id;
};

/* An AES-256-GCM key (pc_seal.c): Intel ipsec-mb's expanded key `imb` where
 * the CPU has VAES, else OpenSSL contexts (the other side stays NULL). */
struct gcm_key_data;
struct pc_gcm {
    EVP_CIPHER_CTX *enc, *dec;
    struct gcm_key_data *imb;
};

/* The sealer's key and the aad without index and version. */
#define PC_NONCE_POOL (256 * PC_SEAL_NONCE) /* random bytes drawn at once */
struct pc_sealer {
    struct pc_gcm gcm;
    uint8_t aad[PC_AAD_MAX + 16];
    size_t aad_len;
    uint8_t pool[PC_NONCE_POOL]; /* nonces to come (public once used) */
    size_t pool_left;
    unsigned pool_forks;         /* pc_seal.c's fork count when they were drawn */
};

/* pc_conn.c */
int pc_tls_init(struct pc_tls *t, const char *ca, const char *cert, const char *keyfile,
                char *err, size_t errlen);
void pc_tls_free(struct pc_tls *t);
void pc_conn_init(struct pc_conn *c);
/* Connect and handshake with node `name` at host:port; every later read or
 * write gives up after timeout_ms. 0 ok, -errno (a reason in err). */
int pc_conn_open(struct pc_tls *t, struct pc_conn *c, const char *name, const char *host,
                 const char *port, int timeout_ms, char *err, size_t errlen);
void pc_conn_close(struct pc_conn *c);   /* also frees the buffer */
int pc_conn_is_open(const struct pc_conn *c);
/* Send one request frame: header, then the iovecs as its payload, in one
 * TLS write. Returns the request id (> 0), or -errno (the connection is
 * closed). */
int64_t pc_send(struct pc_conn *c, uint8_t op, const struct iovec *iov, int niov);
/* Read one answer frame; its payload lands in c->buf. Waits awake for up to
 * spin_ns before sleeping on the socket. Returns the payload length with
 * *op, *status and *id set, or -errno (the connection is closed). */
long pc_recv(struct pc_conn *c, uint64_t spin_ns, uint8_t *op, uint8_t *status, uint64_t *id);
/* pc_send then pc_recv of the matching answer. Payload length or -errno;
 * -EPROTO when the answer does not match the request (connection closed). */
long pc_call(struct pc_conn *c, uint8_t op, const struct iovec *iov, int niov,
             uint64_t spin_ns, uint8_t *status);
uint64_t pc_now_ns(void);

/* Big-endian wire integers. */
static inline void pc_put64(uint8_t *p, uint64_t v)
{
    for (int i = 7; i >= 0; i--, v >>= 8)
        p[i] = (uint8_t)v;
}
static inline void pc_put32(uint8_t *p, uint32_t v)
{
    for (int i = 3; i >= 0; i--, v >>= 8)
        p[i] = (uint8_t)v;
}
static inline uint64_t pc_get64(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 0; i < 8; i++)
        v = (v << 8) | p[i];
    return v;
}
static inline uint32_t pc_get32(const uint8_t *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

/* One item of a BATCH_GET answer: found (u8) | version (u64) | length (u32) | blob. */
struct pc_item {
    int found;
    uint64_t version;
    const uint8_t *blob;
    uint32_t len;
};

/* Parse the item at *pos of an answer of n bytes into it and move *pos past
 * it. 0, or -1 when the answer ends inside the item (*pos unchanged). */
static inline int pc_next_item(const uint8_t *ans, size_t n, size_t *pos, struct pc_item *it)
{
    size_t at = *pos;
    if (at + 13 > n)
        return -1;
    it->found = ans[at];
    it->version = pc_get64(ans + at + 1);
    it->len = pc_get32(ans + at + 9);
    if (at + 13 + it->len > n)
        return -1;
    it->blob = ans + at + 13;
    *pos = at + 13 + it->len;
    return 0;
}

/* pc_frames.c: a byte stream in AES-256-GCM frames over fd, keyed from ssl's
 * finished TLS 1.3 handshake (server: the accepting end). NULL when the
 * session is not TLS 1.3 or memory ran out. */
struct pc_frames *pc_frames_new(SSL *ssl, int server);
void pc_frames_free(struct pc_frames *f);
/* Send n bytes (in frames of at most PC_FRAMES_MAX). 0 or -errno. */
int pc_frames_write(struct pc_frames *f, int fd, const uint8_t *p, size_t n);
/* Read up to n bytes, at least one (blocking as fd does). > 0 bytes, 0 at
 * end of stream, -EIO, -EPROTO (oversized frame), -EBADMSG (a frame failed
 * its tag: dropped, repeated, reordered or changed). */
long pc_frames_read(struct pc_frames *f, int fd, uint8_t *p, size_t n);
/* Whether a read would return without reading fd. */
int pc_frames_pending(struct pc_frames *f);

/* pc_seal.c */
/* key: 32 bytes; aad_prefix: build_aad(kind, owner, 0, 0) without its last
 * 16 bytes. 0 ok, -EINVAL, -ENOMEM. */
int pc_sealer_init(struct pc_sealer *s, const uint8_t *key, const uint8_t *aad_prefix,
                   size_t aad_len);
void pc_sealer_free(struct pc_sealer *s);
/* "ipsec-mb" or "openssl": the cipher code a sealer made now would use. */
const char *pc_seal_engine(void);
/* Key g (32 bytes) with the engine a sealer made now would use. 0, -ENOMEM. */
int pc_gcm_init(struct pc_gcm *g, const uint8_t *key);
void pc_gcm_free(struct pc_gcm *g);
/* Encrypt n bytes of in to out (may be in) under a 12-byte nonce and aad;
 * the 16-byte tag goes to tag. 0, -EIO. */
int pc_gcm_seal(struct pc_gcm *g, const uint8_t *nonce, const uint8_t *aad, size_t aad_len,
                const uint8_t *in, size_t n, uint8_t *out, uint8_t *tag);
/* Decrypt n bytes of in to out (may be in) and check tag; on failure out is
 * zeroed. 0, -EBADMSG. */
int pc_gcm_open(struct pc_gcm *g, const uint8_t *nonce, const uint8_t *aad, size_t aad_len,
                const uint8_t *in, size_t n, uint8_t *out, const uint8_t *tag);
/* Seal len bytes into out (len + PC_SEAL_OVERHEAD bytes). 0 ok, -EIO. */
int pc_seal(struct pc_sealer *s, uint64_t index, uint64_t version, const uint8_t *plain,
            size_t len, uint8_t *out);
/* Open a blob of blen bytes into out (exactly len bytes of plaintext).
 * 0 ok, -EBADMSG (wrong length, format, key, index, version or any bit). */
int pc_open(struct pc_sealer *s, uint64_t index, uint64_t version, const uint8_t *blob,
            size_t blen, uint8_t *out, size_t len);

#endif
