"""Prometheus metrics of the NBD server (``omega_netblock_*``).

:class:`NetblockMetricsCollector` reads the counters the server keeps anyway
(:mod:`hypervisor.netblock.stats`) at scrape time, so serving metrics costs
the I/O path nothing.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily, Metric)
from prometheus_client.registry import Collector

from hypervisor.netblock.server import NbdServer
from hypervisor.netblock.stats import LATENCY_BUCKETS_S, LatencyHistogram


def _buckets(hist: LatencyHistogram) -> list[tuple[str, float]]:
    out = []
    running = 0
    for bound, count in zip(LATENCY_BUCKETS_S, hist.counts):
        running += count
        out.append((repr(bound), float(running)))
    out.append(("+Inf", float(running + hist.counts[-1])))
    return out


class NetblockMetricsCollector(Collector):
    """Per-export and per-peer I/O, replica health and re-replication backlog.

    Args:
        server: the running NBD server.
    """

    def __init__(self, server: NbdServer) -> None:
        self.server = server

    def collect(self) -> Iterator[Metric]:
        """Yield the metric families (called by prometheus-client per scrape)."""
        ops = CounterMetricFamily("omega_netblock_requests", "NBD requests completed",
                                  labels=["export", "op"])
        nbytes = CounterMetricFamily("omega_netblock_bytes", "NBD payload bytes",
                                     labels=["export", "direction"])
        errors = CounterMetricFamily("omega_netblock_errors", "NBD requests answered with an "
                                     "error", labels=["export"])
        conns = GaugeMetricFamily("omega_netblock_connections", "Attached NBD clients",
                                  labels=["export"])
        latency = HistogramMetricFamily("omega_netblock_request_latency_seconds",
                                        "Server-side request handling time",
                                        labels=["export", "op"])
        peer_ops = CounterMetricFamily("omega_netblock_peer_requests", "Chunk requests to "
                                       "peers", labels=["export", "peer", "op"])
        peer_bytes = CounterMetricFamily("omega_netblock_peer_bytes", "Sealed chunk bytes "
                                         "moved", labels=["export", "peer", "direction"])
        peer_errors = CounterMetricFamily("omega_netblock_peer_errors", "Failed chunk "
                                          "requests", labels=["export", "peer"])
        peer_latency = HistogramMetricFamily("omega_netblock_peer_latency_seconds",
                                             "Chunk request round trips",
                                             labels=["export", "peer"])
        peer_up = GaugeMetricFamily("omega_netblock_peer_up", "Peer healthy (1) or not (0)",
                                    labels=["peer"])
        peer_rtt = GaugeMetricFamily("omega_netblock_peer_rtt_seconds", "Smoothed PING RTT",
                                     labels=["peer"])
        chunks = GaugeMetricFamily("omega_netblock_chunks", "Written chunks", labels=["export"])
        backlog = GaugeMetricFamily("omega_netblock_rereplication_backlog_chunks",
                                    "Chunks with fewer live copies than wanted",
                                    labels=["export"])
        repaired = CounterMetricFamily("omega_netblock_rereplicated_chunks",
                                       "Chunks copied back to full replication",
                                       labels=["export"])
        cache = CounterMetricFamily("omega_netblock_cache_lookups", "Plaintext cache lookups "
                                    "of the native replicated backend", labels=["export",
                                                                                "result"])
        batches = CounterMetricFamily("omega_netblock_batches", "Request batches run by the "
                                      "native replicated backend (requests / batches = "
                                      "the mean batch)", labels=["export"])
        unpersisted = GaugeMetricFamily("omega_netblock_table_unpersisted_chunks",
                                        "Chunk-table entries changed since the last flush",
                                        labels=["export"])
        pools = {}
        for name, export in list(self.server.exports.items()):
            st = export.stats
            for op, count in list(st.ops.items()):
                ops.add_metric([name, op], count)
            nbytes.add_metric([name, "read"], st.bytes_read)
            nbytes.add_metric([name, "written"], st.bytes_written)
            errors.add_metric([name], st.errors)
            conns.add_metric([name], st.connections)
            for op, hist in list(st.latency.items()):
                latency.add_metric([name, op], _buckets(hist), hist.total_ns / 1e9)
            backend = export.backend
            peer_stats = getattr(backend, "peer_stats", None)
            if peer_stats is None:
                continue
            for peer, ps in list(peer_stats.items()):
                peer_ops.add_metric([name, peer, "get"], ps.gets)
                peer_ops.add_metric([name, peer, "put"], ps.puts)
                peer_ops.add_metric([name, peer, "delete"], ps.deletes)
                peer_bytes.add_metric([name, peer, "in"], ps.bytes_in)
                peer_bytes.add_metric([name, peer, "out"], ps.bytes_out)
                peer_errors.add_metric([name, peer], ps.errors)
                peer_latency.add_metric([name, peer], _buckets(ps.latency),
                                        ps.latency.total_ns / 1e9)
            chunks.add_metric([name], backend.chunk_count())
            backlog.add_metric([name], len(backend.under_replicated()))
            repaired.add_metric([name], backend.progress.repaired)
            native = getattr(backend, "stats", None)
            if callable(native):  # the native backend's C counters
                st = native()
                cache.add_metric([name, "hit"], st["cache_hits"])
                cache.add_metric([name, "miss"], st["cache_misses"])
                batches.add_metric([name], st["batches"])
                unpersisted.add_metric([name], st["dirty"])
            pools[id(backend.pool)] = backend.pool
        for pool in pools.values():
            for peer in pool.names():
                health = pool.health(peer)
                peer_up.add_metric([peer], 1.0 if health.healthy else 0.0)
                if health.rtt is not None:
                    peer_rtt.add_metric([peer], health.rtt)
        yield from (ops, nbytes, errors, conns, latency, peer_ops, peer_bytes, peer_errors,
                    peer_latency, peer_up, peer_rtt, chunks, backlog, repaired, cache,
                    batches, unpersisted)
