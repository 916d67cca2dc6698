"""The DSM handler process of one VM (``omega dsm handler VM``).

Threads: the C core's reader threads (see native/dsm/dsm.h), which serve
demand faults on pages held by peers themselves (the native fetch path,
native/dsm/dsm_remote.c: one GET over their own mutual-TLS connection, the
page opened and installed in C), the core's prefetch workers, and this
process's one asyncio thread. That thread runs the policies and everything
that is not the common fetch: it reads the core's queue (woken by an
eventfd) — notes of natively served faults, on which the prefetch policy
decides what to fetch ahead (submitted to the workers), and the faults the
native path handed back (a holder failed, no room, no native path), which
it fetches through the Python store with its retries — runs the reclaim
loop that keeps the resident set at the target, re-replicates pages whose
holder died, and answers the control socket (stats, target changes,
shutdown).

Failure handling: a fetch that fails is retried on the next holder, then
again after a pause; it never returns zeros. A write that races an eviction
cancels it (write-protect), so no write is lost. If this process dies, the
agent in QEMU keeps the userfaultfd and re-sends it to the restarted handler,
which rebuilds its page table from the memory file (SEEK_DATA) and the page
directory and wakes every waiter so unserved faults arrive again.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import time
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np

from hypervisor.dsm import hello as hello_codec
from hypervisor.dsm.core import (
    FETCHING,
    HOLDER_MEMORY,
    QUEUE_LANDED,
    QUEUE_RECLAIM,
    QUEUE_SEEN,
    QUEUE_ZERO,
    FaultHandlerCore,
)
from hypervisor.dsm.directory import PageDirectory
from hypervisor.dsm.settings import DsmPaths, DsmSettings
from hypervisor.dsm.store import MemoryPageStore, PageLostError, PageStore
from hypervisor.errors import NativeError, OmegaError, ProtocolError
from policies.clock import ClockVictims
from policies.interface import PrefetchPolicy, VictimPolicy
from policies.prefetch import NoPrefetch, StridePrefetch

log = logging.getLogger("omega.dsm.handler")

RECLAIM_BATCH = 512       # pages evicted per round
RECLAIM_INTERVAL = 0.5    # seconds between reclaim checks without a note (a safety net)
FETCH_RETRY_PAUSE = 0.2   # seconds between attempts after every holder failed
PREFETCH_CHUNK = 128     # pages per pipelined prefetch request
EVICT_ROUNDS_IN_FLIGHT = 3
PREFETCH_MAX_AHEAD = 4096 # pages a stream may be fetched ahead of its last fault


class DsmHandler:
    """Serves one VM's guest RAM (see module doc).

    Args:
        settings: the VM's DSM settings.
        paths: its runtime files.
        store: where evicted pages go.
    """

    def __init__(self, settings: DsmSettings, paths: DsmPaths, store: PageStore) -> None:
        self.settings = settings
        self.paths = paths
        self.store = store
        self.directory = PageDirectory(paths.directory)
        self.core: FaultHandlerCore | None = None
        self.victims: VictimPolicy = ClockVictims()
        self.prefetch: PrefetchPolicy = NoPrefetch()
        #: holder name -> bit of the native fetch path (None: not in use)
        self._holder_bits: dict[str, int] | None = None
        self.target_pages = 0
        self.hard_pages = 0
        self._agent_conn: socket.socket | None = None
        self._room = asyncio.Event()
        self._reclaim_wake = asyncio.Event()
        self._deferred_zero: deque[int] = deque()
        self._inflight = 0
        self._evicting: dict[asyncio.Task[None], int] = {}  # round → pages
        self._stopping = asyncio.Event()
        self._free_on_exit = False  # SIGTERM keeps pages (a restart follows)
        self._tasks: list[asyncio.Task[Any]] = []
        self.counters: dict[str, int] = {
            "fetch_batches": 0, "fetched_pages": 0, "prefetched_pages": 0,
            "fetch_retries": 0, "pages_lost": 0, "install_retries": 0,
            "evict_rounds": 0, "evict_store_failures": 0, "rereplicated_pages": 0,
            "max_file_resident_bytes": 0, "agent_hellos": 0,
        }
        self._rate: deque[tuple[float, int]] = deque(maxlen=20)
        self._last_core_stats: dict[str, Any] = {}  # kept when the guest goes away

    # ---------------------------------------------------------------- agent

    async def _serve_agent(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(listener)
            try:
                await self._accept_agent(conn)
            except (OmegaError, OSError) as exc:
                log.error("agent hello refused: %s", exc)
                try:
                    conn.sendall(hello_codec.NAK + str(exc).encode()[:100])
                except OSError:
                    pass
                conn.close()

    async def _accept_agent(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        conn.settimeout(5)
        data, fds, _, _ = await loop.run_in_executor(
            None, socket.recv_fds, conn, hello_codec.SIZE, 2)
        if len(fds) != 2:
            for fd in fds:
                os.close(fd)
            raise ProtocolError(f"DSM hello carried {len(fds)} descriptors, want 2")
        try:
            msg = hello_codec.decode_hello(data)
            if self.core is not None:
                raise ProtocolError("this handler already serves a guest")
            if msg.length != self.settings.memory:
                raise ProtocolError(f"guest RAM is {msg.length} bytes, settings say "
                                    f"{self.settings.memory}")
            if not msg.wp:
                raise ProtocolError("the agent could not register write-protect; "
                                    "eviction would not be safe")
        except ProtocolError:
            for fd in fds:
                os.close(fd)
            raise
        uffd, memfd = fds
        if not msg.resend and self.directory.entries:
            # A new QEMU: its memory file is fresh, old pages mean nothing.
            log.info("new guest memory: freeing %d pages of a previous run",
                     len(self.directory.entries))
            await self.store.drop()
            self.directory.clear()
        core = FaultHandlerCore(uffd, memfd, base=msg.addr, length=msg.length,
                                file_offset=msg.offset, wp=msg.wp)
        resident = core.scan_resident()
        remote = np.array([p for p in self.directory.entries if core.state[p] == 0],
                          dtype=np.uint64)
        core.mark_remote(remote)
        ps = core.page_size
        self.target_pages = self.settings.local_memory // ps
        self.hard_pages = self.target_pages + self.settings.slack // ps
        core.set_limit(self.hard_pages)
        self._set_mark(core)
        self.prefetch = (StridePrefetch(core.npages, max_depth=1024) if self.settings.prefetch
                         else NoPrefetch())
        core.set_fault_notes(self.settings.prefetch)  # the notes feed the prefetch policy
        await self._setup_native(core)
        core.start(self.settings.threads)
        self.core = core
        loop.add_reader(core.event_fd, self._on_fetch_ready)
        core.wake_all()  # faults an earlier handler read but never served
        conn.setblocking(False)
        conn.sendall(hello_codec.ACK)
        self._agent_conn = conn
        loop.add_reader(conn.fileno(), self._on_agent_readable)
        self.counters["agent_hellos"] += 1
        log.info("serving guest RAM %#x+%d (qemu pid %d%s): %d pages resident, %d remote",
                 msg.addr, msg.length, msg.pid, ", re-sent" if msg.resend else "",
                 resident, len(remote))
        self._reclaim_wake.set()

    async def _setup_native(self, core: FaultHandlerCore) -> None:
        """Give the core its native fetch path (faults then skip this thread)."""
        self._holder_bits = None
        spec = await self.store.native_spec() if self.settings.native else None
        if spec is None:
            log.info("native fetch path off: every remote fault goes through Python")
            return
        try:
            if spec.kind == "memory":
                core.setup_memory(workers=self.settings.prefetch_workers)
                bits = {MemoryPageStore.name: HOLDER_MEMORY}
            else:
                core.setup_remote(key=spec.key, aad_prefix=spec.aad_prefix, ns=spec.ns,
                                  ca=spec.ca, cert=spec.cert, keyfile=spec.keyfile,
                                  peers=list(spec.peers),
                                  workers=self.settings.prefetch_workers)
                bits = {name: 1 << i for i, (name, _, _) in enumerate(spec.peers)}
                core.set_busy_poll(self.settings.busy_poll_us)
        except NativeError as exc:
            log.error("native fetch path unavailable (%s); serving faults through Python", exc)
            return
        self._holder_bits = bits
        entries = self.directory.entries
        if entries:
            self._locate(core, [(p, v, h) for p, (v, h) in entries.items()])
        log.info("native fetch path on (%s, %d holders)", spec.kind, len(bits))

    def _locate(self, core: FaultHandlerCore, records: list[tuple[int, int, Any]]) -> None:
        bits = self._holder_bits
        if bits is None or not records:
            return
        core.locate(np.fromiter((r[0] for r in records), dtype=np.uint64, count=len(records)),
                    np.fromiter((r[1] for r in records), dtype=np.uint64, count=len(records)),
                    np.fromiter((sum(bits.get(n, 0) for n in r[2]) for r in records),
                                dtype=np.uint16, count=len(records)))

    def _record(self, core: FaultHandlerCore | None, records: list[tuple[int, int, Any]]) -> None:
        """Make new page locations durable, then tell the native path."""
        self.directory.record(records)
        if core is not None and core is self.core:
            self._locate(core, records)

    def _on_agent_readable(self) -> None:
        assert self._agent_conn is not None
        try:
            data = self._agent_conn.recv(64)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            return
        log.info("QEMU closed the agent connection: the guest is gone")
        asyncio.get_running_loop().create_task(self._guest_gone())

    async def _guest_gone(self) -> None:
        loop = asyncio.get_running_loop()
        if self._agent_conn is not None:
            loop.remove_reader(self._agent_conn.fileno())
            self._agent_conn.close()
            self._agent_conn = None
        if self.core is not None:
            loop.remove_reader(self.core.event_fd)
            self._last_core_stats = self.stats()
            self.core.close()
            self.core = None
        await self.store.drop()
        self.directory.clear()

    # ---------------------------------------------------------------- faults

    def _on_fetch_ready(self) -> None:
        core = self.core
        if core is None:
            return
        pages = core.take_fetches()
        if len(pages) == 0:
            return
        demand: list[int] = []
        seen: list[int] = []
        landed = 0
        for raw in pages.tolist():
            if raw & QUEUE_ZERO:
                self._deferred_zero.append(raw & ~QUEUE_ZERO)
            elif raw & QUEUE_SEEN:
                seen.append(raw & ~QUEUE_SEEN)
            elif raw & QUEUE_LANDED:
                landed += 1
            elif raw & QUEUE_RECLAIM:
                self._reclaim_wake.set()
            else:
                demand.append(raw)
        if self._deferred_zero:
            self._reclaim_wake.set()
            self._serve_deferred()
        if demand:
            # Demand pages go alone, so the waiting vCPU does not wait for the
            # prefetch.
            self._spawn_fetch(demand)
        faults = demand + seen
        if faults:
            extra: list[int] = []
            for page in faults:
                extra.extend(self.prefetch.on_fault(page))
            room = self._room_left(core) - len(demand)
            if extra and room > 0:
                want = [p for p in extra if p in self.directory.entries][:room]
                self._prefetch_pages(core, want)
        for _ in range(landed):
            self._keep_streaming(core)

    def _set_mark(self, core: FaultHandlerCore) -> None:
        # The reclaim loop starts above target - RECLAIM_BATCH/2 (see there).
        core.set_reclaim_mark(max(1, self.target_pages - RECLAIM_BATCH // 2 + 1))

    def _room_left(self, core: FaultHandlerCore) -> int:
        return self.hard_pages - core.resident() - self._inflight - core.remote_inflight()

    def _prefetch_pages(self, core: FaultHandlerCore, want: list[int]) -> None:
        """Claim pages and fetch them ahead, as several pipelined requests."""
        claimed = core.claim(np.array(want, dtype=np.uint64)) if want else np.empty(0)
        if not len(claimed):
            return
        self.counters["prefetched_pages"] += len(claimed)
        for i in range(0, len(claimed), PREFETCH_CHUNK):
            part = claimed[i:i + PREFETCH_CHUNK]
            if self._holder_bits is not None:
                try:
                    core.submit(part)
                    continue
                except NativeError as exc:
                    log.warning("native prefetch: %s", exc)
            self._spawn_fetch(part.tolist(), prefetch=True)

    def _spawn_fetch(self, pages: list[int], *, prefetch: bool = False) -> None:
        self._inflight += len(pages)
        task = asyncio.get_running_loop().create_task(self._fetch(pages))
        if prefetch:
            task.add_done_callback(self._prefetch_landed)

    def _prefetch_landed(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or task.exception() is not None or self.core is None:
            return
        self._keep_streaming(self.core)

    def _keep_streaming(self, core: FaultHandlerCore) -> None:
        """Keep a stream's pipe full: one batch landed, ask for the next."""
        if self._room_left(core) < 2 * PREFETCH_CHUNK:
            return
        more = [p for p in self.prefetch.extend(PREFETCH_CHUNK, max_ahead=PREFETCH_MAX_AHEAD)
                if p in self.directory.entries]
        self._prefetch_pages(core, more)

    def _serve_deferred(self) -> None:
        core = self.core
        while core is not None and self._deferred_zero:
            if not core.install_zero(self._deferred_zero[0]):
                return  # no room yet: reclaim wakes us again
            self._deferred_zero.popleft()

    async def _fetch(self, pages: list[int]) -> None:
        core = self.core
        try:
            wants = [(p, *self.directory.entries[p]) for p in pages]
            while True:
                # Bounded: each request to a holder has the pool's timeout,
                # and a holder that fails is skipped for the next.
                try:
                    data = await self.store.get(wants)
                    break
                except PageLostError as exc:
                    self.counters["pages_lost"] += 1
                    log.error("fetch: %s; retrying (the guest waits, it never reads zeros)", exc)
                self.counters["fetch_retries"] += 1
                await asyncio.sleep(FETCH_RETRY_PAUSE)
            order = sorted(pages)
            for i in range(0, len(order), PREFETCH_CHUNK):
                part = order[i:i + PREFETCH_CHUNK]
                # Room first: the resident set never passes target + slack.
                while core is self.core and core is not None and not core.reserve(len(part)):
                    self._reclaim_wake.set()
                    self._room.clear()
                    await self._room.wait()
                if core is not self.core or core is None:
                    return
                await self._install(core, part, data)
            self.counters["fetch_batches"] += 1
            self.counters["fetched_pages"] += len(pages)
        finally:
            self._inflight -= len(pages)
            self._reclaim_wake.set()

    async def _install(self, core: FaultHandlerCore, order: list[int],
                       data: dict[int, bytes]) -> None:
        """Install sorted pages, one UFFDIO_COPY per contiguous run.

        A failed copy (EAGAIN past the core's retries, or an unexpected
        error) is retried for the pages still FETCHING after a pause, so no
        waiter is left behind.
        """
        while order:
            failed: list[int] = []
            i = 0
            while i < len(order):
                j = i + 1
                while j < len(order) and order[j] == order[j - 1] + 1:
                    j += 1
                try:
                    core.install(order[i], b"".join(data[p] for p in order[i:j]))
                except NativeError as exc:
                    log.error("install pages %d..%d: %s; retrying", order[i], order[j - 1], exc)
                    self.counters["install_retries"] += 1
                    failed.extend(p for p in order[i:j] if core.state[p] == FETCHING)
                i = j
            if failed:
                await asyncio.sleep(FETCH_RETRY_PAUSE)
                if core is not self.core:
                    return
            order = failed

    # ---------------------------------------------------------------- reclaim

    async def _reclaim_loop(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._reclaim_wake.wait(), RECLAIM_INTERVAL)
            except asyncio.TimeoutError:
                pass
            self._reclaim_wake.clear()
            core = self.core
            if core is None:
                continue
            self._sample_file()
            low = max(0, self.target_pages - RECLAIM_BATCH // 2)
            # Several rounds in flight: sealing one batch overlaps the peers
            # storing the previous one.
            while len(self._evicting) < EVICT_ROUNDS_IN_FLIGHT:
                need = core.resident() - low - sum(self._evicting.values())
                if need <= 0:
                    break
                count = min(RECLAIM_BATCH, need)
                task = asyncio.get_running_loop().create_task(self._evict(core, count))
                self._evicting[task] = count
                task.add_done_callback(self._evict_done)
            self._room.set()
            self._serve_deferred()

    def _evict_done(self, task: asyncio.Task[None]) -> None:
        self._evicting.pop(task, None)
        if not task.cancelled() and task.exception() is not None:
            log.error("eviction round failed: %s", task.exception())
        self._reclaim_wake.set()  # keep going until below the target

    def _sample_file(self) -> int:
        core = self.core
        if core is None:
            return 0
        used = os.fstat(core._h.memfd).st_blocks * 512
        if used > self.counters["max_file_resident_bytes"]:
            self.counters["max_file_resident_bytes"] = used
        return used

    async def _evict(self, core: FaultHandlerCore, count: int) -> None:
        victims = self.victims.victims(core.state, core.ref, count)
        if len(victims) == 0:
            return
        pages, ok, buf = core.evict_begin(victims)
        ps = core.page_size
        idx = np.flatnonzero(ok)
        items = [(int(pages[i]), self.directory.next_version(int(pages[i])),
                  bytes(buf[i * ps:(i + 1) * ps])) for i in idx]
        try:
            holders = await self.store.put(items)
        except OmegaError as exc:
            log.error("evict: storing pages failed: %s", exc)
            holders = {}
        if core is not self.core:
            return
        stored = np.zeros(len(pages), dtype=np.uint8)
        records = []
        for i, (page, version, _) in zip(idx, items):
            if page in holders:
                stored[i] = 1
                records.append((page, version, holders[page]))
        failed = ok.astype(bool) & ~stored.astype(bool)
        if failed.any():
            self.counters["evict_store_failures"] += int(failed.sum())
            core.evict_abort(pages, failed.astype(np.uint8))
        if records:
            if self._holder_bits is not None and HOLDER_MEMORY in self._holder_bits.values():
                keep = np.flatnonzero(stored)
                core.memory_put(pages[keep], np.frombuffer(buf, dtype=np.uint8)
                                .reshape(-1, ps)[keep].tobytes())
            self._record(core, records)  # durable before the punch
            core.evict_commit(pages, stored)
        self.counters["evict_rounds"] += 1

    # ---------------------------------------------------------------- replicas

    async def _replica_loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            # Pages on a peer marked dead move to live peers first; only then
            # is it pinged: one that came back after a restart has lost the
            # pages it held (peers lend RAM), so clearing its mark first
            # would leave them with fewer than R copies.
            dead = self.store.dead_holders()
            entries = self.directory.on_holders(dead) if dead else []
            if entries:
                changed = await self.store.rereplicate(entries)
                if changed:
                    self._record(self.core, [(p, self.directory.entries[p][0], h)
                                             for p, h in changed.items()])
                    self.counters["rereplicated_pages"] += len(changed)
                    log.info("re-replicated %d pages away from %s", len(changed),
                             sorted(dead))
            back = await self.store.recheck()
            if back:
                log.info("peers %s answer again", sorted(back))

    # ---------------------------------------------------------------- control

    def stats(self) -> dict[str, Any]:
        """Everything ``omega dsm stats`` shows."""
        out: dict[str, Any] = {"vm": self.settings.vm_name, "serving": self.core is not None,
                               "target_bytes": self.settings.local_memory,
                               "slack_bytes": self.settings.slack,
                               "replicas": self.settings.replicas,
                               "store": self.settings.store}
        out.update(self._last_core_stats)
        out["serving"] = self.core is not None
        out.update(self.counters)
        if self.core is not None:
            core_stats = self.core.stats().to_dict()
            out.update(core_stats)
            ps = core_stats["page_size"]
            out["resident_bytes"] = core_stats["resident"] * ps
            out["remote_bytes"] = core_stats["remote"] * ps
            out["file_resident_bytes"] = self._sample_file()
            now = time.monotonic()
            self._rate.append((now, core_stats["faults"]))
            t0, f0 = self._rate[0]
            out["faults_per_s"] = (core_stats["faults"] - f0) / (now - t0) if now > t0 else 0.0
        out["pages_per_peer"] = self.directory.holders_count()
        out["dead_peers"] = sorted(self.store.dead_holders())
        out["bytes_out"] = getattr(self.store, "bytes_out", 0)
        # Totals over both fetch paths; the native_* counters say how they split.
        out["python_fetched_pages"] = self.counters["fetched_pages"]
        out["fetched_pages"] = self.counters["fetched_pages"] + \
            out.get("native_fetches", 0) + out.get("native_prefetched", 0)
        out["bytes_in"] = getattr(self.store, "bytes_in", 0) + out.get("native_bytes_in", 0)
        out["native_path"] = self._holder_bits is not None
        return out

    async def _control_client(self, reader: asyncio.StreamReader,
                              writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                try:
                    req = json.loads(line)
                    op = req.get("op")
                    if op == "stats":
                        resp: dict[str, Any] = {"ok": True, "stats": self.stats()}
                    elif op == "set_target":
                        pages = int(req["bytes"]) // os.sysconf("SC_PAGESIZE")
                        self.target_pages = max(0, pages)
                        if self.core is not None:
                            self._set_mark(self.core)
                        self._reclaim_wake.set()
                        resp = {"ok": True}
                    elif op == "shutdown":
                        self._free_on_exit = bool(req.get("free", True))
                        resp = {"ok": True}
                        self._stopping.set()
                    else:
                        resp = {"ok": False, "error": f"unknown op {op!r}"}
                except (ValueError, KeyError, TypeError, AttributeError) as exc:
                    resp = {"ok": False, "error": f"bad request: {exc}"}
                writer.write(json.dumps(resp).encode() + b"\n")
                await writer.drain()
        finally:
            writer.close()

    # ---------------------------------------------------------------- main

    async def run(self) -> None:
        """Serve until SIGTERM or a shutdown request; free pages on shutdown."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)
        for path in (self.paths.agent_socket, self.paths.control_socket):
            path.unlink(missing_ok=True)
        control = await asyncio.start_unix_server(self._control_client,
                                                  path=str(self.paths.control_socket))
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        listener.bind(str(self.paths.agent_socket))
        os.chmod(self.paths.agent_socket, 0o666)  # QEMU may run unprivileged
        listener.listen(4)
        listener.setblocking(False)
        self._tasks = [loop.create_task(self._serve_agent(listener)),
                       loop.create_task(self._reclaim_loop()),
                       loop.create_task(self._replica_loop())]
        log.info("DSM handler for %s ready on %s", self.settings.vm_name, self.paths.agent_socket)
        try:
            await self._stopping.wait()
        finally:
            for t in self._tasks:
                t.cancel()
            listener.close()
            control.close()
            if self.core is not None:
                loop.remove_reader(self.core.event_fd)
                self.core.close()
                self.core = None
            if self._free_on_exit:
                await self.store.drop()
                self.directory.clear()
                log.info("freed every page of %s on every peer", self.settings.vm_name)
            self.directory.close()
            self.paths.agent_socket.unlink(missing_ok=True)
            self.paths.control_socket.unlink(missing_ok=True)


def free_pages(config: Any, vmdir: Path) -> None:
    """Free every page of a VM whose handler is not running, on every peer.

    Raises:
        OmegaError: the settings, key or peers cannot be used.
    """
    paths = DsmPaths(vmdir)
    settings = DsmSettings.load(paths.settings)

    async def drop() -> None:
        store = build_store(config, settings, paths)
        try:
            await store.drop()
        finally:
            await store.close()

    asyncio.run(drop())
    if paths.directory.exists():
        directory = PageDirectory(paths.directory)
        directory.clear()
        directory.close()


def build_store(config: Any, settings: DsmSettings, paths: DsmPaths) -> PageStore:
    """Build the page store the settings name.

    Raises:
        PeerError: no peers are known for a ``peers`` store.
        SecurityError: the VM key or this node's certificate is missing.
    """
    if settings.store == "memory":
        return MemoryPageStore()
    from hypervisor.dsm.store import PeerPageStore
    from hypervisor.errors import PeerError, SecurityError
    from hypervisor.node.client import PeerPool
    from hypervisor.sealing import Sealer
    from hypervisor.security import client_ssl_context, node_paths
    from policies.placement import SpreadPlacement

    try:
        key = paths.key.read_bytes()
    except OSError as exc:
        raise SecurityError(f"DSM key {paths.key}: {exc}") from exc
    pool = PeerPool(client_ssl_context(config, node=settings.node), request_timeout=5.0,
                    connect_timeout=2.0)
    peers = settings.peers
    if not peers:
        try:
            from hypervisor.clusterstate import ClusterState
            peers = [[p.name, p.address] for p in ClusterState(config).peers()
                     if p.memory_lend > 0 and p.state in ("running", "unknown")]
        except ImportError:
            peers = []
    if not peers:
        raise PeerError("no peers lend memory: start some (`omega cluster up`) before a VM "
                        "with --local-memory")
    for name, address in peers:
        pool.add(name, address)
    return PeerPageStore(pool, Sealer(key), vm_id=settings.vm_id, placement=SpreadPlacement(),
                         replicas=settings.replicas, key=key,
                         identity=node_paths(config, settings.node))


def run_handler(config: Any, vmdir: Path) -> None:
    """Entry point of ``omega dsm handler``: load settings, serve until stopped."""
    from hypervisor.memtune import keep_large_buffers

    keep_large_buffers()
    paths = DsmPaths(vmdir)
    settings = DsmSettings.load(paths.settings)
    paths.handler_pid.write_text(f"{os.getpid()}\n")

    async def main() -> None:
        store = build_store(config, settings, paths)
        handler = DsmHandler(settings, paths, store)
        try:
            await handler.run()
        finally:
            await store.close()

    asyncio.run(main())
