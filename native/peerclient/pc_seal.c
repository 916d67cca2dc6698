/*
 * AES-256-GCM sealing and opening, byte-compatible with hypervisor/sealing.py:
 * blob = 01 | 12-byte random nonce | ciphertext | 16-byte tag, associated
 * data = the aad prefix (kind, owner) followed by index and version (u64
 * big-endian each), so a blob opened as another index or version fails.
 *
 * The cipher is OpenSSL's, or, where the build found Intel's ipsec-mb
 * library (libipsec-mb-dev) and the CPU has AVX-512 with VAES, ipsec-mb's
 * direct GCM functions: on this box they seal a 4 KiB page in 0.42 µs
 * against OpenSSL 3.0's 1.13 µs (BENCHMARKS.md), and a page crosses the
 * cipher at least once more on its way in or out.  Both give the same
 * bytes (tests cross-check both with the Python sealer).  OMEGA_SEAL_OPENSSL=1
 * when a sealer is made keeps it on OpenSSL, for comparisons.
 */
#include <errno.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/rand.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "peerclient.h"

#ifdef OMEGA_HAVE_IPSEC_MB
#include <intel-ipsec-mb.h>

/* One manager for the process: the direct GCM calls only read its
 * function pointers, so every thread may use it at once. */
static IMB_MGR *imb_mgr;
static pthread_once_t imb_once = PTHREAD_ONCE_INIT;

static void imb_setup(void)
{
    IMB_MGR *m = alloc_mb_mgr(0);
    if (!m)
        return;
    IMB_ARCH arch = IMB_ARCH_NONE;
    init_mb_mgr_auto(m, &arch);
    if (imb_get_errno(m) != 0 || arch != IMB_ARCH_AVX512 ||
        !(m->features & IMB_FEATURE_VAES) || !(m->features & IMB_FEATURE_VPCLMULQDQ)) {
        free_mb_mgr(m); /* no gain over OpenSSL's AES-NI code measured there */
        return;
    }
    imb_mgr = m;
}

/* The manager for a new sealer, or NULL for OpenSSL (also when
 * OMEGA_SEAL_OPENSSL is set and not 0: read per sealer, so tests can
 * cross-check both in one process). */
static IMB_MGR *imb(void)
{
    const char *off = getenv("OMEGA_SEAL_OPENSSL");
    if (off && *off && strcmp(off, "0") != 0)
        return NULL;
    pthread_once(&imb_once, imb_setup);
    return imb_mgr;
}
#endif

const char *pc_seal_engine(void)
{
#ifdef OMEGA_HAVE_IPSEC_MB
    if (imb())
        return "ipsec-mb";
#endif
    return "openssl";
}

int pc_gcm_init(struct pc_gcm *g, const uint8_t *key)
{
    memset(g, 0, sizeof *g);
#ifdef OMEGA_HAVE_IPSEC_MB
    IMB_MGR *m = imb();
    if (m) {
        g->imb = aligned_alloc(64, (sizeof *g->imb + 63) & ~(size_t)63);
        if (!g->imb)
            return -ENOMEM;
        IMB_AES256_GCM_PRE(m, key, g->imb);
        return 0;
    }
#endif
    g->enc = EVP_CIPHER_CTX_new();
    g->dec = EVP_CIPHER_CTX_new();
    if (!g->enc || !g->dec ||
        EVP_EncryptInit_ex(g->enc, EVP_aes_256_gcm(), NULL, key, NULL) != 1 ||
        EVP_DecryptInit_ex(g->dec, EVP_aes_256_gcm(), NULL, key, NULL) != 1) {
        ERR_clear_error();
        pc_gcm_free(g);
        return -ENOMEM;
    }
    return 0;
}

void pc_gcm_free(struct pc_gcm *g)
{
    if (g->enc)
        EVP_CIPHER_CTX_free(g->enc);
    if (g->dec)
        EVP_CIPHER_CTX_free(g->dec);
#ifdef OMEGA_HAVE_IPSEC_MB
    if (g->imb) {
        OPENSSL_cleanse(g->imb, sizeof *g->imb);
        free(g->imb);
    }
#endif
    memset(g, 0, sizeof *g);
}

int pc_gcm_seal(struct pc_gcm *g, const uint8_t *nonce, const uint8_t *aad, size_t aad_len,
                const uint8_t *in, size_t n, uint8_t *out, uint8_t *tag)
{
    if (n > (size_t)1 << 30)
        return -EIO;
#ifdef OMEGA_HAVE_IPSEC_MB
    if (g->imb) {
        struct gcm_context_data ctx;
        IMB_AES256_GCM_ENC(imb_mgr, g->imb, &ctx, out, in, n, nonce, aad, aad_len, tag,
                           PC_SEAL_TAG);
        return 0;
    }
#endif
    int outl = 0;
    if (EVP_EncryptInit_ex(g->enc, NULL, NULL, NULL, nonce) != 1 ||
        EVP_EncryptUpdate(g->enc, NULL, &outl, aad, (int)aad_len) != 1 ||
        EVP_EncryptUpdate(g->enc, out, &outl, in, (int)n) != 1 ||
        EVP_EncryptFinal_ex(g->enc, out + outl, &outl) != 1 ||
        EVP_CIPHER_CTX_ctrl(g->enc, EVP_CTRL_GCM_GET_TAG, PC_SEAL_TAG, tag) != 1) {
        ERR_clear_error();
        return -EIO;
    }
    return 0;
}

int pc_gcm_open(struct pc_gcm *g, const uint8_t *nonce, const uint8_t *aad, size_t aad_len,
                const uint8_t *in, size_t n, uint8_t *out, const uint8_t *tag)
{
    if (n > (size_t)1 << 30)
        return -EBADMSG;
#ifdef OMEGA_HAVE_IPSEC_MB
    if (g->imb) {
        struct gcm_context_data ctx;
        uint8_t want[PC_SEAL_TAG];
        IMB_AES256_GCM_DEC(imb_mgr, g->imb, &ctx, out, in, n, nonce, aad, aad_len, want,
                           PC_SEAL_TAG);
        if (CRYPTO_memcmp(want, tag, PC_SEAL_TAG) != 0) {
            memset(out, 0, n); /* nothing unauthenticated leaves */
            return -EBADMSG;
        }
        return 0;
    }
#endif
    int outl = 0;
    if (EVP_DecryptInit_ex(g->dec, NULL, NULL, NULL, nonce) != 1 ||
        EVP_DecryptUpdate(g->dec, NULL, &outl, aad, (int)aad_len) != 1 ||
        EVP_DecryptUpdate(g->dec, out, &outl, in, (int)n) != 1 ||
        EVP_CIPHER_CTX_ctrl(g->dec, EVP_CTRL_GCM_SET_TAG, PC_SEAL_TAG, (void *)tag) != 1 ||
        EVP_DecryptFinal_ex(g->dec, out + outl, &outl) != 1) {
        ERR_clear_error();
        memset(out, 0, n);
        return -EBADMSG;
    }
    return 0;
}

/* Forks of this process so far, as seen by each child (a pthread_atfork
 * handler). A sealer remembers the count its nonce pool was drawn at: this
 * costs no syscall per seal, where getpid() (not cached by glibc) was one
 * per sealed block on the host's write path. */
static unsigned fork_count;
static pthread_once_t fork_once = PTHREAD_ONCE_INIT;

static void count_fork(void)
{
    __atomic_add_fetch(&fork_count, 1, __ATOMIC_RELAXED);
}

static void watch_forks(void)
{
    pthread_atfork(NULL, NULL, count_fork);
}

int pc_sealer_init(struct pc_sealer *s, const uint8_t *key, const uint8_t *aad_prefix,
                   size_t aad_len)
{
    memset(s, 0, sizeof *s);
    if (aad_len > PC_AAD_MAX)
        return -EINVAL;
    memcpy(s->aad, aad_prefix, aad_len);
    s->aad_len = aad_len;
    pthread_once(&fork_once, watch_forks);
    s->pool_forks = __atomic_load_n(&fork_count, __ATOMIC_RELAXED);
    return pc_gcm_init(&s->gcm, key);
}

void pc_sealer_free(struct pc_sealer *s)
{
    pc_gcm_free(&s->gcm);
    OPENSSL_cleanse(s, sizeof *s);
}

/* A fresh random nonce. One RAND_bytes call serves 256 of them (a call
 * cost ~0.7 µs here, more than sealing a page with ipsec-mb); the pool is
 * drawn again in a forked child, so two processes never share nonces. */
static int fresh_nonce(struct pc_sealer *s, uint8_t *nonce)
{
    unsigned forks = __atomic_load_n(&fork_count, __ATOMIC_RELAXED);
    if (s->pool_left < PC_SEAL_NONCE || s->pool_forks != forks) {
        if (RAND_bytes(s->pool, sizeof s->pool) != 1)
            return -1;
        s->pool_left = sizeof s->pool;
        s->pool_forks = forks;
    }
    memcpy(nonce, s->pool + sizeof s->pool - s->pool_left, PC_SEAL_NONCE);
    s->pool_left -= PC_SEAL_NONCE;
    return 0;
}

static const uint8_t *full_aad(struct pc_sealer *s, uint64_t index, uint64_t version)
{
    pc_put64(s->aad + s->aad_len, index);
    pc_put64(s->aad + s->aad_len + 8, version);
    return s->aad;
}

int pc_seal(struct pc_sealer *s, uint64_t index, uint64_t version, const uint8_t *plain,
            size_t len, uint8_t *out)
{
    uint8_t *nonce = out + 1, *ct = out + 1 + PC_SEAL_NONCE;
    out[0] = PC_SEAL_FORMAT;
    if (fresh_nonce(s, nonce) < 0) { /* pc_gcm_seal bounds len */
        ERR_clear_error();
        return -EIO;
    }
    return pc_gcm_seal(&s->gcm, nonce, full_aad(s, index, version), s->aad_len + 16, plain,
                       len, ct, ct + len);
}

int pc_open(struct pc_sealer *s, uint64_t index, uint64_t version, const uint8_t *blob,
            size_t blen, uint8_t *out, size_t len)
{
    if (blen != PC_SEAL_OVERHEAD + len || blob[0] != PC_SEAL_FORMAT)
        return -EBADMSG; /* pc_gcm_open bounds len */
    const uint8_t *ct = blob + 1 + PC_SEAL_NONCE;
    return pc_gcm_open(&s->gcm, blob + 1, full_aad(s, index, version), s->aad_len + 16, ct,
                       len, out, ct + len);
}
