"""Allocator settings for Omega's long-running data-path processes.

glibc serves every allocation above ``M_MMAP_THRESHOLD`` (128 KiB, growing
only after a free) with a fresh ``mmap`` and returns it with ``munmap``, so a
daemon that builds a 512 KiB answer per request pays a page fault for every
4 KiB of it, every time: on this box that was 40 % of a peer's CPU while
serving pages. :func:`keep_large_buffers` raises the threshold and the trim
threshold so such buffers are reused from the heap.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger("omega.memtune")

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed value on 64-bit
TRIM_THRESHOLD = 128 << 20


def keep_large_buffers() -> bool:
    """Serve buffers up to 32 MiB from the heap and keep up to 128 MiB of it.

    Returns:
        Whether the allocator took the settings (False on a libc without
        ``mallopt``, e.g. musl; nothing else changes then).
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and \
        bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    if not ok:
        log.debug("mallopt refused the thresholds")
    return ok
