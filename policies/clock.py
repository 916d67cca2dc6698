"""CLOCK (second chance) over the handler's referenced bits.

The handler core sets a page's referenced bit when a fault brings it in; the
hand sweeps the page table, clearing set bits and taking pages whose bit is
already clear. Without hardware accessed bits for shared file pages this is a
fault-history approximation of LRU: a page faulted in recently survives one
more sweep than one brought in by prefetch and never touched again.
"""

from __future__ import annotations

import numpy as np

from hypervisor.dsm.core import LOCAL


class ClockVictims:
    """Second-chance victim selection (see module doc).

    Attributes:
        hand: the next page the sweep looks at.
    """

    def __init__(self) -> None:
        self.hand = 0

    def victims(self, state: np.ndarray, ref: np.ndarray, count: int) -> np.ndarray:
        """Return up to ``count`` LOCAL pages, sweeping at most twice round.

        Args:
            state: per-page state table (read).
            ref: per-page referenced bits (cleared as the hand passes).
            count: pages wanted.

        Returns:
            Page numbers (uint64) in sweep order.
        """
        n = len(state)
        if count <= 0 or n == 0:
            return np.empty(0, dtype=np.uint64)
        order = np.concatenate((np.arange(self.hand, n), np.arange(0, self.hand)))
        local = order[state[order] == LOCAL]
        if len(local) == 0:
            return np.empty(0, dtype=np.uint64)
        unref = np.flatnonzero(ref[local] == 0)
        if len(unref) >= count:
            stop = int(unref[count - 1])
            ref[local[: stop + 1]] = 0  # the hand passed these: second chance used
            chosen = local[unref[:count]]
        else:
            # A full turn clears every bit; the second turn takes pages in order.
            ref[local] = 0
            first = local[unref]
            rest = np.delete(local, unref)[: count - len(first)]
            chosen = np.concatenate((first, rest))
        self.hand = (int(chosen[-1]) + 1) % n
        return chosen.astype(np.uint64)
