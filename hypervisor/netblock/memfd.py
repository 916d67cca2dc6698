"""An in-RAM export held in a memfd, so that it has a file descriptor.

:class:`MemfdBackend` is what :class:`~hypervisor.netblock.backend.MemoryBackend`
is (pages allocated on first write, trimmed pages given back, holes reported
honestly), but the memory is a memfd (shmem) file instead of an anonymous
mapping. Being a file, it is served by the same code as a sparse file —
``pread``/``pwrite``, ``fallocate`` holes, ``SEEK_DATA``/``SEEK_HOLE`` — and
the native fast path (:mod:`hypervisor.netblock.fastpath`) can serve it from C.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from hypervisor.netblock.backend import BackendError, SparseFileBackend


class MemfdBackend(SparseFileBackend):
    """An export in a memfd (RAM, gone when the server exits).

    shmem has no ``FALLOC_FL_ZERO_RANGE``: zeroing that must not leave a hole
    (NBD_CMD_FLAG_NO_HOLE) writes zeroes, and refuses with ENOTSUP under
    FAST_ZERO, exactly as a sparse file on tmpfs does. (Punching and
    re-allocating would be fast, but shmem reports allocated-unwritten pages
    as holes, so block status would contradict NO_HOLE.)

    Args:
        size: export size in bytes.
        name: the memfd's name (shown in /proc/PID/fd).

    Raises:
        ValueError: size is not positive.
        BackendError: the memfd cannot be created or sized.

    Attributes:
        fd: the memfd (the fast path serves from it).
    """

    def __init__(self, size: int, *, name: str = "omega-netblock") -> None:
        if size <= 0:
            raise ValueError("size must be positive")
        try:
            self.fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        except OSError as exc:
            raise BackendError(f"memfd_create: {exc.strerror}") from exc
        try:
            os.ftruncate(self.fd, size)
            # Its size can no longer change: the fast path may then copy WRITEs
            # through a shared mapping, which could not fault past the end.
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
            # The file code opens a path; /proc/self/fd/N reopens this memfd.
            super().__init__(Path(f"/proc/self/fd/{self.fd}"))
        except BaseException as exc:
            os.close(self.fd)
            if isinstance(exc, OSError):
                raise BackendError(f"memfd of {size} bytes: {exc.strerror}") from exc
            raise

    def close(self) -> None:
        super().close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
