"""`omega demo` end to end: builds the image, boots the VM, prints the marker, leaves it running."""

from __future__ import annotations

from tests.vm.conftest import defined_domains, virsh

NAME = "omega-test-v-demo"


def test_demo_boots_and_down_removes(config, tiny_image, omega, vm_cleanup):
    vm_cleanup.append(NAME)
    first = omega("demo", "--name", NAME, check=True)
    assert "OMEGA-GUEST-READY mem_kb=" in first.stdout  # the streamed console
    assert f"omega vm console {NAME}" in first.stdout
    assert f"virsh console {NAME}" in first.stdout
    assert NAME in virsh("list", "--name").stdout.split()
    uuid = virsh("domuuid", NAME).stdout.strip()

    again = omega("demo", "--name", NAME, check=True)  # replaces the previous demo VM
    assert "removed the previous" in again.stderr
    assert virsh("domuuid", NAME).stdout.strip() != uuid

    down = omega("demo", "--down", "--name", NAME, check=True)
    assert f"{NAME} removed" in down.stdout
    assert NAME not in defined_domains()
    assert not (config.vms_dir / NAME).exists()
