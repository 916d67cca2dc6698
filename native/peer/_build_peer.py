"""Emit the cffi (API mode) C source of ``hypervisor._native._peer``.

Usage: ``python _build_peer.py OUTPUT.c VERSION``. meson compiles the output
with the page store and data port (peer_*.c). Declarations are read from the
marked block of peer.h; the store and server types stay opaque.
"""

from __future__ import annotations

import sys
from pathlib import Path

import cffi

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from cffi_build import emit_main, versioned_ffi  # noqa: E402

TYPES = """
#define PEER_ST_OK ...
#define PEER_ST_NOT_FOUND ...
#define PEER_ST_FULL ...
#define PEER_ST_STALE ...
#define PEER_ST_FORBIDDEN ...
#define PEER_MAX_BATCH ...
#define PEER_C_COUNT ...
"""

HEADER = Path(__file__).with_name("peer.h")


def build(version: str) -> cffi.FFI:
    """Return the FFI of ``hypervisor._native._peer`` (see ``versioned_ffi``)."""
    return versioned_ffi("peer", HEADER, TYPES, version)


if __name__ == "__main__":
    sys.exit(emit_main(build, sys.argv[1:], script="_build_peer.py"))
