/*
 * Create a userfaultfd and register the guest-RAM mapping on it.
 *
 * Called from agent_mmap.c in the thread that mapped guest RAM, before any
 * vCPU runs. MISSING mode makes every first touch of a hole in the memory file
 * a fault the handler serves; WP mode (shmem write-protect, Linux >= 5.19) lets
 * the handler evict a page without losing a write that races the copy-out.
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "agent.h"
#include "agent_proto.h"

#ifndef UFFD_USER_MODE_ONLY
#define UFFD_USER_MODE_ONLY 1
#endif
#ifndef USERFAULTFD_IOC_NEW
#define USERFAULTFD_IOC_NEW _IO(0xAA, 0x00)
#endif

/* Returns a userfaultfd, or -1 with errno set. Tries the syscall, then
 * /dev/userfaultfd (its file mode decides), then user-mode-only faults
 * (enough for TCG, whose guest accesses are ordinary user-space loads and
 * stores; kernel accesses such as read(2) into guest RAM would get EFAULT). */
static int agent_uffd_open(uint32_t *flags)
{
    int fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
    if (fd >= 0)
        return fd;
    int saved = errno;
    int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
    if (dev >= 0) {
        fd = ioctl(dev, USERFAULTFD_IOC_NEW, O_CLOEXEC | O_NONBLOCK);
        close(dev);
        if (fd >= 0)
            return fd;
    }
    fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK | UFFD_USER_MODE_ONLY);
    if (fd >= 0) {
        *flags |= OMEGA_DSM_FLAG_USER_MODE_ONLY;
        agent_log("userfaultfd only in user-mode-only mode (%s); kernel accesses to "
                  "guest RAM will fail", strerror(saved));
        return fd;
    }
    errno = saved;
    return -1;
}

/* 0 ok, -1 error (message printed). Fills region->uffd and region->flags. */
int agent_uffd_register(struct agent_region *region)
{
    uint32_t flags = 0;
    int fd = agent_uffd_open(&flags);
    if (fd < 0) {
        agent_log("userfaultfd: %s", strerror(errno));
        return -1;
    }
    struct uffdio_api api = {.api = UFFD_API,
                             .features = UFFD_FEATURE_MISSING_SHMEM |
                                         UFFD_FEATURE_WP_HUGETLBFS_SHMEM};
    if (ioctl(fd, UFFDIO_API, &api) < 0) {
        /* Older kernel without shmem write-protect: MISSING only. */
        close(fd);
        fd = agent_uffd_open(&flags);
        if (fd < 0) {
            agent_log("userfaultfd: %s", strerror(errno));
            return -1;
        }
        api = (struct uffdio_api){.api = UFFD_API, .features = UFFD_FEATURE_MISSING_SHMEM};
        if (ioctl(fd, UFFDIO_API, &api) < 0) {
            agent_log("UFFDIO_API: %s", strerror(errno));
            close(fd);
            return -1;
        }
    }
    int wp = (api.features & UFFD_FEATURE_WP_HUGETLBFS_SHMEM) != 0;
    struct uffdio_register reg = {
        .range = {.start = (uint64_t)(uintptr_t)region->addr, .len = region->length},
        .mode = UFFDIO_REGISTER_MODE_MISSING | (wp ? UFFDIO_REGISTER_MODE_WP : 0),
    };
    if (ioctl(fd, UFFDIO_REGISTER, &reg) < 0) {
        agent_log("UFFDIO_REGISTER %p+%zu: %s", region->addr, region->length, strerror(errno));
        close(fd);
        return -1;
    }
    if (wp)
        flags |= OMEGA_DSM_FLAG_WP;
    region->uffd = fd;
    region->flags = flags;
    return 0;
}
