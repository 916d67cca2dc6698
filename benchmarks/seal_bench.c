/*
 * The C sealer (native/peerclient/pc_seal.c) on one 4 KiB page: seal and
 * open per second with each cipher engine it can use, in one run.
 *
 * Build and run (from the repository root):
 *   cc -O2 -DOMEGA_HAVE_IPSEC_MB -Inative/peerclient benchmarks/seal_bench.c \
 *      native/peerclient/pc_seal.c -lIPSec_MB -lssl -lcrypto -o /tmp/seal_bench
 *   /tmp/seal_bench [SECONDS]
 * (without libipsec-mb-dev drop -DOMEGA_HAVE_IPSEC_MB and -lIPSec_MB: only
 * OpenSSL is measured).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "peerclient.h"

#define PAGE 4096

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

/* Seal and open PAGE bytes for about `secs` seconds each; prints µs per call. */
static int measure(const char *force_openssl, double secs, uint8_t *blob_out)
{
    static uint8_t key[32], aad[32], plain[PAGE], back[PAGE], blob[PC_SEAL_OVERHEAD + PAGE];
    for (size_t i = 0; i < sizeof key; i++)
        key[i] = (uint8_t)(i * 7 + 1);
    memset(aad, 'a', sizeof aad);
    for (size_t i = 0; i < PAGE; i++)
        plain[i] = (uint8_t)(i * 31);
    if (force_openssl)
        setenv("OMEGA_SEAL_OPENSSL", "1", 1);
    else
        unsetenv("OMEGA_SEAL_OPENSSL");
    struct pc_sealer s;
    if (pc_sealer_init(&s, key, aad, sizeof aad) < 0)
        return -1;
    const char *engine = pc_seal_engine();
    long n = 0;
    double t0 = now(), t;
    do {
        for (int k = 0; k < 1000; k++, n++)
            if (pc_seal(&s, (uint64_t)n, 1, plain, PAGE, blob) < 0)
                return -1;
    } while ((t = now() - t0) < secs);
    double seal_us = t / n * 1e6;
    long m = 0;
    pc_seal(&s, 42, 7, plain, PAGE, blob);
    t0 = now();
    do {
        for (int k = 0; k < 1000; k++, m++)
            if (pc_open(&s, 42, 7, blob, sizeof blob, back, PAGE) < 0 ||
                (k == 0 && memcmp(back, plain, PAGE) != 0))
                return -1;
    } while ((t = now() - t0) < secs);
    double open_us = t / m * 1e6;
    printf("%-9s seal %.3f us (%.2f GB/s)  open %.3f us (%.2f GB/s)\n", engine, seal_us,
           PAGE / seal_us / 1e3, open_us, PAGE / open_us / 1e3);
    if (blob_out)
        memcpy(blob_out, blob, sizeof blob);
    pc_sealer_free(&s);
    return 0;
}

int main(int argc, char **argv)
{
    double secs = argc > 1 ? atof(argv[1]) : 2.0;
    static uint8_t a[PC_SEAL_OVERHEAD + PAGE];
    if (measure(NULL, secs, a) < 0 || measure("1", secs, NULL) < 0) {
        fprintf(stderr, "seal_bench: sealing failed\n");
        return 1;
    }
    /* the default engine's blob opens with OpenSSL (OMEGA_SEAL_OPENSSL is set now) */
    static uint8_t key[32], aad[32], back[PAGE];
    for (size_t i = 0; i < sizeof key; i++)
        key[i] = (uint8_t)(i * 7 + 1);
    memset(aad, 'a', sizeof aad);
    struct pc_sealer s;
    if (pc_sealer_init(&s, key, aad, sizeof aad) < 0 ||
        pc_open(&s, 42, 7, a, sizeof a, back, PAGE) < 0) {
        fprintf(stderr, "seal_bench: the engines disagree\n");
        return 1;
    }
    pc_sealer_free(&s);
    printf("cross-check: a blob of the first engine opens with OpenSSL\n");
    return 0;
}
