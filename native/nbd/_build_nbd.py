"""Emit the cffi (API mode) C source of ``hypervisor._native._nbd``.

Usage: ``python _build_nbd.py OUTPUT.c VERSION``.  meson runs this (see
meson.build) and compiles the output with nbd_serve.c, nbd_ops.c and
nbd_reply.c.  Struct and function declarations are read from the marked block
of nbd_fast.h (one source of truth, read by native/uffd's reader); constants are resolved from the header
at compile time (``...``), never copied here.
"""

from __future__ import annotations

import sys
from pathlib import Path

import cffi

CONSTANTS = """
#define OMEGA_NBD_END_DISC ...
#define OMEGA_NBD_END_EOF ...
#define OMEGA_NBD_END_PROTOCOL ...
#define OMEGA_NBD_END_SOCKET ...
#define OMEGA_NBD_END_INTERNAL ...
#define OMEGA_NBD_NCMD ...
#define OMEGA_NBD_NBOUNDS ...
#define OMEGA_NBD_MAX_EXTENTS ...
"""

HEADER = Path(__file__).with_name("nbd_fast.h")

# The marked-block reader is native/uffd's (one implementation of the pattern).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "uffd"))
from _build_uffd import header_declarations  # noqa: E402


def build_ffi(version: str) -> cffi.FFI:
    """Declare the C API and its source preamble.

    Args:
        version: the project version compiled into ``omega_nbd_version()``.

    Returns:
        The configured FFI, ready for ``emit_c_code``.
    """
    ffi = cffi.FFI()
    ffi.cdef(header_declarations(HEADER) + CONSTANTS)
    version_literal = '"' + version.replace("\\", "\\\\").replace('"', '\\"') + '"'
    ffi.set_source(
        "hypervisor._native._nbd",
        '#include "nbd_fast.h"\n'
        "const char *omega_nbd_version(void) { return " + version_literal + "; }\n",
    )
    return ffi


def main(argv: list[str]) -> int:
    """Write the generated C file.

    Args:
        argv: ``[OUTPUT.c, VERSION]``.

    Returns:
        The process exit status.
    """
    if len(argv) != 2:
        print("usage: _build_nbd.py OUTPUT.c VERSION", file=sys.stderr)
        return 2
    build_ffi(argv[1]).emit_c_code(argv[0])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
