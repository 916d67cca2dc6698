"""Health summary of an export for ``omega netblock show``."""

from __future__ import annotations

import os
from typing import Any

from hypervisor.netblock.exports import ExportRecord, ExportStore


def export_health(store: ExportStore, record: ExportRecord) -> dict[str, Any]:
    """Allocation and replica health of one export.

    Args:
        store: the export store.
        record: the export.

    Returns:
        For a local export the allocated bytes; for a replicated one the
        number of written chunks and how many have fewer than ``replicas``
        copies of their current version.
    """
    if record.kind == "local":
        path = store.data_path(record)
        st = os.stat(path)
        return {"allocated": st.st_blocks * 512, "path": str(path)}
    states = store.chunk_states(record)
    under = sum(1 for s in states.values() if len(s.peers) < record.replicas)
    peers: dict[str, int] = {}
    for s in states.values():
        for p in s.peers:
            peers[p] = peers.get(p, 0) + 1
    return {"chunks_written": len(states), "chunks_under_replicated": under,
            "allocated": len(states) * record.chunk_size, "chunks_per_peer": peers}
