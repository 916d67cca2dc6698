"""Where evicted pages go: a peer-backed store (sealed, replicated) and the
in-memory store the benchmark uses as its floor.

Both implement :class:`PageStore`. Pages cross as ``(page, version, data)``;
the peer store seals each with AES-GCM under the VM's key, the associated data
naming (VM id, page, version), so a peer can neither read a page nor hand back
another page or an older version of it undetected.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from hypervisor.errors import PeerError, SecurityError
from hypervisor.sealing import OVERHEAD, Sealer, build_aad
from policies.interface import PlacementPolicy

log = logging.getLogger("omega.dsm.store")

_STAT_TIMEOUT = 2.0  # seconds to learn a peer's page data port before using its main port

#: (page, version, data) going out; (page, version, holders) coming back.
PageOut = tuple[int, int, bytes]
PageWant = tuple[int, int, Sequence[str]]


class PageLostError(PeerError):
    """No holder of a page could return a valid copy."""


@dataclass(frozen=True)
class NativeSpec:
    """What the handler core's native fetch path needs (native/dsm/dsm_remote.c).

    Attributes:
        kind: ``peers`` (fetch over mutual TLS) or ``memory`` (copies kept in
            the core: the floor).
        key: the VM's sealing key.
        aad_prefix: the page aad without its index and version.
        ns: the page namespace as encoded on the wire.
        ca, cert, keyfile: PEM paths of the cluster CA and this node's identity.
        peers: ``(name, host, port)``; index i is holder bit ``1 << i``.
    """

    kind: str
    key: bytes = b""
    aad_prefix: bytes = b""
    ns: bytes = b""
    ca: str = ""
    cert: str = ""
    keyfile: str = ""
    peers: tuple[tuple[str, str, int], ...] = ()


class PageStore(Protocol):
    """Storage for evicted pages."""

    async def put(self, items: Sequence[PageOut]) -> dict[int, tuple[str, ...]]:
        """Store pages; return each page's holders (pages with none are left out)."""
        ...

    async def get(self, wants: Sequence[PageWant]) -> dict[int, bytes]:
        """Fetch pages; raises PageLostError naming pages no holder could give."""
        ...

    async def rereplicate(self, entries: Sequence[PageWant]) -> dict[int, tuple[str, ...]]:
        """Restore the replica count of pages whose holders died; new holders."""
        ...

    async def drop(self) -> None:
        """Free every page of this VM on every holder."""
        ...

    def dead_holders(self) -> set[str]:
        """Holders now considered dead."""
        ...

    async def recheck(self) -> set[str]:
        """Ping holders considered dead; return those that answer again."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...

    async def native_spec(self) -> NativeSpec | None:
        """What the core's native fetch path needs; None when it cannot be used."""
        ...


class MemoryPageStore:
    """Pages kept in this process (no network, no sealing): the floor."""

    name = "local"

    def __init__(self) -> None:
        self._pages: dict[int, tuple[int, bytes]] = {}

    async def put(self, items: Sequence[PageOut]) -> dict[int, tuple[str, ...]]:
        """Keep the pages; every page's holder is ``local``."""
        for page, version, data in items:
            self._pages[page] = (version, bytes(data))
        return {page: (self.name,) for page, _, _ in items}

    async def get(self, wants: Sequence[PageWant]) -> dict[int, bytes]:
        """Return the pages (exact version).

        Raises:
            PageLostError: a page or its version is missing.
        """
        out: dict[int, bytes] = {}
        for page, version, _ in wants:
            held = self._pages.get(page)
            if held is None or held[0] != version:
                raise PageLostError(f"page {page} version {version} is not held")
            out[page] = held[1]
        return out

    async def rereplicate(self, entries: Sequence[PageWant]) -> dict[int, tuple[str, ...]]:
        """Nothing to do: one holder that never dies."""
        return {}

    async def drop(self) -> None:
        """Forget every page."""
        self._pages.clear()

    def dead_holders(self) -> set[str]:
        """None."""
        return set()

    async def recheck(self) -> set[str]:
        """Nothing to ping."""
        return set()

    async def close(self) -> None:
        """Nothing to release."""

    async def native_spec(self) -> NativeSpec:
        """The native path keeps its own copies in the core (see NativeSpec)."""
        return NativeSpec(kind="memory")


class PeerPageStore:
    """Pages sealed and kept on ``replicas`` distinct peers of a PeerPool.

    Args:
        pool: connections to the peers (``hypervisor.node.client.PeerPool``).
        sealer: the VM's sealer (key held only by this host).
        vm_id: the VM's id: the namespace on peers and part of every aad.
        placement: chooses peers for a page.
        replicas: copies per page (R).
        key: the sealer's key, and
        identity: this node's certificate paths (``NodeCertPaths``): with both,
            :meth:`native_spec` lets the handler core fetch pages natively.
    """

    def __init__(self, pool: Any, sealer: Sealer, *, vm_id: str, placement: PlacementPolicy,
                 replicas: int = 2, key: bytes | None = None, identity: Any = None) -> None:
        from hypervisor.node.wire import Namespace

        self.pool = pool
        self.sealer = sealer
        self.vm_id = vm_id
        self.placement = placement
        self.replicas = replicas
        self.ns = Namespace.page(vm_id)
        self._full: set[str] = set()
        self._dead: set[str] = set()
        self.bytes_out = 0
        self.bytes_in = 0
        self.per_peer_pages: Counter[str] = Counter()
        self._key = key
        self._identity = identity
        self._native: Any = None  # (core.remote_store, holder bits), see use_native

    async def native_spec(self) -> NativeSpec | None:
        """The native fetch path's settings; None without the key and identity.

        Each peer is reached on its page data port when its STAT announces
        one (C threads answer there; see hypervisor/node/dataport.py), else on
        its main port. Only the first MAX_PEERS peers get holder bits; pages
        held only by others go through the Python path.
        """
        from hypervisor.dsm.core import MAX_PEERS
        from hypervisor.node.wire import encode_namespace

        if self._key is None or self._identity is None:
            return None
        names = self.pool.names()[:MAX_PEERS]
        ident = self._identity
        ports = await asyncio.gather(*(self._page_port(n) for n in names))
        peers = []
        for name, page_port in zip(names, ports):
            host, port = self.pool.client(name).address
            peers.append((name, host, page_port or port))
        return NativeSpec(kind="peers", key=self._key,
                          aad_prefix=self._aad(0, 0)[:-16], ns=encode_namespace(self.ns),
                          ca=str(ident.ca), cert=str(ident.cert), keyfile=str(ident.key),
                          peers=tuple(peers))

    async def _page_port(self, name: str) -> int:
        """The peer's page data port from its STAT; 0 when it has none or does not answer."""
        try:
            info = await asyncio.wait_for(self.pool.client(name).stat(), _STAT_TIMEOUT)
        except (PeerError, OSError, TimeoutError) as exc:
            log.info("peer %s: no page data port known (%s); using its main port", name, exc)
            return 0
        return info.page_port

    def _aad(self, page: int, version: int) -> bytes:
        return build_aad("page", self.vm_id, page, version)

    def _candidates(self, exclude: Sequence[str] = ()) -> list[str]:
        healthy = [n for n in self.pool.healthy() if n not in self._dead]
        return [n for n in healthy if n not in self._full and n not in exclude]

    def _failed(self, name: str, exc: BaseException) -> None:
        self.pool.mark_failed(name, exc)
        if not isinstance(exc, PeerError) or "full" not in type(exc).__name__.lower():
            self._dead.add(name)
            log.warning("peer %s failed: %s", name, exc)

    def dead_holders(self) -> set[str]:
        """Peers a call failed on (until they answer again)."""
        return set(self._dead)

    async def recheck(self) -> set[str]:
        """Ping the peers a call failed on (or that said FULL); those that answer
        are placement candidates again. Without this a peer that failed once
        (a restart, a timeout) would never hold a page again, and with every
        peer failed once eviction would stop for good.

        Returns:
            The peers that came back.
        """
        names = [n for n in self.pool.names()
                 if n in self._dead or n in self._full or not self.pool.health(n).healthy]
        if not names:
            return set()

        async def ping(name: str) -> str | None:
            try:
                rtt = await self.pool.client(name).ping()
            except PeerError as exc:
                self.pool.mark_failed(name, exc)
                return None
            self.pool.mark_ok(name, rtt)
            return name

        back = {n for n in await asyncio.gather(*(ping(n) for n in names)) if n}
        self._dead -= back
        self._full -= back  # a full peer may have room again: one FULL answer tells
        return back

    async def _put_on(self, name: str, blobs: list[tuple[int, int, bytes]]) -> bool:
        from hypervisor.node.client import PeerFullError

        try:
            await self.pool.client(name).batch_put(self.ns, blobs)
        except PeerFullError:
            self._full.add(name)
            return False
        except PeerError as exc:
            self._failed(name, exc)
            return False
        self.bytes_out += sum(len(b) for _, _, b in blobs)
        return True

    def use_native(self, store: Any, bits: dict[str, int]) -> None:
        """Seal and store evicted pages in C from now on.

        Args:
            store: ``FaultHandlerCore.remote_store`` (blocking; run on a thread).
            bits: each peer's holder bit in the core (peers without one keep
                the Python path's BATCH_PUT).
        """
        self._native = (store, dict(bits))

    def _placements(self, holders: dict[int, list[str]],
                    only: dict[str, int] | None = None) -> dict[int, list[str]]:
        """One placement round: for each page short of R holders, the peers to
        add (live candidates it is not on yet, limited to ``only`` if given);
        pages with none are left out."""
        out: dict[int, list[str]] = {}
        for page, have in holders.items():
            if len(have) >= self.replicas:
                continue
            cands = self._candidates(exclude=have)
            if only is not None:
                cands = [n for n in cands if n in only]
            names = list(self.placement.place(page, self.replicas - len(have), cands))
            if names:
                out[page] = names
        return out

    async def put(self, items: Sequence[PageOut]) -> dict[int, tuple[str, ...]]:
        """Seal and store each page on R distinct peers (fewer when fewer live).

        Returns:
            page → holders; a page no peer took is absent (the caller keeps it).
        """
        if self._native is not None and items:
            return await self._put_native(items)
        sealed = {page: (version, self.sealer.seal(self._aad(page, version), data))
                  for page, version, data in items}
        holders: dict[int, list[str]] = {page: [] for page in sealed}
        for _round in range(4):
            by_peer: dict[str, list[int]] = {}
            for page, names in self._placements(holders).items():
                for name in names:
                    by_peer.setdefault(name, []).append(page)
            if not by_peer:
                break
            names = list(by_peer)
            results = await asyncio.gather(*(
                self._put_on(n, [(p, sealed[p][0], sealed[p][1]) for p in by_peer[n]])
                for n in names))
            for name, ok in zip(names, results):
                if ok:
                    for p in by_peer[name]:
                        holders[p].append(name)
                        self.per_peer_pages[name] += 1
        return {p: tuple(h) for p, h in holders.items() if h}

    async def _put_native(self, items: Sequence[PageOut]) -> dict[int, tuple[str, ...]]:
        """As :meth:`put`, sealing and sending in C (``use_native``): the same
        placement rounds, each one call that puts every page on its targets."""
        store, bits = self._native
        ps = len(items[0][2])
        holders: dict[int, list[str]] = {page: [] for page, _, _ in items}
        data = b"".join(bytes(d) for _, _, d in items)
        for _round in range(4):
            plan = self._placements(holders, only=bits)
            keep = [k for k, (page, _, _) in enumerate(items) if page in plan]
            if not keep:
                break
            targets = np.array([sum(bits[n] for n in plan[items[k][0]]) for k in keep],
                               dtype=np.uint16)
            pages = np.array([items[k][0] for k in keep], dtype=np.uint64)
            versions = np.array([items[k][1] for k in keep], dtype=np.uint64)
            part = data if len(keep) == len(items) else b"".join(
                data[k * ps:(k + 1) * ps] for k in keep)
            ok, full = await asyncio.get_running_loop().run_in_executor(
                None, store, pages, versions, part, targets)
            asked = int(np.bitwise_or.reduce(targets))
            for name, bit in bits.items():
                if full & bit:
                    self._full.add(name)
                elif asked & bit and not np.any(ok & bit):
                    self._failed(name, PeerError(f"peer {name}: storing pages failed"))
                elif np.any(ok & bit):
                    self._dead.discard(name)
            for j, page in enumerate(pages.tolist()):
                for name, bit in bits.items():
                    if ok[j] & bit:
                        holders[page].append(name)
                        self.per_peer_pages[name] += 1
                        self.bytes_out += ps + OVERHEAD
        return {p: tuple(h) for p, h in holders.items() if h}

    async def _get_from(self, name: str, wants: list[tuple[int, int]]) -> dict[int, bytes]:
        client = self.pool.client(name)
        try:
            if len(wants) == 1:  # a lone demand fault: the plain GET is the fastest
                got = [await client.get(self.ns, wants[0][0])]
            else:
                got = await client.batch_get(self.ns, [p for p, _ in wants])
        except PeerError as exc:
            self._failed(name, exc)
            return {}
        self._dead.discard(name)
        out: dict[int, bytes] = {}
        for (page, version), item in zip(wants, got):
            if item is None:
                continue
            held_version, blob = item
            if held_version != version:
                log.warning("peer %s holds page %d version %d, want %d: stale", name, page,
                            held_version, version)
                continue
            try:
                out[page] = self.sealer.open(self._aad(page, version), blob)
            except SecurityError as exc:
                log.warning("peer %s page %d: %s", name, page, exc)
                continue
            self.bytes_in += len(blob)
        return out

    async def get(self, wants: Sequence[PageWant]) -> dict[int, bytes]:
        """Fetch pages, each from its first live holder, falling back to replicas.

        Raises:
            PageLostError: some page could not be had from any holder.
        """
        out: dict[int, bytes] = {}
        tried: dict[int, set[str]] = {p: set() for p, _, _ in wants}
        info = {p: (v, list(h)) for p, v, h in wants}
        pending = list(info)
        while pending:
            by_peer: dict[str, list[tuple[int, int]]] = {}
            lost: list[int] = []
            for page in pending:
                version, holders = info[page]
                order = [h for h in holders if h not in self._dead] + \
                        [h for h in holders if h in self._dead]
                choice = next((h for h in order if h not in tried[page]), None)
                if choice is None:
                    lost.append(page)
                    continue
                tried[page].add(choice)
                by_peer.setdefault(choice, []).append((page, version))
            if lost:
                raise PageLostError(f"{len(lost)} pages lost on every holder "
                                    f"(first: page {lost[0]})")
            if len(by_peer) == 1:  # the common case: no task per request
                (name, part), = by_peer.items()
                out.update(await self._get_from(name, part))
            else:
                names = list(by_peer)
                results = await asyncio.gather(*(self._get_from(n, by_peer[n]) for n in names))
                for res in results:
                    out.update(res)
            pending = [p for p in pending if p not in out]
        return out

    async def rereplicate(self, entries: Sequence[PageWant]) -> dict[int, tuple[str, ...]]:
        """Copy pages held on dead peers to live ones until each has R holders.

        Args:
            entries: (page, version, holders) of pages with a dead holder.

        Returns:
            page → new holder tuple for pages that changed.
        """
        changed: dict[int, tuple[str, ...]] = {}
        for i in range(0, len(entries), 1024):
            part = entries[i:i + 1024]
            live = {p: [h for h in hs if h not in self._dead] for p, _, hs in part}
            wants = [(p, v, live[p] or list(hs)) for p, v, hs in part]
            try:
                data = await self.get(wants)
            except PageLostError as exc:
                log.error("re-replication: %s", exc)
                continue
            by_peer: dict[str, list[tuple[int, int, bytes]]] = {}
            for p, v, _ in part:
                cands = self._candidates(exclude=live[p])
                need = self.replicas - len(live[p])
                for name in self.placement.place(p, need, cands):
                    by_peer.setdefault(name, []).append(
                        (p, v, self.sealer.seal(self._aad(p, v), data[p])))
            names = list(by_peer)
            results = await asyncio.gather(*(self._put_on(n, by_peer[n]) for n in names))
            for name, ok in zip(names, results):
                if ok:
                    for p, _, _ in by_peer[name]:
                        live[p].append(name)
            for p, _, hs in part:
                if tuple(live[p]) != tuple(hs):
                    changed[p] = tuple(live[p])
        return changed

    async def drop(self) -> None:
        """Drop this VM's namespace on every peer (dead ones are skipped)."""
        for name in self.pool.names():
            try:
                await self.pool.client(name).drop_ns(self.ns)
            except PeerError as exc:
                log.warning("drop pages on %s: %s", name, exc)

    async def close(self) -> None:
        """Close the pool."""
        await self.pool.close()
