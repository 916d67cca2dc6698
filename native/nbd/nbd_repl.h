/* Omega replicated NBD export in C: blocks sealed with AES-256-GCM and held
 * on R peers, served without the interpreter.
 *
 * An export is cut into chunks (the placement unit, 64 KiB by default), and
 * chunks into blocks (the unit of sealing and versioning, 4 KiB by default;
 * a block as large as its chunk is the layout of the Python backend,
 * hypervisor/netblock/replicated.py, kept as the reference implementation
 * and for OMEGA_NETBLOCK_NATIVE=0).  Block b's current version is sealed
 * with associated data ("chunk", export id, b, version) and stored, under
 * key b, on every holder of its chunk: up to R peers chosen by weighted
 * rendezvous hashing over healthy peers.  So a 4 KiB write seals and sends
 * 4 KiB, not its whole chunk, while a chunk's blocks stay together (a long
 * read is one BATCH_GET per holder) and the table keeps holders per chunk.
 * A write is acknowledged when the write quorum of its targets took every
 * block written to that chunk; reads come from the nearest healthy holder,
 * and a copy older than recorded or failing authentication is never served.
 *
 * Holders of a chunk hold the current version of each of its blocks.  A
 * write to part of a chunk goes to its live holders only (a new peer would
 * lack the other blocks); a chunk with no holder (new, or trimmed whole)
 * and a write covering a whole chunk are placed afresh, topped up to R;
 * re-replication copies whole chunks.
 *
 *   nbd_repl.c        the export: chunk table, placement, peer health,
 *                     plaintext cache, dirty list, counters
 *   nbd_repl_batch.c  executing a batch of requests: plan, fetch, apply,
 *                     seal, put, record; re-replication of one chunk
 *
 * Who does what.  The export object (struct nbr_export) is shared by every
 * connection serving the export; each serving thread owns a struct
 * nbr_client (its TLS connections to the peers' data ports and its cipher
 * contexts).  The NBD fast path (nbd_serve.c) hands whole pipelined batches
 * of READ/WRITE requests to nbr_exec, so a batch costs one round trip per
 * peer however deep the queue.  Python (hypervisor/netblock/native_replicated.py)
 * opens the export, loads the chunk table from SQLite, pushes peer health,
 * RTT and placement weights, persists the table (the flush hook), runs
 * re-replication (nbr_repair) and serves TLS connections through nbr_exec.
 *
 * Concurrency.  Chunk versions and holders are read and written with atomic
 * loads and stores; writers of a chunk hold its stripe lock (one of
 * NBR_LOCKS mutexes, taken in ascending order for a whole batch, so two
 * batches never deadlock) from planning until the table records the new
 * version.  The cache and the dirty list have their own mutexes.  Readers
 * take no chunk lock: a read captures the version it needs and accepts any
 * copy at least that new (a concurrent write is unordered with it, as NBD
 * allows).
 *
 * Return conventions: 0 / a count on success, a negative errno on failure.
 */
#ifndef OMEGA_NBD_REPL_H
#define OMEGA_NBD_REPL_H

#include <stddef.h>
#include <stdint.h>

#define NBR_MAX_PEERS 16
#define NBR_TRIMMED (1ull << 63)      /* a block version's flag: trimmed (reads as zeroes) */
#define NBR_NBOUNDS 16            /* latency histogram bounds (as omega_nbd_config) */

/* --- cffi declarations begin: _build_nbd.py feeds the text between these
 * markers to ffi.cdef, so it holds only types and prototypes (no macros). */

struct nbr_export;
struct nbr_client;

/* How to open an export. */
struct nbr_config {
    uint64_t size;                /* bytes */
    uint32_t chunk_size;          /* bytes per chunk (placement) */
    uint32_t block_size;          /* bytes per block (sealing, versions); divides chunk_size */
    uint32_t replicas;            /* R */
    uint32_t write_quorum;        /* targets that must take a write (0: 1) */
    uint64_t cache_bytes;         /* plaintext chunk cache */
    uint64_t placement_seed;      /* placement_seed(export id), as replicated.py */
    uint8_t key[32];              /* AES-256-GCM key */
    uint8_t aad_prefix[600];      /* build_aad("chunk", id, 0, 0) without index, version */
    uint32_t aad_len;
    uint8_t ns[258];              /* the chunk namespace as encoded on the wire */
    uint32_t ns_len;
    char ca[1024];                /* PEM paths: cluster CA, this node's cert and key */
    char cert[1024];
    char keyfile[1024];
    uint64_t busy_poll_ns;        /* wait awake this long for a peer's answer */
    uint32_t io_timeout_ms;       /* a peer that does not answer within this fails */
    uint64_t latency_bounds_ns[16];
};

/* A request, as the NBD layer validated it (offset + length inside the
 * export).  cmd: NBD_CMD_READ 0, WRITE 1, TRIM 4, CACHE 5, WRITE_ZEROES 6. */
struct nbr_req {
    uint16_t cmd;
    uint16_t flags;               /* NBD_CMD_FLAG_* */
    uint64_t offset;
    uint32_t length;
    const uint8_t *wdata;         /* WRITE: the payload */
    uint8_t *rdata;               /* READ: where the bytes go */
    uint32_t err;                 /* out: 0, or the NBD errno */
    char msg[160];                /* out: why, when err */
};

/* Per-peer counters (cumulative). */
struct nbr_peer_stats {
    uint64_t gets;                /* chunks asked for */
    uint64_t puts;                /* chunks stored */
    uint64_t deletes;
    uint64_t errors;              /* failed requests and connections */
    uint64_t bytes_in;
    uint64_t bytes_out;
    uint64_t latency[17];         /* round trips, by latency_bounds_ns */
    uint64_t latency_total_ns;
    uint64_t failures;            /* times the peer was marked failed here */
};

/* Export counters (cumulative). */
struct nbr_stats {
    uint64_t cache_hits;          /* chunks served from the plaintext cache */
    uint64_t cache_misses;        /* chunks fetched */
    uint64_t batches;             /* nbr_exec calls */
    uint64_t chunks_written;      /* chunk versions acknowledged */
    uint64_t stale_retries;       /* writes renumbered above a newer copy */
    uint64_t repaired;            /* chunks brought back to R copies */
    uint64_t dirty;               /* table entries not yet persisted */
};

struct nbr_export *nbr_open(const struct nbr_config *cfg, char *err, size_t errlen);
/* Every client must be freed first. */
void nbr_close(struct nbr_export *e);
/* Peer i (0..NBR_MAX_PEERS-1) is node `name`, its data port at host:port
 * (host "" and port 0: a holder named in the table without an address,
 * never reachable: its chunks read from other holders or fail). */
int nbr_set_peer(struct nbr_export *e, int i, const char *name, const char *host, int port);
/* The Python side's view of peer i: healthy (its monitor's pings answer),
 * the smoothed RTT in seconds (< 0: unmeasured), and its placement weight
 * (free lent bytes / (1 + RTT in ms); 0: do not place new chunks there). */
int nbr_set_peer_state(struct nbr_export *e, int i, int healthy, double rtt_s, double weight);
void nbr_peer_stats(struct nbr_export *e, int i, struct nbr_peer_stats *out);
void nbr_stats(struct nbr_export *e, struct nbr_stats *out);
/* The table: n chunks' indexes, holder bits and versions (blocks per chunk
 * entries each, in block order; NBR_TRIMMED marks a trimmed block; 0: never
 * written). */
int nbr_load(struct nbr_export *e, const uint64_t *chunks, const uint16_t *holders,
             const uint64_t *versions, size_t n);
/* Take up to max changed chunks for persistence (marked clean): their
 * indexes, holders and block versions (max * blocks per chunk entries). */
size_t nbr_take_dirty(struct nbr_export *e, uint64_t *chunks, uint16_t *holders,
                      uint64_t *versions, size_t max);
/* Mark chunks dirty again (their persistence failed). */
void nbr_mark_dirty(struct nbr_export *e, const uint64_t *chunks, size_t n);
/* Chunks with fewer healthy holders than R (and at least one holder):
 * fills up to max, returns how many there are. */
size_t nbr_under_replicated(struct nbr_export *e, uint64_t *out, size_t max);
/* Copy the whole table out: versions per block, holders per chunk. */
void nbr_table(struct nbr_export *e, uint64_t *versions, uint16_t *holders);
/* Called (from the serving thread) for FLUSH and FUA: persist the table;
 * returns 0, or < 0 when it could not. */
void nbr_set_flush_hook(struct nbr_export *e, int (*hook)(void *), void *arg);
/* Forget every cached chunk (the next reads go to the peers). */
void nbr_cache_clear(struct nbr_export *e);

struct nbr_client *nbr_client_new(struct nbr_export *e);
void nbr_client_free(struct nbr_client *c);
/* Execute n requests (see the ordering rules in nbd_repl_batch.c); each
 * gets its outcome in err/msg.  0, or -ENOMEM (nothing done). */
int nbr_exec(struct nbr_client *c, struct nbr_req *reqs, size_t n);
/* FLUSH: persist the chunk table (the data is already on the peers).
 * 0, or -EIO. */
int nbr_flush(struct nbr_client *c);
/* Bring one chunk back to R healthy copies (every block of it is copied).
 * 1 done, 0 nothing to do, < 0 failed (-EIO: no holder had a readable copy
 * of every block, -ENOSPC: no peer to copy to, -EAGAIN: fewer than R took
 * it). */
int nbr_repair(struct nbr_client *c, uint64_t chunk);
/* The export's allocation over [offset, offset+length): writes up to max
 * (length, flags) pairs, NBD_STATE_HOLE|ZERO for blocks never written or
 * trimmed; returns the count. */
size_t nbr_extents(struct nbr_export *e, uint64_t offset, uint64_t length, uint32_t *out,
                   size_t max);
/* For tests of the sealer's nonce pool: seal one zero block with a fixed
 * key in one sealer kept for the process (made by the first call) and copy
 * the nonce it drew to nonce (12 bytes). 0 / -1. */
int nbr_probe_seal_nonce(uint8_t *nonce);

/* --- cffi declarations end */

#endif
