"""Emit the cffi (API mode) C source of ``hypervisor._native._dsm``.

Usage: ``python _build_dsm.py OUTPUT.c VERSION``. meson compiles the output
with the handler core (dsm_*.c). Declarations mirror dsm.h.
"""

from __future__ import annotations

import sys

import cffi

TYPES = """
enum dsm_page_state {
    DSM_ZERO, DSM_LOCAL, DSM_REMOTE, DSM_FETCHING, DSM_EVICTING, DSM_PUNCHING,
    DSM_INSTALLING, ...
};
#define DSM_LAT_BUCKETS ...
#define DSM_MAX_THREADS ...
#define DSM_QUEUE_ZERO ...

struct dsm_stats {
    uint64_t npages, page_size, resident, remote, faults, faults_zero,
             faults_remote, faults_inflight, faults_wp, faults_spurious,
             evict_cancelled, installed_pages, install_calls, evicted_pages,
             eagain, errors, queue_len, faults_deferred;
    uint64_t lat_remote[...];
    uint64_t lat_zero[...];
    ...;
};

struct dsm_handler {
    int uffd, memfd, evfd;
    uint64_t base, length, file_offset, page_size, npages;
    int wp;
    uint8_t *state;
    uint8_t *ref;
    ...;
};
"""

FUNCTIONS = """
const char *omega_dsm_version(void);
struct dsm_handler *dsm_open(int uffd, int memfd, uint64_t base, uint64_t length,
                             uint64_t file_offset, int wp, int *err);
int dsm_start(struct dsm_handler *h, int nthreads);
void dsm_close(struct dsm_handler *h);
int dsm_scan_resident(struct dsm_handler *h);
int dsm_mark_remote(struct dsm_handler *h, const uint64_t *pages, size_t n);
int dsm_wake_all(struct dsm_handler *h);
void dsm_get_stats(struct dsm_handler *h, struct dsm_stats *out);
void dsm_set_limit(struct dsm_handler *h, uint64_t hard_limit);
uint64_t dsm_resident(struct dsm_handler *h);
int dsm_reserve(struct dsm_handler *h, uint64_t n);
void dsm_unreserve(struct dsm_handler *h, uint64_t n);
int dsm_install_zero(struct dsm_handler *h, uint64_t page);
int dsm_take_fetches(struct dsm_handler *h, uint64_t *pages, size_t max);
int dsm_claim(struct dsm_handler *h, const uint64_t *pages, size_t n, uint8_t *ok);
int dsm_install(struct dsm_handler *h, uint64_t first_page, const void *data, uint64_t npages);
int dsm_evict_begin(struct dsm_handler *h, const uint64_t *pages, size_t n,
                    uint8_t *ok, void *out);
int dsm_evict_commit(struct dsm_handler *h, const uint64_t *pages, size_t n, uint8_t *ok);
int dsm_evict_abort(struct dsm_handler *h, const uint64_t *pages, size_t n, const uint8_t *ok);
"""


def build(version: str) -> cffi.FFI:
    """Return the FFI describing the handler core.

    Args:
        version: the package version compiled into the module.

    Returns:
        The configured FFI (API mode).
    """
    ffi = cffi.FFI()
    ffi.cdef(TYPES + FUNCTIONS)
    ffi.set_source(
        "hypervisor._native._dsm",
        '#include "dsm.h"\n'
        f'static const char *omega_dsm_version(void) {{ return "{version}"; }}\n',
    )
    return ffi


def main(argv: list[str]) -> int:
    """Write the C source to argv[1] for version argv[2]."""
    out, version = argv[1], argv[2]
    build(version).emit_c_code(out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
