"""A guest-RAM-like region made in-process for tests of the handler core,
with U's userfaultfd primitives (hypervisor.dsm.uffd): a shared memfd mapping
registered MISSING + WP, as the agent does inside QEMU.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from hypervisor.dsm import uffd as U
from hypervisor.dsm.core import FaultHandlerCore


@dataclass
class GuestRegion:
    """A shared memfd mapping registered with a userfaultfd (MISSING + WP)."""

    memfd: int
    uffd: U.Userfaultfd
    mapping: U.MappedFile
    addr: int
    length: int

    def close(self) -> None:
        """Unmap and close both descriptors."""
        self.mapping.close()
        self.uffd.close()
        os.close(self.memfd)


def make_region(length: int) -> GuestRegion:
    """Create a memfd of length bytes, map it shared and register it."""
    memfd = U.memfd_create("omega-test-guest")
    os.ftruncate(memfd, length)
    mapping = U.MappedFile.map(memfd, length)
    fd = U.Userfaultfd.create(features=U.FEATURE_MISSING_SHMEM | U.FEATURE_WP_HUGETLBFS_SHMEM)
    fd.register(mapping.address, length, missing=True, wp=True)
    return GuestRegion(memfd, fd, mapping, mapping.address, length)


@contextmanager
def region_with_core(npages: int) -> Iterator[tuple[GuestRegion, FaultHandlerCore]]:
    """A region of ``npages`` pages and a handler core over it (not started)."""
    reg = make_region(npages * os.sysconf("SC_PAGESIZE"))
    core = FaultHandlerCore(os.dup(reg.uffd.fd), os.dup(reg.memfd), base=reg.addr,
                            length=reg.length, wp=True)
    try:
        yield reg, core
    finally:
        core.close()
        reg.close()


def touch_read(addr: int, length: int) -> bytes:
    """Copy guest memory out; blocks in the kernel (GIL released) on a fault."""
    buf = ctypes.create_string_buffer(length)
    ctypes.memmove(buf, addr, length)
    return buf.raw


def touch_write(addr: int, data: bytes) -> None:
    """Write guest memory; blocks in the kernel (GIL released) on a fault."""
    ctypes.memmove(addr, data, len(data))
