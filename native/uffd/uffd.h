/* Omega userfaultfd and memory-file primitives.
 *
 * Thin, stateless wrappers over the Linux syscalls the DSM layer stands on:
 * userfaultfd(2) and its ioctls (uffd.c), memfd / hole punching / shared
 * mappings (memfile.c), and passing file descriptors over unix sockets with
 * SCM_RIGHTS (fdpass.c).  Python reaches them through the cffi module
 * hypervisor._native._uffd (see _build_uffd.py); the DSM fault handler may
 * link the same files.
 *
 * Return convention (every function unless its comment says otherwise):
 *   0 (or a count >= 0) = ok, -1 = error with errno left as the failing
 *   syscall set it.  Nothing is allocated on the heap; nothing is retained
 *   between calls.
 *
 * Thread model: no global state, so every function may be called from any
 * thread at any time.  Calls that can block (a read on a blocking uffd, a
 * send/recv on a blocking socket) block only the calling thread; cffi drops
 * the Python GIL around each call, which is what lets one Python thread fault
 * on a registered page while another serves it.
 */
#ifndef OMEGA_UFFD_H
#define OMEGA_UFFD_H

#include <stdint.h>
#include <linux/userfaultfd.h>

/* Feature bits newer than the oldest kernel headers we build against
 * (Debian 12 ships 6.1 headers); values are the kernel ABI. */
#ifndef UFFD_FEATURE_WP_UNPOPULATED
#define UFFD_FEATURE_WP_UNPOPULATED (1 << 13)
#endif
#ifndef UFFD_FEATURE_POISON
#define UFFD_FEATURE_POISON (1 << 14)
#endif
#ifndef UFFD_FEATURE_WP_ASYNC
#define UFFD_FEATURE_WP_ASYNC (1 << 15)
#endif
#ifndef UFFD_FEATURE_MOVE
#define UFFD_FEATURE_MOVE (1 << 16)
#endif
#ifndef UFFD_USER_MODE_ONLY
#define UFFD_USER_MODE_ONLY 1
#endif

/* Most events omega_uffd_read_events returns per call. */
#define OMEGA_UFFD_MAX_EVENTS 256
/* Most descriptors one omega_send_fds / omega_recv_fds call carries. */
#define OMEGA_FDPASS_MAX 64

/* --- cffi declarations begin: _build_uffd.py feeds the text between these
 * markers to ffi.cdef, so it holds only types and prototypes (no macros). */

/* One decoded struct uffd_msg.  `kind` is the UFFD_EVENT_* code.
 *   PAGEFAULT: flags = UFFD_PAGEFAULT_FLAG_*, address, ptid (THREAD_ID feature)
 *   FORK:      arg0 = the child's new uffd (a descriptor now open here)
 *   REMAP:     arg0 = from, arg1 = to, arg2 = len
 *   REMOVE, UNMAP: arg0 = start, arg1 = end */
struct omega_uffd_event {
    uint8_t kind;
    uint64_t flags;
    uint64_t address;
    uint32_t ptid;
    uint64_t arg0;
    uint64_t arg1;
    uint64_t arg2;
};

/* uffd.c */
const char *omega_uffd_version(void);   /* defined by the generated cffi C */
int omega_uffd_create(int nonblocking, int user_mode_only);
int omega_uffd_api(int fd, uint64_t features, uint64_t *features_out, uint64_t *ioctls_out);
int omega_uffd_supported_features(int user_mode_only, uint64_t *features_out);
int omega_uffd_register(int fd, uint64_t start, uint64_t len, uint64_t mode,
                        uint64_t *ioctls_out);
int omega_uffd_unregister(int fd, uint64_t start, uint64_t len);
int omega_uffd_copy(int fd, uint64_t dst, uint64_t src, uint64_t len, uint64_t mode,
                    int64_t *copied_out);
int omega_uffd_zeropage(int fd, uint64_t start, uint64_t len, uint64_t mode,
                        int64_t *zeroed_out);
int omega_uffd_wake(int fd, uint64_t start, uint64_t len);
int omega_uffd_writeprotect(int fd, uint64_t start, uint64_t len, uint64_t mode);
int omega_uffd_read_events(int fd, struct omega_uffd_event *out, int max);

/* memfile.c */
int omega_memfd_create(const char *name, unsigned int flags);
int omega_punch_hole(int fd, uint64_t offset, uint64_t len);
int omega_map_shared(int fd, uint64_t len, uint64_t offset, int writable,
                     uint64_t *addr_out);
int omega_unmap(uint64_t addr, uint64_t len);
void omega_mem_copy(uint64_t dst, uint64_t src, uint64_t len);
long omega_page_size(void);

/* fdpass.c */
long omega_send_fds(int sock, const void *data, uint64_t len, const int *fds, int nfds);
long omega_recv_fds(int sock, void *buf, uint64_t len, int *fds, int max_fds,
                    int *nfds_out);

/* --- cffi declarations end */

#endif /* OMEGA_UFFD_H */
