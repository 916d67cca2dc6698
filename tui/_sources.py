"""What the admin app reads and does: a bundle of plain callables.

The app never imports libvirt or the cluster database itself; it is handed a
:class:`ClusterView` whose callables it runs in worker threads. ``omega tui``
wires the real implementations with :meth:`ClusterView.from_config`; tests use
the same ones against a real libvirtd.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hypervisor.config import Config
from hypervisor.errors import NotFoundError
from hypervisor.units import format_size

#: Lines of the serial log shown by the ``c`` key.
SERIAL_TAIL_LINES = 40


@dataclass(frozen=True)
class ClusterView:
    """The data sources and actions of the admin app.

    Every callable may block (libvirt, sockets, SQLite) and may raise
    :class:`hypervisor.errors.OmegaError`; the app calls them off the UI thread.

    Attributes:
        list_vms: rows of Omega VMs (name, state, vcpus, memory, local_memory,
            accel, disks), as display strings.
        start_vm: start a VM by name.
        stop_vm: stop a VM (ACPI, then destroy); returns how it stopped.
        destroy_vm: power a VM off at once.
        pause_vm: pause a running VM or resume a paused one; returns which.
        reboot_vm: ask a running VM to reboot (ACPI, or ``reboot`` typed for
            guests without ACPI); returns what it did.
        delete_vm: undefine a VM and remove its runtime dir (destroying it first).
        serial_tail: the last lines of a VM's serial log.
        dsm_stats: a VM's DSM handler stats, or None when the VM has no DSM.
        peers: rows of cluster peers (name, address, lends, state).
        exports: rows of netblock exports (name, kind, size, replicas).
        host_facts: host facts for the header (accel, reason, libvirt_uri).
    """

    list_vms: Callable[[], list[dict[str, str]]]
    start_vm: Callable[[str], Any]
    stop_vm: Callable[[str], Any]
    destroy_vm: Callable[[str], Any]
    pause_vm: Callable[[str], Any]
    reboot_vm: Callable[[str], Any]
    delete_vm: Callable[[str], Any]
    serial_tail: Callable[[str], str]
    dsm_stats: Callable[[str], dict[str, Any] | None]
    peers: Callable[[], list[dict[str, str]]]
    exports: Callable[[], list[dict[str, str]]]
    host_facts: Callable[[], dict[str, str]]

    @classmethod
    def from_config(cls, config: Config) -> ClusterView:
        """Wire the real sources: VMController, ClusterState, ExportStore, the DSM handler.

        Args:
            config: Omega's configuration.

        Returns:
            A view whose callables talk to this host's libvirt and state files.
        """
        from hypervisor.vm.lifecycle import VMController

        controller = VMController(config)
        return cls(
            list_vms=lambda: vm_rows(controller),
            start_vm=controller.start,
            stop_vm=controller.stop,
            destroy_vm=controller.destroy,
            pause_vm=lambda name: toggle_pause(controller, name),
            reboot_vm=lambda name: (controller.reboot(name), "asked to reboot")[1],
            delete_vm=lambda name: controller.delete(name, force=True),
            serial_tail=lambda name: serial_tail(controller.runtime_dir(name).serial_log),
            dsm_stats=lambda name: dsm_stats(config, name),
            peers=lambda: peer_rows(config),
            exports=lambda: export_rows(config),
            host_facts=lambda: host_facts(config),
        )


def toggle_pause(controller: Any, name: str) -> str:
    """Pause a running VM, or resume a paused one.

    Returns:
        ``"paused"`` or ``"resumed"``.
    """
    if controller.suspend(name):
        return "paused"
    controller.resume(name)
    return "resumed"


def vm_rows(controller: Any) -> list[dict[str, str]]:
    """Rows for the VM table from ``controller.list()`` and ``controller.show()``.

    Args:
        controller: a :class:`hypervisor.vm.lifecycle.VMController`.

    Returns:
        One row per Omega VM, values formatted for display.

    Raises:
        LibvirtError: libvirt is unreachable.
    """
    rows = []
    for vm in controller.list():
        try:
            spec = controller.show(vm["name"])["spec"]
        except NotFoundError:
            continue  # deleted between list() and show()
        local = spec.get("local_memory")
        disks = spec.get("disks", [])
        rows.append({
            "name": vm["name"], "state": vm["state"], "vcpus": str(vm["vcpus"]),
            "memory": format_size(vm["memory"]),
            "local_memory": format_size(local) if local else "all",
            "accel": vm["accel"],
            "disks": ", ".join(d.get("export") or Path(d.get("path", "?")).name
                               for d in disks) or "-",
        })
    return rows


def serial_tail(log: Path, *, lines: int = SERIAL_TAIL_LINES) -> str:
    """The last ``lines`` lines of a serial log.

    Args:
        log: the VM's ``serial.log``.
        lines: how many lines.

    Returns:
        The text (carriage returns dropped).

    Raises:
        NotFoundError: the VM has no serial log yet (never started).
    """
    try:
        with log.open("r", errors="replace") as fh:
            tail = deque(fh, maxlen=lines)
    except FileNotFoundError as exc:
        raise NotFoundError(f"no serial log at {log} (VM never started?)") from exc
    return "".join(tail).replace("\r", "")


def dsm_stats(config: Config, name: str) -> dict[str, Any] | None:
    """What ``omega dsm stats NAME --json`` shows, or None for a VM without DSM.

    Args:
        config: Omega's configuration.
        name: the VM.

    Returns:
        The handler's stats dict, or None when the VM has no DSM settings.

    Raises:
        NotFoundError: the VM has DSM but no handler answers (VM not running).
    """
    from hypervisor.dsm.settings import DsmPaths
    from hypervisor.dsm.vmhook import handler_stats

    vmdir = config.vms_dir / name
    if not DsmPaths(vmdir).settings.exists():
        return None
    stats = handler_stats(vmdir)
    if stats is None:
        raise NotFoundError(f"no DSM handler answers for VM {name!r} (not running?)")
    return stats


def peer_rows(config: Config) -> list[dict[str, str]]:
    """Rows for the peers table from the cluster state database."""
    from hypervisor.clusterstate import ClusterState

    return [{"name": p.name, "address": p.address,
             "lends": f"RAM {format_size(p.memory_lend)}, disk {format_size(p.disk_lend)}",
             "state": p.state} for p in ClusterState(config).peers()]


def export_rows(config: Config) -> list[dict[str, str]]:
    """Rows for the netblock exports table from the export store."""
    from hypervisor.netblock.exports import ExportStore

    store = ExportStore(config)
    try:
        records = [(e, store.holder(e)) for e in store.list()]
    finally:
        store.close()
    return [{"name": e.name, "kind": e.kind, "size": format_size(e.size),
             "replicas": str(e.replicas) if e.kind == "replicated" else "-",
             "in_use_by": f"pid {holder}" if holder else "-"}
            for e, holder in records]


def host_facts(config: Config) -> dict[str, str]:
    """Accelerator (the probe's cached answer) and libvirt URI for the header."""
    from hypervisor.vm.accel import probe

    result = probe(config)
    return {"accel": result.accel, "reason": result.reason, "libvirt_uri": config.libvirt_uri}
