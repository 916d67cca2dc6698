"""What every ``native/<job>/_build_<job>.py`` shares.

Each build script declares its C API to cffi (API mode) and writes the
generated C with ``ffi.emit_c_code``; meson runs it as
``python _build_<job>.py OUTPUT.c VERSION``. The struct and function
declarations live once, in a marked block of the job's header, and are read
from there; the package version is compiled in so a stale build is refused at
import.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import cffi

BEGIN_MARK = "/* --- cffi declarations begin"
END_MARK = "/* --- cffi declarations end */"


def header_declarations(header: Path) -> str:
    """Return the declarations between the cffi markers of ``header``.

    Args:
        header: the header holding the marked declaration block.

    Returns:
        The declarations between the markers, as cdef text.

    Raises:
        ValueError: the markers are missing.
    """
    text = header.read_text()
    try:
        block = text[text.index(BEGIN_MARK):text.index(END_MARK)]
    except ValueError as exc:
        raise ValueError(f"{header}: cffi declaration markers not found") from exc
    return block.split("*/", 1)[1]


def c_string(text: str) -> str:
    """Return ``text`` as a C string literal (quotes and backslashes escaped)."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def emit_main(build_ffi: Callable[[str], cffi.FFI], argv: list[str], *, script: str) -> int:
    """Run a build script: ``argv`` is ``[OUTPUT.c, VERSION]``.

    Args:
        build_ffi: returns the configured FFI for a version.
        argv: the command-line arguments after the script name.
        script: the script's file name, for the usage line.

    Returns:
        The process exit status (2 on bad usage).
    """
    if len(argv) != 2:
        print(f"usage: {script} OUTPUT.c VERSION", file=sys.stderr)
        return 2
    build_ffi(argv[1]).emit_c_code(argv[0])
    return 0


def versioned_ffi(job: str, header: Path, types: str, version: str) -> cffi.FFI:
    """The FFI of a job whose header has a marked declaration block.

    Declares ``types`` (partial declarations and ``#define X ...``
    constants), ``omega_<job>_version()`` and the header's block, and sets
    the source to include the header and define the version function.

    Args:
        job: the job name (module ``hypervisor._native._<job>``).
        header: the job's header (included by its file name).
        types: cdef text declared before the header's block.
        version: the package version compiled into the module.

    Returns:
        The configured FFI (API mode).
    """
    function = f"const char *omega_{job}_version(void)"
    ffi = cffi.FFI()
    ffi.cdef(types + function + ";\n" + header_declarations(header))
    ffi.set_source(
        f"hypervisor._native._{job}",
        f'#include "{header.name}"\n'
        f"static {function} {{ return {c_string(version)}; }}\n",
    )
    return ffi
