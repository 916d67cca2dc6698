"""`omega demo` end to end: builds the image, boots the VM, prints the marker, leaves it running."""

from __future__ import annotations

import re
import subprocess
import urllib.request

from tests.vm.conftest import defined_domains, virsh

NAME = "omega-test-v-demo"
LISTEN = "127.0.0.1:19190"


def _peer_processes(config) -> list[str]:
    out = subprocess.run(["pgrep", "-af", "node serve"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if str(config.home) in line]


def test_demo_boots_and_down_removes(config, tiny_image, omega, vm_cleanup):
    vm_cleanup.append(NAME)
    first = omega("demo", "--name", NAME, "--listen", LISTEN, check=True)
    assert "OMEGA-GUEST-READY mem_kb=" in first.stdout  # the streamed console
    # The main job: peers lend RAM (dsm) and a replicated disk, the desktop is served.
    assert "replicas on peers" in first.stderr
    assert "the rest lent by peers" in first.stderr
    # ... and the guest's memory test really put part of its RAM there.
    assert "OMEGA-MEMTEST ok=1" in first.stdout
    lent = re.search(r"guest RAM: \d+ MiB resident here, (\d+) MiB on peers", first.stderr)
    assert lent and int(lent.group(1)) > 0, first.stderr
    url = next(w for w in first.stdout.split() if w.startswith(f"http://{LISTEN}/#token="))
    with urllib.request.urlopen(url.split("#")[0], timeout=30) as page:
        assert page.status == 200 and b"<video" in page.read()
    assert f"omega vm console {NAME}" in first.stdout
    assert f"virsh console {NAME}" in first.stdout
    assert NAME in virsh("list", "--name").stdout.split()
    uuid = virsh("domuuid", NAME).stdout.strip()

    again = omega("demo", "--name", NAME, "--listen", LISTEN, check=True)  # replaces it
    assert "removed the previous" in again.stderr
    assert virsh("domuuid", NAME).stdout.strip() != uuid

    down = omega("demo", "--down", "--name", NAME, check=True)
    assert f"{NAME} removed" in down.stdout
    assert NAME not in defined_domains()
    assert not (config.vms_dir / NAME).exists()
    if "stopped the local cluster" in down.stderr:  # the demo started it: nothing left
        assert not _peer_processes(config)
