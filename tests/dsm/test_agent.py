"""The QEMU agent under a bare qemu-system-x86_64 (no libvirt): it hands guest
RAM to a handler and the guest boots from it; with no handler, QEMU stops
with a message naming the socket instead of running the guest unbacked.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time

from hypervisor.dsm.settings import DsmPaths, DsmSettings
from tests.dsm.conftest import AGENT, REPO

QEMU = "qemu-system-x86_64"


def qemu_cmd(image, *, mem_mb: int, append: str) -> list[str]:
    return [QEMU, "-accel", "tcg", "-m", f"{mem_mb}M", "-object",
            f"memory-backend-memfd,share=on,size={mem_mb}M,id=m", "-machine",
            "pc,memory-backend=m", "-kernel", str(image.kernel), "-initrd", str(image.initrd),
            "-append", f"{image.cmdline} {append}", "-nographic", "-no-reboot", "-nodefaults",
            "-serial", "stdio"]


def test_no_handler_means_qemu_exits_with_the_reason(tmp_path, tiny_image):
    sock = tmp_path / "nobody.sock"
    proc = subprocess.run(qemu_cmd(tiny_image, mem_mb=128, append=""), capture_output=True,
                          text=True, timeout=60,
                          env={"LD_PRELOAD": str(AGENT), "OMEGA_DSM_SOCKET": str(sock),
                               "OMEGA_DSM_CONNECT_TIMEOUT_MS": "1500",
                               "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 1
    assert f"no DSM handler on {sock}" in proc.stderr
    assert "refusing to start the guest unbacked" in proc.stderr
    assert "OMEGA-GUEST-READY" not in proc.stdout


def test_bare_qemu_guest_runs_memtest_with_most_ram_evicted(config, tiny_image):
    import base64

    vmdir = config.vms_dir / "omega-test-d-bare"
    vmdir.mkdir(parents=True, exist_ok=True)
    paths = DsmPaths(vmdir)
    DsmSettings(vm_name="omega-test-d-bare", vm_id="vm-bare", memory=256 << 20,
                local_memory=64 << 20, slack=4 << 20, store="memory").save(paths.settings)
    handler = subprocess.Popen([sys.executable, "-m", "hypervisor.cli", "dsm", "handler",
                                "omega-test-d-bare"], cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=open(vmdir / "handler.log", "wb"))
    try:
        deadline = time.monotonic() + 20
        while not paths.control_socket.exists():
            assert handler.poll() is None and time.monotonic() < deadline, \
                (vmdir / "handler.log").read_text()
            time.sleep(0.05)
        run = base64.b64encode(b"memtest 160").decode()
        proc = subprocess.run(qemu_cmd(tiny_image, mem_mb=256,
                                       append=f"omega.run={run} omega.poweroff=1"),
                              capture_output=True, text=True, timeout=400,
                              env={"LD_PRELOAD": str(AGENT),
                                   "OMEGA_DSM_SOCKET": str(paths.agent_socket),
                                   "PATH": "/usr/bin:/bin"})
        assert "handed to the DSM handler" in proc.stderr
        m = re.search(r"OMEGA-MEMTEST ok=(\d) mib=(\d+) errors=(\d+)", proc.stdout)
        assert m and m.groups() == ("1", "160", "0"), proc.stdout[-2000:]
        from hypervisor.dsm.control import control_request

        st = control_request(paths.control_socket, {"op": "stats"})["stats"]
        assert st["max_file_resident_bytes"] <= (64 + 4) << 20
        assert st["evicted_pages"] > (100 << 20) // 4096
    finally:
        handler.terminate()
        handler.wait(timeout=20)
