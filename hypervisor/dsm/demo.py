"""What the demo asks of dsm: how much of its guest's RAM to keep local."""

from __future__ import annotations

from hypervisor.config import Config


def demo_local_memory(config: Config, memory: int) -> int | None:
    """Local RAM for the demo guest: half of it when peers lend memory, else all.

    Args:
        config: the Omega configuration (its cluster state is read).
        memory: the guest's RAM in bytes.

    Returns:
        Bytes to keep on this host, or None (no dsm: no peer lends memory).
    """
    try:
        from hypervisor.clusterstate import ClusterState

        peers = [p for p in ClusterState(config).peers()
                 if p.memory_lend > 0 and p.state in ("running", "unknown")]
    except Exception:  # noqa: BLE001 - no cluster state: the demo runs without dsm
        return None
    return memory // 2 if peers else None
