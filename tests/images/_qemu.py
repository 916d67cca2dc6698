"""Boot an image with plain QEMU (TCG) and read the tiny guest's serial output."""

from __future__ import annotations

import base64
import re
import subprocess
from dataclasses import dataclass

from images.store import Image

BOOT_TIMEOUT_S = 240  # generous: TCG on a 2-core machine shared with other tests

MARKER = re.compile(r"OMEGA-GUEST-READY mem_kb=(\d+) cpus=(\d+)")
RUN = re.compile(r"OMEGA-RUN-BEGIN\r?\n(.*?)OMEGA-RUN-END rc=(\d+)", re.S)


@dataclass(frozen=True)
class GuestRun:
    """What one poweroff boot printed on its serial port."""

    serial: str
    mem_kb: int
    cpus: int
    output: str
    rc: int


def boot_tiny(image: Image, *, command: str | None = None, raw_run: str | None = None,
              cpus: int = 1, memory_mb: int = 128, extra: list[str] | None = None) -> GuestRun:
    """Boot under TCG with ``omega.poweroff=1`` and parse the serial output.

    Args:
        image: the image to boot.
        command: shell command for ``omega.run`` (base64-encoded here).
        raw_run: the literal ``omega.run`` value instead (to send bad input).
        cpus: -smp.
        memory_mb: -m.
        extra: more QEMU arguments (disks, NICs).

    Returns:
        The parsed run.
    """
    append = f"{image.cmdline} panic=-1 omega.poweroff=1"
    if command is not None:
        append += " omega.run=" + base64.b64encode(command.encode()).decode()
    elif raw_run is not None:
        append += f" omega.run={raw_run}"
    argv = ["qemu-system-x86_64", "-accel", "tcg", "-m", str(memory_mb), "-smp", str(cpus),
            "-nodefaults", "-display", "none", "-no-reboot", "-serial", "stdio",
            "-kernel", str(image.kernel), "-initrd", str(image.initrd), "-append", append,
            *(extra or [])]
    proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True,
                          timeout=BOOT_TIMEOUT_S)
    serial = proc.stdout.decode(errors="replace")
    assert proc.returncode == 0, f"QEMU exited {proc.returncode}: {proc.stderr[-2000:]!r}"
    markers = MARKER.findall(serial)
    assert len(markers) == 1, f"expected exactly one marker line:\n{serial[-3000:]}"
    run = RUN.search(serial)
    output, rc = (run.group(1).replace("\r\n", "\n"), int(run.group(2))) if run else ("", -1)
    return GuestRun(serial=serial, mem_kb=int(markers[0][0]), cpus=int(markers[0][1]),
                    output=output, rc=rc)
