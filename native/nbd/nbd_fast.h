/* Omega NBD transmission-phase fast path.
 *
 * After the Python server has finished the handshake of a plain (non-TLS)
 * connection to an export whose bytes live in a file descriptor (a sparse
 * file or a memfd), it hands the connected socket and the export's fd to
 * omega_nbd_serve(), which serves NBD requests until NBD_CMD_DISC, end of
 * file, or a framing error, then returns why it stopped.  The semantics are
 * those of hypervisor/netblock/server.py + protocol.check_request: same
 * validation order, same errno values, same reply encoding, byte for byte.
 *
 *   nbd_serve.c   the request loop: receive buffer, framing, dispatch
 *   nbd_ops.c     one function per command, on the export's fd
 *   nbd_reply.c   the reply queue (headers + data, sent with one sendmsg)
 *
 * Thread model: omega_nbd_serve() runs entirely on the calling thread, which
 * owns the connection for its whole life: it blocks in recv() for requests,
 * executes them in arrival order with pread or sendfile / pwrite (a memcpy
 * into a shared mapping for a sealed memfd: nbd_ops.c) / fallocate
 * / fdatasync / lseek / posix_fadvise, and sends the replies of each received batch with
 * one sendmsg() before it blocks again.  One thread per connection (not a
 * pool) because a connection's requests are cheap syscalls on a page-cache or
 * shmem fd: a hand-off between threads would cost more than the work, and
 * the machine has few cores.  Python calls it from a dedicated thread; cffi
 * releases the GIL for the call, so the asyncio loop keeps running.  To make
 * it stop, another thread calls shutdown(sock, SHUT_RD): recv() then returns
 * 0 once the requests already received are served.
 *
 * Counters are written only by the serving thread (relaxed atomic stores, no
 * locked instructions) and read from any thread with omega_nbd_counters_read
 * (relaxed atomic loads), so a metrics scrape never stalls the data path.
 *
 * READs of 64 KiB or more leave by sendfile(): the file's pages go to the
 * socket by reference, without a copy through this process.  The one visible
 * difference from the Python path follows: if the client sends a write that
 * overlaps such a READ before it has received the READ's reply, the reply
 * may carry the newer data.  NBD lets servers reorder in-flight requests, so
 * clients (QEMU, the kernel, libnbd users) never overlap them without
 * waiting; every other reply is byte-for-byte the Python path's.
 *
 * Memory: bounded per connection whatever the client sends: a 4 MiB receive
 * buffer, a 4 MiB reply-data buffer, a 512 KiB extent list.  WRITE payloads
 * longer than the receive buffer are written in pieces as they arrive; long
 * READs are not buffered at all (sendfile).
 *
 * Return conventions are stated per function: 0 = ok, -1 = error.
 */
#ifndef OMEGA_NBD_FAST_H
#define OMEGA_NBD_FAST_H

#include <stddef.h>
#include <stdint.h>

/* How omega_nbd_serve ended (omega_nbd_result.status). */
#define OMEGA_NBD_END_DISC 0      /* NBD_CMD_DISC received */
#define OMEGA_NBD_END_EOF 1       /* client closed (or shutdown(SHUT_RD) was called) */
#define OMEGA_NBD_END_PROTOCOL 2  /* framing error: bad magic, oversized WRITE */
#define OMEGA_NBD_END_SOCKET 3    /* recv/send failed (reset, broken pipe) */
#define OMEGA_NBD_END_INTERNAL 4  /* out of memory for a connection buffer */

#define OMEGA_NBD_NCMD 8          /* NBD_CMD_READ .. NBD_CMD_BLOCK_STATUS */
#define OMEGA_NBD_NBOUNDS 16      /* latency bucket upper bounds */
#define OMEGA_NBD_MAX_EXTENTS 65536 /* descriptors in one BLOCK_STATUS reply */

struct nbr_export;   /* nbd_repl.h */

/* --- cffi declarations begin: _build_nbd.py feeds the text between these
 * markers to ffi.cdef, so it holds only types and prototypes (no macros). */

/* What the handshake negotiated, and where the bytes are. */
struct omega_nbd_config {
    int sock_fd;                  /* connected stream socket (borrowed) */
    int file_fd;                  /* export data (borrowed) */
    uint64_t size;                /* export size in bytes */
    uint32_t max_block;           /* longest READ / WRITE executed */
    uint32_t max_write_payload;   /* a longer WRITE payload ends the connection */
    uint32_t meta_context_id;     /* base:allocation context id; 0 = not negotiated */
    int structured;               /* structured replies negotiated */
    int read_only;                /* refuse WRITE / TRIM / WRITE_ZEROES with EPERM */
    int can_fast_zero;            /* FAST_ZERO allowed */
    struct nbr_export *repl;      /* a replicated export (nbd_repl.h) instead of file_fd */
    uint64_t latency_bounds_ns[16]; /* histogram upper bounds, ascending */
    uint64_t busy_poll_ns;        /* wait awake this long for the next request (0: never) */
};

/* Cumulative counters of one connection; indexes are NBD_CMD_* values.
 * latency[cmd][i] counts requests whose handling time was <= bound i
 * (and > bound i-1); index 16 counts the rest. */
struct omega_nbd_counters {
    uint64_t ops[8];
    uint64_t bytes_read;
    uint64_t bytes_written;
    uint64_t errors;
    uint64_t latency[8][17];
    uint64_t latency_total_ns[8];
};

/* Why omega_nbd_serve returned. */
struct omega_nbd_result {
    int status;                   /* OMEGA_NBD_END_* */
    int sys_errno;                /* errno of a failed socket call, else 0 */
    char reason[200];             /* one line for the log */
};

/* nbd_serve.c */
const char *omega_nbd_version(void);   /* defined by the generated cffi C */
int omega_nbd_serve(const struct omega_nbd_config *cfg, const uint8_t *initial,
                    size_t initial_len, struct omega_nbd_counters *counters,
                    struct omega_nbd_result *result);
void omega_nbd_counters_read(const struct omega_nbd_counters *src,
                             struct omega_nbd_counters *dst);

/* --- cffi declarations end */

#endif
