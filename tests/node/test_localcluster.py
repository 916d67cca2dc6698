"""The local cluster: real peer processes in real network namespaces (and on loopback)."""

from __future__ import annotations

import json
from pathlib import Path

import psutil
import pytest
from pyroute2 import IPRoute
from pyroute2 import netns as pnetns

from hypervisor.clusterstate import ClusterState
from hypervisor.config import Config
from hypervisor.errors import AlreadyExistsError, PeerError, UsageError
from hypervisor.localcluster import LocalCluster, LocalClusterError, home_tag, netlink_call
from hypervisor.node.client import PeerClient
from hypervisor.node.wire import Namespace

from .conftest import free_port

CHUNKS = Namespace.chunk("lc-export")
PAGES = Namespace.page("lc-vm")


def _leftovers(config: Config, pids: list[int]) -> list[str]:
    tag = home_tag(config)
    left = [f"netns {ns}" for ns in pnetns.listnetns() if ns.startswith(f"omega-{tag}-")]

    def links() -> list[str]:
        with IPRoute() as ipr:
            return [link.get_attr("IFLA_IFNAME") for link in ipr.get_links()]

    left += [f"link {name}" for name in netlink_call(links) if name.startswith(f"o{tag}")]
    left += [f"pid {pid}" for pid in pids if psutil.pid_exists(pid)
             and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    left += [f"peer {p.name}" for p in ClusterState(config).peers(local=True)]
    return left


@pytest.fixture
def lc_config(tmp_path: Path) -> Config:
    home = tmp_path / "home"
    cfg = Config(home=home)
    cfg.ensure()
    return cfg


async def test_netns_cluster_kill_restart_down_leaves_nothing(lc_config: Config) -> None:
    cluster = LocalCluster(lc_config)
    peers = cluster.up(2, memory_lend=8 << 20, disk_lend=8 << 20, netns=True, fsync=False)
    pids = [p.pid for p in peers]
    try:
        assert [p.name for p in peers] == ["peer1", "peer2"]
        for i, p in enumerate(peers, 1):
            assert p.state == "running" and p.netns == f"omega-{home_tag(lc_config)}-{i}"
            assert p.host.startswith(f"10.200.{i}.") and p.netns in pnetns.listnetns()
        ctx = cluster.client_context()
        clients = {p.name: PeerClient(p.address, ctx, server_name=p.name,
                                      connect_timeout=10, request_timeout=30) for p in peers}
        for c in clients.values():
            await c.put(CHUNKS, 1, 1, b"chunk" * 100)
            await c.put(PAGES, 1, 1, b"page")

        cluster.kill("peer1")
        assert cluster.peer("peer1").state == "dead"
        with pytest.raises(PeerError):
            await clients["peer1"].get(CHUNKS, 1)
        assert await clients["peer2"].get(PAGES, 1) == (1, b"page")  # others unaffected

        again = cluster.restart("peer1")
        assert again.address == peers[0].address and again.state == "running"
        pids.append(again.pid)
        assert await clients["peer1"].get(CHUNKS, 1) == (1, b"chunk" * 100)  # kept on disk
        assert await clients["peer1"].get(PAGES, 1) is None                # RAM was lost

        pool = cluster.pool(connect_timeout=10, request_timeout=30)
        rtts = await pool.measure(samples=2)
        assert all(r is not None for r in rtts.values()), rtts
        await pool.close()
        for c in clients.values():
            await c.close()
    finally:
        stopped = cluster.down()
    assert sorted(stopped) == ["peer1", "peer2"]
    assert _leftovers(lc_config, pids) == []


async def test_loopback_cluster(lc_config: Config) -> None:
    cluster = LocalCluster(lc_config)
    base = free_port()
    peers = cluster.up(1, memory_lend=1 << 20, disk_lend=1 << 20, netns=False, base_port=base,
                       fsync=False)
    try:
        assert peers[0].address == f"127.0.0.1:{base}" and peers[0].netns is None
        with pytest.raises(AlreadyExistsError):
            cluster.up(1, netns=False)
        c = PeerClient(peers[0].address, cluster.client_context(), server_name="peer1")
        await c.put(PAGES, 3, 1, b"x")
        assert (await c.stat()).memory_capacity == 1 << 20
        await c.close()
        # Another process (the CLI) sees the same cluster.
        assert [p.name for p in LocalCluster(lc_config).peers()] == ["peer1"]
    finally:
        cluster.down()
    assert _leftovers(lc_config, [peers[0].pid]) == []


def test_bad_peer_counts(lc_config: Config) -> None:
    for n in (0, 17):
        with pytest.raises(UsageError):
            LocalCluster(lc_config).up(n, netns=False)


def test_cluster_cli_up_status_down(omega, lc_config: Config) -> None:
    env = {"OMEGA_HOME": str(lc_config.home)}
    r = omega("cluster", "up", "--peers", "2", "--memory-lend", "16M", "--disk-lend", "16M",
              "--json", env=env)
    assert r.returncode == 0, r.stderr
    pids = [p["pid"] for p in json.loads(r.stdout)]
    try:
        r = omega("cluster", "status", "--json", env=env)
        assert r.returncode == 0, r.stderr
        rows = json.loads(r.stdout)
        assert [(row["name"], row["state"], row["reachable"]) for row in rows] == \
            [("peer1", "running", True), ("peer2", "running", True)]
        r = omega("cluster", "up", "--peers", "1", env=env)
        assert r.returncode == 1 and "already up" in r.stderr
        r = omega("cluster", "up", "--peers", "0", env=env)
        assert r.returncode == 2
    finally:
        r = omega("cluster", "down", env=env)
    assert r.returncode == 0 and "stopped 2 peers" in r.stdout
    assert _leftovers(lc_config, pids) == []
    r = omega("cluster", "status", "--json", env=env)
    assert json.loads(r.stdout) == []


def test_failed_up_is_undone(lc_config: Config) -> None:
    import socket

    base = free_port()
    taken = socket.socket()
    taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    taken.bind(("127.0.0.1", base + 1))  # peer2's port
    taken.listen()
    try:
        cluster = LocalCluster(lc_config)
        with pytest.raises(LocalClusterError, match="peer2 did not start"):
            cluster.up(2, memory_lend=1 << 20, disk_lend=1 << 20, netns=False, base_port=base,
                       fsync=False)
    finally:
        taken.close()
    assert ClusterState(lc_config).peers() == []
    assert _node_processes(lc_config) == []


def _node_processes(config: Config) -> list[int]:
    """Pids of node daemons running with ``config``'s OMEGA_HOME."""
    pids = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if "serve" in (proc.info["cmdline"] or []) and \
                    proc.environ().get("OMEGA_HOME") == str(config.home) and \
                    proc.status() != psutil.STATUS_ZOMBIE:
                pids.append(proc.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return pids
