"""Per-owner access on a peer: a namespace belongs to the member whose certificate created it."""

from __future__ import annotations

from pathlib import Path

import pytest

from hypervisor.config import Config
from hypervisor.node.client import PeerClient, PeerForbiddenError
from hypervisor.node.wire import Item, Namespace
from hypervisor.security import ClusterCA, client_ssl_context, issue_node_cert

PAGES = Namespace.page("vm-owned")
CHUNKS = Namespace.chunk("export-owned")


@pytest.fixture
def other_ctx(config: Config, cluster_ca: ClusterCA):
    """A client context of a second member of the same cluster (``test-other``)."""
    issue_node_cert(config, "test-other", sans=["127.0.0.1"])
    return client_ssl_context(config, node="test-other")


def client_of(node, ctx) -> PeerClient:
    return PeerClient(node.address, ctx, server_name=node.name, connect_timeout=30,
                      request_timeout=30)


async def _refused_everything(b: PeerClient, ns: Namespace) -> None:
    """Every operation of ``b`` on ``ns`` is answered FORBIDDEN."""
    calls = [lambda: b.get(ns, 1), lambda: b.put(ns, 1, 9, b"overwrite"),
             lambda: b.put(ns, 77, 1, b"new key"), lambda: b.batch_get(ns, [1, 2]),
             lambda: b.batch_put(ns, [Item(1, 9, b"x"), Item(3, 1, b"y")]),
             lambda: b.delete(ns, [1, 2]), lambda: b.list(ns), lambda: b.drop_ns(ns)]
    for call in calls:
        with pytest.raises(PeerForbiddenError, match="FORBIDDEN"):
            await call()


@pytest.mark.parametrize("ns", [PAGES, CHUNKS], ids=["page", "chunk"])
async def test_only_the_owner_may_use_its_namespace(start_node, client_ctx, other_ctx,
                                                    ns: Namespace) -> None:
    node = start_node("peer-owner")
    a, b = client_of(node, client_ctx), client_of(node, other_ctx)
    mine = Namespace(ns.kind, "b-own")
    try:
        await a.batch_put(ns, [(1, 1, b"a1" * 100), (2, 1, b"a2" * 100)])
        await _refused_everything(b, ns)
        # B's own namespace works, and each member lists only its own.
        await b.put(mine, 1, 1, b"b1")
        assert [str(i.ns) for i in await b.list_ns()] == [str(mine)]
        assert [str(i.ns) for i in await a.list_ns()] == [str(ns)]
        with pytest.raises(PeerForbiddenError):
            await a.get(mine, 1)
        # STAT is global: B sees everything the peer holds.
        stat = await b.stat()
        assert (stat.pages if ns.kind is PAGES.kind else stat.chunks) == 3
        # A's data is untouched and A can still do everything.
        assert await a.batch_get(ns, [1, 2]) == [(1, b"a1" * 100), (1, b"a2" * 100)]
        assert await a.list(ns) == [(1, 1), (2, 1)]
        assert await a.delete(ns, [1]) == 1
        assert await a.drop_ns(ns) == 1
        # Gone: the name is free again, for anyone.
        await b.put(ns, 5, 1, b"b5")
        assert await b.get(ns, 5) == (1, b"b5")
        with pytest.raises(PeerForbiddenError):
            await a.get(ns, 5)
    finally:
        await a.close()
        await b.close()


async def test_chunk_ownership_survives_a_daemon_restart(start_node, client_ctx, other_ctx,
                                                         tmp_path: Path) -> None:
    data = tmp_path / "owner-data"
    node = start_node("peer-owner-restart", data_dir=data)
    a = client_of(node, client_ctx)
    try:
        await a.put(CHUNKS, 1, 1, b"kept" * 100)
    finally:
        await a.close()
    assert node.stop() == 0
    node = start_node("peer-owner-restart", port=node.address[1], data_dir=data)
    a, b = client_of(node, client_ctx), client_of(node, other_ctx)
    try:
        await _refused_everything(b, CHUNKS)
        assert await b.list_ns() == []
        assert await a.get(CHUNKS, 1) == (1, b"kept" * 100)
        assert [str(i.ns) for i in await a.list_ns()] == [str(CHUNKS)]
    finally:
        await a.close()
        await b.close()
