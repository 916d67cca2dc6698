"""Boot the tiny image with plain QEMU (TCG) and check the guest contract."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from images.store import Image
from tests.images._qemu import boot_tiny

pytestmark = [pytest.mark.slow]


def test_marker_and_framed_run_output(tiny_image: Image, tmp_path: Path) -> None:
    disk = tmp_path / "disk.raw"
    subprocess.run(["truncate", "-s", "8M", str(disk)], check=True)
    command = ("omega-hello; echo sum=$((2+3)); lsmod | cut -d' ' -f1 | sort | tr '\\n' ' '; "
               "echo; echo vda=$(cat /sys/block/vda/size); "
               "grep -c ' /dev/pts ' /proc/mounts; printf no-newline; exit 3")
    run = boot_tiny(tiny_image, command=command, cpus=2, memory_mb=192,
                    extra=["-drive", f"file={disk},format=raw,if=virtio",
                           "-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0"])
    assert run.cpus == 2
    # MemTotal is RAM minus what the kernel reserves: below 192 MiB, well above half of it.
    assert 96 * 1024 < run.mem_kb < 192 * 1024
    assert run.rc == 3
    lines = run.output.splitlines()
    assert lines[0].startswith("omega-hello kernel=6.") and "-amd64" in lines[0]
    assert "sum=5" in lines
    modules = set(lines[2].split())
    assert {"virtio_pci", "virtio_blk", "virtio_net", "virtio_console"} <= modules
    assert "vda=16384" in lines  # 8 MiB in 512-byte sectors: virtio_blk found the disk
    assert lines[4] == "1"
    assert lines[5] == "no-newline"  # the end marker still starts its own line
    assert run.serial.index("OMEGA-GUEST-READY") < run.serial.index("OMEGA-RUN-BEGIN")


def test_bad_base64_run_is_reported_and_guest_still_powers_off(tiny_image: Image) -> None:
    run = boot_tiny(tiny_image, raw_run="!!not-base64!!")
    assert run.rc == 127
    assert "omega.run is not valid base64" in run.output
    assert run.mem_kb > 0 and run.cpus == 1
