/*
 * A peer's page service in C: the page store and its data port.
 *
 * The store (peer_store.c) holds the sealed pages a peer lends RAM for:
 * namespaces of u64 key -> (version, blob), bounded by a capacity, each
 * namespace owned by the cluster member whose put created it. It is shared
 * by the Python node daemon (every opcode, through cffi) and the data port
 * (peer_server.c): a mutual-TLS listener whose threads answer the page data
 * opcodes (PING, GET, BATCH_GET, PUT, BATCH_PUT, DELETE on page namespaces)
 * without the interpreter. Semantics, statuses and wire format are those of
 * hypervisor/node/stores.py's contract and hypervisor/node/wire.py.
 *
 * Thread safety: every store function may be called from any thread (one
 * read-write lock: lookups share it, changes take it alone).
 *
 * Return convention: a wire status (PEER_ST_*, >= 0), or a negative errno.
 */
#ifndef OMEGA_PEER_H
#define OMEGA_PEER_H

#include <stddef.h>
#include <stdint.h>

#define PEER_ST_OK 0
#define PEER_ST_NOT_FOUND 1
#define PEER_ST_FULL 2
#define PEER_ST_STALE 3
#define PEER_ST_BAD_REQUEST 4
#define PEER_ST_INTERNAL 5
#define PEER_ST_SHUTTING_DOWN 6
#define PEER_ST_FORBIDDEN 7

#define PEER_MAX_BLOB (16u << 20)
#define PEER_MAX_FRAME (64u << 20)
#define PEER_MAX_BATCH 4096
#define PEER_NAME_MAX 255

/* Server counters (peer_server_counters). */
enum peer_counter {
    PEER_C_CONNECTIONS,   /* accepted and authenticated, total */
    PEER_C_OPEN,          /* open now */
    PEER_C_PING,
    PEER_C_GET,
    PEER_C_BATCH_GET,
    PEER_C_PUT,
    PEER_C_BATCH_PUT,
    PEER_C_DELETE,
    PEER_C_BYTES_OUT,     /* blob bytes answered */
    PEER_C_BYTES_IN,      /* blob bytes stored */
    PEER_C_BAD_REQUEST,   /* connections closed for malformed bytes */
    PEER_C_FORBIDDEN,
    PEER_C_HANDSHAKE_FAILED,
    PEER_C_COUNT
};

/* --- cffi declarations begin: _build_peer.py feeds the text between these
 * markers to ffi.cdef: the API the Python side calls. */

struct peer_store;
struct peer_server;

struct peer_ns_info {
    char name[256];
    char owner[256];
    uint64_t keys;
    uint64_t bytes;
};

struct peer_store *peer_store_new(uint64_t capacity);
void peer_store_free(struct peer_store *s);
/* out: capacity, used (blob bytes), count (blobs). */
void peer_store_usage(struct peer_store *s, uint64_t out[3]);

int peer_store_put(struct peer_store *s, const char *ns, const char *owner, uint64_t key,
                   uint64_t version, const uint8_t *blob, uint32_t len);
/* All or nothing on FULL; otherwise one status per item (OK or STALE). */
int peer_store_put_batch(struct peer_store *s, const char *ns, const char *owner, size_t n,
                         const uint64_t *keys, const uint64_t *versions,
                         const uint8_t *const *blobs, const uint32_t *lens, uint8_t *statuses);
/* OK with *copy a malloc'd copy (free with peer_store_release), NOT_FOUND,
 * FORBIDDEN. */
int peer_store_get(struct peer_store *s, const char *ns, const char *owner, uint64_t key,
                   uint64_t *version, uint8_t **copy, uint32_t *len);
void peer_store_release(uint8_t *copy);
int peer_store_delete(struct peer_store *s, const char *ns, const char *owner, size_t n,
                      const uint64_t *keys, uint64_t *deleted);
/* Up to limit (key, version) with key > after (every key when first), in
 * key order; *more when others follow. */
int peer_store_list(struct peer_store *s, const char *ns, const char *owner, uint64_t after,
                    uint32_t limit, int first, uint64_t *keys, uint64_t *versions,
                    uint32_t *n, int *more);
int peer_store_drop(struct peer_store *s, const char *ns, const char *owner, uint64_t *dropped);
/* Fills up to max entries (only owner's when owner is not NULL); returns how
 * many namespaces matched (may exceed max: call again with more room). */
size_t peer_store_namespaces(struct peer_store *s, const char *owner, struct peer_ns_info *out,
                             size_t max);

/* The data port. Listens on host:port (0: any); *bound gets the port. On
 * failure returns NULL with a message in err. */
struct peer_server *peer_server_start(struct peer_store *s, const char *host, int port,
                                      const char *ca, const char *cert, const char *keyfile,
                                      int *bound, char *err, size_t errlen);
/* Stop accepting, close every connection after the burst it is answering,
 * join the threads, copy the final counters to `final` (if not NULL), free. */
void peer_server_stop(struct peer_server *srv, uint64_t *final);
void peer_server_counters(struct peer_server *srv, uint64_t *out);
/* An idle connection's thread waits awake for up to spin_ns after each burst
 * before it sleeps (0: sleeps at once). */
void peer_server_set_spin(struct peer_server *srv, uint64_t spin_ns);

/* --- cffi declarations end */

/* Internal to the page service. */

/* Lookups under the read lock for the data port: the blob is handed to fn
 * while the lock is held (fn must not call back into the store). */
typedef void (*peer_visit_fn)(void *arg, int found, uint64_t version, const uint8_t *blob,
                              uint32_t len);
int peer_store_visit(struct peer_store *s, const char *ns, const char *owner, size_t n,
                     const uint64_t *keys, peer_visit_fn fn, void *arg);

#endif
