"""The core's native fetch path (native/dsm/dsm_remote.c) against real peers.

Pages are sealed and stored by the Python peer store (and, in the last
tests, by the C store the handler evicts with); faults on them are served
by the C reader threads over their own mutual-TLS connections, prefetch
jobs by the C workers. Failures
(dead holder, stale or tampered copy, a page no holder has) must either be
served from a replica or handed to the Python queue, never installed wrong.
"""

from __future__ import annotations

import asyncio
import os
import select
import threading
from collections.abc import Iterator

import numpy as np
import pytest

from hypervisor.dsm.core import (
    FETCHING,
    HOLDER_MEMORY,
    LOCAL,
    QUEUE_LANDED,
    QUEUE_SEEN,
    FaultHandlerCore,
)
from hypervisor.dsm.store import PeerPageStore
from hypervisor.errors import NativeError
from hypervisor.node.client import PeerPool
from hypervisor.sealing import Sealer
from hypervisor.security import client_ssl_context, node_paths
from policies.placement import SpreadPlacement
from tests.dsm.conftest import HOST_NODE
from tests.dsm.guest_region import GuestRegion, region_with_core, touch_read, touch_write

PS = os.sysconf("SC_PAGESIZE")
NPAGES = 256


@pytest.fixture
def region() -> Iterator[tuple[GuestRegion, FaultHandlerCore]]:
    with region_with_core(NPAGES) as made:
        yield made


KEY = Sealer.generate_key()


@pytest.fixture(params=["default", "openssl"])
def seal_engine(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The C sealer's cipher code: the build's default (Intel ipsec-mb where
    the CPU has VAES, else OpenSSL) and OpenSSL forced; both must give
    blobs the Python sealer opens, and open the Python sealer's."""
    from hypervisor._native import _dsm

    if request.param == "openssl":
        monkeypatch.setenv("OMEGA_SEAL_OPENSSL", "1")
    else:
        monkeypatch.delenv("OMEGA_SEAL_OPENSSL", raising=False)
    engine = _dsm.ffi.string(_dsm.lib.dsm_seal_engine()).decode()
    assert engine in ("ipsec-mb", "openssl")
    if request.param == "openssl":
        assert engine == "openssl"
    return engine


def make_store(config, peers, replicas: int = 2) -> PeerPageStore:
    """A store (its pool belongs to the event loop that first uses it)."""
    pool = PeerPool(client_ssl_context(config, node=HOST_NODE), request_timeout=5,
                    connect_timeout=2)
    for p in peers:
        pool.add(p.name, p.address)
    return PeerPageStore(pool, Sealer(KEY), vm_id="vm-native-test", placement=SpreadPlacement(),
                         replicas=replicas, key=KEY, identity=node_paths(config, HOST_NODE))


async def _spec(store: PeerPageStore):
    try:
        return await store.native_spec()
    finally:
        await store.pool.close()


def setup_native(core: FaultHandlerCore, store: PeerPageStore) -> dict[str, int]:
    spec = asyncio.run(_spec(store))
    assert spec is not None
    core.setup_remote(key=spec.key, aad_prefix=spec.aad_prefix, ns=spec.ns, ca=spec.ca,
                      cert=spec.cert, keyfile=spec.keyfile, peers=list(spec.peers), workers=2)
    return {name: 1 << i for i, (name, _, _) in enumerate(spec.peers)}


def write_and_begin_evict(reg: GuestRegion, core: FaultHandlerCore, pages: list[int]):
    """Write random contents to pages and start evicting them.

    Returns:
        (the contents by page, and evict_begin's pages, ok flags and copies).
    """
    data = {p: os.urandom(PS) for p in pages}
    for p, d in data.items():
        touch_write(reg.addr + p * PS, d)
    arr, ok, buf = core.evict_begin(np.array(pages, dtype=np.uint64))
    return data, arr, ok, buf


def evict(reg: GuestRegion, core: FaultHandlerCore, new_store, bits: dict[str, int],
          pages: list[int], version: int = 1) -> dict[int, bytes]:
    """Write random pages, evict them to a store, punch them, locate them."""
    data, arr, ok, buf = write_and_begin_evict(reg, core, pages)
    assert ok.all()
    holders = asyncio.run(_put(new_store(), [(p, version, bytes(buf[i * PS:(i + 1) * PS]))
                                               for i, p in enumerate(pages)]))
    core.locate(arr, np.full(len(pages), version, dtype=np.uint64),
                np.array([sum(bits[n] for n in holders[p]) for p in pages], dtype=np.uint16))
    assert core.evict_commit(arr, ok).all()
    return data


def serve_from_peers(cluster, reg: GuestRegion, core: FaultHandlerCore, pages: list[int], *,
                     peers=None, replicas: int = 2, version: int = 1
                     ) -> tuple[PeerPageStore, dict[str, int], dict[int, bytes]]:
    """Give the core its native path to ``peers`` (default: all), start it, and
    evict ``pages`` there; returns the store, holder bits and page contents."""
    peers = cluster.peers if peers is None else peers
    store = make_store(cluster.config, peers, replicas)
    bits = setup_native(core, store)
    core.start(threads=2)
    data = evict(reg, core, lambda: make_store(cluster.config, peers, replicas), bits, pages,
                 version)
    return store, bits, data


async def _put(store: PeerPageStore, items):
    try:
        return await store.put(items)
    finally:
        await store.pool.close()


def read_in_thread(addr: int, length: int, timeout: float = 10) -> bytes | None:
    """Read guest memory from a thread; None if the read is still blocked."""
    out: list[bytes] = []
    t = threading.Thread(target=lambda: out.append(touch_read(addr, length)), daemon=True)
    t.start()
    t.join(timeout)
    return out[0] if out else None


def drain(core: FaultHandlerCore, timeout: float = 10) -> list[int]:
    r, _, _ = select.select([core.event_fd], [], [], timeout)
    return [int(x) for x in core.take_fetches()] if r else []


def test_demand_faults_are_served_natively_from_a_peer(cluster, region, seal_engine):
    reg, core = region
    _, _, data = serve_from_peers(cluster, reg, core, list(range(10, 30)))
    for p, d in data.items():
        assert read_in_thread(reg.addr + p * PS, PS) == d
    st = core.stats().counters
    assert st["native_fetches"] == 20 and st["native_fallbacks"] == 0
    assert st["native_bytes_in"] >= 20 * PS
    notes = []
    while len(notes) < 20 and (got := drain(core)):
        notes += got
    # The Python side is told about each fault (for its policies), not asked to fetch.
    assert sorted(n & ~QUEUE_SEEN for n in notes) == list(range(10, 30))
    assert all(n & QUEUE_SEEN for n in notes)


def test_prefetch_jobs_install_whole_runs(cluster, region):
    reg, core = region
    pages = list(range(64, 192))
    _, _, data = serve_from_peers(cluster, reg, core, pages)
    claimed = core.claim(np.array(pages, dtype=np.uint64))
    assert len(claimed) == len(pages)
    assert core.reserve(0)  # no limit set
    core.submit(claimed[:64])
    core.submit(claimed[64:])
    notes: list[int] = []
    while sum(1 for n in notes if n & QUEUE_LANDED) < 2:
        got = drain(core)
        assert got, "prefetch jobs did not finish"
        notes += got
    assert core.remote_inflight() == 0
    assert all(core.state[p] == LOCAL for p in pages)
    faults_before = core.stats().counters["faults"]
    for p in pages:  # no fault: the pages are there
        assert touch_read(reg.addr + p * PS, PS) == data[p]
    st = core.stats().counters
    assert st["faults"] == faults_before and st["native_prefetched"] == len(pages)


def test_dead_holder_is_skipped_for_the_replica(cluster, region):
    reg, core = region
    _, _, data = serve_from_peers(cluster, reg, core, list(range(0, 40)))
    cluster.peers[0].kill()
    for p, d in data.items():
        assert read_in_thread(reg.addr + p * PS, PS) == d
    st = core.stats().counters
    assert st["native_fetches"] == 40 and st["native_fallbacks"] == 0
    assert st["native_peer_errors"] >= 1


def test_stale_or_tampered_copies_go_to_the_python_side(cluster, region, seal_engine):
    reg, core = region
    store, bits, data = serve_from_peers(cluster, reg, core, [5, 6], peers=cluster.peers[:1],
                                         replicas=1, version=3)

    async def spoil() -> None:
        pool = PeerPool(client_ssl_context(cluster.config, node=HOST_NODE))
        client = pool.add(cluster.peers[0].name, cluster.peers[0].address)
        try:
            version, blob = await client.get(store.ns, 5)
            forged = bytearray(blob)
            forged[40] ^= 1
            await client.put(store.ns, 5, version, bytes(forged))   # tampered
        finally:
            await pool.close()

    asyncio.run(spoil())
    # Page 6: we wrote version 4 since (the peer missed it): its copy is stale.
    core.locate(np.array([6], dtype=np.uint64), np.array([4], dtype=np.uint64),
                np.array([bits[cluster.peers[0].name]], dtype=np.uint16))
    for p in (5, 6):
        t = threading.Thread(target=touch_read, args=(reg.addr + p * PS, 8), daemon=True)
        t.start()
        queued = drain(core)
        # Handed over as a plain fetch (no note bit), the page still FETCHING and
        # the guest still waiting: never served wrong data.
        assert queued == [p] and core.state[p] == FETCHING and t.is_alive()
        assert core.reserve(1)
        core.install(p, data[p])
        t.join(10)
        assert not t.is_alive()
    assert core.stats().counters["native_fallbacks"] == 2


def test_memory_source_serves_faults_and_prefetch(region):
    reg, core = region
    core.setup_memory(workers=1)
    core.start(threads=2)
    pages = list(range(100, 140))
    data, arr, ok, buf = write_and_begin_evict(reg, core, pages)
    core.memory_put(arr, bytes(buf))
    core.locate(arr, np.ones(len(arr), dtype=np.uint64),
                np.full(len(arr), HOLDER_MEMORY, dtype=np.uint16))
    core.evict_commit(arr, ok)
    assert touch_read(reg.addr + 100 * PS, PS) == data[100]  # served by a reader thread
    core.submit(core.claim(arr[1:]))
    while not any(n & QUEUE_LANDED for n in drain(core)):
        pass
    assert all(touch_read(reg.addr + p * PS, PS) == data[p] for p in pages)
    st = core.stats().counters
    assert st["native_fetches"] == 1 and st["native_prefetched"] == len(pages) - 1


def test_bad_identity_is_a_clear_error(cluster_ca, region, tmp_path):
    _, core = region
    bogus = tmp_path / "nope.pem"
    paths = node_paths(cluster_ca, HOST_NODE)
    with pytest.raises(NativeError, match="TLS identity"):
        core.setup_remote(key=b"k" * 32, aad_prefix=b"a", ns=b"\0\1x", ca=str(paths.ca),
                          cert=str(bogus), keyfile=str(paths.key), peers=[])
    # The core still works without it.
    core.start(threads=1)
    assert read_in_thread(core._h.base + 3 * PS, 4) == b"\0" * 4


async def _put_native(store: PeerPageStore, core: FaultHandlerCore, bits: dict[str, int],
                      items, *, measure: bool = True):
    store.use_native(core.remote_store, bits)
    try:
        if measure:
            await store.pool.measure(samples=1)
        return await store.put(items)
    finally:
        await store.pool.close()


def test_eviction_seals_and_stores_in_c(cluster, region, seal_engine):
    """Pages evicted through the C store land on R peers, open with the
    Python sealer (same format), and fault back in natively."""
    from hypervisor.node.wire import Namespace
    from hypervisor.sealing import build_aad

    reg, core = region
    store = make_store(cluster.config, cluster.peers)
    bits = setup_native(core, store)
    core.start(threads=2)
    pages = list(range(40, 72))
    data, arr, ok, buf = write_and_begin_evict(reg, core, pages)
    items = [(p, 3, bytes(buf[i * PS:(i + 1) * PS])) for i, p in enumerate(pages)]
    holders = asyncio.run(_put_native(make_store(cluster.config, cluster.peers), core, bits,
                                      items))
    assert sorted(holders) == pages and all(len(set(h)) == 2 for h in holders.values())

    async def fetch_one(name: str, page: int):  # noqa: ANN202
        pool = make_store(cluster.config, cluster.peers).pool
        try:
            return await pool.client(name).get(Namespace.page("vm-native-test"), page)
        finally:
            await pool.close()

    version, blob = asyncio.run(fetch_one(holders[40][0], 40))
    assert version == 3
    assert Sealer(KEY).open(build_aad("page", "vm-native-test", 40, 3), blob) == data[40]
    core.locate(arr, np.full(len(pages), 3, dtype=np.uint64),
                np.array([sum(bits[n] for n in holders[p]) for p in pages], dtype=np.uint16))
    assert core.evict_commit(arr, ok).all()
    for p, d in data.items():
        assert read_in_thread(reg.addr + p * PS, PS) == d


def test_c_eviction_skips_a_dead_peer(cluster, region):
    reg, core = region
    store = make_store(cluster.config, cluster.peers)
    bits = setup_native(core, store)
    core.start(threads=2)
    dead = cluster.peers[0]
    dead.proc.kill()
    dead.proc.wait()
    pages = list(range(100, 140))
    _, arr, ok, buf = write_and_begin_evict(reg, core, pages)
    items = [(p, 1, bytes(buf[i * PS:(i + 1) * PS])) for i, p in enumerate(pages)]
    putter = make_store(cluster.config, cluster.peers)
    # no ping first: the pool still thinks the dead peer is up, so C is asked
    # to store there, fails to connect, and the next round places elsewhere
    holders = asyncio.run(_put_native(putter, core, bits, items, measure=False))
    assert dead.name in putter.dead_holders()
    # every page still on two distinct live peers, none on the dead one
    assert sorted(holders) == pages
    assert all(len(set(h)) == 2 and dead.name not in h for h in holders.values())
    core.evict_abort(arr, ok)
