"""Where an export's bytes live: the backend interface and the local backends.

A :class:`Backend` serves one export. Local backends (:class:`MemoryBackend`,
:class:`SparseFileBackend`) answer synchronously, which lets the server reply
to a pipelined batch of requests without creating a task per request; remote
backends set ``is_async`` and return awaitables from the same methods.

Allocation is tracked honestly: ``block_status`` reports holes only where no
data was written (or where it was trimmed), so ``base:allocation`` and
``nbdinfo --map`` show the truth.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap
import os
from abc import ABC, abstractmethod
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

from hypervisor.errors import OmegaError
from hypervisor.netblock import protocol as nbd


class BackendError(OmegaError):
    """A backend operation failed; ``nbd_errno`` is what the client is told.

    Args:
        message: what failed.
        nbd_errno: the NBD error number to reply with (default EIO).
    """

    def __init__(self, message: str, *, nbd_errno: int = nbd.EIO) -> None:
        super().__init__(message)
        self.nbd_errno = nbd_errno


Extent = tuple[int, int]
"""(length, NBD_STATE_* flags) of one block-status descriptor."""


class Backend(ABC):
    """Storage behind one export.

    Synchronous backends (``is_async = False``) return results directly;
    asynchronous ones return awaitables from the same methods.

    Attributes:
        size: export size in bytes.
        min_block, preferred_block, max_block: NBD block size constraints.
        read_only: refuse writes.
        multi_conn_safe: a flush on one connection makes every connection's
            completed writes durable and visible (NBD CAN_MULTI_CONN).
        can_fast_zero: write_zeroes is cheaper than writing zero bytes.
        is_async: methods return awaitables.
    """

    size: int
    min_block: int = 1
    preferred_block: int = 4096
    max_block: int = 32 * 1024 * 1024
    read_only: bool = False
    multi_conn_safe: bool = True
    can_fast_zero: bool = True
    is_async: bool = False

    @abstractmethod
    def read(self, offset: int, length: int) -> bytes | Awaitable[bytes]:
        """Return ``length`` bytes at ``offset`` (holes read as zeroes)."""

    @abstractmethod
    def write(self, offset: int, data: bytes | memoryview, *, fua: bool) -> Any:
        """Write ``data`` at ``offset``; with ``fua`` make it durable first."""

    @abstractmethod
    def trim(self, offset: int, length: int, *, fua: bool) -> Any:
        """Discard a range (it then reads as zeroes and may become a hole)."""

    @abstractmethod
    def write_zeroes(self, offset: int, length: int, *, fua: bool, may_trim: bool,
                     fast_only: bool) -> Any:
        """Zero a range.

        Args:
            offset: start.
            length: byte count.
            fua: make durable before returning.
            may_trim: the range may become a hole (no NO_HOLE flag).
            fast_only: fail with ENOTSUP instead of doing slow work (FAST_ZERO).
        """

    @abstractmethod
    def flush(self) -> Any:
        """Make every completed write durable."""

    @abstractmethod
    def block_status(self, offset: int, length: int) -> list[Extent] | Awaitable[list[Extent]]:
        """Describe allocation from ``offset``: (length, flags) extents in order."""

    def cache(self, offset: int, length: int) -> Any:
        """Prefetch a range (advisory; default does nothing)."""
        return None

    def close(self) -> Any:
        """Release resources."""
        return None

    def export_info(self, name: str, *, description: str = "") -> nbd.ExportInfo:
        """What the handshake advertises for this backend.

        Args:
            name: the export name.
            description: free text.

        Returns:
            The export info with capability flags taken from this backend.
        """
        return nbd.ExportInfo(
            name=name, size=self.size, description=description, read_only=self.read_only,
            can_flush=True, can_fua=True, can_trim=True, can_zero=True,
            can_fast_zero=self.can_fast_zero, can_cache=True,
            can_multi_conn=self.multi_conn_safe, min_block=self.min_block,
            preferred_block=self.preferred_block, max_block=self.max_block)


class AllocationMap:
    """Which fixed-size blocks of an export hold data (one byte per block).

    Args:
        size: export size in bytes.
        block: granularity in bytes (a power of two).
    """

    def __init__(self, size: int, *, block: int = 4096) -> None:
        if block <= 0 or block & (block - 1):
            raise ValueError("block must be a power of two")
        self.block = block
        self.size = size
        self._map = bytearray((size + block - 1) // block)

    def mark(self, offset: int, length: int) -> None:
        """Record a write touching [offset, offset+length)."""
        if length <= 0:
            return
        first = offset // self.block
        last = (offset + length - 1) // self.block
        self._map[first:last + 1] = b"\x01" * (last - first + 1)

    def clear(self, offset: int, length: int) -> tuple[int, int]:
        """Forget the blocks fully inside a range.

        Returns:
            (offset, length) of the whole blocks cleared (length 0 if none).
        """
        first = -(-offset // self.block)
        end = (offset + length) // self.block
        if offset + length >= self.size:
            end = len(self._map)
        if end <= first:
            return offset, 0
        self._map[first:end] = bytes(end - first)
        start = first * self.block
        return start, min(end * self.block, self.size) - start

    def extents(self, offset: int, length: int) -> list[Extent]:
        """Allocation extents covering [offset, offset+length)."""
        out: list[Extent] = []
        pos = offset
        stop = min(offset + length, self.size)
        amap = self._map
        while pos < stop:
            index = pos // self.block
            state = amap[index]
            nxt = amap.find(b"\x00" if state else b"\x01", index)
            run_end = self.size if nxt < 0 else nxt * self.block
            run_end = min(run_end, stop)
            out.append((run_end - pos, 0 if state else nbd.STATE_HOLE | nbd.STATE_ZERO))
            pos = run_end
        return out


class MemoryBackend(Backend):
    """An export in anonymous memory (like nbdkit's memory plugin).

    Pages are allocated on first write; trimmed and zeroed whole pages are
    returned to the kernel with MADV_DONTNEED, so they read as zeroes again.

    Args:
        size: export size in bytes.
    """

    def __init__(self, size: int) -> None:
        if size <= 0:
            raise ValueError("size must be positive")
        self.size = size
        self._mem = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self._alloc = AllocationMap(size, block=mmap.PAGESIZE)

    def read(self, offset: int, length: int) -> bytes:
        return self._mem[offset:offset + length]

    def write(self, offset: int, data: bytes | memoryview, *, fua: bool) -> None:
        self._mem[offset:offset + len(data)] = data
        self._alloc.mark(offset, len(data))

    def _fill_zero(self, offset: int, length: int) -> None:
        step = 1 << 20
        for pos in range(offset, offset + length, step):
            count = min(step, offset + length - pos)
            self._mem[pos:pos + count] = bytes(count)

    def _zero(self, offset: int, length: int, *, punch: bool) -> None:
        if not punch:
            self._fill_zero(offset, length)
            self._alloc.mark(offset, length)
            return
        start, count = self._alloc.clear(offset, length)
        if not count:
            self._fill_zero(offset, length)
            return
        self._mem.madvise(mmap.MADV_DONTNEED, start, count)
        # partial pages at either edge keep their allocation; zero their bytes
        self._fill_zero(offset, start - offset)
        self._fill_zero(start + count, offset + length - start - count)

    def trim(self, offset: int, length: int, *, fua: bool) -> None:
        self._zero(offset, length, punch=True)

    def write_zeroes(self, offset: int, length: int, *, fua: bool, may_trim: bool,
                     fast_only: bool) -> None:
        self._zero(offset, length, punch=may_trim)

    def flush(self) -> None:
        return None

    def block_status(self, offset: int, length: int) -> list[Extent]:
        return self._alloc.extents(offset, length)

    def close(self) -> None:
        self._mem.close()


_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_FALLOC_FL_ZERO_RANGE = 0x10
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
_libc.fallocate.restype = ctypes.c_int


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with mode flags (os.posix_fallocate has none).

    Raises:
        OSError: the call failed.
    """
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class SparseFileBackend(Backend):
    """An export in a sparse file on this host.

    Holes come from the file system (SEEK_HOLE/SEEK_DATA); trims punch holes;
    FUA and flush are fdatasync. One descriptor serves every connection, so a
    flush anywhere covers all completed writes (multi-conn safe).

    Args:
        path: the file; created (sparse) at ``size`` if missing.
        size: export size (required when creating).
        read_only: open read-only.
        owner_lock: a lock file descriptor (``ExportStore.lock``) this backend
            holds while open and closes with it.

    Raises:
        BackendError: the file cannot be opened or has the wrong size.
    """

    def __init__(self, path: Path, *, size: int | None = None, read_only: bool = False,
                 owner_lock: int | None = None) -> None:
        self._owner_lock = owner_lock
        flags = os.O_RDONLY if read_only else os.O_RDWR
        if size is not None and not read_only:
            flags |= os.O_CREAT
        try:
            self._fd = os.open(path, flags | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise BackendError(f"cannot open {path}: {exc.strerror}") from exc
        actual = os.fstat(self._fd).st_size
        if size is not None and actual == 0 and size > 0 and not read_only:
            os.ftruncate(self._fd, size)
            actual = size
        self.size = actual
        self.read_only = read_only
        self.path = path

    def read(self, offset: int, length: int) -> bytes:
        data = os.pread(self._fd, length, offset)
        if len(data) < length:  # only past EOF of a shrunken file
            data += bytes(length - len(data))
        return data

    def write(self, offset: int, data: bytes | memoryview, *, fua: bool) -> None:
        view = memoryview(data)
        while view:
            n = os.pwrite(self._fd, view, offset)
            view = view[n:]
            offset += n
        if fua:
            os.fdatasync(self._fd)

    def trim(self, offset: int, length: int, *, fua: bool) -> None:
        try:
            fallocate(self._fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError as exc:
            if exc.errno != errno.EOPNOTSUPP:
                raise BackendError(f"trim: {exc.strerror}") from exc
        if fua:
            os.fdatasync(self._fd)

    def write_zeroes(self, offset: int, length: int, *, fua: bool, may_trim: bool,
                     fast_only: bool) -> None:
        mode = (_FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE) if may_trim else _FALLOC_FL_ZERO_RANGE
        try:
            fallocate(self._fd, mode, offset, length)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise BackendError(f"write_zeroes: {exc.strerror}") from exc
            if fast_only:
                raise BackendError("zeroing would be slow", nbd_errno=nbd.ENOTSUP) from exc
            step = 1 << 20
            for pos in range(offset, offset + length, step):
                os.pwrite(self._fd, bytes(min(step, offset + length - pos)), pos)
        if fua:
            os.fdatasync(self._fd)

    def flush(self) -> None:
        os.fdatasync(self._fd)

    def block_status(self, offset: int, length: int) -> list[Extent]:
        out: list[Extent] = []
        pos = offset
        stop = min(offset + length, self.size)
        while pos < stop:
            try:
                data_at = os.lseek(self._fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno != errno.ENXIO:
                    raise BackendError(f"SEEK_DATA: {exc.strerror}") from exc
                data_at = stop
            if data_at > pos:
                end = min(data_at, stop)
                out.append((end - pos, nbd.STATE_HOLE | nbd.STATE_ZERO))
                pos = end
                continue
            hole_at = os.lseek(self._fd, pos, os.SEEK_HOLE)
            end = min(hole_at, stop)
            out.append((end - pos, 0))
            pos = end
        return out

    def cache(self, offset: int, length: int) -> None:
        os.posix_fadvise(self._fd, offset, length, os.POSIX_FADV_WILLNEED)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._owner_lock is not None:
            os.close(self._owner_lock)
            self._owner_lock = None
