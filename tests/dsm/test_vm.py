"""Done-when tests: a real tiny guest (libvirt + QEMU, agent preloaded) with
512 MiB of RAM of which 128 MiB stays on this host runs memtest over 400 MiB,
with the rest on real peers; again with a peer killed and with the handler
killed mid-run; and a VM whose handler cannot start does not run at all.
"""

from __future__ import annotations

import os
import re
import signal
import time

import pytest

from tests.dsm.conftest import create_dsm_vm, omega_cli
from tests.waiting import wait_for

pytestmark = [pytest.mark.libvirt, pytest.mark.slow, pytest.mark.timeout(1200)]

MEMTEST = "memtest 400"
RESULT = r"OMEGA-MEMTEST ok=(\d) mib=(\d+) errors=(\d+)"
TARGET = 128 << 20
MEMTEST_TIMEOUT = 900  # generous: the box is shared and TCG is slow


def assert_memtest_passed(vm) -> None:
    m = vm.wait_serial(RESULT, timeout=MEMTEST_TIMEOUT)
    assert m.groups() == ("1", "400", "0"), m.group(0)


def assert_resident_bounded(stats: dict) -> None:
    bound = stats["target_bytes"] + stats["slack_bytes"]
    assert stats["target_bytes"] == TARGET
    assert 0 < stats["max_file_resident_bytes"] <= bound, stats
    # Real paging happened: most of the 400 MiB went to peers and came back.
    assert stats["evicted_pages"] * 4096 >= (400 << 20) - TARGET
    assert stats["fetched_pages"] > 0


def wait_pages_freed(cluster, vm_id: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        held = {p: [ns for ns in spaces if ns[0] == vm_id and ns[1]]
                for p, spaces in cluster.namespaces().items()}
        if not any(held.values()):
            return
        time.sleep(0.5)
    raise AssertionError(f"pages of {vm_id} still on peers: {held}")


def vm_id_of(vm) -> str:
    import json

    return json.loads((vm.vmdir / "dsm.json").read_text())["vm_id"]


def test_memtest_400m_with_128m_local(config, cluster, dsm_vms):
    vm, proc = create_dsm_vm(config, dsm_vms, "omega-test-d-memtest", memory="512M",
                             local_memory="128M", command=MEMTEST, env=cluster.env)
    assert proc.returncode == 0, proc.stderr
    vm_id = vm_id_of(vm)
    samples: list[int] = []

    def watch() -> None:
        st = vm.stats()
        if st and st.get("serving"):
            samples.append(st["file_resident_bytes"])

    vm.wait_serial(r"memtest: wrote", timeout=MEMTEST_TIMEOUT, watch=watch)
    # While it runs, peers hold its pages (R=2 over the three peers).
    st = wait_for(vm.stats, timeout=30, what="the handler's stats")
    assert st and st["remote_bytes"] > 200 << 20, st
    assert len(st["pages_per_peer"]) == 3 and all(v > 0 for v in st["pages_per_peer"].values())
    assert_memtest_passed(vm)
    st = wait_for(vm.stats, timeout=30, what="the handler's stats")
    assert_resident_bounded(st)
    assert max(samples) <= st["target_bytes"] + st["slack_bytes"]
    # The reads came back through the native fetch path (C readers and workers).
    assert st["native_fetches"] + st["native_prefetched"] > 50_000, st
    shown = omega_cli("vm", "show", vm.name, env=vm.env)
    assert "dsm:" in shown.stdout
    # The guest powered off: its pages are freed on every peer.
    wait_pages_freed(cluster, vm_id)


def test_memtest_survives_a_peer_killed_mid_run(config, cluster, dsm_vms):
    vm, proc = create_dsm_vm(config, dsm_vms, "omega-test-d-peerkill", memory="512M",
                             local_memory="128M", command=MEMTEST, env=cluster.env)
    assert proc.returncode == 0, proc.stderr
    victim = cluster.peers[0]
    killed_at: list[int] = []

    def watch() -> None:
        st = vm.stats()
        if not killed_at and st and st.get("remote_bytes", 0) > 150 << 20:
            victim.kill()
            killed_at.append(st["remote_bytes"])

    vm.wait_serial(RESULT, timeout=MEMTEST_TIMEOUT, watch=watch)
    assert killed_at, "the run ended before a peer could be killed"
    assert_memtest_passed(vm)
    st = wait_for(vm.stats, timeout=30, what="the handler's stats")
    assert_resident_bounded(st)
    assert victim.name in st["dead_peers"]
    assert st["rereplicated_pages"] > 0, "pages of the dead peer were not re-replicated"


def test_a_reset_guest_runs_again_on_ram_lent_by_peers(config, cluster, dsm_vms):
    """`omega vm reboot --hard` resets the guest inside the same QEMU: the handler
    keeps serving, and the rebooted guest's memtest passes on RAM mostly on peers."""
    vm, proc = create_dsm_vm(config, dsm_vms, "omega-test-d-reset", memory="384M",
                             local_memory="128M", command="memtest 200 && sleep 900",
                             env=cluster.env)
    assert proc.returncode == 0, proc.stderr
    first = vm.wait_serial(RESULT, timeout=MEMTEST_TIMEOUT)
    assert first.groups() == ("1", "200", "0"), first.group(0)
    before = wait_for(vm.stats, timeout=30, what="the handler's stats")
    handler = (vm.vmdir / "dsm-handler.pid").read_text()
    seen = len(vm.serial())
    rebooted = omega_cli("vm", "reboot", vm.name, "--hard", "--wait-ready", "--timeout", "300",
                         env=vm.env)
    assert rebooted.returncode == 0, rebooted.stderr
    deadline = time.monotonic() + MEMTEST_TIMEOUT
    while not (m := re.search(RESULT, vm.serial()[seen:])):
        assert time.monotonic() < deadline, vm.serial()[-1500:]
        time.sleep(0.5)
    assert m.groups() == ("1", "200", "0"), m.group(0)
    after = wait_for(vm.stats, timeout=30, what="the handler's stats")
    assert (vm.vmdir / "dsm-handler.pid").read_text() == handler  # the same handler
    assert after["serving"] and after["errors"] == 0
    assert after["evicted_pages"] > before["evicted_pages"]
    assert after["fetched_pages"] > before["fetched_pages"]
    assert after["max_file_resident_bytes"] <= TARGET + after["slack_bytes"], after


def test_memtest_survives_the_handler_killed_mid_run(config, cluster, dsm_vms):
    vm, proc = create_dsm_vm(config, dsm_vms, "omega-test-d-hkill", memory="512M",
                             local_memory="128M", command=MEMTEST, env=cluster.env)
    assert proc.returncode == 0, proc.stderr
    killed: list[int] = []

    def watch() -> None:
        st = vm.stats()
        if not killed and st and st.get("remote_bytes", 0) > 150 << 20:
            pid = int((vm.vmdir / "dsm-handler.pid").read_text())
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    vm.wait_serial(RESULT, timeout=MEMTEST_TIMEOUT, watch=watch)
    assert killed, "the run ended before the handler could be killed"
    assert_memtest_passed(vm)
    new_pid = int((vm.vmdir / "dsm-handler.pid").read_text())
    assert new_pid != killed[0]
    log = (vm.vmdir / "dsm-handler.log").read_text()
    assert re.search(r"serving guest RAM .* re-sent\)", log), log[-2000:]
    st = wait_for(vm.stats, timeout=30, what="the handler's stats")
    assert st["evicted_pages"] > 0 and st["fetched_pages"] > 0


def test_vm_whose_handler_cannot_start_does_not_run(config, cluster_ca, dsm_vms):
    # No peer lends memory: the handler refuses to start, so QEMU never starts.
    env = {"OMEGA_DSM_PEERS": ""}
    vm, proc = create_dsm_vm(config, dsm_vms, "omega-test-d-nohandler", memory="512M",
                             local_memory="128M", command="true", env=env)
    assert proc.returncode == 1
    assert "DSM handler" in proc.stderr and "no peers lend memory" in proc.stderr, proc.stderr
    state = omega_cli("vm", "show", vm.name, "--json", env=env)
    assert '"state": "shut-off"' in state.stdout, state.stdout
    assert "OMEGA-GUEST-READY" not in vm.serial()
