"""Fixtures for the peer tests: a cluster CA per session, ports from P's range."""

from __future__ import annotations

import itertools
import socket
from collections.abc import Iterator

import pytest

from hypervisor.config import Config
from hypervisor.security import ClusterCA

# Helper P's port range (see INTERFACES.md): 19300-19399.
_PORTS = itertools.cycle(range(19300, 19400))


def free_port() -> int:
    """Return the next port of P's range that nothing listens on."""
    for port in itertools.islice(_PORTS, 100):
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port left in 19300-19399")


@pytest.fixture(scope="session")
def cluster_ca(config: Config) -> ClusterCA:
    """The session's cluster CA (created once)."""
    if ClusterCA.exists(config):
        return ClusterCA.load(config)
    return ClusterCA.init(config, name="test")


@pytest.fixture
def port() -> Iterator[int]:
    """A free TCP port from P's range."""
    yield free_port()


@pytest.fixture(scope="session")
def host_identity(config: Config, cluster_ca: ClusterCA) -> str:
    """The node name tests connect as (a cluster certificate for it exists)."""
    from hypervisor.security import issue_node_cert

    issue_node_cert(config, "test-host", sans=["127.0.0.1"])
    return "test-host"


@pytest.fixture
def client_ctx(config: Config, host_identity: str):
    """A client TLS context of the cluster (as ``test-host``)."""
    from hypervisor.security import client_ssl_context

    return client_ssl_context(config, node=host_identity)


@pytest.fixture
def start_node(config: Config, cluster_ca: ClusterCA, tmp_path):
    """Start real ``omega node serve`` processes; every one is stopped afterwards."""
    from hypervisor.node.serve import NodeOptions, NodeProcess
    from hypervisor.security import issue_node_cert

    started: list[NodeProcess] = []

    def start(name: str, *, memory_lend: int = 64 << 20, disk_lend: int = 64 << 20,
              port: int | None = None, data_dir=None, metrics: int | None = None,
              fsync: bool = False) -> NodeProcess:
        if not (config.cluster_dir / "nodes" / f"{name}.pem").exists():
            issue_node_cert(config, name, sans=["127.0.0.1"])
        opts = NodeOptions(name=name, host="127.0.0.1", port=port or free_port(),
                           memory_lend=memory_lend, disk_lend=disk_lend,
                           data_dir=data_dir or tmp_path / f"{name}-data",
                           metrics=("127.0.0.1", metrics) if metrics else None, fsync=fsync)
        node = NodeProcess.start(config, opts, log_path=tmp_path / f"{name}.log")
        started.append(node)
        return node

    yield start
    for node in started:
        node.kill()
