/*
 * The hello message the QEMU agent sends to the DSM handler.
 *
 * One message per guest-RAM region, on a unix stream socket, carrying two
 * descriptors by SCM_RIGHTS: [0] the userfaultfd registered over the region,
 * [1] the memory file (memfd) backing it. The handler answers with
 * OMEGA_DSM_ACK (8 bytes) once it serves faults, or OMEGA_DSM_NAK followed by
 * a reason. All integers are little-endian (the host's order; both ends run
 * on the same machine).
 */
#ifndef OMEGA_AGENT_PROTO_H
#define OMEGA_AGENT_PROTO_H

#include <stdint.h>

#define OMEGA_DSM_MAGIC "OMEGADSM"
#define OMEGA_DSM_ACK "OMEGAACK"
#define OMEGA_DSM_NAK "OMEGANAK"
#define OMEGA_DSM_PROTO_VERSION 1

/* hello.flags */
#define OMEGA_DSM_FLAG_WP 1u             /* range registered for write-protect too */
#define OMEGA_DSM_FLAG_USER_MODE_ONLY 2u /* uffd created with UFFD_USER_MODE_ONLY */
#define OMEGA_DSM_FLAG_RESEND 4u         /* a re-send after the handler went away */

struct omega_dsm_hello {
    char magic[8];        /* OMEGA_DSM_MAGIC, not NUL-terminated */
    uint32_t version;     /* OMEGA_DSM_PROTO_VERSION */
    uint32_t flags;       /* OMEGA_DSM_FLAG_* */
    uint64_t addr;        /* start of the mapping in QEMU */
    uint64_t length;      /* bytes mapped */
    uint64_t offset;      /* file offset of addr in the memory file */
    uint64_t page_size;   /* host page size */
    int32_t pid;          /* QEMU's pid */
    uint32_t reserved;
};

#endif
