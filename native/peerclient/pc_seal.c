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

IMB_MGR *pc_seal_imb(void)
{
    return imb();
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

int pc_sealer_init(struct pc_sealer *s, const uint8_t *key, const uint8_t *aad_prefix,
                   size_t aad_len)
{
    memset(s, 0, sizeof *s);
    if (aad_len > PC_AAD_MAX)
        return -EINVAL;
    memcpy(s->aad, aad_prefix, aad_len);
    s->aad_len = aad_len;
#ifdef OMEGA_HAVE_IPSEC_MB
    IMB_MGR *m = imb();
    if (m) {
        s->imb = aligned_alloc(64, (sizeof *s->imb + 63) & ~(size_t)63);
        if (!s->imb)
            return -ENOMEM;
        IMB_AES256_GCM_PRE(m, key, s->imb);
        return 0;
    }
#endif
    s->enc = EVP_CIPHER_CTX_new();
    s->dec = EVP_CIPHER_CTX_new();
    if (!s->enc || !s->dec ||
        EVP_EncryptInit_ex(s->enc, EVP_aes_256_gcm(), NULL, key, NULL) != 1 ||
        EVP_DecryptInit_ex(s->dec, EVP_aes_256_gcm(), NULL, key, NULL) != 1) {
        ERR_clear_error();
        pc_sealer_free(s);
        return -ENOMEM;
    }
    return 0;
}

void pc_sealer_free(struct pc_sealer *s)
{
    if (s->enc)
        EVP_CIPHER_CTX_free(s->enc);
    if (s->dec)
        EVP_CIPHER_CTX_free(s->dec);
#ifdef OMEGA_HAVE_IPSEC_MB
    if (s->imb) {
        OPENSSL_cleanse(s->imb, sizeof *s->imb);
        free(s->imb);
    }
#endif
    OPENSSL_cleanse(s, sizeof *s);
}

/* A fresh random nonce. One RAND_bytes call serves 256 of them (a call
 * cost ~0.7 µs here, more than sealing a page with ipsec-mb); the pool is
 * drawn again in a forked child, so two processes never share nonces. */
static int fresh_nonce(struct pc_sealer *s, uint8_t *nonce)
{
    int pid = (int)getpid();
    if (s->pool_left < PC_SEAL_NONCE || s->pool_pid != pid) {
        if (RAND_bytes(s->pool, sizeof s->pool) != 1)
            return -1;
        s->pool_left = sizeof s->pool;
        s->pool_pid = pid;
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
    int outl = 0;
    uint8_t *nonce = out + 1, *ct = out + 1 + PC_SEAL_NONCE;
    out[0] = PC_SEAL_FORMAT;
    if (len > (size_t)1 << 30 || fresh_nonce(s, nonce) < 0) {
        ERR_clear_error();
        return -EIO;
    }
#ifdef OMEGA_HAVE_IPSEC_MB
    if (s->imb) {
        struct gcm_context_data ctx;
        IMB_AES256_GCM_ENC(imb_mgr, s->imb, &ctx, ct, plain, len, nonce,
                           full_aad(s, index, version), s->aad_len + 16, ct + len,
                           PC_SEAL_TAG);
        return 0;
    }
#endif
    if (EVP_EncryptInit_ex(s->enc, NULL, NULL, NULL, nonce) != 1 ||
        EVP_EncryptUpdate(s->enc, NULL, &outl, full_aad(s, index, version),
                          (int)(s->aad_len + 16)) != 1 ||
        EVP_EncryptUpdate(s->enc, ct, &outl, plain, (int)len) != 1 ||
        EVP_EncryptFinal_ex(s->enc, ct + outl, &outl) != 1 ||
        EVP_CIPHER_CTX_ctrl(s->enc, EVP_CTRL_GCM_GET_TAG, PC_SEAL_TAG, ct + len) != 1) {
        ERR_clear_error();
        return -EIO;
    }
    return 0;
}

int pc_open(struct pc_sealer *s, uint64_t index, uint64_t version, const uint8_t *blob,
            size_t blen, uint8_t *out, size_t len)
{
    if (blen != PC_SEAL_OVERHEAD + len || blob[0] != PC_SEAL_FORMAT || len > (size_t)1 << 30)
        return -EBADMSG;
    int outl = 0;
    const uint8_t *ct = blob + 1 + PC_SEAL_NONCE;
#ifdef OMEGA_HAVE_IPSEC_MB
    if (s->imb) {
        struct gcm_context_data ctx;
        uint8_t tag[PC_SEAL_TAG];
        IMB_AES256_GCM_DEC(imb_mgr, s->imb, &ctx, out, ct, len, blob + 1,
                           full_aad(s, index, version), s->aad_len + 16, tag, PC_SEAL_TAG);
        if (CRYPTO_memcmp(tag, ct + len, PC_SEAL_TAG) != 0) {
            memset(out, 0, len); /* nothing unauthenticated leaves */
            return -EBADMSG;
        }
        return 0;
    }
#endif
    if (EVP_DecryptInit_ex(s->dec, NULL, NULL, NULL, blob + 1) != 1 ||
        EVP_DecryptUpdate(s->dec, NULL, &outl, full_aad(s, index, version),
                          (int)(s->aad_len + 16)) != 1 ||
        EVP_DecryptUpdate(s->dec, out, &outl, ct, (int)len) != 1 ||
        EVP_CIPHER_CTX_ctrl(s->dec, EVP_CTRL_GCM_SET_TAG, PC_SEAL_TAG, (void *)(ct + len)) != 1 ||
        EVP_DecryptFinal_ex(s->dec, out + outl, &outl) != 1) {
        ERR_clear_error();
        return -EBADMSG;
    }
    return 0;
}
