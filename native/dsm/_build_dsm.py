"""Emit the cffi (API mode) C source of ``hypervisor._native._dsm``.

Usage: ``python _build_dsm.py OUTPUT.c VERSION``. meson compiles the output
with the handler core (dsm_*.c). Function declarations are read from the
marked block of dsm.h; the types are declared partially here (``...``) so
cffi never sees the pthread fields.
"""

from __future__ import annotations

import sys
from pathlib import Path

import cffi

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from cffi_build import emit_main, versioned_ffi  # noqa: E402

TYPES = """
enum dsm_page_state {
    DSM_ZERO, DSM_LOCAL, DSM_REMOTE, DSM_FETCHING, DSM_EVICTING, DSM_PUNCHING,
    DSM_INSTALLING, ...
};
#define DSM_LAT_BUCKETS ...
#define DSM_MAX_THREADS ...
#define DSM_QUEUE_ZERO ...
#define DSM_QUEUE_SEEN ...
#define DSM_QUEUE_LANDED ...
#define DSM_QUEUE_RECLAIM ...
#define DSM_MAX_PEERS ...
#define DSM_HOLDER_MEMORY ...

struct dsm_stats {
    uint64_t npages, page_size, resident, remote, faults, faults_zero,
             faults_remote, faults_inflight, faults_wp, faults_spurious,
             evict_cancelled, installed_pages, install_calls, evicted_pages,
             eagain, errors, queue_len, faults_deferred, native_fetches,
             native_prefetched, native_fallbacks, native_peer_errors, native_bytes_in,
             native_prefetch_dropped;
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

HEADER = Path(__file__).with_name("dsm.h")


def build(version: str) -> cffi.FFI:
    """Return the FFI of ``hypervisor._native._dsm`` (see ``versioned_ffi``)."""
    return versioned_ffi("dsm", HEADER, TYPES, version)


if __name__ == "__main__":
    sys.exit(emit_main(build, sys.argv[1:], script="_build_dsm.py"))
