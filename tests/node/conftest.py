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
