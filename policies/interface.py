"""The policy interface of the DSM handler: eviction, prefetch, placement.

The handler asks three questions and nothing else, so a policy can be
swapped (a later issue brings latency-aware numba kernels):

- :class:`VictimPolicy` — which resident pages to evict;
- :class:`PrefetchPolicy` — which pages to fetch along with a remote fault;
- :class:`PlacementPolicy` — which peers hold a page's replicas.

Inputs are the handler core's live tables (numpy views: per-page state and
referenced bit) and the stream of remote faults.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np


class VictimPolicy(Protocol):
    """Chooses pages to evict."""

    def victims(self, state: np.ndarray, ref: np.ndarray, count: int) -> np.ndarray:
        """Return up to ``count`` page numbers now LOCAL to evict.

        Args:
            state: per-page state (hypervisor.dsm.core constants); read-only.
            ref: per-page referenced bits; the policy may clear them.
            count: how many pages the handler wants back.

        Returns:
            Page numbers (uint64), at most ``count``.
        """
        ...


class PrefetchPolicy(Protocol):
    """Predicts pages about to be needed from the remote-fault stream."""

    def on_fault(self, page: int) -> Sequence[int]:
        """Record a remote demand fault; return pages worth fetching with it."""
        ...

    def extend(self, count: int, *, max_ahead: int) -> Sequence[int]:
        """Continue the current stream after a prefetch landed (maybe nothing)."""
        ...


class PlacementPolicy(Protocol):
    """Chooses the peers that hold a page."""

    def place(self, page: int, replicas: int, candidates: Sequence[str]) -> list[str]:
        """Return ``replicas`` distinct peers, best first, from healthy candidates.

        Args:
            page: the page number.
            replicas: how many copies to keep.
            candidates: healthy peers with room, best (nearest) first.

        Returns:
            Up to ``replicas`` distinct peer names.
        """
        ...
