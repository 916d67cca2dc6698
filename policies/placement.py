"""Replica placement: R distinct peers per page, spread by page number.

Candidates arrive best first (healthy, with room, nearest). Pages are spread
round-robin over them so load is even, with the replicas of one page always
on distinct peers.
"""

from __future__ import annotations

from collections.abc import Sequence


class SpreadPlacement:
    """Round-robin spread over the candidates (see module doc)."""

    def place(self, page: int, replicas: int, candidates: Sequence[str]) -> list[str]:
        """Return up to ``replicas`` distinct peers for ``page``."""
        n = len(candidates)
        if n == 0:
            return []
        start = page % n
        return [candidates[(start + i) % n] for i in range(min(replicas, n))]
