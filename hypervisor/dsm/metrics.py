"""Prometheus metrics of every running DSM handler (``omega_dsm_*``).

:class:`DsmMetricsCollector` asks each handler found under the VMs directory
for its stats over the control socket at scrape time, so the numbers are the
handler's own counters, never a copy that could go stale.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from hypervisor.config import Config
from hypervisor.errors import OmegaError

#: stats key → (metric name, help, counter?)
_SERIES: dict[str, tuple[str, str, bool]] = {
    "resident_bytes": ("omega_dsm_resident_bytes", "Guest RAM resident on this host.", False),
    "file_resident_bytes": ("omega_dsm_memory_file_bytes",
                            "Bytes allocated in the guest memory file (st_blocks).", False),
    "max_file_resident_bytes": ("omega_dsm_memory_file_max_bytes",
                                "Largest memory-file allocation seen.", False),
    "target_bytes": ("omega_dsm_target_bytes", "Resident target (local memory).", False),
    "remote_bytes": ("omega_dsm_remote_bytes", "Guest RAM held by peers.", False),
    "faults": ("omega_dsm_faults", "userfaultfd page faults.", True),
    "faults_zero": ("omega_dsm_faults_zero", "Faults served with a zero page.", True),
    "faults_remote": ("omega_dsm_faults_remote", "Faults that needed a fetch from peers.", True),
    "faults_wp": ("omega_dsm_faults_write_protect", "Write-protect faults.", True),
    "evicted_pages": ("omega_dsm_evicted_pages", "Pages written to peers and punched.", True),
    "evict_cancelled": ("omega_dsm_evictions_cancelled",
                        "Evictions cancelled by a racing guest write.", True),
    "fetched_pages": ("omega_dsm_fetched_pages", "Pages fetched from peers.", True),
    "prefetched_pages": ("omega_dsm_prefetched_pages", "Pages fetched ahead of a fault.", True),
    "native_fetches": ("omega_dsm_native_fetches",
                       "Demand faults served by the native fetch path (C).", True),
    "native_prefetched": ("omega_dsm_native_prefetched_pages",
                          "Pages fetched ahead by the native path's workers.", True),
    "native_fallbacks": ("omega_dsm_native_fallbacks",
                         "Pages the native path handed to the Python fetch path.", True),
    "native_peer_errors": ("omega_dsm_native_peer_errors",
                           "Peer connections of the native path that failed.", True),
    "fetch_retries": ("omega_dsm_fetch_retries", "Fetches retried after every holder failed.",
                      True),
    "pages_lost": ("omega_dsm_pages_lost_events", "Fetches where no holder had a valid copy.",
                   True),
    "rereplicated_pages": ("omega_dsm_rereplicated_pages",
                           "Pages copied to a new peer after a holder died.", True),
    "bytes_out": ("omega_dsm_sent_bytes", "Sealed page bytes sent to peers.", True),
    "bytes_in": ("omega_dsm_received_bytes", "Sealed page bytes received from peers.", True),
    "errors": ("omega_dsm_errors", "Failed userfaultfd or memory-file operations.", True),
    "remote_fault_p50_us": ("omega_dsm_remote_fault_p50_microseconds",
                            "Median remote fault service time.", False),
    "remote_fault_p99_us": ("omega_dsm_remote_fault_p99_microseconds",
                            "99th percentile remote fault service time.", False),
}


def running_handler_stats(config: Config) -> list[dict[str, Any]]:
    """Stats of every DSM handler that answers under ``config.vms_dir``."""
    from hypervisor.dsm.control import control_request

    out: list[dict[str, Any]] = []
    if not config.vms_dir.exists():
        return out
    for sock in sorted(config.vms_dir.glob("*/dsm-control.sock")):
        try:
            out.append(control_request(sock, {"op": "stats"}, timeout=2)["stats"])
        except OmegaError:
            continue
    return out


class DsmMetricsCollector(Collector):
    """Collects ``omega_dsm_*`` from every running handler at scrape time.

    Args:
        config: where the VMs live.
    """

    def __init__(self, config: Config) -> None:
        self.config = config

    def collect(self) -> Iterator[Any]:
        """Yield one family per series, one sample per VM (per peer for pages)."""
        stats = running_handler_stats(self.config)
        for key, (name, doc, counter) in _SERIES.items():
            fam = (CounterMetricFamily(name, doc, labels=["vm"]) if counter
                   else GaugeMetricFamily(name, doc, labels=["vm"]))
            for st in stats:
                if key in st:
                    fam.add_metric([st["vm"]], float(st[key]))
            yield fam
        per_peer = GaugeMetricFamily("omega_dsm_peer_pages", "Evicted pages each peer holds.",
                                     labels=["vm", "peer"])
        dead = GaugeMetricFamily("omega_dsm_peer_dead", "1 when the handler considers a peer "
                                 "dead.", labels=["vm", "peer"])
        for st in stats:
            for peer, count in st.get("pages_per_peer", {}).items():
                per_peer.add_metric([st["vm"], peer], float(count))
                dead.add_metric([st["vm"], peer], 1.0 if peer in st.get("dead_peers", []) else 0.0)
        yield per_peer
        yield dead
