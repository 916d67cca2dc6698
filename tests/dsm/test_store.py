"""The peer page store against real node daemons (mutual TLS): sealing, R
replicas on distinct peers, failover to a replica when a peer dies, stale
and tampered copies refused, a full peer skipped, re-replication, freeing.
"""

from __future__ import annotations

import os

import pytest

from hypervisor.dsm.store import PageLostError, PeerPageStore
from hypervisor.node.client import PeerPool
from hypervisor.node.wire import Namespace
from hypervisor.sealing import Sealer
from hypervisor.security import client_ssl_context
from policies.placement import SpreadPlacement
from tests.dsm.conftest import HOST_NODE, restart_peer, start_peers

PAGE = 4096


def make_store(config, peers, *, replicas: int = 2, vm_id: str = "vm-store-test") -> PeerPageStore:
    pool = PeerPool(client_ssl_context(config, node=HOST_NODE), request_timeout=5,
                    connect_timeout=2)
    for p in peers:
        pool.add(p.name, p.address)
    return PeerPageStore(pool, Sealer(Sealer.generate_key()), vm_id=vm_id,
                         placement=SpreadPlacement(), replicas=replicas)


def pages(n: int, start: int = 0) -> list[tuple[int, int, bytes]]:
    return [(p, 1, os.urandom(PAGE)) for p in range(start, start + n)]


async def test_pages_are_sealed_on_two_distinct_peers_and_come_back(cluster):
    store = make_store(cluster.config, cluster.peers)
    items = pages(64)
    try:
        holders = await store.put(items)
        assert all(len(set(h)) == 2 for h in holders.values())
        got = await store.get([(p, v, holders[p]) for p, v, _ in items])
        assert got == {p: d for p, _, d in items}
        # What a peer holds is not the page.
        raw = await store.pool.client(holders[0][0]).get(store.ns, 0)
        assert raw is not None and items[0][2] not in raw[1]
    finally:
        await store.drop()
        await store.close()


async def test_dead_peer_pages_come_from_the_replica_then_rereplicate(cluster):
    store = make_store(cluster.config, cluster.peers)
    items = pages(90)
    try:
        holders = await store.put(items)
        victim = cluster.peers[0]
        victim.kill()
        got = await store.get([(p, v, holders[p]) for p, v, _ in items])
        assert got == {p: d for p, _, d in items}
        assert victim.name in store.dead_holders()
        affected = [(p, 1, holders[p]) for p, _, _ in items if victim.name in holders[p]]
        assert affected
        changed = await store.rereplicate(affected)
        assert set(changed) == {p for p, _, _ in affected}
        for p, hs in changed.items():
            assert victim.name not in hs and len(set(hs)) == 2
        # Still readable with only the new holders.
        again = await store.get([(p, 1, changed[p]) for p, _, _ in affected])
        assert len(again) == len(affected)
    finally:
        await store.drop()
        await store.close()


async def test_a_peer_that_failed_is_a_candidate_again_once_it_answers(cluster):
    """A restarted peer must hold pages again: one failure is not forever."""
    store = make_store(cluster.config, cluster.peers[:2])
    try:
        first = await store.put(pages(8))
        assert all(len(set(h)) == 2 for h in first.values())
        victim = cluster.peers[0]
        victim.kill()
        degraded = await store.put(pages(8, start=100))
        assert all(h == (cluster.peers[1].name,) for h in degraded.values())
        assert victim.name in store.dead_holders()
        assert await store.recheck() == set()  # still down
        restart_peer(victim)
        assert await store.recheck() == {victim.name}
        assert victim.name not in store.dead_holders()
        again = await store.put(pages(8, start=200))
        assert all(len(set(h)) == 2 for h in again.values())
    finally:
        await store.drop()
        await store.close()


async def test_stale_version_is_refused(cluster):
    store = make_store(cluster.config, cluster.peers[:1], replicas=1)
    try:
        old = os.urandom(PAGE)
        new = os.urandom(PAGE)
        h1 = await store.put([(7, 1, old)])
        await store.put([(7, 2, new)])
        assert (await store.get([(7, 2, h1[7])]))[7] == new
        # A directory asking for version 1 (e.g. an old copy replayed) gets nothing.
        with pytest.raises(PageLostError):
            await store.get([(7, 1, h1[7])])
    finally:
        await store.drop()
        await store.close()


async def test_tampered_copy_is_refused_and_the_replica_used(cluster):
    store = make_store(cluster.config, cluster.peers[:2], replicas=2)
    try:
        data = os.urandom(PAGE)
        holders = (await store.put([(3, 1, data)]))[3]
        first = store.pool.client(holders[0])
        version, blob = await first.get(store.ns, 3)
        forged = bytearray(blob)
        forged[40] ^= 1
        await first.put(store.ns, 3, version, bytes(forged))
        assert (await store.get([(3, 1, holders)]))[3] == data
        # Both copies forged: the page is reported lost, never returned wrong.
        second = store.pool.client(holders[1])
        await second.put(store.ns, 3, version, bytes(forged))
        with pytest.raises(PageLostError):
            await store.get([(3, 1, holders)])
    finally:
        await store.drop()
        await store.close()


async def test_full_peer_is_skipped(cluster_ca):
    small = start_peers(cluster_ca, 1, memory_lend="64K")
    big = start_peers(cluster_ca, 2, memory_lend="64M")
    store = make_store(cluster_ca, small + big, replicas=2)
    try:
        items = pages(40)
        holders = await store.put(items)
        assert len(holders) == 40
        assert all(len(set(h)) == 2 for h in holders.values())
        assert sum(small[0].name in h for h in holders.values()) < 40
    finally:
        await store.drop()
        await store.close()
        for p in small + big:
            p.proc.terminate()
            p.proc.wait(timeout=10)


async def test_drop_frees_every_page_on_every_peer(cluster):
    store = make_store(cluster.config, cluster.peers, vm_id="vm-drop-test")
    await store.put(pages(30))
    await store.drop()
    await store.close()
    for peer in cluster.peers:
        pool = PeerPool(client_ssl_context(cluster.config, node=HOST_NODE))
        pool.add(peer.name, peer.address)
        infos = await pool.client(peer.name).list_ns()
        await pool.close()
        assert not [i for i in infos if i.ns == Namespace.page("vm-drop-test") and i.keys]
