"""userfaultfd and memory-file primitives (Python side of native/uffd).

The DSM layer stands on these: a :class:`Userfaultfd` on a guest's shared RAM
mapping, memfds whose pages can be punched out (:func:`punch_hole`) so that the
next touch faults, and descriptors passed between processes with
:func:`send_fds` / :func:`recv_fds` (SCM_RIGHTS).

Every call goes to C in ``hypervisor._native._uffd`` with the GIL released, so
one thread may block on a fault in a registered range while another thread
resolves it. Failures raise :class:`UffdError` subclasses chosen by errno.

Importing this module raises :class:`~hypervisor.errors.NativeError` when the
native module is missing (run ``make native``) or was built for another version.
"""

from __future__ import annotations

import enum
import errno as errno_codes
import os
import select
import socket
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from hypervisor import _native
from hypervisor.errors import NativeError

_module = _native.load("uffd")
ffi: Any = _module.ffi
lib: Any = _module.lib

__all__ = [
    "EventKind",
    "FaultEvent",
    "MappedFile",
    "UffdAgain",
    "UffdBadRange",
    "UffdError",
    "UffdExists",
    "UffdFeatureMissing",
    "UffdPermission",
    "UffdProcessGone",
    "Userfaultfd",
    "available_features",
    "feature_names",
    "memfd_create",
    "page_size",
    "punch_hole",
    "recv_fds",
    "send_fds",
    "supported_features",
]

# Feature bits for Userfaultfd.create(features=...); values come from the kernel headers.
FEATURE_PAGEFAULT_FLAG_WP: int = lib.UFFD_FEATURE_PAGEFAULT_FLAG_WP
FEATURE_EVENT_FORK: int = lib.UFFD_FEATURE_EVENT_FORK
FEATURE_EVENT_REMAP: int = lib.UFFD_FEATURE_EVENT_REMAP
FEATURE_EVENT_REMOVE: int = lib.UFFD_FEATURE_EVENT_REMOVE
FEATURE_MISSING_HUGETLBFS: int = lib.UFFD_FEATURE_MISSING_HUGETLBFS
FEATURE_MISSING_SHMEM: int = lib.UFFD_FEATURE_MISSING_SHMEM
FEATURE_EVENT_UNMAP: int = lib.UFFD_FEATURE_EVENT_UNMAP
FEATURE_SIGBUS: int = lib.UFFD_FEATURE_SIGBUS
FEATURE_THREAD_ID: int = lib.UFFD_FEATURE_THREAD_ID
FEATURE_MINOR_HUGETLBFS: int = lib.UFFD_FEATURE_MINOR_HUGETLBFS
FEATURE_MINOR_SHMEM: int = lib.UFFD_FEATURE_MINOR_SHMEM
FEATURE_EXACT_ADDRESS: int = lib.UFFD_FEATURE_EXACT_ADDRESS
FEATURE_WP_HUGETLBFS_SHMEM: int = lib.UFFD_FEATURE_WP_HUGETLBFS_SHMEM
FEATURE_WP_UNPOPULATED: int = lib.UFFD_FEATURE_WP_UNPOPULATED
FEATURE_POISON: int = lib.UFFD_FEATURE_POISON
FEATURE_WP_ASYNC: int = lib.UFFD_FEATURE_WP_ASYNC
FEATURE_MOVE: int = lib.UFFD_FEATURE_MOVE

#: Every named feature bit, by lower-case name (the keys of available_features()).
FEATURES: dict[str, int] = {
    name[len("FEATURE_"):].lower(): value
    for name, value in dict(globals()).items()
    if name.startswith("FEATURE_")
}

# Bits of the ioctls mask returned by register(): which ioctls the range allows.
IOCTL_WAKE: int = 1 << lib._UFFDIO_WAKE
IOCTL_COPY: int = 1 << lib._UFFDIO_COPY
IOCTL_ZEROPAGE: int = 1 << lib._UFFDIO_ZEROPAGE
IOCTL_WRITEPROTECT: int = 1 << lib._UFFDIO_WRITEPROTECT
IOCTL_CONTINUE: int = 1 << lib._UFFDIO_CONTINUE

# Pagefault flags (FaultEvent.flags).
PAGEFAULT_FLAG_WRITE: int = lib.UFFD_PAGEFAULT_FLAG_WRITE
PAGEFAULT_FLAG_WP: int = lib.UFFD_PAGEFAULT_FLAG_WP
PAGEFAULT_FLAG_MINOR: int = lib.UFFD_PAGEFAULT_FLAG_MINOR

MAX_EVENTS_PER_READ: int = lib.OMEGA_UFFD_MAX_EVENTS
MAX_FDS_PER_MESSAGE: int = lib.OMEGA_FDPASS_MAX


class UffdError(NativeError):
    """A userfaultfd or memory-file syscall failed.

    Attributes:
        errno: the errno the kernel returned.
    """

    def __init__(self, message: str, *, errno: int) -> None:
        super().__init__(message)
        self.errno = errno


class UffdExists(UffdError):
    """EEXIST: the page is already present (a second copy or zeropage)."""


class UffdAgain(UffdError):
    """EAGAIN: nothing was done now (the mm is changing, or the socket would block)."""


class UffdPermission(UffdError):
    """EPERM/EACCES: not allowed (e.g. vm.unprivileged_userfaultfd=0 for non-root)."""


class UffdBadRange(UffdError):
    """EINVAL/ENOMEM/EFAULT/ENOENT: the range is unaligned, unmapped or not registered."""


class UffdProcessGone(UffdError):
    """ESRCH: the process whose memory the uffd serves has exited."""


class UffdFeatureMissing(UffdError):
    """The kernel does not offer a requested userfaultfd feature.

    Attributes:
        missing: the requested feature bits the kernel lacks.
    """

    def __init__(self, missing: int) -> None:
        names = ", ".join(feature_names(missing))
        super().__init__(
            f"the kernel's userfaultfd lacks requested feature(s): {names}",
            errno=errno_codes.EINVAL,
        )
        self.missing = missing


_ERRNO_CLASSES: dict[int, type[UffdError]] = {
    errno_codes.EEXIST: UffdExists,
    errno_codes.EAGAIN: UffdAgain,
    errno_codes.EPERM: UffdPermission,
    errno_codes.EACCES: UffdPermission,
    errno_codes.EINVAL: UffdBadRange,
    errno_codes.ENOMEM: UffdBadRange,
    errno_codes.EFAULT: UffdBadRange,
    errno_codes.ENOENT: UffdBadRange,
    errno_codes.ESRCH: UffdProcessGone,
}


def _error(operation: str, err: int) -> UffdError:
    """Build the typed exception for a failed call.

    Args:
        operation: what was attempted, with its arguments, for the message.
        err: the errno.

    Returns:
        An instance of the UffdError subclass for ``err``.
    """
    cls = _ERRNO_CLASSES.get(err, UffdError)
    return cls(f"{operation}: {os.strerror(err)} (errno {err})", errno=err)


def _check(rc: int, operation: str) -> int:
    """Raise the typed error when a C call returned -1; else pass ``rc`` through."""
    if rc == -1:
        raise _error(operation, ffi.errno)
    return rc


def _address_of(buffer: Any) -> int:
    return int(ffi.cast("uintptr_t", buffer))


def feature_names(bits: int) -> list[str]:
    """Name feature bits, unknown ones as ``bit N``.

    Args:
        bits: a mask of UFFD_FEATURE_* bits.

    Returns:
        Upper-case names (``MISSING_SHMEM``) in bit order.
    """
    names = {value: name.upper() for name, value in FEATURES.items()}
    return [
        names.get(1 << bit, f"bit {bit}") for bit in range(64) if bits & (1 << bit)
    ]


def page_size() -> int:
    """Return the base page size in bytes."""
    return int(lib.omega_page_size())


def supported_features(*, user_mode_only: bool = False) -> int:
    """Return the feature bits this kernel's userfaultfd offers.

    Args:
        user_mode_only: probe with UFFD_USER_MODE_ONLY (what an unprivileged
            process may create when vm.unprivileged_userfaultfd=0).

    Returns:
        The mask of UFFD_FEATURE_* bits.

    Raises:
        UffdError: userfaultfd cannot be created here.
    """
    out = ffi.new("uint64_t *")
    _check(lib.omega_uffd_supported_features(int(user_mode_only), out), "userfaultfd probe")
    return int(out[0])


def available_features() -> dict[str, bool]:
    """Report each named userfaultfd feature as available or not (for ``omega host check``).

    Probes a full userfaultfd first and falls back to a user-mode-only one
    where the full one is not permitted.

    Returns:
        ``{"missing_shmem": True, ...}`` for every name in :data:`FEATURES`.

    Raises:
        UffdError: no userfaultfd can be created at all.
    """
    try:
        bits = supported_features()
    except UffdPermission:
        bits = supported_features(user_mode_only=True)
    return {name: bool(bits & value) for name, value in FEATURES.items()}


class EventKind(enum.StrEnum):
    """What a :class:`FaultEvent` reports."""

    PAGEFAULT = "pagefault"
    FORK = "fork"
    REMAP = "remap"
    REMOVE = "remove"
    UNMAP = "unmap"
    UNKNOWN = "unknown"


_EVENT_KINDS: dict[int, EventKind] = {
    lib.UFFD_EVENT_PAGEFAULT: EventKind.PAGEFAULT,
    lib.UFFD_EVENT_FORK: EventKind.FORK,
    lib.UFFD_EVENT_REMAP: EventKind.REMAP,
    lib.UFFD_EVENT_REMOVE: EventKind.REMOVE,
    lib.UFFD_EVENT_UNMAP: EventKind.UNMAP,
}


@dataclass(frozen=True)
class FaultEvent:
    """One message read from a userfaultfd.

    Attributes:
        kind: the event kind.
        address: faulting address (PAGEFAULT); the kernel page-aligns it
            unless the EXACT_ADDRESS feature was requested.
        flags: UFFD_PAGEFAULT_FLAG_* bits (PAGEFAULT).
        write: the fault was a write.
        wp: the fault hit a write-protected page.
        minor: a minor fault (page in the page cache, not mapped).
        ptid: faulting thread id (THREAD_ID feature), else 0.
        ufd: the child's new uffd, now open in this process (FORK).
        start: range start (REMOVE, UNMAP) or new address (REMAP).
        end: range end (REMOVE, UNMAP).
        remap_from: old address (REMAP).
        length: remapped length (REMAP).
    """

    kind: EventKind
    address: int = 0
    flags: int = 0
    write: bool = False
    wp: bool = False
    minor: bool = False
    ptid: int = 0
    ufd: int | None = None
    start: int = 0
    end: int = 0
    remap_from: int = 0
    length: int = 0

    @classmethod
    def from_c(cls, event: Any) -> FaultEvent:
        """Decode one ``struct omega_uffd_event``.

        Args:
            event: the cffi struct.

        Returns:
            The event.
        """
        kind = _EVENT_KINDS.get(event.kind, EventKind.UNKNOWN)
        if kind is EventKind.PAGEFAULT:
            flags = int(event.flags)
            return cls(
                kind,
                address=int(event.address),
                flags=flags,
                write=bool(flags & PAGEFAULT_FLAG_WRITE),
                wp=bool(flags & PAGEFAULT_FLAG_WP),
                minor=bool(flags & PAGEFAULT_FLAG_MINOR),
                ptid=int(event.ptid),
            )
        if kind is EventKind.FORK:
            return cls(kind, ufd=int(event.arg0))
        if kind is EventKind.REMAP:
            return cls(kind, remap_from=int(event.arg0), start=int(event.arg1),
                       length=int(event.arg2))
        if kind in (EventKind.REMOVE, EventKind.UNMAP):
            return cls(kind, start=int(event.arg0), end=int(event.arg1))
        return cls(kind)


class Userfaultfd:
    """A userfaultfd: register ranges, read their faults, resolve them.

    Create one with :meth:`create` (this process's memory) or adopt one
    received from another process with :meth:`from_fd` (then the ioctls act on
    that process's memory). Methods may be called from several threads at
    once; :meth:`close` only once no other thread uses the object.

    Attributes:
        features: the feature bits negotiated (or declared, for from_fd).
        ioctls: the ioctls mask the handshake reported (0 for from_fd).
    """

    def __init__(self, fd: int, *, features: int, ioctls: int) -> None:
        self._fd = fd
        self.features = features
        self.ioctls = ioctls

    @classmethod
    def create(cls, *, features: int = 0, nonblocking: bool = True,
               user_mode_only: bool = False) -> Userfaultfd:
        """Create a userfaultfd (O_CLOEXEC) and perform the UFFDIO_API handshake.

        Args:
            features: UFFD_FEATURE_* bits required; all must be offered.
            nonblocking: open with O_NONBLOCK (read_events never blocks).
            user_mode_only: UFFD_USER_MODE_ONLY: handle user-space faults only;
                allowed to unprivileged processes when vm.unprivileged_userfaultfd=0.

        Returns:
            The ready userfaultfd.

        Raises:
            UffdFeatureMissing: a requested feature is not offered by the kernel.
            UffdPermission: creating a userfaultfd (or a feature) is not permitted.
            UffdError: another failure.
        """
        missing = features & ~supported_features(user_mode_only=user_mode_only)
        if missing:
            raise UffdFeatureMissing(missing)
        fd = _check(lib.omega_uffd_create(int(nonblocking), int(user_mode_only)), "userfaultfd")
        features_out = ffi.new("uint64_t *")
        ioctls_out = ffi.new("uint64_t *")
        if lib.omega_uffd_api(fd, features, features_out, ioctls_out) == -1:
            err = ffi.errno
            os.close(fd)
            raise _error(f"UFFDIO_API features={features:#x}", err)
        return cls(fd, features=features, ioctls=int(ioctls_out[0]))

    @classmethod
    def from_fd(cls, fd: int, *, features: int = 0) -> Userfaultfd:
        """Adopt a userfaultfd that has done its handshake (e.g. received by SCM_RIGHTS).

        Args:
            fd: the descriptor; the object owns it from now on.
            features: the features it was created with, when known.

        Returns:
            The userfaultfd.
        """
        return cls(fd, features=features, ioctls=0)

    @property
    def fd(self) -> int:
        """The descriptor (-1 once closed)."""
        return self._fd

    def fileno(self) -> int:
        """Return the descriptor, for select/poll/asyncio."""
        return self._fd

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has run."""
        return self._fd < 0

    def close(self) -> None:
        """Close the descriptor; faulting threads of the target get SIGBUS or retry."""
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def __enter__(self) -> Userfaultfd:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Userfaultfd(fd={self._fd}, features={self.features:#x})"

    def register(self, addr: int, length: int, *, missing: bool = True, wp: bool = False,
                 minor: bool = False) -> int:
        """UFFDIO_REGISTER a page-aligned range.

        Args:
            addr: start address (page aligned).
            length: bytes (a multiple of the page size).
            missing: report faults on pages not present.
            wp: report writes to write-protected pages (needs PAGEFAULT_FLAG_WP,
                and WP_HUGETLBFS_SHMEM for shared memory).
            minor: report minor faults (needs MINOR_SHMEM for shared memory).

        Returns:
            The mask (IOCTL_*) of ioctls the range allows.

        Raises:
            UffdBadRange: unaligned or unmapped range, or a mode the memory does not support.
            UffdError: another failure.
        """
        mode = ((lib.UFFDIO_REGISTER_MODE_MISSING if missing else 0)
                | (lib.UFFDIO_REGISTER_MODE_WP if wp else 0)
                | (lib.UFFDIO_REGISTER_MODE_MINOR if minor else 0))
        out = ffi.new("uint64_t *")
        _check(lib.omega_uffd_register(self._fd, addr, length, mode, out),
               f"UFFDIO_REGISTER {addr:#x}+{length:#x} mode={mode:#x}")
        return int(out[0])

    def unregister(self, addr: int, length: int) -> None:
        """UFFDIO_UNREGISTER a range; threads waiting on it are woken.

        Args:
            addr: start address (page aligned).
            length: bytes (a multiple of the page size).

        Raises:
            UffdBadRange: unaligned or unmapped range.
        """
        _check(lib.omega_uffd_unregister(self._fd, addr, length),
               f"UFFDIO_UNREGISTER {addr:#x}+{length:#x}")

    def copy(self, dst: int, src_addr: int, length: int, *, dontwake: bool = False,
             wp: bool = False) -> int:
        """UFFDIO_COPY ``length`` bytes from ``src_addr`` (this process) to ``dst``.

        Args:
            dst: destination in the uffd's address space (page aligned).
            src_addr: source address in this process.
            length: bytes (a multiple of the page size).
            dontwake: leave waiting threads asleep (wake them later with :meth:`wake`).
            wp: install the pages write-protected.

        Returns:
            Bytes installed: ``length``, or fewer when the kernel stopped part
            way (for example at a page already present); the caller decides
            about the rest.

        Raises:
            UffdExists: the first page is already present.
            UffdAgain: nothing copied because the mm is changing; retry.
            UffdBadRange: unaligned, unmapped or unregistered destination.
            UffdProcessGone: the target process has exited.
        """
        mode = ((lib.UFFDIO_COPY_MODE_DONTWAKE if dontwake else 0)
                | (lib.UFFDIO_COPY_MODE_WP if wp else 0))
        copied = ffi.new("int64_t *")
        if lib.omega_uffd_copy(self._fd, dst, src_addr, length, mode, copied) == -1:
            err = ffi.errno
            if err == errno_codes.EAGAIN and copied[0] > 0:
                return int(copied[0])
            raise _error(f"UFFDIO_COPY dst={dst:#x} len={length:#x}", err)
        return length

    def copy_bytes(self, dst: int, data: bytes | bytearray | memoryview, *,
                   dontwake: bool = False, wp: bool = False) -> int:
        """UFFDIO_COPY the bytes of ``data`` to ``dst``; see :meth:`copy`.

        Args:
            dst: destination (page aligned).
            data: the contents; its length must be a multiple of the page size.
            dontwake: leave waiting threads asleep.
            wp: install the pages write-protected.

        Returns:
            Bytes installed (see :meth:`copy`).

        Raises:
            UffdError: as :meth:`copy`.
        """
        source = ffi.from_buffer(data)
        return self.copy(dst, _address_of(source), len(source), dontwake=dontwake, wp=wp)

    def zeropage(self, addr: int, length: int, *, dontwake: bool = False) -> int:
        """UFFDIO_ZEROPAGE: install zero-filled pages over the range.

        Args:
            addr: start address (page aligned).
            length: bytes (a multiple of the page size).
            dontwake: leave waiting threads asleep.

        Returns:
            Bytes installed (fewer than ``length`` when the kernel stopped part way).

        Raises:
            UffdError: as :meth:`copy`.
        """
        mode = lib.UFFDIO_ZEROPAGE_MODE_DONTWAKE if dontwake else 0
        zeroed = ffi.new("int64_t *")
        if lib.omega_uffd_zeropage(self._fd, addr, length, mode, zeroed) == -1:
            err = ffi.errno
            if err == errno_codes.EAGAIN and zeroed[0] > 0:
                return int(zeroed[0])
            raise _error(f"UFFDIO_ZEROPAGE {addr:#x}+{length:#x}", err)
        return length

    def wake(self, addr: int, length: int) -> None:
        """UFFDIO_WAKE threads waiting on faults in the range.

        Args:
            addr: start address (page aligned).
            length: bytes.

        Raises:
            UffdBadRange: unaligned range.
        """
        _check(lib.omega_uffd_wake(self._fd, addr, length), f"UFFDIO_WAKE {addr:#x}+{length:#x}")

    def writeprotect(self, addr: int, length: int, *, enable: bool,
                     dontwake: bool = False) -> None:
        """UFFDIO_WRITEPROTECT: set or clear write protection on a WP-registered range.

        Args:
            addr: start address (page aligned).
            length: bytes (a multiple of the page size).
            enable: True to protect, False to unprotect (which wakes waiting writers).
            dontwake: when unprotecting, leave waiting writers asleep.

        Raises:
            UffdBadRange: the range is not registered with wp=True, or unaligned.
        """
        mode = ((lib.UFFDIO_WRITEPROTECT_MODE_WP if enable else 0)
                | (lib.UFFDIO_WRITEPROTECT_MODE_DONTWAKE if dontwake else 0))
        _check(lib.omega_uffd_writeprotect(self._fd, addr, length, mode),
               f"UFFDIO_WRITEPROTECT {addr:#x}+{length:#x} mode={mode:#x}")

    def read_events(self, max: int = 64) -> list[FaultEvent]:  # noqa: A002 - interface name
        """Read pending events in one read(2).

        Args:
            max: most events to return (capped at MAX_EVENTS_PER_READ).

        Returns:
            The events; ``[]`` when none is pending (non-blocking uffd). A
            blocking uffd waits for the first event.

        Raises:
            UffdError: the read failed.
        """
        count = min(max, MAX_EVENTS_PER_READ)
        if count <= 0:
            return []
        events = ffi.new("struct omega_uffd_event[]", count)
        n = _check(lib.omega_uffd_read_events(self._fd, events, count), "read(userfaultfd)")
        return [FaultEvent.from_c(events[i]) for i in range(n)]

    def wait(self, timeout: float | None) -> bool:
        """Wait until an event is pending.

        Args:
            timeout: seconds; None waits without bound.

        Returns:
            True when readable, False on timeout.
        """
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        return bool(poller.poll(None if timeout is None else max(0, int(timeout * 1000))))


class MappedFile:
    """A MAP_SHARED mapping of a file descriptor (typically a memfd).

    ``read``/``write`` copy inside a C call with the GIL released, so a thread
    may touch a page registered with a userfaultfd and sleep on the fault
    while another Python thread serves it.

    Attributes:
        fd: the mapped descriptor (not owned; close it yourself).
        address: start of the mapping.
        length: bytes mapped.
    """

    def __init__(self, fd: int, address: int, length: int) -> None:
        self.fd = fd
        self.address = address
        self.length = length

    @classmethod
    def map(cls, fd: int, length: int, *, offset: int = 0, writable: bool = True) -> MappedFile:
        """mmap ``length`` bytes of ``fd`` shared.

        Args:
            fd: the file.
            length: bytes to map.
            offset: file offset (page aligned).
            writable: map PROT_READ|PROT_WRITE (else read-only).

        Returns:
            The mapping.

        Raises:
            UffdError: mmap failed.
        """
        out = ffi.new("uint64_t *")
        _check(lib.omega_map_shared(fd, length, offset, int(writable), out),
               f"mmap fd={fd} len={length:#x} offset={offset:#x}")
        return cls(fd, int(out[0]), length)

    @property
    def closed(self) -> bool:
        """Whether the mapping is gone."""
        return self.length == 0

    def _check_span(self, offset: int, length: int) -> None:
        if self.closed:
            raise UffdBadRange("mapping is closed", errno=errno_codes.EINVAL)
        if offset < 0 or length < 0 or offset + length > self.length:
            raise UffdBadRange(
                f"span {offset:#x}+{length:#x} outside mapping of {self.length:#x} bytes",
                errno=errno_codes.EINVAL,
            )

    def read(self, offset: int, length: int) -> bytes:
        """Copy bytes out of the mapping (faulting registered pages in).

        Args:
            offset: offset within the mapping.
            length: bytes.

        Returns:
            The bytes.

        Raises:
            UffdBadRange: the span is outside the mapping.
        """
        self._check_span(offset, length)
        out = ffi.new("char[]", length)
        lib.omega_mem_copy(_address_of(out), self.address + offset, length)
        return bytes(ffi.buffer(out, length))

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Copy bytes into the mapping (faulting registered pages in).

        Args:
            offset: offset within the mapping.
            data: the bytes.

        Raises:
            UffdBadRange: the span is outside the mapping.
        """
        source = ffi.from_buffer(data)
        self._check_span(offset, len(source))
        lib.omega_mem_copy(self.address + offset, _address_of(source), len(source))

    def close(self) -> None:
        """munmap the mapping (idempotent)."""
        if not self.closed:
            address, length = self.address, self.length
            self.length = 0
            _check(lib.omega_unmap(address, length), f"munmap {address:#x}+{length:#x}")

    def __enter__(self) -> MappedFile:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def memfd_create(name: str, *, cloexec: bool = True, allow_sealing: bool = False) -> int:
    """Create an anonymous memory file.

    Args:
        name: the name shown in /proc/<pid>/fd (``memfd:<name>``).
        cloexec: set MFD_CLOEXEC.
        allow_sealing: set MFD_ALLOW_SEALING.

    Returns:
        The descriptor (size 0; ``os.ftruncate`` it).

    Raises:
        UffdError: memfd_create failed.
    """
    flags = (lib.MFD_CLOEXEC if cloexec else 0) | (lib.MFD_ALLOW_SEALING if allow_sealing else 0)
    return _check(lib.omega_memfd_create(name.encode(), flags), f"memfd_create {name!r}")


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Free a span of a file without changing its size (FALLOC_FL_PUNCH_HOLE|KEEP_SIZE).

    The pages leave every mapping, so a uffd-registered mapping faults on its
    next touch of them.

    Args:
        fd: the file.
        offset: start (page aligned to free whole pages).
        length: bytes.

    Raises:
        UffdError: fallocate failed.
    """
    _check(lib.omega_punch_hole(fd, offset, length),
           f"fallocate(PUNCH_HOLE) fd={fd} {offset:#x}+{length:#x}")


def _fileno(sock: socket.socket | int) -> int:
    return sock if isinstance(sock, int) else sock.fileno()


def send_fds(sock: socket.socket | int, fds: list[int], data: bytes = b"\0") -> int:
    """Send descriptors with a payload over a unix socket (SCM_RIGHTS).

    Args:
        sock: a connected AF_UNIX socket (blocking), or its descriptor.
        fds: descriptors to pass (at most MAX_FDS_PER_MESSAGE).
        data: the payload, at least one byte; the descriptors travel with its first byte.

    Returns:
        Bytes of payload sent (all of it).

    Raises:
        UffdBadRange: empty payload or too many descriptors.
        UffdError: sendmsg failed (EPIPE when the peer is gone).
    """
    if not data or len(fds) > MAX_FDS_PER_MESSAGE:
        raise UffdBadRange(
            f"send_fds needs 1+ payload bytes and at most {MAX_FDS_PER_MESSAGE} fds "
            f"(got {len(data)} bytes, {len(fds)} fds)",
            errno=errno_codes.EINVAL,
        )
    fd_array = ffi.new("int[]", list(fds) or [0])
    return _check(lib.omega_send_fds(_fileno(sock), ffi.from_buffer(data), len(data),
                                     fd_array, len(fds)), "sendmsg(SCM_RIGHTS)")


def recv_fds(sock: socket.socket | int, *, max_fds: int = 8,
             bufsize: int = 4096) -> tuple[bytes, list[int]]:
    """Receive a payload and descriptors sent with :func:`send_fds`.

    Args:
        sock: a connected AF_UNIX socket (blocking), or its descriptor.
        max_fds: most descriptors accepted; more is an error and none leak.
        bufsize: most payload bytes read.

    Returns:
        ``(payload, fds)``; the fds are O_CLOEXEC and owned by the caller.
        ``(b"", [])`` means the peer closed the connection.

    Raises:
        UffdError: recvmsg failed, or EMSGSIZE when more than ``max_fds`` came.
    """
    if not 0 <= max_fds <= MAX_FDS_PER_MESSAGE or bufsize <= 0:
        raise UffdBadRange(
            f"recv_fds needs 0..{MAX_FDS_PER_MESSAGE} fds and a positive bufsize",
            errno=errno_codes.EINVAL,
        )
    buf = ffi.new("char[]", bufsize)
    fd_array = ffi.new("int[]", max(max_fds, 1))
    count = ffi.new("int *")
    n = _check(lib.omega_recv_fds(_fileno(sock), buf, bufsize, fd_array, max_fds, count),
               "recvmsg(SCM_RIGHTS)")
    return bytes(ffi.buffer(buf, n)), [int(fd_array[i]) for i in range(count[0])]
