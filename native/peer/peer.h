/*
 * A peer's blob services in C: the page store, the chunk store and the
 * data port that serves both.
 *
 * The page store (peer_store.c) holds the sealed pages a peer lends RAM
 * for; the chunk store (chunk_store.c, on disk, see chunk_store.h) the
 * sealed chunks it lends disk for. Both are namespaces of u64 key ->
 * (version, blob), bounded by a capacity, each namespace owned by the
 * cluster member whose put created it. They are shared by the Python node
 * daemon (every opcode, through cffi) and the data port (peer_server.c): a
 * mutual-TLS listener whose threads answer the data opcodes (PING, GET,
 * BATCH_GET, PUT, BATCH_PUT, DELETE on page and chunk namespaces) without
 * the interpreter. Semantics, statuses and wire format are those of
 * hypervisor/node/stores.py's contract and hypervisor/node/wire.py.
 *
 * Thread safety: every store function may be called from any thread. The
 * page store has one read-write lock (lookups share it, changes take it
 * alone); the chunk store locks per namespace and does its disk I/O with
 * no store-wide lock held (chunk_store.h).
 *
 * Return convention: a wire status (PEER_ST_*, >= 0), or a negative errno.
 * The chunk store adds -EBADMSG (a slot on disk failed its check: served
 * as an error, never as data), -EINVAL (a bad namespace name or a blob
 * over PEER_MAX_BLOB) and the errno of a failed disk call.
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
    /* Appended: the same, on chunk namespaces (the ones above count pages). */
    PEER_C_CHUNK_GET,
    PEER_C_CHUNK_BATCH_GET,
    PEER_C_CHUNK_PUT,
    PEER_C_CHUNK_BATCH_PUT,
    PEER_C_CHUNK_DELETE,
    PEER_C_CHUNK_BYTES_OUT,
    PEER_C_CHUNK_BYTES_IN,
    PEER_C_STORE_ERRORS,  /* requests answered INTERNAL (a disk error) */
    PEER_C_COUNT
};

/* --- cffi declarations begin: _build_peer.py feeds the text between these
 * markers to ffi.cdef: the API the Python side calls. */

struct peer_store;
struct chunk_store;
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

/* The chunk store kept under root (made when missing; an old
 * one-file-per-chunk directory is converted). fsync: make every put and
 * delete durable before it returns. Only one store may use a root at a
 * time. On failure returns NULL with a message in err (about root, which
 * it does not repeat). The other calls
 * are those of the page store, on disk; chunk_store_get's copy is freed
 * with peer_store_release. */
struct chunk_store *chunk_store_open(const char *root, uint64_t capacity, int fsync, char *err,
                                     size_t errlen);
/* Close the store (no other thread may be using it). */
void chunk_store_close(struct chunk_store *s);
void chunk_store_usage(struct chunk_store *s, uint64_t out[3]);
int chunk_store_put(struct chunk_store *s, const char *ns, const char *owner, uint64_t key,
                    uint64_t version, const uint8_t *blob, uint32_t len);
int chunk_store_put_batch(struct chunk_store *s, const char *ns, const char *owner, size_t n,
                          const uint64_t *keys, const uint64_t *versions,
                          const uint8_t *const *blobs, const uint32_t *lens, uint8_t *statuses);
int chunk_store_get(struct chunk_store *s, const char *ns, const char *owner, uint64_t key,
                    uint64_t *version, uint8_t **copy, uint32_t *len);
int chunk_store_delete(struct chunk_store *s, const char *ns, const char *owner, size_t n,
                       const uint64_t *keys, uint64_t *deleted);
int chunk_store_list(struct chunk_store *s, const char *ns, const char *owner, uint64_t after,
                     uint32_t limit, int first, uint64_t *keys, uint64_t *versions,
                     uint32_t *n, int *more);
int chunk_store_drop(struct chunk_store *s, const char *ns, const char *owner,
                     uint64_t *dropped);
size_t chunk_store_namespaces(struct chunk_store *s, const char *owner,
                              struct peer_ns_info *out, size_t max);

/* The data port, serving pages from `pages` and chunks from `chunks`
 * (either may be NULL: its namespaces are then answered BAD_REQUEST).
 * Listens on host:port (0: any); *bound gets the port. On failure returns
 * NULL with a message in err. */
struct peer_server *peer_server_start(struct peer_store *pages, struct chunk_store *chunks,
                                      const char *host, int port,
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

/* Internal to the blob services. */

/* Reads for the data port: for each key in turn, room() is told whether it
 * is held and, when it is, returns where its len blob bytes go (NULL: out of
 * memory, the read stops with -ENOMEM). Called with the store's lock held:
 * room must not call back into the store. */
typedef uint8_t *(*peer_room_fn)(void *arg, int found, uint64_t version, uint32_t len);
int peer_store_read(struct peer_store *s, const char *ns, const char *owner, size_t n,
                    const uint64_t *keys, peer_room_fn room, void *arg);
int chunk_store_read(struct chunk_store *s, const char *ns, const char *owner, size_t n,
                     const uint64_t *keys, peer_room_fn room, void *arg);

/* One key read into a malloc'd copy (the *_get calls). */
struct peer_copy {
    int found;
    uint64_t version;
    uint8_t *blob;
    uint32_t len;
};
uint8_t *peer_room_malloc(void *arg, int found, uint64_t version, uint32_t len);
/* The *_get answer for a read that returned rc into c (frees c on error). */
int peer_copy_result(int rc, struct peer_copy *c, uint64_t *version, uint8_t **copy,
                     uint32_t *len);

void peer_ns_info_fill(struct peer_ns_info *out, const char *name, const char *owner,
                       uint64_t keys, uint64_t bytes);

#endif
