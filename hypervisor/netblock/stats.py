"""Per-export I/O counters, cheap enough to update on every request.

The hot path only increments integers and one histogram bucket;
:mod:`hypervisor.netblock.metrics` turns these into Prometheus families at
scrape time.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass, field

from hypervisor.netblock import protocol as nbd

LATENCY_BUCKETS_S: tuple[float, ...] = (
    5e-6, 10e-6, 25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3,
    50e-3, 100e-3, 250e-3, 1.0)
"""Upper bounds (seconds) of the request latency histogram."""
_BOUNDS_NS = tuple(int(b * 1e9) for b in LATENCY_BUCKETS_S)


@dataclass
class LatencyHistogram:
    """Cumulative-at-scrape latency histogram kept as plain bucket counts."""

    counts: list[int] = field(default_factory=lambda: [0] * (len(_BOUNDS_NS) + 1))
    total_ns: int = 0

    def observe_ns(self, ns: int) -> None:
        """Add one observation in nanoseconds."""
        self.counts[bisect_left(_BOUNDS_NS, ns)] += 1
        self.total_ns += ns

    @property
    def count(self) -> int:
        """Number of observations."""
        return sum(self.counts)


@dataclass
class ExportStats:
    """Counters of one export (or one peer, for the replicated backend).

    Attributes:
        name: the export name.
        ops: requests completed, by command name.
        bytes_read, bytes_written: payload bytes.
        errors: requests answered with an error.
        connections: connections currently attached.
        latency: per command name.
    """

    name: str = ""
    ops: dict[str, int] = field(default_factory=dict)
    bytes_read: int = 0
    bytes_written: int = 0
    errors: int = 0
    connections: int = 0
    latency: dict[str, LatencyHistogram] = field(default_factory=dict)

    def record(self, command: int, length: int, elapsed_ns: int) -> None:
        """Count one completed request.

        Args:
            command: NBD_CMD_*.
            length: request length.
            elapsed_ns: server-side handling time.
        """
        name = nbd.COMMAND_NAMES.get(command, "other")
        self.ops[name] = self.ops.get(name, 0) + 1
        if command == nbd.CMD_READ:
            self.bytes_read += length
        elif command == nbd.CMD_WRITE:
            self.bytes_written += length
        hist = self.latency.get(name)
        if hist is None:
            hist = self.latency[name] = LatencyHistogram()
        hist.observe_ns(elapsed_ns)

    def record_batch(self, *, reads: int, read_bytes: int, writes: int, written: int,
                     elapsed_ns: int) -> None:
        """Count a batch of fast-path reads and writes handled in one go.

        The batch's handling time is split evenly over its requests (one
        latency observation per request at the batch average), which keeps the
        per-request cost at a few integer additions.

        Args:
            reads, writes: requests in the batch.
            read_bytes, written: their payload bytes.
            elapsed_ns: time spent on the whole batch.
        """
        total = reads + writes
        avg = elapsed_ns // total
        bucket = bisect_left(_BOUNDS_NS, avg)
        for name, count in (("read", reads), ("write", writes)):
            if not count:
                continue
            self.ops[name] = self.ops.get(name, 0) + count
            hist = self.latency.get(name)
            if hist is None:
                hist = self.latency[name] = LatencyHistogram()
            hist.counts[bucket] += count
            hist.total_ns += avg * count
        self.bytes_read += read_bytes
        self.bytes_written += written
