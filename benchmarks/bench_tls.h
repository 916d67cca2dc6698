/*
 * TLS contexts for the C benchmarks' own loopback links (netblock_ceiling.c,
 * peer_rtt_ceiling.c): TLS 1.3 with AES-128-GCM only and read-ahead, as
 * Omega's peer links. A server gets a throw-away self-signed P-256
 * certificate and sends no session tickets, so frames (pc_frames.c) may
 * start right after the handshake. Clients do not verify: only the links'
 * speed is measured. NULL on failure.
 */
#ifndef OMEGA_BENCH_TLS_H
#define OMEGA_BENCH_TLS_H

#include <openssl/evp.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>

static SSL_CTX *bench_tls_ctx(int server)
{
    SSL_CTX *c = SSL_CTX_new(server ? TLS_server_method() : TLS_client_method());
    if (!c)
        return NULL;
    SSL_CTX_set_min_proto_version(c, TLS1_3_VERSION);
    SSL_CTX_set_ciphersuites(c, "TLS_AES_128_GCM_SHA256");
    SSL_CTX_set_read_ahead(c, 1);
    if (!server)
        return c;
    SSL_CTX_set_num_tickets(c, 0);
    EVP_PKEY *k = EVP_EC_gen("P-256");
    X509 *x = X509_new();
    int ok = k && x;
    if (ok) {
        ASN1_INTEGER_set(X509_get_serialNumber(x), 1);
        X509_gmtime_adj(X509_getm_notBefore(x), 0);
        X509_gmtime_adj(X509_getm_notAfter(x), 3600);
        X509_set_pubkey(x, k);
        X509_NAME_add_entry_by_txt(X509_get_subject_name(x), "CN", MBSTRING_ASC,
                                   (const unsigned char *)"peer", -1, -1, 0);
        X509_set_issuer_name(x, X509_get_subject_name(x));
        ok = X509_sign(x, k, EVP_sha256()) && SSL_CTX_use_certificate(c, x) == 1 &&
             SSL_CTX_use_PrivateKey(c, k) == 1;
    }
    X509_free(x);
    EVP_PKEY_free(k);
    if (!ok) {
        SSL_CTX_free(c);
        return NULL;
    }
    return c;
}

#endif
