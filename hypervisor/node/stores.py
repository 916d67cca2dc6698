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

:class:`PageStore` keeps its pages in the C page store (thread-safe, never
blocks on I/O), which the daemon's page data port also serves.
:class:`ChunkStore` does file I/O and is meant to run in worker threads; its
index is guarded by a lock, and every file is written to a temporary name,
fsynced, then renamed over the old one, so a reader sees the old blob or the
new one, never a mix, and a killed peer never leaves a torn chunk.
"""

from __future__ import annotations

import os
import shutil
import struct
import threading
from collections.abc import Callable, Iterable, Mapping
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


def _page_list(entries: dict[int, tuple[int, bytes]] | dict[int, tuple[int, int]], after: int,
               limit: int, first: bool) -> tuple[list[tuple[int, int]], bool]:
    keys = sorted(k for k in entries if first or k > after)
    page = keys[:limit]
    return [(k, entries[k][0]) for k in page], len(keys) > limit


def _batch_growth(items: list[Item], entries: Mapping[int, tuple[int, Any]], *,
                  size_of: Callable[[Any], int]) -> int:
    """Bytes a batch PUT would add to a namespace, before any of it is stored.

    Items older than the stored version are skipped (they will be refused
    STALE); a key written twice in the batch counts once, at its last size.

    Args:
        items: the batch, in order.
        entries: the namespace's ``key -> (version, stored)``.
        size_of: the size of a stored value (a page's bytes, a chunk's length).

    Returns:
        The growth in bytes (negative when the batch shrinks blobs).
    """
    growth = 0
    seen: dict[int, int] = {}
    for it in items:
        old = entries.get(it.key)
        if old is not None and old[0] > it.version:
            continue
        growth += len(it.blob) - seen.get(it.key, size_of(old[1]) if old is not None else 0)
        seen[it.key] = len(it.blob)
    return growth


class PageStore:
    """Pages in RAM, bounded by the memory this peer lends.

    The pages live in the C page store (native/peer/peer_store.c), which the
    daemon's page data port (:class:`PageDataPort`) serves from its own
    threads; this class is the Python face every other opcode uses. Any
    thread may call it (the store has its own lock; the C calls release the
    GIL).

    Attributes:
        capacity: bytes this store may hold.
    """

    def __init__(self, capacity: int) -> None:
        """Create an empty store.

        Args:
            capacity: the memory lent, in bytes (0: this peer lends no memory).

        Raises:
            NativeError: the native page store is not built.
        """
        from hypervisor._native import load

        mod = load("peer")
        self._ffi, self._lib = mod.ffi, mod.lib
        self.capacity = capacity
        self.handle = self._ffi.gc(self._lib.peer_store_new(capacity), self._lib.peer_store_free)
        if self.handle == self._ffi.NULL:
            raise MemoryError("cannot create the page store")
        self._usage = self._ffi.new("uint64_t[3]")

    def _stats(self) -> tuple[int, int, int]:
        self._lib.peer_store_usage(self.handle, self._usage)
        return int(self._usage[0]), int(self._usage[1]), int(self._usage[2])

    @property
    def used(self) -> int:
        """Blob bytes held."""
        return self._stats()[1]

    @property
    def count(self) -> int:
        """Number of pages held."""
        return self._stats()[2]

    def _check(self, rc: int, ns: str) -> int:
        if rc == self._lib.PEER_ST_FORBIDDEN:
            raise NotOwnerError(ns)
        if rc < 0:
            raise MemoryError(f"page store: {os.strerror(-rc)}")
        return rc

    def put(self, ns: str, item: Item, *, owner: str) -> Status:
        """Store one page.

        Args:
            ns: the namespace name.
            item: key, version, blob.
            owner: the caller; it owns the namespace if this put creates it.

        Returns:
            OK, FULL (nothing changed) or STALE (a newer version is held).

        Raises:
            NotOwnerError: ``ns`` belongs to another member.
        """
        rc = self._lib.peer_store_put(self.handle, ns.encode(), owner.encode(), item.key,
                                      item.version, item.blob, len(item.blob))
        return Status(self._check(rc, ns))

    def put_many(self, ns: str, items: Iterable[Item], *,
                 owner: str) -> tuple[Status, list[Status]]:
        """Store several pages; FULL for the whole batch when it cannot fit.

        Args:
            ns: the namespace name.
            items: the pages.
            owner: the caller.

        Returns:
            ``(FULL, [])`` when the batch would not fit (nothing stored), else
            ``(OK, per-item statuses)``.

        Raises:
            NotOwnerError: ``ns`` belongs to another member (nothing stored).
        """
        items = list(items)
        n = len(items)
        ffi = self._ffi
        blobs = [ffi.from_buffer("uint8_t[]", it.blob) for it in items]
        statuses = ffi.new("uint8_t[]", max(n, 1))
        rc = self._lib.peer_store_put_batch(
            self.handle, ns.encode(), owner.encode(), n,
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
        """
        ffi = self._ffi
        version = ffi.new("uint64_t *")
        copy = ffi.new("uint8_t **")
        size = ffi.new("uint32_t *")
        rc = self._check(self._lib.peer_store_get(self.handle, ns.encode(), owner.encode(), key,
                                                  version, copy, size), ns)
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
        """
        keys = list(keys)
        deleted = self._ffi.new("uint64_t *")
        self._check(self._lib.peer_store_delete(self.handle, ns.encode(), owner.encode(),
                                                len(keys), self._ffi.new("uint64_t[]", keys),
                                                deleted), ns)
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
        self._check(self._lib.peer_store_list(self.handle, ns.encode(), owner.encode(), after,
                                              limit, first, keys, versions, n, more), ns)
        return [(int(keys[i]), int(versions[i])) for i in range(n[0])], bool(more[0])

    def drop(self, ns: str, *, owner: str) -> int:
        """Drop a whole namespace; return how many pages it held.

        Raises:
            NotOwnerError: ``ns`` belongs to another member (nothing dropped).
        """
        dropped = self._ffi.new("uint64_t *")
        self._check(self._lib.peer_store_drop(self.handle, ns.encode(), owner.encode(),
                                              dropped), ns)
        return int(dropped[0])

    def namespaces(self, *, owner: str | None = None) -> list[tuple[str, int, int]]:
        """Return ``(name, keys, bytes)`` per namespace (only ``owner``'s, when given)."""
        ffi = self._ffi
        who = owner.encode() if owner is not None else ffi.NULL
        room = 16
        while True:
            out = ffi.new("struct peer_ns_info[]", room)
            n = self._lib.peer_store_namespaces(self.handle, who, out, room)
            if n <= room:
                return [(ffi.string(out[i].name).decode(), int(out[i].keys), int(out[i].bytes))
                        for i in range(n)]
            room = n + 16


_CHUNK_MAGIC = b"OMCH"
_CHUNK_HEAD = struct.Struct(">4sQI")  # magic, version, blob length
_OWNER_FILE = "owner"  # in a namespace's directory: the owning member's name (UTF-8)


class ChunkStore:
    """Chunks on disk under ``root``, bounded by the disk this peer lends.

    Layout: ``root/<namespace>/<key as 16 hex digits>``; each file is a small
    header (magic, version, length) and the blob; ``root/<namespace>/owner``
    names the member that owns it. The index (versions, sizes, owners) is
    rebuilt from the files at start.

    Attributes:
        root: the data directory.
        capacity: bytes this store may hold.
        used: bytes it holds.
    """

    def __init__(self, root: Path, capacity: int, *, fsync: bool = True) -> None:
        """Open (and index) a store.

        Args:
            root: the data directory (created if missing).
            capacity: the disk lent, in bytes.
            fsync: fsync each chunk before it is acknowledged.

        Raises:
            StoreError: the directory cannot be used.
        """
        self.root = Path(root)
        self.capacity = capacity
        self.used = 0
        self._fsync = fsync
        self._lock = threading.Lock()
        self._ns: dict[str, dict[int, tuple[int, int]]] = {}
        self._owners: dict[str, str | None] = {}  # same keys as _ns; None: not recorded
        self._seq = 0
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self._load()
        except OSError as exc:
            raise StoreError(f"cannot use data directory {self.root}: {exc}") from exc

    def _load(self) -> None:
        for nsdir in self.root.iterdir():
            if nsdir.name.startswith(".trash-"):
                shutil.rmtree(nsdir, ignore_errors=True)
                continue
            if not nsdir.is_dir():
                continue
            entries: dict[int, tuple[int, int]] = {}
            owner: str | None = None
            for f in nsdir.iterdir():
                if f.name.startswith("."):  # an interrupted write
                    f.unlink(missing_ok=True)
                    continue
                if f.name == _OWNER_FILE:
                    owner = f.read_text("utf-8", errors="replace").strip() or None
                    continue
                try:
                    key = int(f.name, 16)
                    with f.open("rb") as fh:
                        magic, version, size = _CHUNK_HEAD.unpack(fh.read(_CHUNK_HEAD.size))
                except (ValueError, struct.error):
                    continue  # not ours: leave it alone, do not serve it
                if magic != _CHUNK_MAGIC or f.stat().st_size != _CHUNK_HEAD.size + size:
                    continue
                entries[key] = (version, size)
                self.used += size
            if entries:
                self._ns[nsdir.name] = entries
                self._owners[nsdir.name] = owner

    @property
    def count(self) -> int:
        """Number of chunks held."""
        with self._lock:
            return sum(len(d) for d in self._ns.values())

    def _path(self, ns: str, key: int) -> Path:
        return self.root / ns / f"{key:016x}"

    def _authorize(self, ns: str, owner: str) -> None:
        # Under the lock. A namespace nobody holds is anyone's to create.
        have = self._owners.get(ns, owner)
        if have == owner:
            return
        if have is not None:
            raise NotOwnerError(ns)
        # Written before owners were recorded: the first member to use it adopts it.
        self._record_owner(ns, owner)
        self._owners[ns] = owner

    def _record_owner(self, ns: str, owner: str) -> None:
        # Under the lock; the namespace directory exists. Temporary name, then rename:
        # a crash leaves the old owner file or the new one.
        self._seq += 1
        path = self.root / ns / _OWNER_FILE
        tmp = path.with_name(f".{_OWNER_FILE}.{self._seq}")
        try:
            with open(tmp, "w", encoding="utf-8") as fh:
                fh.write(owner)
                if self._fsync:
                    fh.flush()
                    os.fsync(fh.fileno())
            os.replace(tmp, path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise StoreError(f"cannot record the owner of namespace {ns}: {exc}") from exc

    def put(self, ns: str, item: Item, *, owner: str) -> Status:
        """Store one chunk (blocking: call from a worker thread).

        Args:
            ns: the namespace name.
            item: key, version, blob.
            owner: the caller; it owns the namespace if this put creates it.

        Returns:
            OK, FULL or STALE.

        Raises:
            NotOwnerError: ``ns`` belongs to another member (nothing changed).
            StoreError: the write failed (nothing changed).
        """
        with self._lock:
            self._authorize(ns, owner)
            status = self._admit(ns, item)
            if status is not Status.OK:
                return status
            self._seq += 1
            seq = self._seq
        path = self._path(ns, item.key)
        tmp = path.with_name(f".{path.name}.{seq}")
        try:
            path.parent.mkdir(exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, _CHUNK_HEAD.pack(_CHUNK_MAGIC, item.version, len(item.blob)))
                view = memoryview(item.blob)
                while view:
                    view = view[os.write(fd, view):]
                if self._fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise StoreError(f"cannot write chunk {ns}/{item.key}: {exc}") from exc
        with self._lock:
            # Re-check: another put of this key (or another member's first put to
            # this namespace) may have finished meanwhile.
            try:
                self._authorize(ns, owner)
                status = self._admit(ns, item)
                if status is not Status.OK:
                    tmp.unlink(missing_ok=True)
                    return status
                if ns not in self._ns:
                    self._record_owner(ns, owner)  # before the chunk: never unowned on disk
                os.replace(tmp, path)
            except OSError as exc:
                tmp.unlink(missing_ok=True)
                raise StoreError(f"cannot store chunk {ns}/{item.key}: {exc}") from exc
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            if ns not in self._ns:
                self._owners[ns] = owner
            entries = self._ns.setdefault(ns, {})
            old = entries.get(item.key)
            self.used += len(item.blob) - (old[1] if old else 0)
            entries[item.key] = (item.version, len(item.blob))
        return Status.OK

    def _admit(self, ns: str, item: Item) -> Status:
        old = self._ns.get(ns, {}).get(item.key)
        if old is not None and old[0] > item.version:
            return Status.STALE
        growth = len(item.blob) - (old[1] if old else 0)
        if self.used + growth > self.capacity:
            return Status.FULL
        return Status.OK

    def put_many(self, ns: str, items: Iterable[Item], *,
                 owner: str) -> tuple[Status, list[Status]]:
        """Store several chunks; FULL for the whole batch when it cannot fit.

        Returns:
            ``(FULL, [])`` (nothing stored) or ``(OK, per-item statuses)``.

        Raises:
            NotOwnerError: ``ns`` belongs to another member (nothing stored).
        """
        items = list(items)
        with self._lock:
            self._authorize(ns, owner)
            entries = self._ns.get(ns, {})
            if self.used + _batch_growth(items, entries, size_of=int) > self.capacity:
                return Status.FULL, []
        return Status.OK, [self.put(ns, it, owner=owner) for it in items]

    def get(self, ns: str, key: int, *, owner: str) -> tuple[int, bytes] | None:
        """Return ``(version, blob)`` or None (blocking).

        Raises:
            NotOwnerError: ``ns`` belongs to another member.
            StoreError: the file is unreadable or corrupt.
        """
        with self._lock:
            self._authorize(ns, owner)
            if key not in self._ns.get(ns, {}):
                return None
        try:
            with open(self._path(ns, key), "rb") as fh:
                data = fh.read()
        except FileNotFoundError:
            return None  # deleted meanwhile
        except OSError as exc:
            raise StoreError(f"cannot read chunk {ns}/{key}: {exc}") from exc
        if len(data) < _CHUNK_HEAD.size:
            raise StoreError(f"chunk {ns}/{key} is corrupt")
        magic, version, size = _CHUNK_HEAD.unpack_from(data)
        if magic != _CHUNK_MAGIC or len(data) != _CHUNK_HEAD.size + size:
            raise StoreError(f"chunk {ns}/{key} is corrupt")
        return version, data[_CHUNK_HEAD.size:]

    def delete(self, ns: str, keys: Iterable[int], *, owner: str) -> int:
        """Delete keys; return how many existed (blocking).

        Raises:
            NotOwnerError: ``ns`` belongs to another member (nothing deleted).
        """
        n = 0
        with self._lock:
            self._authorize(ns, owner)
            entries = self._ns.get(ns)
            if entries is None:
                return 0
            for k in keys:
                old = entries.pop(k, None)
                if old is None:
                    continue
                self._path(ns, k).unlink(missing_ok=True)
                self.used -= old[1]
                n += 1
            if not entries:
                # Empty: the namespace (and its ownership) ends here.
                del self._ns[ns]
                del self._owners[ns]
                try:
                    (self.root / ns / _OWNER_FILE).unlink(missing_ok=True)
                    (self.root / ns).rmdir()
                except OSError:
                    pass
        return n

    def list(self, ns: str, *, owner: str, after: int = 0, limit: int = 65536,
             first: bool = True) -> tuple[list[tuple[int, int]], bool]:
        """Return up to ``limit`` ``(key, version)`` in key order, and whether more follow.

        Raises:
            NotOwnerError: ``ns`` belongs to another member.
        """
        with self._lock:
            self._authorize(ns, owner)
            return _page_list(dict(self._ns.get(ns, {})), after, limit, first)

    def drop(self, ns: str, *, owner: str) -> int:
        """Drop a namespace and its files; return how many chunks it held (blocking).

        Raises:
            NotOwnerError: ``ns`` belongs to another member (nothing dropped).
        """
        with self._lock:
            self._authorize(ns, owner)
            entries = self._ns.pop(ns, None)
            if entries is None:
                return 0
            del self._owners[ns]
            self.used -= sum(size for _, size in entries.values())
            self._seq += 1
            trash = self.root / f".trash-{self._seq}"
            try:
                os.replace(self.root / ns, trash)
            except FileNotFoundError:
                return len(entries)
        shutil.rmtree(trash, ignore_errors=True)
        return len(entries)

    def namespaces(self, *, owner: str | None = None) -> list[tuple[str, int, int]]:
        """Return ``(name, keys, bytes)`` per namespace (only ``owner``'s, when given)."""
        with self._lock:
            return [(name, len(d), sum(s for _, s in d.values()))
                    for name, d in self._ns.items()
                    if owner is None or self._owners[name] == owner]
