"""Sequential and stride prefetch from the remote-fault stream.

A stride is confirmed when the last two demand faults moved by the same
delta (+1 is the sequential case). While the stream keeps the stride, the
window doubles up to ``max_depth`` pages ahead (readahead-style ramp); a
break resets it. Each call returns only pages not predicted before on the
stream, so following a stream costs O(pages), not O(faults x window).
"""

from __future__ import annotations

from collections.abc import Sequence


class StridePrefetch:
    """Prefetch along a confirmed stride.

    Args:
        npages: pages in guest RAM (predictions are clipped to it).
        min_depth: window after a stride is first confirmed.
        max_depth: largest window.
    """

    def __init__(self, npages: int, *, min_depth: int = 8, max_depth: int = 256) -> None:
        self.npages = npages
        self.min_depth = min_depth
        self.max_depth = max_depth
        self._last: int | None = None
        self._stride: int | None = None
        self._depth = 0
        self._ahead = -1  # furthest page already predicted on this stream

    def on_fault(self, page: int) -> Sequence[int]:
        """Record a demand fault; return pages to fetch with it (maybe none)."""
        last, self._last = self._last, page
        if last is None:
            return []
        if self._stride is not None and self._ahead >= 0 and self._on_stream(last, page):
            delta = self._stride  # the stream ran into or through our window: a hit
        else:
            delta = page - last
            if delta == 0:
                return []
            if delta != self._stride:
                self._stride, self._depth, self._ahead = delta, 0, -1
                return []
        self._depth = min(self.max_depth, max(self.min_depth, self._depth * 2))
        first = 1
        if self._ahead >= 0:  # on the stream: skip what was already predicted
            first = max(1, (self._ahead - page) // delta + 1)
        out = [p for p in (page + delta * i for i in range(first, self._depth + 1))
               if 0 <= p < self.npages]
        if out:
            self._ahead = out[-1]
        elif first == 1:
            self._ahead = -1
        return out


    def _on_stream(self, last: int, page: int) -> bool:
        """page follows last along the stride, no further than just past the window."""
        stride = self._stride or 0
        if (page - last) % stride:
            return False
        if stride > 0:
            return last < page <= self._ahead + stride
        return self._ahead + stride <= page < last

    def extend(self, count: int, *, max_ahead: int) -> Sequence[int]:
        """Continue the current stream beyond its window without a new fault.

        Called when a prefetch batch has landed, so the next batch is in
        flight before the reader reaches the end of the window (the faults
        alone would only say so once it had stalled there).

        Args:
            count: pages to add.
            max_ahead: never predict further than this many strides past the
                last demand fault.

        Returns:
            The next pages of the stream (none when no stream is confirmed).
        """
        if self._stride is None or self._last is None or self._ahead < 0 or self._depth == 0:
            return []
        limit = self._last + self._stride * max_ahead
        out = []
        p = self._ahead + self._stride
        while len(out) < count and 0 <= p < self.npages and \
                (p <= limit if self._stride > 0 else p >= limit):
            out.append(p)
            p += self._stride
        if out:
            self._ahead = out[-1]
        return out


class NoPrefetch:
    """Fetch only what faults (the baseline prefetch is measured against)."""

    def on_fault(self, page: int) -> Sequence[int]:
        """Return no extra pages."""
        return []

    def extend(self, count: int, *, max_ahead: int) -> Sequence[int]:
        """Return no extra pages."""
        return []
