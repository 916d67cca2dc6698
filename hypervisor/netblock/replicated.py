"""An export stored as sealed, replicated chunks on peer nodes.

The export is cut into fixed-size chunks. Chunk ``i`` is held, sealed with the
export's AES-GCM key (associated data = export id, chunk index, version), by
up to ``replicas`` peers chosen by :class:`ChunkPlacement`. The export's
metadata (SQLite, :class:`~hypervisor.netblock.exports.ExportStore`) records
each chunk's current version and which peers hold it; a chunk without a row
(or with no holders) is a hole.

Writes: read-modify-write of the chunk under a per-chunk lock, a new version
sealed once and PUT to every target concurrently; the write is acknowledged
when ``write_quorum`` targets (default: every target still alive at the end
of the write) have it. A peer that fails during the write is dropped from the
chunk's holders and marked unhealthy, so an acknowledged write is on at least
one live peer and never depends on the dead one. Reads come from the nearest
healthy holder; a blob whose version is older than recorded, or that fails
authentication (tampered, swapped, or another chunk's), is never served —
the next holder is tried. Re-replication (:meth:`ReplicatedBackend.repair`)
copies each under-replicated chunk's current sealed blob to new peers.

A plaintext cache of recently used chunks (bounded) saves the read half of
small writes and serves hot reads locally.

Threads: everything runs on the event loop of the NBD server.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from hypervisor.config import Config
from hypervisor.errors import NotFoundError, PeerError, SecurityError, UsageError
from hypervisor.netblock import protocol as nbd
from hypervisor.netblock.backend import Backend, BackendError, Extent
from hypervisor.netblock.exports import ChunkState, ExportRecord, ExportStore
from hypervisor.netblock.stats import LatencyHistogram
from hypervisor.sealing import Sealer, build_aad

log = logging.getLogger(__name__)

DEFAULT_CACHE_BYTES = 64 * 1024 * 1024
ENV_NATIVE = "OMEGA_NETBLOCK_NATIVE"
PUT_BATCH_ITEMS = 256          # chunks per BATCH_PUT (the wire allows 4096)
PUT_BATCH_BYTES = 16 << 20     # bytes per BATCH_PUT (the wire allows 64 MiB frames)


def host_node_name(config: Config | None = None) -> str:
    """This host's node name as a cluster client.

    ``OMEGA_NODE`` if set, else the name the cluster state records for this
    host (``omega cluster up`` uses ``host``), else ``host``.
    """
    if os.environ.get("OMEGA_NODE"):
        return os.environ["OMEGA_NODE"]
    if config is not None:
        try:
            from hypervisor.clusterstate import ClusterState

            name = ClusterState(config).get_meta("local_node")
        except Exception:  # no cluster state yet
            name = None
        if name:
            return str(name)
    return "host"


@dataclass
class PeerLoad:
    """Placement inputs for one peer.

    Attributes:
        name: node name.
        free: lent bytes still free (None: unknown, treated as plenty).
        rtt: smoothed round-trip time in seconds (None: unmeasured).
    """

    name: str
    free: int | None = None
    rtt: float | None = None


_M64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    """splitmix64's finalizer (native/nbd/nbd_repl.c nbr_mix64)."""
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & _M64
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def _fnv1a64(text: str) -> int:
    h = 0xCBF29CE484222325
    for byte in text.encode():
        h = ((h ^ byte) * 0x100000001B3) & _M64
    return h


def placement_seed(export_id: str) -> int:
    """The 64-bit seed of an export's chunk placement (both backends use it)."""
    return _fnv1a64(export_id)


def placement_hash(seed: int, index: int, peer: str) -> int:
    """The pseudo-random 64 bits of a (chunk, peer) pair, as nbr_placement_hash in C."""
    return _mix64(seed ^ _mix64((index + 0x9E3779B97F4A7C15) & _M64) ^ _mix64(_fnv1a64(peer)))


class ChunkPlacement:
    """Chooses distinct peers for a chunk: weighted rendezvous hashing.

    Each (chunk, peer) pair gets a pseudo-random score scaled by the peer's
    weight = free capacity / (1 + RTT in ms); the highest scores win. The
    choice is stable while peers do not change (chunks do not move around),
    spreads chunks in proportion to weight, and never picks a peer twice.
    The hash is the native backend's (native/nbd/nbd_repl.c), so both place
    a chunk on the same peers.

    Args:
        export_id: mixed into the hash so exports spread differently.
    """

    def __init__(self, export_id: str) -> None:
        self.export_id = export_id
        self._seed = placement_seed(export_id)

    def weight(self, load: PeerLoad) -> float:
        """Relative attractiveness of a peer."""
        free = float(load.free) if load.free is not None else float(1 << 40)
        rtt_ms = (load.rtt or 0.0) * 1000.0
        return max(free, 1.0) / (1.0 + rtt_ms)

    def choose(self, index: int, peers: Iterable[PeerLoad], count: int, *,
               exclude: Iterable[str] = (), need: int = 0) -> list[str]:
        """Pick up to ``count`` distinct peers for chunk ``index``.

        Args:
            index: the chunk index.
            peers: candidate (healthy) peers.
            count: how many to pick.
            exclude: peers that must not be picked (already hold the chunk).
            need: bytes the chunk needs (peers with less free space are skipped).

        Returns:
            Peer names, best first.
        """
        banned = set(exclude)
        scored = []
        for load in peers:
            if load.name in banned or (load.free is not None and load.free < need):
                continue
            h = placement_hash(self._seed, index, load.name)
            u = ((h >> 11) + 0.5) / float(1 << 53)
            scored.append((-self.weight(load) / math.log(u), load.name))
        scored.sort(reverse=True)
        return [name for _, name in scored[:count]]


@dataclass
class RepairProgress:
    """Re-replication state, also exported as metrics.

    Attributes:
        backlog: chunks with fewer live copies than wanted (last scan).
        repaired: chunks copied back to full strength since start.
        failed: copies that failed (retried on the next pass).
    """

    backlog: int = 0
    repaired: int = 0
    failed: int = 0


@dataclass
class PeerIoStats:
    """Per-peer request counters (metrics)."""

    gets: int = 0
    puts: int = 0
    deletes: int = 0
    errors: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)


class ReplicatedBackend(Backend):
    """Backend of a replicated export (see the module docstring).

    Args:
        record: the export.
        store: its metadata store (chunk versions are persisted there).
        pool: clients of the peers (a ``PeerPool``).
        key: the export's sealing key.
        read_only: refuse writes.
        cache_bytes: plaintext chunk cache size.
        own_pool: close the pool in :meth:`close`.
    """

    is_async = True
    can_fast_zero = True
    multi_conn_safe = True

    def __init__(self, record: ExportRecord, store: ExportStore, pool: Any, key: bytes, *,
                 read_only: bool = False, cache_bytes: int = DEFAULT_CACHE_BYTES,
                 own_pool: bool = False) -> None:
        from hypervisor.node.wire import Namespace

        if record.block_size != record.chunk_size:
            raise UsageError(
                f"export {record.name} seals {record.block_size // 1024}K blocks within "
                f"{record.chunk_size // 1024}K chunks: only the native backend serves it "
                f"(is {ENV_NATIVE}=0 set, or the native module not built?)")
        self.record = record
        self.store = store
        self.pool = pool
        self.size = record.size
        self.read_only = read_only
        self.chunk_size = record.chunk_size
        self.min_block = 512
        self.preferred_block = min(record.chunk_size, 64 * 1024)
        self.max_block = 32 * 1024 * 1024
        self.ns = Namespace.chunk(f"nb-{record.id}")
        self._sealer = Sealer(key)
        self._states = store.chunk_states(record)
        self._dirty: dict[int, ChunkState | None] = {}
        self._locks: dict[int, asyncio.Lock] = {}
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._cache_max = max(cache_bytes // self.chunk_size, 0)
        self._placement = ChunkPlacement(record.id)
        self._free: dict[str, int | None] = {}
        self._own_pool = own_pool
        self.progress = RepairProgress()
        self.peer_stats: dict[str, PeerIoStats] = {}
        self._repair_task: asyncio.Task[None] | None = None
        self._flush_lock = asyncio.Lock()
        self._lock_fd: int | None = None
        # PUTs to one peer issued in the same event-loop pass go as one BATCH_PUT
        self._put_queues: dict[str, list[tuple[int, int, bytes, asyncio.Future[None]]]] = {}

    @classmethod
    def open(cls, config: Config, store: ExportStore, record: ExportRecord, *,
             read_only: bool = False, pool: Any = None, node: str | None = None,
             cache_bytes: int = DEFAULT_CACHE_BYTES) -> ReplicatedBackend:
        """Open a replicated export with a pool of the cluster's peers.

        Args:
            config: configuration (cluster state and this node's certificate).
            store: metadata store.
            record: the export.
            read_only: refuse writes.
            pool: an existing ``PeerPool`` (default: every peer in the cluster state).
            node: this host's node name for mutual TLS (default :func:`host_node_name`).
            cache_bytes: plaintext cache size.

        Returns:
            The backend.
        """
        own = pool is None
        if pool is None:
            from hypervisor.node.client import PeerPool
            from hypervisor.security import ensure_node_cert

            name = node or host_node_name(config)
            ensure_node_cert(config, name)
            pool = PeerPool.from_cluster(config, node=name)
        lock = store.lock(record)
        try:
            backend = cls(record, store, pool, store.key(record), read_only=read_only,
                          cache_bytes=cache_bytes, own_pool=own)
        except BaseException:
            os.close(lock)
            raise
        backend._lock_fd = lock
        return backend

    # --- helpers ---------------------------------------------------------------------

    def _aad(self, index: int, version: int) -> bytes:
        return build_aad("chunk", self.record.id, index, version)

    def _lock(self, index: int) -> asyncio.Lock:
        lock = self._locks.get(index)
        if lock is None:
            lock = self._locks[index] = asyncio.Lock()
        return lock

    def _cache_put(self, index: int, data: bytes) -> None:
        if self._cache_max <= 0:
            return
        self._cache[index] = data
        self._cache.move_to_end(index)
        while len(self._cache) > self._cache_max:
            self._cache.popitem(last=False)

    def _set_state(self, index: int, state: ChunkState | None) -> None:
        if state is None:
            self._states.pop(index, None)
        else:
            self._states[index] = state
        self._dirty[index] = state

    def _pstats(self, name: str) -> PeerIoStats:
        st = self.peer_stats.get(name)
        if st is None:
            st = self.peer_stats[name] = PeerIoStats()
        return st

    def _healthy(self) -> list[str]:
        return self.pool.healthy()

    def _loads(self, names: Iterable[str]) -> list[PeerLoad]:
        out = []
        for name in names:
            health = self.pool.health(name)
            out.append(PeerLoad(name, self._free.get(name), health.rtt))
        return out

    def _targets(self, index: int, holders: tuple[str, ...]) -> list[str]:
        """Where the next version of a chunk goes: live holders, topped up to R."""
        healthy = self._healthy()
        live = [p for p in holders if p in healthy]
        missing = self.record.replicas - len(live)
        if missing > 0:
            live += self._placement.choose(index, self._loads(healthy), missing, exclude=live,
                                           need=self.chunk_size)
        return live

    async def refresh_capacity(self) -> None:
        """Ask every healthy peer for its free lent capacity (placement input)."""
        async def one(name: str) -> None:
            try:
                info = await self.pool.client(name).stat()
                self._free[name] = max(int(info.disk_capacity) - int(info.disk_used), 0)
            except PeerError as exc:
                self.pool.mark_failed(name, exc)
        await asyncio.gather(*(one(n) for n in self._healthy()))

    # --- peer I/O --------------------------------------------------------------------

    async def _get_from(self, name: str, index: int) -> tuple[int, bytes] | None:
        stats = self._pstats(name)
        t0 = _now_ns()
        try:
            got = await self.pool.client(name).get(self.ns, index)
        except PeerError as exc:
            stats.errors += 1
            self.pool.mark_failed(name, exc)
            raise
        stats.gets += 1
        stats.latency.observe_ns(_now_ns() - t0)
        if got is not None:
            stats.bytes_in += len(got[1])
        return got

    async def _put_to(self, name: str, index: int, version: int, blob: bytes) -> str:
        """Store one sealed chunk version on a peer; returns the peer's name.

        Puts to the same peer issued in one pass of the event loop (a deep
        queue of writes) are sent together as one BATCH_PUT; each caller gets
        its own item's outcome (a full peer refuses the whole batch).
        """
        stats = self._pstats(name)
        t0 = _now_ns()
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        queue = self._put_queues.get(name)
        if queue is None:
            queue = self._put_queues[name] = []
            asyncio.get_running_loop().call_soon(self._send_puts, name)
        queue.append((index, version, blob, fut))
        try:
            await fut
        except PeerError as exc:
            stats.errors += 1
            if not type(exc).__name__ == "StaleVersionError":
                self.pool.mark_failed(name, exc)
            raise
        stats.puts += 1
        stats.bytes_out += len(blob)
        stats.latency.observe_ns(_now_ns() - t0)
        return name

    def _send_puts(self, name: str) -> None:
        items = self._put_queues.pop(name, [])
        batch: list[tuple[int, int, bytes, asyncio.Future[None]]] = []
        size = 0
        for item in items:
            if batch and (len(batch) >= PUT_BATCH_ITEMS or size + len(item[2]) > PUT_BATCH_BYTES):
                asyncio.ensure_future(self._put_batch(name, batch))
                batch, size = [], 0
            batch.append(item)
            size += len(item[2])
        if batch:
            asyncio.ensure_future(self._put_batch(name, batch))

    async def _put_batch(self, name: str,
                         items: list[tuple[int, int, bytes, asyncio.Future[None]]]) -> None:
        from hypervisor.node.client import StaleVersionError
        from hypervisor.node.wire import Status

        client = self.pool.client(name)
        results: list[BaseException | None]
        try:
            if len(items) == 1:
                index, version, blob, _ = items[0]
                await client.put(self.ns, index, version, blob)
                results = [None]
            else:
                statuses = await client.batch_put(self.ns, [(i, v, b) for i, v, b, _ in items])
                results = [None if st == Status.OK else
                           StaleVersionError(f"peer {name}: chunk {i}: PUT → STALE")
                           for (i, _, _, _), st in zip(items, statuses)]
        except PeerError as exc:
            results = [exc] * len(items)
        except asyncio.CancelledError:
            for _, _, _, fut in items:
                fut.cancel()
            raise
        except Exception as exc:  # a bug: fail the writes, keep serving
            log.exception("batched put to %s failed", name)
            results = [PeerError(f"peer {name}: {exc}")] * len(items)
        for (_, _, _, fut), res in zip(items, results):
            if fut.done():
                continue
            if res is None:
                fut.set_result(None)
            else:
                fut.set_exception(res)

    def _read_order(self, index: int, state: ChunkState) -> list[str]:
        """Holders to read a chunk from, best first.

        Healthy holders whose RTT is within 1.5x of the nearest one count as
        equally near; among those the chunk index picks the first, so reads
        spread over replicas instead of piling onto one peer. Unhealthy
        holders come last (tried only when nothing else answers).
        """
        healthy = [p for p in self._healthy() if p in state.peers]
        if len(healthy) > 1:
            rtts = [self.pool.health(p).rtt for p in healthy]
            best = rtts[0]
            if best is not None:
                near = [p for p, r in zip(healthy, rtts) if r is not None and r <= best * 1.5]
                if len(near) > 1:
                    k = index % len(near)
                    healthy = near[k:] + near[:k] + [p for p in healthy if p not in near]
        return healthy + [p for p in state.peers if p not in healthy]

    def _open_blob(self, index: int, state: ChunkState, got: tuple[int, bytes] | None,
                   name: str) -> tuple[int, bytes] | str:
        """Authenticate one copy: (version, plaintext), or why it was refused."""
        if got is None:
            return f"{name}: missing"
        version, blob = got
        if version < state.version:
            return f"{name}: stale version {version} < {state.version}"
        try:
            plain = self._sealer.open(self._aad(index, version), blob)
        except SecurityError as exc:
            return f"{name}: {exc}"
        if len(plain) != self.chunk_size:
            return f"{name}: wrong chunk length {len(plain)}"
        return version, plain

    async def _fetch(self, index: int, state: ChunkState) -> tuple[int, bytes, bytes]:
        """Current (version, plaintext, sealed blob) of a chunk from the nearest holder.

        Raises:
            BackendError: no holder returned an authentic, current copy.
        """
        order = self._read_order(index, state)
        problems = []
        for name in order:
            try:
                got = await self._get_from(name, index)
            except PeerError as exc:
                problems.append(f"{name}: {exc}")
                continue
            opened = self._open_blob(index, state, got, name)
            if isinstance(opened, str):
                problems.append(opened)
                continue
            assert got is not None
            return opened[0], opened[1], got[1]
        raise BackendError(f"chunk {index}: no current copy readable ({'; '.join(problems)})")

    async def _chunk_plain(self, index: int) -> tuple[int, bytes]:
        """(version, plaintext) of a chunk, from the cache when possible."""
        state = self._states.get(index)
        if state is None or not state.peers:
            return (state.version if state else 0), bytes(self.chunk_size)
        cached = self._cache.get(index)
        if cached is not None:
            self._cache.move_to_end(index)
            return state.version, cached
        version, plain, _ = await self._fetch(index, state)
        # A write or trim may have finished while this fetch was in flight: only
        # what is still current goes into the cache.
        current = self._states.get(index)
        if current is not None and current.peers and version >= current.version:
            if version > current.version:  # newer than recorded (table not yet flushed)
                self._set_state(index, ChunkState(version, current.peers))
            self._cache_put(index, plain)
        return version, plain

    async def _store_chunk(self, index: int, version: int, plain: bytes, *,
                           retried: bool = False) -> None:
        """Seal and PUT a new version of a chunk to its targets; record who has it.

        A target that already holds a newer version (the chunk table was not
        flushed before this host went down) makes the write start over once,
        numbered above every version the targets hold, so no copy can ever
        outrank the one just acknowledged.

        Raises:
            BackendError: fewer than the write quorum acknowledged it.
        """
        from hypervisor.node.client import StaleVersionError

        state = self._states.get(index)
        targets = self._targets(index, state.peers if state else ())
        if not targets:
            raise BackendError(f"chunk {index}: no live peer to write to")
        blob = self._sealer.seal(self._aad(index, version), plain)
        results = await asyncio.gather(*(self._put_to(t, index, version, blob) for t in targets),
                                       return_exceptions=True)
        stale = [t for t, r in zip(targets, results) if isinstance(r, StaleVersionError)]
        if stale and not retried:
            newest = version
            for name in stale:
                try:
                    got = await self.pool.client(name).get(self.ns, index)
                except PeerError:
                    continue
                if got is not None:
                    newest = max(newest, got[0])
            await self._store_chunk(index, newest + 1, plain, retried=True)
            return
        ok = tuple(r for r in results if isinstance(r, str))
        failed = [f"{t}: {r}" for t, r in zip(targets, results) if not isinstance(r, str)]
        quorum = self.record.write_quorum or 1
        if len(ok) < quorum:
            self._cache.pop(index, None)
            raise BackendError(f"chunk {index}: {len(ok)} of {len(targets)} replicas took "
                               f"the write ({'; '.join(failed)})")
        if failed:
            log.warning("chunk %d written to %d of %d targets: %s", index, len(ok),
                        len(targets), "; ".join(failed))
        self._set_state(index, ChunkState(version, ok))
        self._cache_put(index, plain)

    def _span(self, offset: int, length: int) -> Iterable[tuple[int, int, int]]:
        """(chunk index, offset inside chunk, byte count) pieces of a range."""
        cs = self.chunk_size
        pos, end = offset, offset + length
        while pos < end:
            index, inner = divmod(pos, cs)
            count = min(cs - inner, end - pos)
            yield index, inner, count
            pos += count

    # --- Backend ---------------------------------------------------------------------

    async def read(self, offset: int, length: int) -> bytes:
        pieces = list(self._span(offset, length))
        if len(pieces) == 1:
            index, inner, count = pieces[0]
            _, plain = await self._chunk_plain(index)
            return plain[inner:inner + count]
        parts = await asyncio.gather(*(self._chunk_plain(i) for i, _, _ in pieces))
        return b"".join(plain[inner:inner + count]
                        for (_, inner, count), (_, plain) in zip(pieces, parts))

    async def _modify(self, index: int, inner: int, data: bytes | memoryview | None,
                      count: int) -> None:
        """Replace ``count`` bytes at ``inner`` of a chunk (zeroes when ``data`` is None)."""
        async with self._lock(index):
            if inner == 0 and count == self.chunk_size:
                state = self._states.get(index)
                version = state.version if state else 0
                plain = bytes(data) if data is not None else bytes(self.chunk_size)
            else:
                version, old = await self._chunk_plain(index)
                buf = bytearray(old)
                buf[inner:inner + count] = data if data is not None else bytes(count)
                plain = bytes(buf)
            await self._store_chunk(index, version + 1, plain)

    async def write(self, offset: int, data: bytes | memoryview, *, fua: bool) -> None:
        view = memoryview(data)
        jobs = []
        pos = 0
        for index, inner, count in self._span(offset, len(view)):
            jobs.append(self._modify(index, inner, view[pos:pos + count], count))
            pos += count
        await _all(jobs)
        if fua:
            await self.flush()

    async def _discard(self, index: int) -> None:
        """Make a whole chunk a hole again: delete it on its holders."""
        async with self._lock(index):
            state = self._states.get(index)
            if state is None or not state.peers:
                return
            self._cache.pop(index, None)
            # keep the version (a tombstone) so a stale copy can never look current
            self._set_state(index, ChunkState(state.version, ()))
            for name in state.peers:
                try:
                    await self.pool.client(name).delete(self.ns, [index])
                    self._pstats(name).deletes += 1
                except PeerError as exc:  # the copy is unreferenced; repair ignores it
                    self.pool.mark_failed(name, exc)

    async def _zero_range(self, offset: int, length: int, *, discard: bool) -> None:
        jobs = []
        for index, inner, count in self._span(offset, length):
            state = self._states.get(index)
            if discard and (state is None or not state.peers):
                continue  # already a hole: reads as zeroes
            if discard and inner == 0 and count == self.chunk_size:
                jobs.append(self._discard(index))
            else:
                jobs.append(self._modify(index, inner, None, count))
        await _all(jobs)

    async def trim(self, offset: int, length: int, *, fua: bool) -> None:
        await self._zero_range(offset, length, discard=True)
        if fua:
            await self.flush()

    async def write_zeroes(self, offset: int, length: int, *, fua: bool, may_trim: bool,
                           fast_only: bool) -> None:
        # With NO_HOLE the zeroes are stored (allocated); otherwise whole chunks
        # become holes again, which is as fast as it gets (FAST_ZERO holds).
        if fast_only and not may_trim:
            raise BackendError("storing zeroes is not fast", nbd_errno=nbd.ENOTSUP)
        await self._zero_range(offset, length, discard=may_trim)
        if fua:
            await self.flush()

    async def flush(self) -> None:
        """Persist the chunk version table (data is already on the peers)."""
        async with self._flush_lock:
            if not self._dirty:
                return
            dirty, self._dirty = self._dirty, {}
            try:
                await asyncio.to_thread(self.store.set_chunks, self.record, dirty)
            except BaseException:
                dirty.update(self._dirty)
                self._dirty = dirty
                raise

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        out: list[Extent] = []
        for index, _inner, count in self._span(offset, length):
            state = self._states.get(index)
            flags = 0 if state is not None and state.peers else nbd.STATE_HOLE | nbd.STATE_ZERO
            out.append((count, flags))
        return out

    async def cache(self, offset: int, length: int) -> None:
        pieces = list(self._span(offset, min(length, self._cache_max * self.chunk_size)))
        await asyncio.gather(*(self._chunk_plain(i) for i, _, _ in pieces),
                             return_exceptions=True)

    async def close(self) -> None:
        if self._repair_task is not None:
            self._repair_task.cancel()
            try:
                await self._repair_task
            except (asyncio.CancelledError, Exception):
                pass
        await self.flush()
        if self._own_pool:
            await self.pool.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # --- re-replication ----------------------------------------------------------------

    def chunk_count(self) -> int:
        """Chunks with at least one holder."""
        return sum(1 for s in list(self._states.values()) if s.peers)

    def under_replicated(self) -> list[int]:
        """Chunks with fewer live holders of the current version than wanted."""
        healthy = set(self._healthy())
        want = self.record.replicas
        return [i for i, s in self._states.items()
                if s.peers and sum(1 for p in s.peers if p in healthy) < want]

    async def repair(self, *, progress: Callable[[int, int], None] | None = None,
                     batch: int = 32) -> RepairProgress:
        """Copy every under-replicated chunk's current blob to new live peers.

        Args:
            progress: called with (chunks done, chunks to do) as it goes.
            batch: chunks repaired concurrently.

        Returns:
            The running totals (``backlog`` = what is left).
        """
        await self.refresh_capacity()
        todo = self.under_replicated()
        self.progress.backlog = len(todo)
        done = 0
        if progress:
            progress(0, len(todo))
        for start in range(0, len(todo), batch):
            results = await asyncio.gather(*(self._repair_one(i) for i in todo[start:start + batch]),
                                           return_exceptions=True)
            for r in results:
                if r is True:
                    self.progress.repaired += 1
                elif r is not False:
                    self.progress.failed += 1
            done += len(results)
            self.progress.backlog = len(todo) - done + sum(1 for r in results if r is not True)
            if progress:
                progress(done, len(todo))
        self.progress.backlog = len(self.under_replicated())
        await self.flush()
        return self.progress

    async def _repair_one(self, index: int) -> bool:
        async with self._lock(index):
            state = self._states.get(index)
            if state is None or not state.peers:
                return False
            healthy = self._healthy()
            live = [p for p in state.peers if p in healthy]
            missing = self.record.replicas - len(live)
            if missing <= 0:
                return False
            version, _plain, blob = await self._fetch(index, state)
            targets = self._placement.choose(index, self._loads(healthy), missing, exclude=live,
                                             need=self.chunk_size)
            if not targets:
                raise BackendError(f"chunk {index}: no peer to re-replicate to")
            results = await asyncio.gather(*(self._put_to(t, index, version, blob)
                                              for t in targets), return_exceptions=True)
            added = tuple(r for r in results if isinstance(r, str))
            self._set_state(index, ChunkState(version, tuple(live) + added))
            return len(live) + len(added) >= self.record.replicas

    def start_repair_loop(self, *, interval: float = 2.0) -> None:
        """Re-replicate in the background (incrementally, every ``interval`` seconds)."""
        if self._repair_task is None:
            self._repair_task = start_repair_loop(self, interval=interval)


def start_repair_loop(backend: Any, *, interval: float) -> asyncio.Task[None]:
    """A task re-replicating ``backend`` (either replicated backend) every ``interval`` s.

    Each pass runs only when some chunk is under-replicated; a failed pass is
    logged and retried on the next (the backlog metric shows what is left).
    """
    async def loop() -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                if backend.under_replicated():
                    await backend.repair()
            except Exception as exc:  # keep trying; the backlog metric shows it
                log.warning("re-replication pass failed: %s", exc)

    return asyncio.ensure_future(loop())


async def _all(jobs: list[Any]) -> None:
    """Run coroutines concurrently; raise the first BackendError after all finish."""
    if len(jobs) == 1:
        await jobs[0]
        return
    results = await asyncio.gather(*jobs, return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r


def _now_ns() -> int:
    import time

    return time.perf_counter_ns()


async def drop_export_chunks(config: Config, store: ExportStore, record: ExportRecord, *,
                             pool: Any = None) -> int:
    """Drop an export's namespace on every reachable peer.

    Returns:
        The number of blobs dropped.
    """
    from hypervisor.node.wire import Namespace

    own = pool is None
    if pool is None:
        from hypervisor.netblock.service import make_peer_pool

        pool = make_peer_pool(config)
    total = 0
    try:
        ns = Namespace.chunk(f"nb-{record.id}")
        for name in pool.names():
            try:
                total += await pool.client(name).drop_ns(ns)
            except PeerError as exc:
                log.warning("could not drop chunks of %s on %s: %s", record.name, name, exc)
    finally:
        if own:
            await pool.close()
    return total


async def repair_export(config: Config, store: ExportStore, name: str, *,
                        progress: Callable[[int, int], None] | None = None,
                        pool: Any = None, node: str | None = None) -> dict[str, int]:
    """Re-replicate one export (run while it is not being served).

    Returns:
        ``repaired`` chunks and ``stale`` chunks still under-replicated.

    Raises:
        NotFoundError: no such replicated export.
    """
    record = store.get(name)
    if record.kind != "replicated":
        raise NotFoundError(f"export {name!r} is local; nothing to re-replicate")
    from hypervisor.netblock import native_replicated

    backend: Any
    if native_replicated.enabled():
        backend = native_replicated.NativeReplicatedBackend.open(config, store, record,
                                                                  pool=pool, node=node)
    else:
        backend = ReplicatedBackend.open(config, store, record, pool=pool, node=node)
    backend._own_pool = True
    try:
        await backend.pool.measure(samples=1)
        result = await backend.repair(progress=progress)
        return {"repaired": result.repaired, "stale": result.backlog, "failed": result.failed}
    finally:
        await backend.close()
