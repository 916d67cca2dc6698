"""DSM stats of the selected VM, with a sparkline of faults per second."""

from __future__ import annotations

from collections import deque
from typing import Any

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Sparkline, Static

from hypervisor.units import format_size

#: Samples of faults/s kept for the sparkline.
HISTORY = 60


def describe_stats(stats: dict[str, Any]) -> str:
    """A few lines summarising a DSM handler's stats (as ``omega dsm stats`` has them)."""
    if not stats.get("serving"):
        return f"{stats.get('vm', '?')}: handler up, no guest attached"
    peers = ", ".join(f"{k}={v}" for k, v in sorted(stats.get("pages_per_peer", {}).items()))
    return "\n".join([
        f"resident {format_size(stats['resident_bytes'])} "
        f"(target {format_size(stats['target_bytes'])}), "
        f"remote {format_size(stats['remote_bytes'])} R={stats['replicas']}",
        f"pages per peer: {peers or '-'}"
        + (f"; dead: {', '.join(stats['dead_peers'])}" if stats.get("dead_peers") else ""),
        f"faults {stats['faults']} ({stats['faults_per_s']:.0f}/s): zero {stats['faults_zero']}, "
        f"remote {stats['faults_remote']}; p50 {stats['remote_fault_p50_us']:.0f} µs, "
        f"p99 {stats['remote_fault_p99_us']:.0f} µs",
        f"evicted {stats['evicted_pages']}, fetched {stats['fetched_pages']}, "
        f"prefetched {stats['prefetched_pages']}, errors {stats['errors']}",
    ])


class DsmPanel(Vertical):
    """Stats text and a faults/s sparkline for one VM at a time."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._vm: str | None = None
        self._history: deque[float] = deque(maxlen=HISTORY)

    def compose(self) -> ComposeResult:
        """The text and the sparkline."""
        yield Static("no VM selected", id="dsm-text")
        yield Sparkline([], id="dsm-faults")

    def show_stats(self, vm: str | None, stats: dict[str, Any] | None, *,
                   note: str | None = None) -> None:
        """Show one sample; a new VM restarts the sparkline.

        Args:
            vm: the selected VM, or None.
            stats: its handler's stats, or None (no DSM, or unreachable).
            note: why there are no stats, when there are none.
        """
        if vm != self._vm:
            self._vm = vm
            self._history.clear()
        text = self.query_one("#dsm-text", Static)
        if vm is None:
            text.update("no VM selected")
        elif stats is None:
            text.update(f"{vm}: {note or 'no DSM (all memory local)'}")
        else:
            self._history.append(float(stats.get("faults_per_s", 0.0)))
            text.update(f"{vm}\n{describe_stats(stats)}")
        self.query_one("#dsm-faults", Sparkline).data = list(self._history)
