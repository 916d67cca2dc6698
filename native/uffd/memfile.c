/* Memory files: memfd, hole punching, shared mappings, fault-safe copies.
 *
 * Return conventions and thread model: see uffd.h (0 = ok, -1 = error with
 * errno from the failing syscall; no state, any thread).
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "uffd.h"

/* Returns a new memfd (flags: MFD_CLOEXEC, MFD_ALLOW_SEALING, ...) or -1. */
int omega_memfd_create(const char *name, unsigned int flags)
{
    return memfd_create(name, flags);
}

/* Frees [offset, offset+len) of the file without changing its size; every
 * mapping of those pages is zapped, so a registered mapping faults again on
 * its next touch.  Returns 0 or -1. */
int omega_punch_hole(int fd, uint64_t offset, uint64_t len)
{
    int rc;

    do {
        rc = fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                       (off_t)offset, (off_t)len);
    } while (rc == -1 && errno == EINTR);
    return rc;
}

/* Maps `len` bytes of `fd` from `offset`, MAP_SHARED, readable (and
 * writable when `writable`).  Fills the address.  Returns 0 or -1. */
int omega_map_shared(int fd, uint64_t len, uint64_t offset, int writable,
                     uint64_t *addr_out)
{
    int prot = PROT_READ | (writable ? PROT_WRITE : 0);
    void *p = mmap(NULL, (size_t)len, prot, MAP_SHARED, fd, (off_t)offset);

    if (p == MAP_FAILED)
        return -1;
    *addr_out = (uint64_t)(uintptr_t)p;
    return 0;
}

/* Returns 0 or -1. */
int omega_unmap(uint64_t addr, uint64_t len)
{
    return munmap((void *)(uintptr_t)addr, (size_t)len);
}

/* memcpy between raw addresses.  It exists so that touching a registered
 * page happens inside a C call: cffi has released the GIL, so the thread can
 * sleep on a userfault while another Python thread resolves it.  Cannot
 * fail; touching an unmapped address kills the process, as in C. */
void omega_mem_copy(uint64_t dst, uint64_t src, uint64_t len)
{
    memcpy((void *)(uintptr_t)dst, (const void *)(uintptr_t)src, (size_t)len);
}

/* Returns the base page size in bytes. */
long omega_page_size(void)
{
    return sysconf(_SC_PAGESIZE);
}
