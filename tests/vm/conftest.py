"""Fixtures for the VM tests: a real libvirtd and QEMU (TCG here) booting the tiny guest.

Every domain is named ``omega-test-v-*``. Boots are slow under TCG, so one
guest (``booted_vm``) is shared by every read-only test of the session; tests
that change a VM's life create their own and :func:`vm_cleanup` removes it
whatever happens.
"""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from hypervisor.config import Config
from hypervisor.errors import NotFoundError
from hypervisor.vm.lifecycle import VMController
from hypervisor.vm.spec import VMSpec

#: The command the shared guest runs at boot, and what it prints.
GUEST_COMMAND = "echo guest-says-$((6*7)); grep -c ^processor /proc/cpuinfo; ls /dev/vda"


def virsh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run the real ``virsh`` against the session's libvirt URI."""
    uri = Config.from_env().libvirt_uri
    return subprocess.run(["virsh", "-c", uri, *args], capture_output=True, text=True,
                          check=check, timeout=60)


def defined_domains() -> set[str]:
    """Names of every domain libvirt knows, running or not (``virsh list --all``)."""
    out = virsh("list", "--all", "--name").stdout
    return {line.strip() for line in out.splitlines() if line.strip()}


def run_output(serial_text: str) -> tuple[str, int]:
    """Extract the output and exit status of the guest's omega.run command."""
    m = re.search(r"OMEGA-RUN-BEGIN\r?\n(.*?)OMEGA-RUN-END rc=(\d+)", serial_text, re.S)
    assert m, f"no framed run output in serial log:\n{serial_text[-2000:]}"
    return m.group(1).replace("\r", ""), int(m.group(2))


def encode_command(command: str) -> str:
    """Kernel-argument form of a guest command (``omega.run=<base64>``)."""
    return "omega.run=" + base64.b64encode(command.encode()).decode()


@pytest.fixture(scope="session")
def controller(config: Config, tiny_image) -> Iterator[VMController]:
    """A VM controller on the session's OMEGA_HOME (with the tiny image built)."""
    ctl = VMController(config)
    yield ctl
    ctl.close()


def force_remove(controller: VMController, name: str) -> None:
    """Remove a test VM whatever state it is in (and its runtime dir)."""
    try:
        controller.delete(name, force=True)
    except NotFoundError:
        pass
    shutil.rmtree(controller.runtime_dir(name).path, ignore_errors=True)


@pytest.fixture
def vm_cleanup(controller: VMController) -> Iterator[list[str]]:
    """A list to append VM names to; each is removed after the test."""
    names: list[str] = []
    yield names
    for name in names:
        force_remove(controller, name)


@dataclass
class BootedVM:
    """The shared running guest.

    Attributes:
        name: domain name.
        marker: its OMEGA-GUEST-READY line.
        serial_log: the serial log file.
    """

    name: str
    marker: str
    serial_log: Path


@pytest.fixture(scope="session")
def booted_vm(controller: VMController) -> Iterator[BootedVM]:
    """One guest booted for the session (2 vCPUs, a 32M scratch disk, a boot command)."""
    name = "omega-test-v-shared"
    force_remove(controller, name)
    spec = VMSpec(name=name, image="tiny", vcpus=2, memory=256 << 20, disk_size=32 << 20,
                  cmdline_extra=encode_command(GUEST_COMMAND))
    controller.create(spec)
    try:
        controller.start(name)
        marker = controller.wait_for_serial(name, r"OMEGA-GUEST-READY", timeout=180)
        controller.wait_for_serial(name, r"OMEGA-RUN-END", timeout=120)
        yield BootedVM(name=name, marker=marker,
                       serial_log=controller.runtime_dir(name).serial_log)
    finally:
        force_remove(controller, name)
