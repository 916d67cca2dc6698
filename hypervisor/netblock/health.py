"""Health summary of an export for ``omega netblock show``."""

from __future__ import annotations

import os
from typing import Any

from hypervisor.netblock.exports import TRIMMED, ExportRecord, ExportStore


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
    held = {i: s for i, s in states.items() if s.peers}
    under = sum(1 for s in held.values() if len(s.peers) < record.replicas)
    peers: dict[str, int] = {}
    for s in held.values():
        for p in s.peers:
            peers[p] = peers.get(p, 0) + 1
    if record.blocks_per_chunk > 1:
        allocated = sum(1 for s in held.values() for v in s.blocks
                        if v and not v & TRIMMED) * record.block_size
    else:
        allocated = len(held) * record.chunk_size
    return {"chunks_written": len(held), "chunks_under_replicated": under,
            "allocated": allocated, "chunks_per_peer": peers}
