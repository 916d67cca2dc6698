"""Where a peer keeps the blobs it is lent: pages in RAM, chunks on disk.

Both stores hold opaque blobs (already sealed by their owner) with a version,
grouped in namespaces, and are bounded: a put that would exceed the capacity is
refused with FULL and changes nothing. A put whose version is older than the
stored one is refused with STALE (a late re-replication must not overwrite a
newer write); the same version overwrites (an idempotent retry).

Accounting counts blob bytes only (not per-entry bookkeeping).

Ownership: a namespace belongs to the cluster member (certificate name) whose
put created it, for as long as it holds blobs; every call names the caller
(``owner=``) and one naming another member's namespace raises
:class:`NotOwnerError`, changing nothing. The chunk store keeps the owner in
the namespace's directory (file ``owner``), so it survives a restart; a chunk
directory written before owners were recorded is adopted by the first member
that uses it.

:class:`PageStore` keeps its pages in the C page store (native/peer/
peer_store.c: thread-safe, never blocks on I/O). :class:`ChunkStore` keeps
its chunks in the C chunk store (native/peer/chunk_store.c): per namespace,
slot files of one blob length each, every slot a checksummed header and the
blob; a put writes a free slot, fdatasyncs, then switches the index, so a
reader sees the old blob or the new one and a killed peer never serves a
torn chunk (format and reasons in native/peer/chunk_store.h). Its calls do
disk I/O and are meant for worker threads. The daemon's data port
(:mod:`hypervisor.node.dataport`) serves both C stores from its own threads,
so both ports see the same blobs. Every C call releases the GIL.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from hypervisor.errors import OmegaError
from hypervisor.node.wire import Item, Status


class StoreError(OmegaError):
    """A store's backing storage failed (disk error, corrupt chunk file)."""


class NotOwnerError(OmegaError):
    """The namespace belongs to another cluster member (the daemon answers FORBIDDEN)."""

    def __init__(self, ns: str) -> None:
        """Name the namespace (not its owner: that is none of the caller's business)."""
        super().__init__(f"namespace {ns!r} belongs to another cluster member")


class _NativeStore:
    """The calls the two C stores share (``peer_store_*`` and ``chunk_store_*``).

    A subclass opens its store into ``handle`` and says how a negative errno
    from it becomes an exception (:meth:`_failure`).

    Attributes:
        capacity: bytes this store may hold.
    """

    _PREFIX = ""

    def __init__(self, capacity: int) -> None:
        """Bind the C calls of ``_PREFIX`` (the store itself is the subclass's to open).

        Args:
            capacity: bytes the store may hold.

        Raises:
            NativeError: the native module is not built.
        """
        from hypervisor._native import load

        mod = load("peer")
        self._ffi, self._lib = mod.ffi, mod.lib
        self.capacity = capacity
        self.handle: Any = None
        self._usage = self._ffi.new("uint64_t[3]")
        p = self._PREFIX
        self._c_usage = getattr(self._lib, p + "usage")
        self._c_put = getattr(self._lib, p + "put")
        self._c_put_batch = getattr(self._lib, p + "put_batch")
        self._c_get = getattr(self._lib, p + "get")
        self._c_delete = getattr(self._lib, p + "delete")
        self._c_list = getattr(self._lib, p + "list")
        self._c_drop = getattr(self._lib, p + "drop")
        self._c_namespaces = getattr(self._lib, p + "namespaces")

    def _failure(self, rc: int, ns: str) -> Exception:
        """The exception for a negative errno ``rc`` from a call on ``ns``."""
        raise NotImplementedError  # pragma: no cover

    def _h(self) -> Any:
        """The C handle (a subclass may refuse a closed store)."""
        return self.handle

    def _stats(self) -> tuple[int, int, int]:
        self._c_usage(self._h(), self._usage)
        return int(self._usage[0]), int(self._usage[1]), int(self._usage[2])

    @property
    def used(self) -> int:
        """Blob bytes held."""
        return self._stats()[1]

    @property
    def count(self) -> int:
        """Number of blobs held."""
        return self._stats()[2]

    def _check(self, rc: int, ns: str) -> int:
        if rc == self._lib.PEER_ST_FORBIDDEN:
            raise NotOwnerError(ns)
        if rc < 0:
            raise self._failure(rc, ns)
        return rc

    def put(self, ns: str, item: Item, *, owner: str) -> Status:
        """Store one blob.

        Args:
            ns: the namespace name.
            item: key, version, blob.
            owner: the caller; it owns the namespace if this put creates it.

        Returns:
            OK, FULL (nothing changed) or STALE (a newer version is held).

        Raises:
            NotOwnerError: ``ns`` belongs to another member (nothing changed).
            StoreError: the chunk store's disk failed (nothing changed).
        """
        rc = self._c_put(self._h(), ns.encode(), owner.encode(), item.key, item.version,
                         item.blob, len(item.blob))
        return Status(self._check(rc, ns))

    def put_many(self, ns: str, items: Iterable[Item], *,
                 owner: str) -> tuple[Status, list[Status]]:
        """Store several blobs; FULL for the whole batch when it cannot fit.

        Args:
            ns: the namespace name.
            items: the blobs.
            owner: the caller.

        Returns:
            ``(FULL, [])`` when the batch would not fit (nothing stored), else
            ``(OK, per-item statuses)`` (OK or STALE).

        Raises:
            NotOwnerError: ``ns`` belongs to another member (nothing stored).
            StoreError: the chunk store's disk failed.
        """
        items = list(items)
        n = len(items)
        ffi = self._ffi
        blobs = [ffi.from_buffer("uint8_t[]", it.blob) for it in items]
        statuses = ffi.new("uint8_t[]", max(n, 1))
        rc = self._c_put_batch(
            self._h(), ns.encode(), owner.encode(), n,
            ffi.new("uint64_t[]", [it.key for it in items]),
            ffi.new("uint64_t[]", [it.version for it in items]),
            ffi.new("uint8_t *[]", blobs), ffi.new("uint32_t[]", [len(it.blob) for it in items]),
            statuses)
        status = Status(self._check(rc, ns))
        if status is not Status.OK:
            return status, []
        return Status.OK, [Status(statuses[i]) for i in range(n)]

    def get(self, ns: str, key: int, *, owner: str) -> tuple[int, bytes] | None:
        """Return ``(version, blob)`` or None.

        Raises:
            NotOwnerError: ``ns`` belongs to another member.
            StoreError: the chunk is unreadable or failed its check on disk.
        """
        ffi = self._ffi
        version = ffi.new("uint64_t *")
        copy = ffi.new("uint8_t **")
        size = ffi.new("uint32_t *")
        rc = self._check(self._c_get(self._h(), ns.encode(), owner.encode(), key, version, copy,
                                     size), ns)
        if rc == self._lib.PEER_ST_NOT_FOUND:
            return None
        try:
            return int(version[0]), bytes(ffi.buffer(copy[0], size[0]))
        finally:
            self._lib.peer_store_release(copy[0])

    def delete(self, ns: str, keys: Iterable[int], *, owner: str) -> int:
        """Delete keys; return how many existed.

        Raises:
            NotOwnerError: ``ns`` belongs to another member (nothing deleted).
            StoreError: the chunk store's disk failed.
        """
        keys = list(keys)
        deleted = self._ffi.new("uint64_t *")
        self._check(self._c_delete(self._h(), ns.encode(), owner.encode(), len(keys),
                                   self._ffi.new("uint64_t[]", keys), deleted), ns)
        return int(deleted[0])

    def list(self, ns: str, *, owner: str, after: int = 0, limit: int = 65536,
             first: bool = True) -> tuple[list[tuple[int, int]], bool]:
        """Return up to ``limit`` ``(key, version)`` in key order, and whether more follow.

        Raises:
            NotOwnerError: ``ns`` belongs to another member.
        """
        ffi = self._ffi
        keys = ffi.new("uint64_t[]", max(limit, 1))
        versions = ffi.new("uint64_t[]", max(limit, 1))
        n = ffi.new("uint32_t *")
        more = ffi.new("int *")
        self._check(self._c_list(self._h(), ns.encode(), owner.encode(), after, limit, first,
                                 keys, versions, n, more), ns)
        return [(int(keys[i]), int(versions[i])) for i in range(n[0])], bool(more[0])

    def drop(self, ns: str, *, owner: str) -> int:
        """Drop a whole namespace; return how many blobs it held.

        Raises:
            NotOwnerError: ``ns`` belongs to another member (nothing dropped).
            StoreError: the chunk store's disk failed (nothing dropped).
        """
        dropped = self._ffi.new("uint64_t *")
        self._check(self._c_drop(self._h(), ns.encode(), owner.encode(), dropped), ns)
        return int(dropped[0])

    def namespaces(self, *, owner: str | None = None) -> list[tuple[str, int, int]]:
        """Return ``(name, keys, bytes)`` per namespace (only ``owner``'s, when given)."""
        ffi = self._ffi
        who = owner.encode() if owner is not None else ffi.NULL
        room = 16
        while True:
            out = ffi.new("struct peer_ns_info[]", room)
            n = self._c_namespaces(self._h(), who, out, room)
            if n <= room:
                return [(ffi.string(out[i].name).decode(), int(out[i].keys), int(out[i].bytes))
                        for i in range(n)]
            room = n + 16


class PageStore(_NativeStore):
    """Pages in RAM, bounded by the memory this peer lends.

    The pages live in the C page store (native/peer/peer_store.c), which the
    daemon's data port (:class:`~hypervisor.node.dataport.DataPort`) serves
    from its own threads; this class is the Python face every other opcode
    uses. Any thread may call it (the store has its own lock; the C calls
    release the GIL). Out of memory in the store raises :class:`MemoryError`.

    Attributes:
        capacity: bytes this store may hold.
    """

    _PREFIX = "peer_store_"

    def __init__(self, capacity: int) -> None:
        """Create an empty store.

        Args:
            capacity: the memory lent, in bytes (0: this peer lends no memory).

        Raises:
            NativeError: the native page store is not built.
        """
        super().__init__(capacity)
        self.handle = self._ffi.gc(self._lib.peer_store_new(capacity), self._lib.peer_store_free)
        if self.handle == self._ffi.NULL:
            raise MemoryError("cannot create the page store")

    def _failure(self, rc: int, ns: str) -> Exception:
        return MemoryError(f"page store: {os.strerror(-rc)}")


class ChunkStore(_NativeStore):
    """Chunks on disk under ``root``, bounded by the disk this peer lends.

    The chunks live in the C chunk store (native/peer/chunk_store.c; its
    format is in chunk_store.h): ``root/<namespace>/slots-<length>`` holds
    every chunk of that blob length in fixed-size slots (a header with
    magic, crc32c, key, version and write sequence number, then the blob),
    ``root/<namespace>/owner`` names the member that owns it. The index
    (versions, slots, owners) is rebuilt from the slot files at open, torn
    slots left out; a directory in the older one-file-per-chunk layout is
    converted at open. Only one store may use a directory at a time. Calls
    block on the disk: make them from worker threads (the C calls release
    the GIL; reads of one namespace run in parallel).

    Attributes:
        root: the data directory.
        capacity: bytes this store may hold.
    """

    _PREFIX = "chunk_store_"

    def __init__(self, root: Path, capacity: int, *, fsync: bool = True) -> None:
        """Open (and index) a store.

        Args:
            root: the data directory (created if missing).
            capacity: the disk lent, in bytes.
            fsync: make each put and delete durable (fdatasync) before it returns.

        Raises:
            StoreError: the directory cannot be used (or another store uses it).
            NativeError: the native chunk store is not built.
        """
        super().__init__(capacity)
        self.root = Path(root)
        self._fsync = fsync
        err = self._ffi.new("char[]", 512)
        handle = self._lib.chunk_store_open(os.fsencode(self.root), capacity, fsync, err, 512)
        if handle == self._ffi.NULL:
            why = self._ffi.string(err).decode(errors="replace")
            raise StoreError(f"cannot use data directory {self.root}: {why}")
        self.handle = self._ffi.gc(handle, self._lib.chunk_store_close)

    def _h(self) -> Any:
        if self.handle is None:
            raise StoreError(f"chunk store {self.root} is closed")
        return self.handle

    def _failure(self, rc: int, ns: str) -> Exception:
        if rc == -errno.EBADMSG:
            why = "a chunk failed its check on disk (corrupt)"
        elif rc == -errno.EINVAL:
            why = "bad namespace name, or blob over the size limit"
        else:
            why = os.strerror(-rc)
        return StoreError(f"chunk store {self.root}: namespace {ns!r}: {why}")

    def close(self) -> None:
        """Close the store now (its files, and its hold on the directory).

        No other thread may be using it; later calls raise :class:`StoreError`.
        """
        if self.handle is not None:
            handle, self.handle = self.handle, None
            self._ffi.release(handle)

    def __enter__(self) -> ChunkStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
