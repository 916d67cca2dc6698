/*
 * libomega_agent: loaded into QEMU with LD_PRELOAD.
 *
 * Thread model: the registration runs in whichever QEMU thread maps guest RAM
 * (the main thread, before any vCPU runs) and blocks it until the handler
 * acknowledges. One agent thread ("omega-agent") then watches the handler
 * connection and re-sends the userfaultfd when the handler restarts.
 */
#ifndef OMEGA_AGENT_H
#define OMEGA_AGENT_H

#include <stddef.h>
#include <stdint.h>

struct agent_region {
    void *addr;
    size_t length;
    uint64_t offset;
    int memfd;  /* QEMU's descriptor (not ours: QEMU owns it) */
    int uffd;   /* our userfaultfd, kept open for the life of QEMU */
    uint32_t flags;
};

struct agent_settings {
    const char *socket_path;
    uint64_t min_bytes;
    int connect_timeout_ms;
    int reconnect_timeout_ms;
};

/* agent_uffd.c — 0 ok, -1 error (message already printed). */
int agent_uffd_register(struct agent_region *region);

/* agent_link.c — 0 ok, -1 error (message already printed). */
int agent_link_send(const struct agent_settings *settings,
                    const struct agent_region *region, int timeout_ms, int resend);
int agent_link_start_watch(const struct agent_settings *settings,
                           const struct agent_region *region);

/* agent_log.c */
void agent_log(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void agent_fatal(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));

#endif
