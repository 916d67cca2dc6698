"""The demo's netblock disk: one export, replicated when the local cluster is up."""

from __future__ import annotations

from hypervisor.config import Config
from hypervisor.errors import NotFoundError
from hypervisor.netblock.exports import DEFAULT_BLOCK_SIZE, ExportRecord, ExportStore

DEMO_DISK_SIZE = 64 << 20


def ensure_demo_export(config: Config, name: str, *, size: int = DEMO_DISK_SIZE) -> ExportRecord:
    """Return the demo's export, creating it when missing.

    It is replicated (R = 2, or 1 with a single peer) when the cluster state
    lists peers, and a local sparse file otherwise, so the demo works before
    and after ``omega cluster up``.

    Args:
        config: configuration.
        name: export name.
        size: size when created.

    Returns:
        The export.
    """
    store = ExportStore(config)
    try:
        try:
            return store.get(name)
        except NotFoundError:
            pass
        peers = 0
        try:
            from hypervisor.clusterstate import ClusterState

            peers = len(ClusterState(config).peers())
        except Exception:  # no cluster state yet: a local disk
            peers = 0
        if peers:
            return store.create(name, size, replicas=min(2, peers),
                                block_size=DEFAULT_BLOCK_SIZE, description="omega demo disk")
        return store.create(name, size, local=True, description="omega demo disk")
    finally:
        store.close()
