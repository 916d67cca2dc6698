"""A VM's life through the real CLI and libvirt: TOML spec, start, stop, destroy, delete."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from hypervisor.config import Config
from hypervisor.vm.lifecycle import VMController, VMStateError
from hypervisor.vm.spec import VMSpec
from tests.vm.conftest import defined_domains, encode_command, run_output, virsh
from tests.waiting import wait_for

NAME = "omega-test-v-life"


@contextmanager
def attached_console(name: str) -> Iterator[None]:
    """Hold the VM's serial console open, as a `virsh console` user would."""
    import libvirt

    conn = libvirt.open(Config.from_env().libvirt_uri)
    stream = conn.newStream(0)
    conn.lookupByName(name).openConsole(None, stream, 0)
    try:
        yield
    finally:
        try:
            stream.abort()
        except libvirt.libvirtError:
            pass
        conn.close()


def test_toml_vm_start_stop_destroy_delete_leaves_nothing(config, tiny_image, omega, tmp_path,
                                                          vm_cleanup):
    vm_cleanup.append(NAME)
    spec_file = tmp_path / "vm.toml"
    spec_file.write_text(f'name = "{NAME}"\nimage = "tiny"\nvcpus = 1\nmemory = "192M"\n'
                         f'disk_size = "16M"\n'
                         f'cmdline_extra = "{encode_command("cat /sys/block/vda/size")}"\n')
    out = omega("vm", "create", "--spec", str(spec_file), check=True).stdout
    assert f"created {NAME}" in out
    runtime = config.vms_dir / NAME
    assert (runtime / "scratch.img").stat().st_size == 16 << 20
    shown = json.loads(omega("vm", "show", NAME, "--json", check=True).stdout)
    assert shown["state"] == "shut-off" and shown["memory"] == 192 << 20

    started = omega("vm", "start", NAME, "--wait-ready", "--timeout", "180", check=True).stdout
    assert "OMEGA-GUEST-READY" in started and "mem_kb=" in started
    assert NAME in virsh("list", "--name").stdout.split()
    ran = omega("vm", "console", NAME, "--until", "OMEGA-RUN-END", "--timeout", "60")
    assert ran.returncode == 0, ran.stderr
    output, rc = run_output((runtime / "serial.log").read_text(errors="replace"))
    assert (output.strip(), rc) == (str((16 << 20) // 512), 0)

    # The tiny guest runs no ACPI daemon; stop also types `poweroff` on its console
    # and returns on libvirt's STOPPED event.
    stopped = omega("vm", "stop", NAME, "--timeout", "120", check=True).stdout
    assert f"{NAME} shut down" in stopped
    # virtlogd writes the log: QEMU's last line may land a moment after it exits.
    wait_for(lambda: "reboot: Power down" in (runtime / "serial.log").read_text(errors="replace"),
             timeout=15, what="the power-down line in serial.log")
    assert NAME not in virsh("list", "--name").stdout.split()
    assert NAME in defined_domains()

    omega("vm", "start", NAME, "--wait-ready", "--timeout", "300", check=True)
    refused = omega("vm", "delete", NAME)
    assert refused.returncode == 1 and "is running" in refused.stderr
    assert NAME in defined_domains()
    # With the console taken by someone else, only ACPI is tried: timeout, then destroy.
    with attached_console(NAME):
        stopped = omega("vm", "stop", NAME, "--timeout", "3", check=True).stdout
    assert "did not power off within 3s; destroyed" in stopped
    assert NAME not in virsh("list", "--name").stdout.split()

    omega("vm", "start", NAME, check=True)
    assert "destroyed" in omega("vm", "destroy", NAME, check=True).stdout
    assert "was not running" in omega("vm", "destroy", NAME, check=True).stdout

    omega("vm", "delete", NAME, check=True)
    assert NAME not in defined_domains()
    assert not runtime.exists()
    assert NAME not in omega("vm", "list", "--json", check=True).stdout


def test_stop_returns_on_the_stopped_event(config, tiny_image, vm_cleanup):
    """A guest that powers itself off during stop() ends it through libvirt's event."""
    name = "omega-test-v-poweroff"
    vm_cleanup.append(name)
    with VMController(config) as ctl:
        ctl.create(VMSpec(name=name, image="tiny",
                          cmdline_extra=encode_command("echo bye") + " omega.poweroff=1"))
        ctl.start(name)
        # Generous timeout: the guest boots and powers off well before it; if the
        # event were missed, stop() would report "destroyed".
        assert ctl.stop(name, timeout=240) == "shutdown"
        assert not ctl.is_active(name)
        assert ctl.stop(name) == "not-running"
        # The log stays readable after the guest is gone; waiting on it ends at once.
        assert ctl.wait_for_serial(name, r"^bye", timeout=5) == "bye"
        with pytest.raises(VMStateError, match="stopped before"):
            ctl.wait_for_serial(name, r"never-printed", timeout=60)
        ctl.delete(name)
    assert name not in defined_domains()


def test_force_delete_of_running_vm(config, tiny_image, omega, vm_cleanup):
    name = "omega-test-v-force"
    vm_cleanup.append(name)
    omega("vm", "create", name, "--image", "tiny", "--disk", "4M", "--start", check=True)
    assert name in virsh("list", "--name").stdout.split()
    omega("vm", "delete", name, "--force", check=True)
    assert name not in defined_domains()
    assert not (config.vms_dir / name).exists()


def test_vnc_memfd_vm_gets_its_socket(config, tiny_image, omega, tmp_path, vm_cleanup):
    """graphics=vnc: QEMU (as libvirt-qemu) creates vnc.sock in the runtime dir."""
    name = "omega-test-v-vnc"
    vm_cleanup.append(name)
    spec_file = tmp_path / "vnc.toml"
    spec_file.write_text(f'name = "{name}"\nimage = "tiny"\ngraphics = "vnc"\n'
                         f'memory_backing = "memfd-shared"\n')
    omega("vm", "create", "--spec", str(spec_file), "--start", check=True)
    shown = json.loads(omega("vm", "show", name, "--json", check=True).stdout)
    sock = config.vms_dir / name / "vnc.sock"
    assert shown["vnc_socket"] == str(sock)
    assert sock.is_socket()
    xml = virsh("dumpxml", name).stdout
    assert "<graphics type='vnc' socket=" in xml and "memfd" in xml
    omega("vm", "delete", "--force", name, check=True)
    assert name not in defined_domains()


def test_vnc_socket_path_too_long(config, tiny_image, omega, tmp_path):
    """A VNC socket path beyond sun_path's 107 bytes is refused before anything is made."""
    home = Path(tempfile.mkdtemp(prefix="omega-test-v-" + "h" * 40, dir="/var/tmp"))
    try:
        home.chmod(0o755)
        shutil.copytree(config.images_dir / tiny_image.digest,
                        home / "images" / tiny_image.digest)
        name = "omega-test-v-" + "x" * 51
        proc = omega("vm", "create", name, "--image", "tiny", "--graphics", "vnc",
                     env={"OMEGA_HOME": str(home)})
        assert proc.returncode == 2 and "longer than 107 bytes" in proc.stderr, proc.stderr
        assert name not in defined_domains()
        assert not (home / "vms" / name).exists()
    finally:
        shutil.rmtree(home, ignore_errors=True)


def test_suspend_resume_and_reboot_keep_qemu_running(config, tiny_image, omega, vm_cleanup):
    """suspend/resume pause and continue the vCPUs; reboot --hard resets the guest and
    reboot (ACPI, and `reboot` typed for the tiny guest) asks it; QEMU's pid stays."""
    name = "omega-test-v-reboot"
    vm_cleanup.append(name)
    omega("vm", "create", name, "--image", "tiny", "--memory", "192M", check=True)
    omega("vm", "start", name, "--wait-ready", "--timeout", "300", check=True)
    log = config.vms_dir / name / "serial.log"
    pid_file = Path("/run/libvirt/qemu") / f"{name}.pid"
    qemu_pid = pid_file.read_text().strip()

    assert omega("vm", "suspend", name, check=True).stdout.strip() == f"suspended {name}"
    assert virsh("domstate", name).stdout.strip() == "paused"
    shown = json.loads(omega("vm", "show", name, "--json", check=True).stdout)
    assert shown["state"] == "paused"
    cpu = shown["cpu_seconds"]
    time.sleep(1.0)  # a paused guest's vCPUs use no time at all
    assert json.loads(omega("vm", "show", name, "--json", check=True).stdout)["cpu_seconds"] == cpu
    assert "already paused" in omega("vm", "suspend", name, check=True).stdout
    assert omega("vm", "resume", name, check=True).stdout.strip() == f"resumed {name}"
    assert virsh("domstate", name).stdout.strip() == "running"
    assert "was not paused" in omega("vm", "resume", name, check=True).stdout

    markers = log.read_text(errors="replace").count("OMEGA-GUEST-READY")
    hard = omega("vm", "reboot", name, "--hard", "--wait-ready", "--timeout", "300", check=True)
    assert f"reset {name}" in hard.stdout and "OMEGA-GUEST-READY" in hard.stdout
    assert log.read_text(errors="replace").count("OMEGA-GUEST-READY") == markers + 1
    soft = omega("vm", "reboot", name, "--wait-ready", "--timeout", "300", check=True)
    assert f"asked to reboot {name}" in soft.stdout and "OMEGA-GUEST-READY" in soft.stdout
    text = log.read_text(errors="replace")
    assert text.count("OMEGA-GUEST-READY") == markers + 2
    assert "reboot: Restarting system" in text
    assert pid_file.read_text().strip() == qemu_pid  # the same QEMU all along

    omega("vm", "destroy", name, check=True)
    for verb in ("suspend", "resume", "reboot"):
        refused = omega("vm", verb, name)
        assert refused.returncode == 1 and "is not running" in refused.stderr, refused.stderr
    omega("vm", "delete", name, check=True)
