"""A replicated export served by C (native/nbd/nbd_repl*.c), driven from Python.

Profiling the Python replicated backend (:mod:`hypervisor.netblock.replicated`)
put the time in per-request Python work in the NBD server process: each 4 KiB
write cost a coroutine, a seal, a TLS send per replica and an event-loop
wake-up, and the peers sat idle. Here the whole data path runs in C: the NBD
fast path hands each pipelined batch of requests to ``nbr_exec``, which reads
what it needs with one ``BATCH_GET`` per peer, applies the writes, seals each
changed chunk once and stores it with one ``BATCH_PUT`` per peer, over its own
mutual-TLS connections to the peers' data ports. Semantics are the Python
backend's (see its module docstring); it stays the reference implementation,
and ``OMEGA_NETBLOCK_NATIVE=0`` selects it.

What stays in Python: opening the export and loading its chunk table from
SQLite; telling C where the peers are (their data ports from STAT), whether
they are healthy, their RTT and their placement weight (a monitor, every
second); persisting the table (C calls :meth:`NativeReplicatedBackend._persist`
for FLUSH and FUA); re-replication (which chunks, in what order, progress);
metrics; and the connections the fast path does not take (TLS, ``-s``), which
call the same C through a small thread pool.

Threads: the asyncio loop (monitor, repair scheduling); the fast path's
connection threads (C, GIL released); ``nbr-*`` worker threads for calls from
Python, each with its own C client. The C export outlives every connection
thread that uses it (:meth:`acquire` / :meth:`release`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import threading
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np

from hypervisor.errors import NativeError, OmegaError, PeerError
from hypervisor.netblock import protocol as nbd
from hypervisor.netblock.backend import Backend, BackendError, Extent
from hypervisor.netblock.exports import TRIMMED, ChunkState, ExportRecord, ExportStore
from hypervisor.netblock.replicated import (
    DEFAULT_CACHE_BYTES,
    ENV_NATIVE,
    PeerIoStats,
    RepairProgress,
    placement_seed,
    start_repair_loop,
)
from hypervisor.netblock.stats import LATENCY_BUCKETS_S
from hypervisor.sealing import build_aad

log = logging.getLogger(__name__)

ENV_SWITCH = ENV_NATIVE
"""Environment variable: ``0`` serves replicated exports with the Python backend."""

BUSY_POLL_US = 100
"""How long a C thread waits awake for a peer's answer before sleeping."""

IO_TIMEOUT_MS = 5000
"""A peer that does not answer a request within this is treated as failed."""

MONITOR_INTERVAL_S = 1.0
CAPACITY_INTERVAL_S = 10.0
WORKERS = 4

_CMD = {"read": 0, "write": 1, "trim": 4, "cache": 5, "write_zeroes": 6}
_STORE_LOCKS: weakref.WeakKeyDictionary[ExportStore, threading.Lock] = (
    weakref.WeakKeyDictionary())
_STORE_LOCKS_GUARD = threading.Lock()


def _store_lock(store: ExportStore) -> threading.Lock:
    """One lock per export store: its SQLite connection runs one transaction at a time."""
    with _STORE_LOCKS_GUARD:
        lock = _STORE_LOCKS.get(store)
        if lock is None:
            lock = _STORE_LOCKS[store] = threading.Lock()
        return lock


def _module() -> Any:
    from hypervisor import _native

    return _native.load("nbd")


def enabled() -> bool:
    """Replicated exports are served natively (the switch is not ``0`` and it is built)."""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return False
    try:
        _module()
    except NativeError as exc:
        log.warning("native replicated backend unavailable: %s", exc)
        return False
    return True


class NativeReplicatedBackend(Backend):
    """A replicated export whose data path is C (see the module docstring).

    Args:
        record: the export.
        store: its metadata store.
        pool: a ``PeerPool`` of the peers (health, RTT, STAT, names).
        key: the export's sealing key.
        node: this host's node name (its certificate authenticates us to peers).
        read_only: refuse writes.
        cache_bytes: plaintext chunk cache size.
        own_pool: close the pool in :meth:`close`.

    Raises:
        OmegaError: the identity cannot be loaded or memory is short.
    """

    is_async = True
    can_fast_zero = True
    multi_conn_safe = True

    def __init__(self, record: ExportRecord, store: ExportStore, pool: Any, key: bytes, *,
                 node: str, config: Any, read_only: bool = False,
                 cache_bytes: int = DEFAULT_CACHE_BYTES, own_pool: bool = False) -> None:
        from hypervisor.node.wire import Namespace, encode_namespace
        from hypervisor.security import node_paths

        module = _module()
        self._ffi, self._lib = module.ffi, module.lib
        ffi, lib = self._ffi, self._lib
        self.record = record
        self.store = store
        self.pool = pool
        self.size = record.size
        self.read_only = read_only
        self.chunk_size = record.chunk_size
        self.block_size = record.block_size
        self._bpc = record.blocks_per_chunk
        self.min_block = 512
        self.preferred_block = min(record.block_size, 64 * 1024)
        self.max_block = 32 * 1024 * 1024
        self.progress = RepairProgress()
        self._own_pool = own_pool
        self._lock_fd: int | None = None
        self._free: dict[str, int | None] = {}
        ident = node_paths(config, node)
        cfg = ffi.new("struct nbr_config *")
        cfg.size = record.size
        cfg.chunk_size = record.chunk_size
        cfg.block_size = record.block_size
        cfg.replicas = record.replicas
        cfg.write_quorum = record.write_quorum
        cfg.cache_bytes = max(cache_bytes, 0)
        cfg.placement_seed = placement_seed(record.id)
        ffi.memmove(cfg.key, key, 32)
        aad = build_aad("chunk", record.id, 0, 0)[:-16]
        ffi.memmove(cfg.aad_prefix, aad, len(aad))
        cfg.aad_len = len(aad)
        ns = encode_namespace(Namespace.chunk(f"nb-{record.id}"))
        ffi.memmove(cfg.ns, ns, len(ns))
        cfg.ns_len = len(ns)
        for field_name, path in (("ca", ident.ca), ("cert", ident.cert), ("keyfile", ident.key)):
            raw = str(path).encode()
            if len(raw) >= 1024:
                raise OmegaError(f"path too long for the native backend: {path}")
            setattr(cfg, field_name, raw)
        cfg.busy_poll_ns = BUSY_POLL_US * 1000
        cfg.io_timeout_ms = IO_TIMEOUT_MS
        for i, bound in enumerate(LATENCY_BUCKETS_S):
            cfg.latency_bounds_ns[i] = int(bound * 1e9)
        err = ffi.new("char[]", 512)
        handle = lib.nbr_open(cfg, err, 512)
        if handle == ffi.NULL:
            raise OmegaError(f"export {record.name}: native backend: "
                             f"{ffi.string(err).decode(errors='replace')}")
        self._h: Any = handle
        # Peer bit i <-> name: the pool's peers, then holders the table names
        # that the pool does not know (kept, never reachable).
        states = store.chunk_states(record)
        names = list(pool.names())
        for state in states.values():
            names += [p for p in state.peers if p not in names]
        if len(names) > lib.NBR_MAX_PEERS:
            lib.nbr_close(handle)
            raise OmegaError(f"export {record.name}: the native backend knows at most "
                             f"{lib.NBR_MAX_PEERS} peers ({len(names)} here)")
        self._names = names
        self._bits = {name: 1 << i for i, name in enumerate(names)}
        for i, name in enumerate(names):
            if name in pool.names():
                host, port = pool.client(name).address
                self._set_peer(i, name, host, port)
                self._push_state(i, name, healthy=True)
            else:
                self._set_peer(i, name, "", 0)
        self._load(states)
        self._persist_lock = threading.Lock()
        self._hook = ffi.callback("int(void *)", self._persist_hook)
        lib.nbr_set_flush_hook(handle, self._hook, ffi.NULL)
        self._local = threading.local()
        self._clients: list[Any] = []
        self._clients_lock = threading.Lock()
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=WORKERS, thread_name_prefix=f"nbr-{record.name}")
        self._users = 0
        self._users_lock = threading.Lock()
        self._idle = threading.Event()
        self._idle.set()
        self._monitor: asyncio.Task[None] | None = None
        self._repair_task: asyncio.Task[None] | None = None
        self._failures = [0] * len(names)
        self._pstats = ffi.new("struct nbr_peer_stats *")
        self._closed = False

    @classmethod
    def open(cls, config: Any, store: ExportStore, record: ExportRecord, *,
             read_only: bool = False, pool: Any = None, node: str | None = None,
             cache_bytes: int = DEFAULT_CACHE_BYTES) -> NativeReplicatedBackend:
        """Open a replicated export natively (see ``ReplicatedBackend.open``).

        Raises:
            OmegaError: the export is in use, or the backend cannot start.
        """
        from hypervisor.netblock.replicated import host_node_name
        from hypervisor.security import ensure_node_cert

        name = node or host_node_name(config)
        ensure_node_cert(config, name)
        own = pool is None
        if pool is None:
            from hypervisor.node.client import PeerPool

            pool = PeerPool.from_cluster(config, node=name)
        lock = store.lock(record)
        try:
            backend = cls(record, store, pool, store.key(record), node=name, config=config,
                          read_only=read_only, cache_bytes=cache_bytes, own_pool=own)
        except BaseException:
            os.close(lock)
            raise
        backend._lock_fd = lock
        return backend

    # --- the C side ----------------------------------------------------------------

    @property
    def native_handle(self) -> Any:
        """The ``struct nbr_export *`` the NBD fast path serves (see :meth:`acquire`)."""
        return self._h

    def acquire(self) -> None:
        """A connection thread starts using the C export (close waits for it)."""
        with self._users_lock:
            if self._closed:
                raise OmegaError(f"export {self.record.name} is closing")
            self._users += 1
            self._idle.clear()

    def release(self) -> None:
        """A connection thread stopped using the C export."""
        with self._users_lock:
            self._users -= 1
            if self._users == 0:
                self._idle.set()

    def _set_peer(self, i: int, name: str, host: str, port: int) -> None:
        rc = self._lib.nbr_set_peer(self._h, i, name.encode(), host.encode(), port)
        if rc < 0:
            raise OmegaError(f"native backend: bad peer {name} at {host}:{port}")

    def _push_state(self, i: int, name: str, *, healthy: bool) -> None:
        health = self.pool.health(name)
        rtt = health.rtt
        free = self._free.get(name)
        free_f = float(free) if free is not None else float(1 << 40)
        weight = max(free_f, 1.0) / (1.0 + (rtt or 0.0) * 1000.0)
        self._lib.nbr_set_peer_state(self._h, i, int(healthy), -1.0 if rtt is None else rtt,
                                     weight if (free is None or free >= self.chunk_size) else 0.0)

    def _load(self, states: dict[int, ChunkState]) -> None:
        if not states:
            return
        bpc = self._bpc
        idx = np.fromiter(states.keys(), dtype=np.uint64, count=len(states))
        holders = np.fromiter((sum(self._bits[p] for p in s.peers) for s in states.values()),
                              dtype=np.uint16, count=len(states))
        ver = np.zeros(len(states) * bpc, dtype=np.uint64)
        for k, state in enumerate(states.values()):
            if state.blocks:
                if len(state.blocks) != bpc:
                    raise OmegaError(f"export {self.record.name}: chunk table row with "
                                     f"{len(state.blocks)} blocks, want {bpc}")
                ver[k * bpc:(k + 1) * bpc] = state.blocks
            else:  # one block per chunk: the chunk's version (a tombstone has no holder)
                ver[k * bpc] = state.version
        ffi = self._ffi
        rc = self._lib.nbr_load(self._h, ffi.cast("uint64_t *", idx.ctypes.data),
                                ffi.cast("uint16_t *", holders.ctypes.data),
                                ffi.cast("uint64_t *", ver.ctypes.data), len(idx))
        if rc < 0:
            raise OmegaError(f"export {self.record.name}: its chunk table does not fit its size")

    def _client(self) -> Any:
        c = getattr(self._local, "client", None)
        if c is None:
            c = self._lib.nbr_client_new(self._h)
            if c == self._ffi.NULL:
                raise BackendError("out of memory for a native client")
            self._local.client = c
            with self._clients_lock:
                self._clients.append(c)
        return c

    def _holders(self, bits: int) -> tuple[str, ...]:
        return tuple(name for name, bit in self._bits.items() if bits & bit)

    # --- persistence (called from C threads, and from Python) ----------------------

    def _persist_hook(self, _arg: Any) -> int:
        try:
            self._persist()
        except Exception as exc:  # told to C as a failed flush; logged here
            log.error("export %s: persisting the chunk table failed: %s", self.record.name, exc)
            return -1
        return 0

    def _persist(self) -> None:
        """Write every changed chunk-table entry to SQLite (one transaction a round)."""
        ffi, lib = self._ffi, self._lib
        n, bpc = 4096, self._bpc
        idx = np.empty(n, dtype=np.uint64)
        ver = np.empty(n * bpc, dtype=np.uint64)
        hold = np.empty(n, dtype=np.uint16)
        with self._persist_lock:
            while True:
                got = lib.nbr_take_dirty(self._h, ffi.cast("uint64_t *", idx.ctypes.data),
                                         ffi.cast("uint16_t *", hold.ctypes.data),
                                         ffi.cast("uint64_t *", ver.ctypes.data), n)
                if not got:
                    return
                states: dict[int, ChunkState | None] = {}
                for k in range(got):
                    h = int(hold[k])
                    blocks = tuple(int(v) for v in ver[k * bpc:(k + 1) * bpc])
                    if not h and not any(blocks):
                        states[int(idx[k])] = None
                    elif bpc == 1:  # the Python backend's rows: a tombstone has no holder
                        states[int(idx[k])] = ChunkState(blocks[0] & ~TRIMMED, self._holders(h))
                    else:
                        states[int(idx[k])] = ChunkState(
                            max(v & ~TRIMMED for v in blocks), self._holders(h), blocks)
                try:
                    with _store_lock(self.store):
                        self.store.set_chunks(self.record, states)
                except BaseException:
                    lib.nbr_mark_dirty(self._h, ffi.cast("uint64_t *", idx.ctypes.data), got)
                    raise

    # --- requests from Python connections ------------------------------------------

    def _exec(self, cmd: str, offset: int, length: int, *, flags: int = 0,
              data: bytes | memoryview | None = None) -> bytes | None:
        ffi, lib = self._ffi, self._lib
        req = ffi.new("struct nbr_req *")
        req.cmd = _CMD[cmd]
        req.flags = flags
        req.offset = offset
        req.length = length
        keep: Any = None
        out: Any = None
        if data is not None:
            keep = ffi.from_buffer(data)
            req.wdata = keep
        if cmd == "read":
            out = ffi.new("uint8_t[]", max(length, 1))
            req.rdata = out
        if lib.nbr_exec(self._client(), req, 1) < 0:
            raise BackendError("out of memory")
        if req.err:
            raise BackendError(ffi.string(req.msg).decode(errors="replace"),
                               nbd_errno=int(req.err))
        del keep
        return ffi.buffer(out, length)[:] if out is not None else None

    async def _run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: fn(*args, **kwargs))

    async def read(self, offset: int, length: int) -> bytes:
        return await self._run(self._exec, "read", offset, length)

    async def write(self, offset: int, data: bytes | memoryview, *, fua: bool) -> None:
        await self._run(self._exec, "write", offset, len(data), data=data,
                        flags=nbd.CMD_FLAG_FUA if fua else 0)

    async def trim(self, offset: int, length: int, *, fua: bool) -> None:
        await self._run(self._exec, "trim", offset, length, flags=nbd.CMD_FLAG_FUA if fua else 0)

    async def write_zeroes(self, offset: int, length: int, *, fua: bool, may_trim: bool,
                           fast_only: bool) -> None:
        flags = ((nbd.CMD_FLAG_FUA if fua else 0) | (0 if may_trim else nbd.CMD_FLAG_NO_HOLE)
                 | (nbd.CMD_FLAG_FAST_ZERO if fast_only else 0))
        await self._run(self._exec, "write_zeroes", offset, length, flags=flags)

    async def cache(self, offset: int, length: int) -> None:
        await self._run(self._exec, "cache", offset, length)

    async def flush(self) -> None:
        await self._run(self._persist)

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        return self.extents(offset, length)

    def extents(self, offset: int, length: int, *, max_extents: int = 65536) -> list[Extent]:
        """Allocation of a range: (length, flags) per run of chunks (holes: HOLE|ZERO)."""
        out = self._ffi.new("uint32_t[]", 2 * max_extents)
        n = self._lib.nbr_extents(self._h, offset, length, out, max_extents)
        return [(int(out[2 * k]), int(out[2 * k + 1])) for k in range(n)]

    # --- health, capacity, metrics -------------------------------------------------

    async def start(self) -> None:
        """Switch to the peers' data ports (from STAT) and start the health monitor."""
        await self._refresh()
        if self._monitor is None:
            self._monitor = asyncio.ensure_future(self._monitor_loop())

    async def _refresh(self) -> None:
        """STAT every known peer: its data port and free lent disk."""
        async def one(i: int, name: str) -> None:
            try:
                info = await self.pool.client(name).stat()
            except PeerError as exc:
                self.pool.mark_failed(name, exc)
                return
            self._free[name] = max(int(info.disk_capacity) - int(info.disk_used), 0)
            if info.page_port:
                host, _ = self.pool.client(name).address
                self._set_peer(i, name, host, int(info.page_port))

        known = set(self.pool.names())
        await asyncio.gather(*(one(i, n) for i, n in enumerate(self._names) if n in known))
        self._sync_health()

    def _sync_health(self) -> None:
        """Failures C saw reach the pool; the pool's view of health reaches C."""
        known = set(self.pool.names())
        for i, name in enumerate(self._names):
            if name not in known:
                continue
            self._lib.nbr_peer_stats(self._h, i, self._pstats)
            failures = int(self._pstats.failures)
            if failures > self._failures[i]:
                self._failures[i] = failures
                self.pool.mark_failed(name, PeerError(f"peer {name}: request failed"))
            self._push_state(i, name, healthy=self.pool.health(name).healthy)

    async def _monitor_loop(self) -> None:
        last_stat = 0.0
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(MONITOR_INTERVAL_S)
            try:
                if loop.time() - last_stat >= CAPACITY_INTERVAL_S:
                    last_stat = loop.time()
                    await self._refresh()
                else:
                    self._sync_health()
            except Exception as exc:  # keep monitoring; the next pass retries
                log.warning("export %s: peer monitor: %s", self.record.name, exc)

    @property
    def peer_stats(self) -> dict[str, PeerIoStats]:
        """Per-peer counters of the C data path (metrics)."""
        out = {}
        for i, name in enumerate(self._names):
            self._lib.nbr_peer_stats(self._h, i, self._pstats)
            p = self._pstats
            st = PeerIoStats(gets=int(p.gets), puts=int(p.puts), deletes=int(p.deletes),
                             errors=int(p.errors), bytes_in=int(p.bytes_in),
                             bytes_out=int(p.bytes_out))
            st.latency.counts = [int(p.latency[b]) for b in range(len(st.latency.counts))]
            st.latency.total_ns = int(p.latency_total_ns)
            out[name] = st
        return out

    def stats(self) -> dict[str, int]:
        """Export counters of the C data path (cache hits, batches, repairs...)."""
        st = self._ffi.new("struct nbr_stats *")
        self._lib.nbr_stats(self._h, st)
        return {k: int(getattr(st, k)) for k in (
            "cache_hits", "cache_misses", "batches", "chunks_written", "stale_retries",
            "repaired", "dirty")}

    def _table(self) -> tuple[np.ndarray, np.ndarray]:
        """(block versions, padded to whole chunks; holders per chunk)."""
        n = -(-self.size // self.chunk_size)
        ver = np.zeros(n * self._bpc, dtype=np.uint64)
        hold = np.empty(n, dtype=np.uint16)
        self._lib.nbr_table(self._h, self._ffi.cast("uint64_t *", ver.ctypes.data),
                            self._ffi.cast("uint16_t *", hold.ctypes.data))
        return ver, hold

    def states(self) -> dict[int, ChunkState]:
        """The chunk table as C holds it now (written and trimmed chunks)."""
        ver, hold = self._table()
        bpc = self._bpc
        out = {}
        for i in range(len(hold)):
            blocks = ver[i * bpc:(i + 1) * bpc]
            if not hold[i] and not blocks.any():
                continue
            newest = int((blocks & np.uint64(~TRIMMED & (2**64 - 1))).max())
            out[i] = ChunkState(newest, self._holders(int(hold[i])),
                                tuple(int(v) for v in blocks) if bpc > 1 else ())
        return out

    def clear_cache(self) -> None:
        """Forget every cached chunk (the next reads go to the peers)."""
        self._lib.nbr_cache_clear(self._h)

    def chunk_count(self) -> int:
        """Chunks with at least one holder."""
        return int(np.count_nonzero(self._table()[1]))

    def under_replicated(self) -> list[int]:
        """Chunks with fewer healthy holders than R."""
        n = 1 << 16
        while True:
            out = np.empty(n, dtype=np.uint64)
            total = self._lib.nbr_under_replicated(
                self._h, self._ffi.cast("uint64_t *", out.ctypes.data), n)
            if total <= n:
                return [int(x) for x in out[:total]]
            n = total

    # --- re-replication ------------------------------------------------------------

    def _repair_one(self, index: int) -> int:
        return int(self._lib.nbr_repair(self._client(), index))

    async def repair(self, *, progress: Callable[[int, int], None] | None = None,
                     batch: int = 32) -> RepairProgress:
        """Copy every under-replicated chunk to new live peers (see ReplicatedBackend.repair)."""
        await self._refresh()
        todo = self.under_replicated()
        self.progress.backlog = len(todo)
        if progress:
            progress(0, len(todo))
        done = 0
        for start in range(0, len(todo), batch):
            part = todo[start:start + batch]
            results = await asyncio.gather(*(self._run(self._repair_one, i) for i in part))
            for index, r in zip(part, results):
                if r == 1:
                    self.progress.repaired += 1
                elif r < 0:
                    self.progress.failed += 1
                    log.warning("export %s: chunk %d: re-replication failed: %s",
                                self.record.name, index, os.strerror(-r))
            done += len(results)
            self.progress.backlog = len(todo) - done + sum(1 for r in results if r != 1)
            if progress:
                progress(done, len(todo))
        self.progress.backlog = len(self.under_replicated())
        await self.flush()
        return self.progress

    def start_repair_loop(self, *, interval: float = 2.0) -> None:
        """Re-replicate in the background (incrementally, every ``interval`` seconds)."""
        if self._repair_task is None:
            self._repair_task = start_repair_loop(self, interval=interval)

    # --- closing -------------------------------------------------------------------

    async def close(self) -> None:
        for task in (self._repair_task, self._monitor):
            if task is not None:
                task.cancel()
                try:
                    await task
                except (asyncio.CancelledError, Exception):
                    pass
        self._repair_task = self._monitor = None
        with self._users_lock:
            self._closed = True
        loop = asyncio.get_running_loop()
        if not await loop.run_in_executor(None, self._idle.wait, 30.0):
            log.error("export %s: connections still use it after 30 s; not freeing it",
                      self.record.name)
            return
        await self.flush()
        self._executor.shutdown(wait=True)
        for c in self._clients:
            self._lib.nbr_client_free(c)
        self._clients.clear()
        self._lib.nbr_set_flush_hook(self._h, self._ffi.NULL, self._ffi.NULL)
        self._lib.nbr_close(self._h)
        self._h = self._ffi.NULL
        if self._own_pool:
            await self.pool.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

