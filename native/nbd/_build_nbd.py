"""Emit the cffi (API mode) C source of ``hypervisor._native._nbd``.

Usage: ``python _build_nbd.py OUTPUT.c VERSION``.  meson runs this (see
meson.build) and compiles the output with nbd_*.c.  Struct and function
declarations are read from the marked blocks of nbd_repl.h and nbd_fast.h
(one source of truth, read by native/cffi_build.py); constants are resolved
from the headers at compile time (``...``), never copied here.
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
#define NBR_MAX_PEERS ...
"""

HEADER = Path(__file__).with_name("nbd_fast.h")
REPL_HEADER = Path(__file__).with_name("nbd_repl.h")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from cffi_build import c_string, emit_main, header_declarations  # noqa: E402


def build_ffi(version: str) -> cffi.FFI:
    """Declare the C API and its source preamble.

    Args:
        version: the project version compiled into ``omega_nbd_version()``.

    Returns:
        The configured FFI, ready for ``emit_c_code``.
    """
    ffi = cffi.FFI()
    ffi.cdef(header_declarations(REPL_HEADER) + header_declarations(HEADER) + CONSTANTS)
    ffi.set_source(
        "hypervisor._native._nbd",
        '#include "nbd_repl.h"\n#include "nbd_fast.h"\n'
        "const char *omega_nbd_version(void) { return " + c_string(version) + "; }\n",
    )
    return ffi


if __name__ == "__main__":
    sys.exit(emit_main(build_ffi, sys.argv[1:], script="_build_nbd.py"))
