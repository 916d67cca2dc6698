"""Prometheus metrics of Omega VMs, read from libvirt at scrape time.

One collector (:class:`VMMetricsCollector`) asks libvirt for every domain's
stats in a single call (``getAllDomainStats``) per scrape, keeps the domains that
carry Omega metadata, and exports:

* ``omega_vm_state{vm}``: libvirt's domain state number (1 running, 3 paused,
  5 shut off; see :data:`hypervisor.vm.lifecycle.STATE_NAMES`).
* ``omega_vm_vcpu_seconds_total{vm}``: CPU time used by the guest's vCPUs.
* ``omega_vm_memory_bytes{vm,kind}``: ``maximum`` (configured RAM),
  ``current`` (what the balloon leaves the guest) and ``rss`` (resident in QEMU).
* ``omega_vm_info{vm,image,accel,uuid}``: always 1, carries labels.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from hypervisor.errors import LibvirtError
from hypervisor.vm.lifecycle import VMController, accel_of_xml
from hypervisor.vm.spec import OMEGA_XMLNS


class VMMetricsCollector(Collector):
    """Collects per-VM metrics from libvirt on every scrape.

    Args:
        controller: the VM controller whose libvirt connection is read.
    """

    def __init__(self, controller: VMController) -> None:
        self.controller = controller

    def collect(self) -> Iterator[Any]:
        """Yield the metric families (called by prometheus-client per scrape)."""
        state = GaugeMetricFamily("omega_vm_state", "libvirt domain state number "
                                  "(1 running, 3 paused, 4 shutting down, 5 shut off)",
                                  labels=["vm"])
        vcpu = CounterMetricFamily("omega_vm_vcpu_seconds", "CPU time used by the VM's vCPUs",
                                   labels=["vm"])
        memory = GaugeMetricFamily("omega_vm_memory_bytes", "VM memory by kind "
                                   "(maximum, current, rss)", labels=["vm", "kind"])
        info = GaugeMetricFamily("omega_vm_info", "Omega VM identity (value always 1)",
                                 labels=["vm", "image", "accel", "uuid"])
        try:
            rows = self.controller.domain_stats()
        except LibvirtError:
            rows = []  # libvirt unreachable: export nothing rather than fail the scrape
        for row in rows:
            name = row["name"]
            state.add_metric([name], row["state"])
            vcpu.add_metric([name], row["vcpu_seconds"])
            for kind in ("maximum", "current", "rss"):
                if row.get(kind) is not None:
                    memory.add_metric([name, kind], row[kind])
            info.add_metric([name, row["image"], row["accel"], row["uuid"]], 1)
        yield from (state, vcpu, memory, info)


def domain_stats_rows(conn: Any) -> list[dict[str, Any]]:
    """Read stats of every Omega domain on ``conn`` in one libvirt call.

    Args:
        conn: an open libvirt connection (use on the libvirt event loop thread).

    Returns:
        One dict per Omega VM: name, uuid, state, vcpu_seconds, maximum,
        current, rss (bytes; None where libvirt has no figure), image, accel.
    """
    import libvirt

    stats = (libvirt.VIR_DOMAIN_STATS_STATE | libvirt.VIR_DOMAIN_STATS_VCPU
             | libvirt.VIR_DOMAIN_STATS_BALLOON)
    rows = []
    for dom, record in conn.getAllDomainStats(stats, 0):
        try:
            meta = dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, OMEGA_XMLNS, 0)
        except libvirt.libvirtError:
            continue  # not an Omega domain
        try:
            image = _image_of(meta)
            kind = accel_of_xml(dom.XMLDesc(0))
            uuid = dom.UUIDString()
        except libvirt.libvirtError:
            continue  # vanished during the scrape
        vcpu_ns = sum(v for k, v in record.items()
                      if k.startswith("vcpu.") and k.endswith(".time"))
        rows.append({
            "name": dom.name(), "uuid": uuid, "state": record.get("state.state", 0),
            "vcpu_seconds": vcpu_ns / 1e9,
            "maximum": _kib(record.get("balloon.maximum")),
            "current": _kib(record.get("balloon.current")),
            "rss": _kib(record.get("balloon.rss")),
            "image": image, "accel": kind,
        })
    return rows


def _kib(value: int | None) -> int | None:
    return None if value is None else int(value) * 1024


def _image_of(meta_xml: str) -> str:
    import json

    try:
        return str(json.loads(ET.fromstring(meta_xml).text or "{}").get("image", ""))
    except (ET.ParseError, json.JSONDecodeError):
        return ""
