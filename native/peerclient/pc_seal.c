/*
 * AES-256-GCM sealing and opening, byte-compatible with hypervisor/sealing.py:
 * blob = 01 | 12-byte random nonce | ciphertext | 16-byte tag, associated
 * data = the aad prefix (kind, owner) followed by index and version (u64
 * big-endian each), so a blob opened as another index or version fails.
 */
#include <errno.h>
#include <openssl/err.h>
#include <openssl/rand.h>
#include <string.h>

#include "peerclient.h"

int pc_sealer_init(struct pc_sealer *s, const uint8_t *key, const uint8_t *aad_prefix,
                   size_t aad_len)
{
    memset(s, 0, sizeof *s);
    if (aad_len > PC_AAD_MAX)
        return -EINVAL;
    memcpy(s->aad, aad_prefix, aad_len);
    s->aad_len = aad_len;
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
    OPENSSL_cleanse(s, sizeof *s);
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
    if (len > (size_t)1 << 30 || RAND_bytes(nonce, PC_SEAL_NONCE) != 1 ||
        EVP_EncryptInit_ex(s->enc, NULL, NULL, NULL, nonce) != 1 ||
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
