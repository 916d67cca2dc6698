"""Python face of the C fault-handler core (``hypervisor._native._dsm``).

:class:`FaultHandlerCore` owns one VM's userfaultfd and memory file once the
agent has handed them over. Its reader threads (C) serve never-written pages
and queue faults on pages held by peers; the caller (one asyncio thread)
drains that queue with :meth:`FaultHandlerCore.take_fetches`, fetches the
data and installs it with :meth:`FaultHandlerCore.install`.
"""

from __future__ import annotations

import errno
import os
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hypervisor.errors import NativeError

ZERO, LOCAL, REMOTE, FETCHING, EVICTING, PUNCHING, INSTALLING = range(7)
#: bit set on queue entries that are deferred zero faults rather than fetches
QUEUE_ZERO = 1 << 63
#: a note: the native fetch path served a fault on this page (for the policies)
QUEUE_SEEN = 1 << 62
#: a note: a native prefetch job of this many pages finished
QUEUE_LANDED = 1 << 61
#: a note: the resident set grew past the reclaim mark
QUEUE_RECLAIM = 1 << 60
#: holder bit of the native path's in-process memory source (the floor)
HOLDER_MEMORY = 1 << 15
#: holder bits 0..MAX_PEERS-1 name peers
MAX_PEERS = 15


def _load() -> tuple[Any, Any]:
    from hypervisor._native import load

    module = load("dsm")  # refuses a missing or stale build
    return module.ffi, module.lib


def latency_percentile(hist: list[int], q: float) -> float:
    """Return the q-quantile (0..1) in microseconds of a C latency histogram.

    Args:
        hist: bucket counts as kept by dsm_stats.c (4 steps per power of two of ns).
        q: the quantile, e.g. 0.5 or 0.99.

    Returns:
        The lower edge of the bucket holding the quantile, in µs (0.0 when empty).
    """
    total = sum(hist)
    if total == 0:
        return 0.0
    rank = q * total
    seen = 0
    for b, count in enumerate(hist):
        seen += count
        if seen >= rank and count:
            if b < 4:
                return b / 1000.0
            e, m = divmod(b, 4)
            return ((4 + m) << (e - 2)) / 1000.0
    return 0.0


@dataclass
class CoreStats:
    """A snapshot of the core's counters (see dsm.h for each)."""

    counters: dict[str, int] = field(default_factory=dict)
    lat_remote: list[int] = field(default_factory=list)
    lat_zero: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Return counters plus p50/p99 latencies in µs."""
        out: dict[str, Any] = dict(self.counters)
        out["remote_fault_p50_us"] = latency_percentile(self.lat_remote, 0.5)
        out["remote_fault_p99_us"] = latency_percentile(self.lat_remote, 0.99)
        out["zero_fault_p50_us"] = latency_percentile(self.lat_zero, 0.5)
        out["zero_fault_p99_us"] = latency_percentile(self.lat_zero, 0.99)
        return out


_COUNTERS = ("npages", "page_size", "resident", "remote", "faults", "faults_zero",
             "faults_remote", "faults_inflight", "faults_wp", "faults_spurious",
             "evict_cancelled", "installed_pages", "install_calls", "evicted_pages",
             "eagain", "errors", "queue_len", "faults_deferred", "native_fetches",
             "native_prefetched", "native_fallbacks", "native_peer_errors", "native_bytes_in",
             "native_prefetch_dropped")


class FaultHandlerCore:
    """One VM's fault handler core.

    Args:
        uffd: the userfaultfd (ownership passes to the core).
        memfd: the guest memory file (ownership passes to the core).
        base: guest-RAM start address in QEMU.
        length: bytes of guest RAM.
        file_offset: file offset of ``base``.
        wp: whether the range is registered for write-protect (needed to evict).

    Raises:
        NativeError: the module is missing or the tables cannot be allocated.
    """

    def __init__(self, uffd: int, memfd: int, *, base: int, length: int,
                 file_offset: int = 0, wp: bool = True) -> None:
        self._ffi, self._lib = _load()
        err = self._ffi.new("int *")
        h = self._lib.dsm_open(uffd, memfd, base, length, file_offset, int(wp), err)
        if h == self._ffi.NULL:
            raise NativeError(f"dsm_open: {os.strerror(-err[0])}")
        self._h = h
        self.page_size: int = h.page_size
        self.npages: int = h.npages
        self.wp = wp
        self.event_fd: int = h.evfd
        #: per-page state (ZERO, LOCAL, ...) — a live view of the C table.
        self.state = np.frombuffer(self._ffi.buffer(h.state, self.npages), dtype=np.uint8)
        #: per-page referenced bit (CLOCK), set by the C side on fault-in.
        self.ref = np.frombuffer(self._ffi.buffer(h.ref, self.npages), dtype=np.uint8)
        self._closed = False
        # calls running on other threads (remote_store): close waits for them
        self._busy = 0
        self._idle = threading.Condition()

    def _check(self, rc: int, what: str) -> int:
        if rc < 0:
            raise NativeError(f"{what}: {os.strerror(-rc)}", ) from OSError(-rc, os.strerror(-rc))
        return rc

    def scan_resident(self) -> int:
        """Mark pages with data in the memory file LOCAL; return their count."""
        return self._check(self._lib.dsm_scan_resident(self._h), "scan resident pages")

    def mark_remote(self, pages: np.ndarray) -> int:
        """Mark never-seen pages REMOTE (held by peers); return how many changed."""
        arr = np.ascontiguousarray(pages, dtype=np.uint64)
        ptr = self._ffi.cast("const uint64_t *", arr.ctypes.data)
        return self._lib.dsm_mark_remote(self._h, ptr, len(arr))

    def start(self, threads: int = 2) -> None:
        """Start the reader threads."""
        self._check(self._lib.dsm_start(self._h, threads), "start reader threads")

    def wake_all(self) -> None:
        """Wake every waiter (after a restart: they fault again and reach us)."""
        self._check(self._lib.dsm_wake_all(self._h), "UFFDIO_WAKE")

    def take_fetches(self, max_pages: int = 4096) -> np.ndarray:
        """Drain queued remote faults; returns their page numbers (maybe empty)."""
        out = np.empty(max_pages, dtype=np.uint64)
        n = self._lib.dsm_take_fetches(self._h, self._ffi.cast("uint64_t *", out.ctypes.data),
                                       max_pages)
        return out[:n]

    def resident(self) -> int:
        """Pages resident now (LOCAL or EVICTING)."""
        return int(self._lib.dsm_resident(self._h))

    def set_limit(self, pages: int) -> None:
        """Defer zero faults while ``pages`` or more are resident (0: never)."""
        self._lib.dsm_set_limit(self._h, pages)

    def set_reclaim_mark(self, pages: int) -> None:
        """Leave a :data:`QUEUE_RECLAIM` note when resident grows to ``pages`` (0: never)."""
        self._lib.dsm_set_reclaim_mark(self._h, max(0, pages))

    def set_fault_notes(self, on: bool) -> None:
        """Whether natively served and in-flight faults leave :data:`QUEUE_SEEN` notes.

        On by default; they feed the prefetch policy, so a handler without
        one turns them off (each note would only wake the Python side).
        """
        self._lib.dsm_set_fault_notes(self._h, int(on))

    def install_zero(self, page: int) -> bool:
        """Serve a deferred zero fault (queued with :data:`QUEUE_ZERO`).

        Returns:
            False when there is no room under the hard limit (nothing done).

        Raises:
            NativeError: the page was not waiting or the ioctl failed.
        """
        rc = self._lib.dsm_install_zero(self._h, page)
        if rc == -errno.EAGAIN:
            return False
        self._check(rc, "UFFDIO_ZEROPAGE")
        return True

    def reserve(self, pages: int) -> bool:
        """Take room for ``pages`` under the hard limit before installing them.

        Returns:
            False when that would pass the limit (nothing taken).
        """
        return self._lib.dsm_reserve(self._h, pages) == 0

    def unreserve(self, pages: int) -> None:
        """Give back room taken by :meth:`reserve` and not used."""
        self._lib.dsm_unreserve(self._h, pages)

    def claim(self, pages: np.ndarray) -> np.ndarray:
        """Claim REMOTE pages for a prefetch; returns the pages claimed."""
        arr = np.ascontiguousarray(pages, dtype=np.uint64)
        ok = np.zeros(len(arr), dtype=np.uint8)
        self._lib.dsm_claim(self._h, self._ffi.cast("const uint64_t *", arr.ctypes.data),
                            len(arr), self._ffi.cast("uint8_t *", ok.ctypes.data))
        return arr[ok.astype(bool)]

    def install(self, first_page: int, data: bytes | bytearray | memoryview) -> None:
        """Place len(data)/page_size pages at first_page with one UFFDIO_COPY.

        Their room must have been taken with :meth:`reserve`.

        Raises:
            NativeError: the copy failed (the pages stay FETCHING).
        """
        n = len(data) // self.page_size
        buf = self._ffi.from_buffer(data)
        self._check(self._lib.dsm_install(self._h, first_page, buf, n), "UFFDIO_COPY")

    # ---------------------------------------------------------- native fetch path

    def setup_remote(self, *, key: bytes, aad_prefix: bytes, ns: bytes, ca: str, cert: str,
                     keyfile: str, peers: list[tuple[str, str, int]], workers: int = 2) -> None:
        """Serve remote faults natively from peers (call before :meth:`start`).

        Args:
            key: the VM's 32-byte sealing key.
            aad_prefix: ``build_aad("page", vm_id, 0, 0)`` without its last 16 bytes.
            ns: the page namespace as encoded on the wire.
            ca, cert, keyfile: PEM paths (cluster CA, this node's certificate and key).
            peers: ``(name, host, port)``; peer i is holder bit ``1 << i``.
            workers: prefetch threads.

        Raises:
            NativeError: the identity cannot be loaded or the arguments are bad.
        """
        if len(peers) > MAX_PEERS:
            raise NativeError(f"the native fetch path knows at most {MAX_PEERS} peers")
        rc = self._lib.dsm_remote_setup(self._h, key, len(key), aad_prefix, len(aad_prefix), ns,
                                        len(ns), ca.encode(), cert.encode(), keyfile.encode(),
                                        workers)
        if rc == -errno.EPROTO:
            raise NativeError(f"native fetch path: cannot load the TLS identity {cert}, "
                              f"{keyfile} (CA {ca})")
        self._check(rc, "native fetch path")
        for i, (name, host, port) in enumerate(peers):
            self._check(self._lib.dsm_remote_peer(self._h, i, name.encode(), host.encode(), port),
                        f"native fetch path: peer {name}")

    def remote_store(self, pages: np.ndarray, versions: np.ndarray, data: bytes | memoryview,
                     targets: np.ndarray) -> tuple[np.ndarray, int]:
        """Seal evicted pages and store page k on the peers of ``targets[k]`` (bits).

        Blocking (call it from a worker thread; the GIL is released). One
        BATCH_PUT per peer over the native path's own connections.

        Args:
            pages: page numbers.
            versions: each page's new version.
            data: the pages' contents, back to back.
            targets: per page, the holder bits of the peers to store it on.

        Returns:
            (per page the bits of the peers that took it, the bits of peers
            that answered FULL).

        Raises:
            NativeError: the arguments are bad or memory ran out.
        """
        p = np.ascontiguousarray(pages, dtype=np.uint64)
        v = np.ascontiguousarray(versions, dtype=np.uint64)
        t = np.ascontiguousarray(targets, dtype=np.uint16)
        if not len(p) == len(v) == len(t) or len(data) != len(p) * self.page_size:
            raise ValueError("pages, versions, targets and data differ in length")
        ok = np.zeros(len(p), dtype=np.uint16)
        full = self._ffi.new("uint16_t *")
        ffi = self._ffi
        with self._idle:
            if self._closed:
                raise NativeError("store evicted pages: the core is closed")
            self._busy += 1
        try:
            rc = self._lib.dsm_remote_store(
                self._h, ffi.cast("const uint64_t *", p.ctypes.data),
                ffi.cast("const uint64_t *", v.ctypes.data), len(p), ffi.from_buffer(data),
                ffi.cast("const uint16_t *", t.ctypes.data),
                ffi.cast("uint16_t *", ok.ctypes.data), full)
        finally:
            with self._idle:
                self._busy -= 1
                self._idle.notify_all()
        self._check(rc, "store evicted pages")
        return ok, int(full[0])

    def set_busy_poll(self, us: int) -> None:
        """How long native-path threads wait awake for a peer's answer (0: never)."""
        self._check(self._lib.dsm_remote_set_spin(self._h, max(0, us) * 1000), "busy poll")

    def setup_memory(self, workers: int = 2) -> None:
        """Serve remote faults natively from copies kept in this process (the floor)."""
        self._check(self._lib.dsm_remote_setup_memory(self._h, workers), "native memory source")

    def locate(self, pages: np.ndarray, versions: np.ndarray, holders: np.ndarray) -> None:
        """Tell the native path each page's version and holder bits."""
        p = np.ascontiguousarray(pages, dtype=np.uint64)
        v = np.ascontiguousarray(versions, dtype=np.uint64)
        h = np.ascontiguousarray(holders, dtype=np.uint16)
        if not len(p) == len(v) == len(h):
            raise ValueError("pages, versions and holders differ in length")
        self._check(self._lib.dsm_remote_locate(
            self._h, self._ffi.cast("const uint64_t *", p.ctypes.data), len(p),
            self._ffi.cast("const uint64_t *", v.ctypes.data),
            self._ffi.cast("const uint16_t *", h.ctypes.data)), "locate pages")

    def memory_put(self, pages: np.ndarray, data: bytes | bytearray | memoryview) -> None:
        """Keep copies of pages (back to back in ``data``) in the memory source."""
        p = np.ascontiguousarray(pages, dtype=np.uint64)
        if len(data) != len(p) * self.page_size:
            raise ValueError("data is not one page per page number")
        self._check(self._lib.dsm_remote_memory_put(
            self._h, self._ffi.cast("const uint64_t *", p.ctypes.data), len(p),
            self._ffi.from_buffer(data)), "memory source")

    def submit(self, pages: np.ndarray) -> None:
        """Prefetch pages claimed with :meth:`claim` on the native workers."""
        p = np.sort(np.ascontiguousarray(pages, dtype=np.uint64))
        self._check(self._lib.dsm_remote_submit(
            self._h, self._ffi.cast("const uint64_t *", p.ctypes.data), len(p)), "prefetch")

    def remote_inflight(self) -> int:
        """Pages submitted for prefetch and not yet settled."""
        return int(self._lib.dsm_remote_inflight(self._h))

    def evict_begin(self, pages: np.ndarray) -> tuple[np.ndarray, np.ndarray, bytearray]:
        """Write-protect and copy out LOCAL pages.

        Returns:
            (pages, ok mask, buffer): page i's content is at buffer[i*ps:(i+1)*ps]
            when ok[i].
        """
        arr = np.ascontiguousarray(pages, dtype=np.uint64)
        ok = np.zeros(len(arr), dtype=np.uint8)
        buf = bytearray(len(arr) * self.page_size)
        rc = self._lib.dsm_evict_begin(self._h, self._ffi.cast("const uint64_t *", arr.ctypes.data),
                                       len(arr), self._ffi.cast("uint8_t *", ok.ctypes.data),
                                       self._ffi.from_buffer(buf))
        if rc == -errno.EOPNOTSUPP:
            raise NativeError("eviction needs userfaultfd write-protect on shmem (Linux >= 5.19)")
        self._check(rc, "evict")
        return arr, ok, buf

    def evict_commit(self, pages: np.ndarray, ok: np.ndarray) -> np.ndarray:
        """Punch out pages whose copies are stored; returns the mask actually punched."""
        ok = np.ascontiguousarray(ok, dtype=np.uint8).copy()
        self._lib.dsm_evict_commit(self._h, self._ffi.cast("const uint64_t *", pages.ctypes.data),
                                   len(pages), self._ffi.cast("uint8_t *", ok.ctypes.data))
        return ok

    def evict_abort(self, pages: np.ndarray, ok: np.ndarray) -> None:
        """Give up evicting pages (their copies could not be stored)."""
        ok = np.ascontiguousarray(ok, dtype=np.uint8)
        self._lib.dsm_evict_abort(self._h, self._ffi.cast("const uint64_t *", pages.ctypes.data),
                                  len(pages), self._ffi.cast("const uint8_t *", ok.ctypes.data))

    def stats(self) -> CoreStats:
        """Return a snapshot of the counters and latency histograms."""
        st = self._ffi.new("struct dsm_stats *")
        self._lib.dsm_get_stats(self._h, st)
        return CoreStats(counters={k: int(getattr(st, k)) for k in _COUNTERS},
                         lat_remote=list(st.lat_remote), lat_zero=list(st.lat_zero))

    def close(self) -> None:
        """Stop the readers and close the descriptors (idempotent).

        Waits for calls running on other threads (:meth:`remote_store`) to
        return first: the handle they use is freed here.
        """
        with self._idle:
            if self._closed:
                return
            self._closed = True
            while self._busy:
                self._idle.wait()
        self.state = self.ref = None  # type: ignore[assignment]
        self._lib.dsm_close(self._h)

    def __enter__(self) -> FaultHandlerCore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
