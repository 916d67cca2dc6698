"""Time from `omega vm start` to the guest's marker line, against `virsh create`.

Anchor: ``virsh create`` of the same domain XML (a transient copy of the Omega
domain under another name, with its own serial log and scratch disk). Both are
timed the same way, from launching the command to the moment the marker line
``OMEGA-GUEST-READY`` appears in the domain's serial log, in alternating rounds
in the same run (ABBA: omega goes first in rounds 1, 4, 5, 8, ...). Reported:
per-round times, medians, the median of the per-round ratios omega/virsh
(target <= 1.05), and how long each command took to return (the part Omega
adds; the boot after it is QEMU's and the guest's).

Usage::

    .venv/bin/python benchmarks/vm_start.py [--rounds 6] [--markdown]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from hypervisor.config import Config  # noqa: E402
from hypervisor.vm.lifecycle import VMController  # noqa: E402
from hypervisor.vm.spec import VMSpec  # noqa: E402

MARKER = b"OMEGA-GUEST-READY"
OMEGA_VM = "omega-bench-v-omega"
ANCHOR_VM = "omega-bench-v-virsh"


def wait_for_marker(log: Path, *, timeout: float = 300) -> float:
    """Poll a serial log every 5 ms until the marker appears.

    Args:
        log: the serial log file.
        timeout: seconds before giving up.

    Returns:
        ``time.monotonic()`` when the marker was seen.

    Raises:
        TimeoutError: no marker in time.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if MARKER in log.read_bytes():
                return time.monotonic()
        except FileNotFoundError:
            pass
        time.sleep(0.005)
    raise TimeoutError(f"no marker in {log} within {timeout}s")


def anchor_xml(omega_xml: str, anchor_dir: Path, omega_dir: Path) -> str:
    """The Omega domain's XML as a transient domain: new name, no UUID, own files."""
    xml = re.sub(r"<uuid>[^<]*</uuid>\s*", "", omega_xml)
    xml = xml.replace(f"<name>{OMEGA_VM}</name>", f"<name>{ANCHOR_VM}</name>")
    return xml.replace(str(omega_dir), str(anchor_dir))


def run_omega_round(omega: list[str], log: Path) -> tuple[float, float]:
    """Returns (launch → marker, launch → command returned) in seconds."""
    start = time.monotonic()
    subprocess.run([*omega, "vm", "start", OMEGA_VM], check=True, capture_output=True)
    returned = time.monotonic() - start
    took = wait_for_marker(log) - start
    subprocess.run([*omega, "vm", "destroy", OMEGA_VM], check=True, capture_output=True)
    return took, returned


def run_virsh_round(uri: str, xml_file: Path, log: Path) -> tuple[float, float]:
    """Returns (launch → marker, launch → command returned) in seconds."""
    start = time.monotonic()
    subprocess.run(["virsh", "-c", uri, "create", str(xml_file)], check=True,
                   capture_output=True)
    returned = time.monotonic() - start
    took = wait_for_marker(log) - start
    subprocess.run(["virsh", "-c", uri, "destroy", ANCHOR_VM], check=True, capture_output=True)
    return took, returned


def main() -> int:
    """Run the benchmark and print a table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6, help="rounds of each (default 6)")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args = parser.parse_args()

    home = Path(tempfile.mkdtemp(prefix="omega-bench-v-", dir="/var/tmp"))
    home.chmod(0o755)
    config = Config.from_env({"OMEGA_HOME": str(home),
                              "OMEGA_LIBVIRT_URI": Config.from_env().libvirt_uri,
                              "OMEGA_ACCEL": Config.from_env().accel or ""})
    config.ensure()
    omega = [sys.executable, "-m", "hypervisor.cli"]
    env_omega = ["env", f"OMEGA_HOME={home}", f"OMEGA_LIBVIRT_URI={config.libvirt_uri}"]
    if config.accel:
        env_omega.append(f"OMEGA_ACCEL={config.accel}")
    omega = [*env_omega, *omega]
    anchor_dir = home / "anchor"
    anchor_dir.mkdir(mode=0o755)
    ctl = VMController(config)
    try:
        from images.store import ImageStore

        ImageStore(config).build("tiny")
        ctl.create(VMSpec(name=OMEGA_VM, image="tiny", vcpus=1, memory=256 << 20,
                          disk_size=16 << 20))
        omega_dir = ctl.runtime_dir(OMEGA_VM).path
        shutil.copy(omega_dir / "scratch.img", anchor_dir / "scratch.img")
        shutil.copystat(omega_dir, anchor_dir)
        shutil.chown(anchor_dir, omega_dir.stat().st_uid, omega_dir.stat().st_gid)
        xml = subprocess.run(["virsh", "-c", config.libvirt_uri, "dumpxml", OMEGA_VM],
                             check=True, capture_output=True, text=True).stdout
        xml_file = home / "anchor.xml"
        xml_file.write_text(anchor_xml(xml, anchor_dir, omega_dir))
        accel = ctl.show(OMEGA_VM)["accel"]

        rows: list[tuple[int, float, float, float, float]] = []
        for i in range(args.rounds):
            # ABBA: alternate which goes first so drift hurts both alike.
            if i % 4 in (0, 3):
                o = run_omega_round(omega, omega_dir / "serial.log")
                v = run_virsh_round(config.libvirt_uri, xml_file, anchor_dir / "serial.log")
            else:
                v = run_virsh_round(config.libvirt_uri, xml_file, anchor_dir / "serial.log")
                o = run_omega_round(omega, omega_dir / "serial.log")
            rows.append((i + 1, o[0], v[0], o[1], v[1]))
            print(f"round {i + 1}: marker omega {o[0]:.3f}s virsh {v[0]:.3f}s "
                  f"ratio {o[0] / v[0]:.3f}; command omega {o[1]:.3f}s virsh {v[1]:.3f}s",
                  file=sys.stderr)
    finally:
        subprocess.run(["virsh", "-c", config.libvirt_uri, "destroy", ANCHOR_VM],
                       capture_output=True)
        try:
            ctl.delete(OMEGA_VM, force=True)
        except Exception as exc:  # noqa: BLE001 - report, keep cleaning
            print(f"cleanup: {exc}", file=sys.stderr)
        ctl.close()
        shutil.rmtree(home, ignore_errors=True)

    omega_med = statistics.median(r[1] for r in rows)
    virsh_med = statistics.median(r[2] for r in rows)
    ratio_med = statistics.median(r[1] / r[2] for r in rows)
    cmd_omega = statistics.median(r[3] for r in rows)
    cmd_virsh = statistics.median(r[4] for r in rows)
    load = os.getloadavg()[0]
    if args.markdown:
        print(f"accelerator: {accel}; load average at the end: {load:.1f} on "
              f"{os.cpu_count()} CPUs\n")
        print("| round | omega vm start → marker (s) | virsh create → marker (s) | ratio "
              "| omega vm start returns (s) | virsh create returns (s) |")
        print("|---|---|---|---|---|---|")
        for n, o, v, oc, vc in rows:
            print(f"| {n} | {o:.3f} | {v:.3f} | {o / v:.3f} | {oc:.3f} | {vc:.3f} |")
        print(f"| **median** | **{omega_med:.3f}** | **{virsh_med:.3f}** | **{ratio_med:.3f}** "
              f"| **{cmd_omega:.3f}** | **{cmd_virsh:.3f}** |")
    else:
        print(f"accelerator {accel}; {args.rounds} rounds; load {load:.1f}")
        print(f"to marker: median omega {omega_med:.3f}s  virsh {virsh_med:.3f}s  "
              f"median ratio {ratio_med:.3f} (target <= 1.05)")
        print(f"command returns: median omega {cmd_omega:.3f}s  virsh {cmd_virsh:.3f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
