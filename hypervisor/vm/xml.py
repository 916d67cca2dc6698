"""A :class:`VMSpec` and its image → libvirt domain XML (ElementTree).

The domain is an ordinary libvirt domain so ``virsh`` and virt-manager can
manage it: direct kernel boot of the image, the first serial port on a pty
(``virsh console``) that libvirt also logs to ``serial.log``, power-off ends the
domain, and the spec rides along as JSON in ``<metadata>`` so Omega can recover
it from libvirt alone.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import TYPE_CHECKING

from hypervisor.errors import SpecError
from hypervisor.vm.runtime import VMRuntimeDir
from hypervisor.vm.spec import OMEGA_XMLNS, VMSpec

if TYPE_CHECKING:
    from images.store import Image

QEMU_XMLNS = "http://libvirt.org/schemas/domain/qemu/1.0"
ET.register_namespace("qemu", QEMU_XMLNS)
ET.register_namespace("omega", OMEGA_XMLNS)

#: libvirt's domain type per accelerator.
DOMAIN_TYPES = {"kvm": "kvm", "tcg": "qemu"}


def domain_xml(spec: VMSpec, image: Image, *, accel: str, runtime: VMRuntimeDir,
               nbd_socket: Path | None = None) -> str:
    """Build the domain XML for ``spec``.

    Args:
        spec: a validated spec (hooks have already run ``prepare`` on it).
        image: the resolved image (kernel, initrd, default command line).
        accel: ``kvm`` or ``tcg``.
        runtime: the VM's runtime directory (serial log, scratch disk, sockets).
        nbd_socket: NBD server socket for netblock disks that name none.

    Returns:
        The XML text.

    Raises:
        SpecError: ``accel`` is unknown, or a netblock disk has no socket.
    """
    if accel not in DOMAIN_TYPES:
        raise SpecError(f"accel: {accel!r} is not one of {', '.join(DOMAIN_TYPES)}")
    dom = ET.Element("domain", {"type": DOMAIN_TYPES[accel]})
    ET.SubElement(dom, "name").text = spec.name
    meta = ET.SubElement(dom, "metadata")
    ET.SubElement(meta, f"{{{OMEGA_XMLNS}}}vm").text = spec.to_json()
    ET.SubElement(dom, "memory", {"unit": "KiB"}).text = str(spec.memory // 1024)
    ET.SubElement(dom, "currentMemory", {"unit": "KiB"}).text = str(spec.memory // 1024)
    if spec.memory_backing == "memfd-shared":
        backing = ET.SubElement(dom, "memoryBacking")
        ET.SubElement(backing, "source", {"type": "memfd"})
        ET.SubElement(backing, "access", {"mode": "shared"})
    ET.SubElement(dom, "vcpu", {"placement": "static"}).text = str(spec.vcpus)

    os_el = ET.SubElement(dom, "os")
    ET.SubElement(os_el, "type", {"arch": "x86_64", "machine": "pc"}).text = "hvm"
    ET.SubElement(os_el, "kernel").text = str(image.kernel)
    ET.SubElement(os_el, "initrd").text = str(image.initrd)
    ET.SubElement(os_el, "cmdline").text = " ".join(
        part for part in (image.cmdline.strip(), spec.cmdline_extra.strip()) if part)

    features = ET.SubElement(dom, "features")
    ET.SubElement(features, "acpi")
    if accel == "kvm":
        ET.SubElement(dom, "cpu", {"mode": "host-passthrough", "check": "none"})
    ET.SubElement(dom, "clock", {"offset": "utc"})
    ET.SubElement(dom, "on_poweroff").text = "destroy"
    ET.SubElement(dom, "on_reboot").text = "restart"
    ET.SubElement(dom, "on_crash").text = "destroy"

    devices = ET.SubElement(dom, "devices")
    _add_disks(devices, spec, runtime, nbd_socket)
    if spec.graphics == "none":
        ET.SubElement(devices, "controller", {"type": "usb", "model": "none"})
    _add_serial(devices, runtime)
    if spec.graphics == "vnc":
        ET.SubElement(devices, "input", {"type": "tablet", "bus": "usb"})
        ET.SubElement(devices, "graphics", {"type": "vnc", "socket": str(runtime.vnc_socket)})
        video = ET.SubElement(devices, "video")
        ET.SubElement(video, "model", {"type": "vga", "vram": "16384", "heads": "1",
                                       "primary": "yes"})
    ET.SubElement(devices, "memballoon", {"model": "none"})

    if spec.run_as_root:
        seclabel = ET.SubElement(dom, "seclabel", {"type": "static", "model": "dac",
                                                  "relabel": "no"})
        ET.SubElement(seclabel, "label").text = "+0:+0"

    if spec.qemu_args or spec.qemu_env:
        cmd = ET.SubElement(dom, f"{{{QEMU_XMLNS}}}commandline")
        for arg in spec.qemu_args:
            ET.SubElement(cmd, f"{{{QEMU_XMLNS}}}arg", {"value": arg})
        for key, value in sorted(spec.qemu_env.items()):
            ET.SubElement(cmd, f"{{{QEMU_XMLNS}}}env", {"name": key, "value": value})

    ET.indent(dom)
    return ET.tostring(dom, encoding="unicode")


def _add_disks(devices: ET.Element, spec: VMSpec, runtime: VMRuntimeDir,
               nbd_socket: Path | None) -> None:
    targets = iter(f"vd{chr(ord('a') + i)}" for i in range(26))
    if spec.disk_size:
        disk = ET.SubElement(devices, "disk", {"type": "file", "device": "disk"})
        ET.SubElement(disk, "driver", {"name": "qemu", "type": "raw", "cache": "none",
                                       "discard": "unmap"})
        ET.SubElement(disk, "source", {"file": str(runtime.scratch_disk)})
        ET.SubElement(disk, "target", {"dev": next(targets), "bus": "virtio"})
    for i, extra in enumerate(spec.disks):
        if extra.kind == "file":
            disk = ET.SubElement(devices, "disk", {"type": "file", "device": "disk"})
            ET.SubElement(disk, "driver", {"name": "qemu", "type": "raw"})
            ET.SubElement(disk, "source", {"file": str(extra.path)})
        else:
            socket = extra.socket or nbd_socket
            if socket is None:
                raise SpecError(f"disks[{i}]: netblock export {extra.export!r} has no NBD "
                                f"socket (is the netblock server configured?)")
            disk = ET.SubElement(devices, "disk", {"type": "network", "device": "disk"})
            ET.SubElement(disk, "driver", {"name": "qemu", "type": "raw", "cache": "none"})
            source = ET.SubElement(disk, "source", {"protocol": "nbd",
                                                    "name": extra.export or ""})
            ET.SubElement(source, "host", {"transport": "unix", "socket": str(socket)})
        ET.SubElement(disk, "target", {"dev": next(targets), "bus": "virtio"})
        if extra.readonly:
            ET.SubElement(disk, "readonly")


def _add_serial(devices: ET.Element, runtime: VMRuntimeDir) -> None:
    serial = ET.SubElement(devices, "serial", {"type": "pty"})
    # append='off': each boot starts a fresh log, so a marker found there is from this boot.
    ET.SubElement(serial, "log", {"file": str(runtime.serial_log), "append": "off"})
    ET.SubElement(serial, "target", {"type": "isa-serial", "port": "0"})
    console = ET.SubElement(devices, "console", {"type": "pty"})
    ET.SubElement(console, "target", {"type": "serial", "port": "0"})
