"""A userfaultfd made in-process for tests of the handler core.

The agent (native/agent) does this inside QEMU; these tests need the same
thing inside the test process, so the few ioctls are spelled out here.
"""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import struct
from dataclasses import dataclass

_SYS_USERFAULTFD = 323  # x86_64
_UFFD_API = 0xAA
_UFFDIO_API = 0xC018AA3F
_UFFDIO_REGISTER = 0xC020AA00
_FEATURE_MISSING_SHMEM = 1 << 5
_FEATURE_WP_SHMEM = 1 << 12
_MODE_MISSING, _MODE_WP = 1, 2

_libc = ctypes.CDLL(None, use_errno=True)


@dataclass
class GuestRegion:
    """A shared memfd mapping registered with a userfaultfd (MISSING + WP)."""

    memfd: int
    uffd: int
    mapping: mmap.mmap
    addr: int
    length: int

    def close(self) -> None:
        """Unmap and close both descriptors (those not handed over)."""
        self.mapping.close()
        for fd in (self.memfd, self.uffd):
            try:
                os.close(fd)
            except OSError:
                pass


def make_region(length: int) -> GuestRegion:
    """Create a memfd of length bytes, map it shared and register it.

    Args:
        length: bytes (page multiple).

    Returns:
        The region.
    """
    memfd = os.memfd_create("omega-test-guest", os.MFD_CLOEXEC)
    os.ftruncate(memfd, length)
    mapping = mmap.mmap(memfd, length, flags=mmap.MAP_SHARED)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(mapping))
    uffd = _libc.syscall(_SYS_USERFAULTFD, os.O_CLOEXEC | os.O_NONBLOCK)
    if uffd < 0:
        raise OSError(ctypes.get_errno(), "userfaultfd")
    fcntl.ioctl(uffd, _UFFDIO_API, struct.pack("QQQ", _UFFD_API,
                                                _FEATURE_MISSING_SHMEM | _FEATURE_WP_SHMEM, 0))
    fcntl.ioctl(uffd, _UFFDIO_REGISTER, struct.pack("QQQQ", addr, length,
                                                     _MODE_MISSING | _MODE_WP, 0))
    return GuestRegion(memfd, uffd, mapping, addr, length)


def touch_read(addr: int, length: int) -> bytes:
    """Copy guest memory out; blocks in the kernel (GIL released) on a fault."""
    buf = ctypes.create_string_buffer(length)
    ctypes.memmove(buf, addr, length)
    return buf.raw


def touch_write(addr: int, data: bytes) -> None:
    """Write guest memory; blocks in the kernel (GIL released) on a fault."""
    ctypes.memmove(addr, data, len(data))
