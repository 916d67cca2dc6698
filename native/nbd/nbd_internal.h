/* Shared by nbd_serve.c, nbd_ops.c and nbd_reply.c (not part of the cffi API).
 *
 * One struct nbd_conn per served connection, owned by the serving thread;
 * nothing here is shared between threads except the counters (see
 * nbd_fast.h).  Wire constants are the NBD protocol's (doc/proto.md), not the
 * host's: NBD errno values are fixed by the protocol.
 */
#ifndef OMEGA_NBD_INTERNAL_H
#define OMEGA_NBD_INTERNAL_H

#include <stdint.h>
#include <sys/uio.h>

#include "nbd_fast.h"

#define NBD_REQUEST_MAGIC 0x25609513u
#define NBD_SIMPLE_REPLY_MAGIC 0x67446698u
#define NBD_STRUCTURED_REPLY_MAGIC 0x668e33efu

#define NBD_CMD_READ 0
#define NBD_CMD_WRITE 1
#define NBD_CMD_DISC 2
#define NBD_CMD_FLUSH 3
#define NBD_CMD_TRIM 4
#define NBD_CMD_CACHE 5
#define NBD_CMD_WRITE_ZEROES 6
#define NBD_CMD_BLOCK_STATUS 7

#define NBD_CMD_FLAG_FUA (1u << 0)
#define NBD_CMD_FLAG_NO_HOLE (1u << 1)
#define NBD_CMD_FLAG_DF (1u << 2)
#define NBD_CMD_FLAG_REQ_ONE (1u << 3)
#define NBD_CMD_FLAG_FAST_ZERO (1u << 4)

#define NBD_REPLY_FLAG_DONE 1u
#define NBD_REPLY_TYPE_NONE 0u
#define NBD_REPLY_TYPE_OFFSET_DATA 1u
#define NBD_REPLY_TYPE_BLOCK_STATUS 5u
#define NBD_REPLY_TYPE_ERROR ((1u << 15) + 1)

#define NBD_STATE_HOLE 1u
#define NBD_STATE_ZERO 2u

#define NBD_EPERM 1
#define NBD_EIO 5
#define NBD_EINVAL 22
#define NBD_ENOSPC 28
#define NBD_EOVERFLOW 75
#define NBD_ENOTSUP 95

#define NBD_REQUEST_SIZE 28

#define RBUF_CAP (4u << 20)      /* receive buffer */
#define DATA_CAP (4u << 20)      /* reply data (READ payloads, extents) */
#define HDR_CAP (64u << 10)      /* reply headers and error chunks */
#define IOV_CAP 512              /* iovecs queued before a send */
#define MAX_MESSAGE 160          /* error chunk text */

struct nbd_request {
    uint16_t flags;
    uint16_t cmd;
    uint64_t cookie;
    uint64_t offset;
    uint32_t length;
};

struct nbd_extent {
    uint32_t length;
    uint32_t flags;
};

struct nbd_conn {
    const struct omega_nbd_config *cfg;
    struct omega_nbd_counters *ctr;
    struct omega_nbd_result *result;
    uint8_t *rbuf;                /* received bytes [rpos, rend) not yet consumed */
    size_t rpos, rend;
    uint8_t *hdr;                 /* reply header arena, hlen used */
    size_t hlen;
    uint8_t *data;                /* reply data arena, dlen used */
    size_t dlen;
    struct nbd_extent *extents;   /* BLOCK_STATUS scratch, OMEGA_NBD_MAX_EXTENTS */
    struct iovec iov[IOV_CAP];
    int niov;
    int shared_counters;          /* several threads count into ctr: atomic adds */
    int spin_off;                 /* the last wait awake ran out: sleep until requests come fast */
    uint8_t *wmap;                /* a sealed memfd export mapped for WRITEs (nbd_write_map), or NULL */
};

/* nbd_ops.c: a shared mapping of the export for WRITEs when that can never
 * fault (a memfd sealed against shrinking and growing), else NULL. */
uint8_t *nbd_write_map(const struct omega_nbd_config *cfg);

/* nbd_reply.c: queueing returns 0, or -1 after a failed send (result set). */
int nbd_reply_flush(struct nbd_conn *c);
int nbd_reply_ok(struct nbd_conn *c, const struct nbd_request *r);
int nbd_reply_error(struct nbd_conn *c, const struct nbd_request *r, uint32_t err,
                    const char *message);
/* Make room for hlen header bytes, niov iovecs and dlen data bytes (sending
 * what is queued if needed); nbd_reply_take_data() then hands out data space
 * without sending.  0 / -1. */
int nbd_reply_room(struct nbd_conn *c, size_t hlen, int niov, size_t dlen);
uint8_t *nbd_reply_take_data(struct nbd_conn *c, size_t dlen);
/* Queue a successful READ reply's header (the caller sends the data), or the
 * whole reply with its `length` data bytes at `buf`. */
int nbd_reply_read_header(struct nbd_conn *c, const struct nbd_request *r);
int nbd_reply_read(struct nbd_conn *c, const struct nbd_request *r, const uint8_t *buf);
/* Queue one BLOCK_STATUS chunk (DONE) for `n` extents. */
int nbd_reply_block_status(struct nbd_conn *c, const struct nbd_request *r,
                           const struct nbd_extent *ext, size_t n);

/* nbd_ops.c: each executes one validated request and queues its reply;
 * 0 = the connection goes on (the request may have failed with an NBD
 * error reply), -1 = the connection must end (result set). */
int nbd_op_read(struct nbd_conn *c, const struct nbd_request *r);
/* Write one piece of a WRITE payload; returns 0 or the errno of the failure
 * (not -1: the payload must still be consumed before replying). */
int nbd_op_write_piece(struct nbd_conn *c, const uint8_t *buf, size_t len, uint64_t offset);
/* Finish a WRITE whose pieces are written (FUA, reply). */
int nbd_op_write_done(struct nbd_conn *c, const struct nbd_request *r, int failed_errno);
int nbd_op_flush(struct nbd_conn *c, const struct nbd_request *r);
int nbd_op_trim(struct nbd_conn *c, const struct nbd_request *r);
int nbd_op_write_zeroes(struct nbd_conn *c, const struct nbd_request *r);
int nbd_op_cache(struct nbd_conn *c, const struct nbd_request *r);
int nbd_op_block_status(struct nbd_conn *c, const struct nbd_request *r);

/* nbd_serve.c */
void nbd_end(struct nbd_conn *c, int status, int sys_errno, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
uint64_t nbd_now_ns(void);
void nbd_parse(const uint8_t *p, uint32_t *magic, struct nbd_request *r);
/* 0 when the request may run, else the NBD errno (protocol.check_request). */
uint32_t nbd_check_request(const struct nbd_conn *c, const struct nbd_request *r);
/* Send queued replies, then receive more bytes after [rpos, rend) (moved to
 * the front).  1 = got bytes, 0 = end of file, -1 = socket error (result set). */
int nbd_receive(struct nbd_conn *c);
void nbd_count(struct nbd_conn *c, const struct nbd_request *r, uint64_t elapsed);

/* nbd_repl_serve.c: the request loop of a replicated export.
 * 0 = ended by DISC or end of file, -1 = ended by an error. */
int nbd_serve_replicated(struct nbd_conn *c);

#endif
