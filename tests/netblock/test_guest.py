"""A tiny guest on a 2-replica netblock disk survives a peer killed while it writes."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest

from hypervisor.config import Config
from hypervisor.errors import AlreadyExistsError, NotFoundError
from hypervisor.localcluster import LocalCluster
from hypervisor.vm.lifecycle import VMController
from hypervisor.vm.spec import DiskSpec, VMSpec
from tests.vm.conftest import encode_command, virsh
from tests.waiting import wait_for

VM = "omega-test-n-guest"
EXPORT = "omega-test-n-disk"
MIB = 1 << 20

# 16 x 512 KiB written with fsync, one piece at a time; a pause after the 6th lets
# the test kill a peer while the guest is in the middle of its writes.
GUEST_SCRIPT = (
    "head -c 8388608 /dev/urandom > /tmp/d; echo WRITING; i=0; "
    "while [ $i -lt 16 ]; do dd if=/tmp/d of=/dev/vda bs=512k skip=$i seek=$i count=1 "
    "conv=fsync 2>/dev/null || echo DD-FAILED; i=$((i+1)); "
    "if [ $i -eq 6 ]; then echo HALF-WRITTEN; sleep 15; fi; done; sync; "
    "echo 3 > /proc/sys/vm/drop_caches; "
    "echo WROTE $(sha256sum /tmp/d | cut -c1-64); "
    "echo READ $(head -c 8388608 /dev/vda | sha256sum | cut -c1-64)")


@pytest.fixture
def cluster(config: Config):
    lc = LocalCluster(config)
    try:
        lc.up(2, disk_lend=256 * MIB, base_port=19240, fsync=False)
    except AlreadyExistsError:
        pytest.fail("a local cluster is already up in this OMEGA_HOME")
    yield lc
    lc.down()


@pytest.mark.libvirt
@pytest.mark.slow
def test_guest_writes_survive_peer_kill_and_rereplicate(config: Config, tiny_image, omega,
                                                        cluster: LocalCluster,
                                                        nbd_tmp: Path) -> None:
    omega("netblock", "create", EXPORT, "16M", "--replicas", "2", check=True)
    ctl = VMController(config)
    try:
        spec = VMSpec(name=VM, image="tiny", disks=[DiskSpec(kind="netblock", export=EXPORT)],
                      cmdline_extra=encode_command(GUEST_SCRIPT) + " omega.poweroff=1")
        ctl.create(spec)
        xml = virsh("dumpxml", VM).stdout
        assert "<disk type='network'" in xml and "protocol='nbd'" in xml, xml
        assert f"name='{EXPORT}'" in xml and "transport='unix'" in xml
        ctl.start(VM)
        # the guest pauses after 6 of 16 pieces; the peer dies, the guest writes on
        ctl.wait_for_serial(VM, r"HALF-WRITTEN", timeout=300)
        victim = cluster.peers()[1].name
        cluster.kill(victim)
        assert ctl.stop(VM, timeout=600) == "shutdown"
        log = config.vms_dir / VM / "serial.log"
        # virtlogd writes the log: the last lines may land a moment after QEMU exits.
        serial = wait_for(lambda: (t := log.read_text(errors="replace")) and "READ " in t and t,
                          timeout=15, what="the guest's READ line")
        wrote = re.search(r"WROTE ([0-9a-f]{64})", serial)
        read = re.search(r"READ ([0-9a-f]{64})", serial)
        assert wrote and read, serial[-3000:]
        assert "DD-FAILED" not in serial
        assert wrote.group(1) == read.group(1)
    finally:
        try:
            ctl.delete(VM, force=True)
        except NotFoundError:
            pass
        ctl.close()
    # every byte the guest wrote reads back on the host, from the surviving replica
    out = nbd_tmp / "disk.raw"
    omega("netblock", "export", EXPORT, str(out), check=True)
    assert hashlib.sha256(out.read_bytes()[:8 * MIB]).hexdigest() == wrote.group(1)
    shown = json.loads(omega("netblock", "show", EXPORT, "--json", check=True).stdout)
    assert shown["chunks_written"] == 128
    # chunks (re)written after the kill went to the surviving peer only
    assert shown["chunks_under_replicated"] > 0
    # the peer returns; re-replication brings every chunk back to two copies
    cluster.restart(victim)
    rep = json.loads(omega("netblock", "repair", EXPORT, "--json", check=True).stdout)
    assert rep["stale"] == 0 and rep["repaired"] > 0
    shown = json.loads(omega("netblock", "show", EXPORT, "--json", check=True).stdout)
    assert shown["chunks_under_replicated"] == 0
    assert shown["chunks_per_peer"] == {p.name: 128 for p in cluster.peers()}
    omega("netblock", "delete", EXPORT, check=True)


@pytest.mark.libvirt
def test_vm_create_disk_netblock_cli(config: Config, tiny_image, omega) -> None:
    name = "omega-test-n-cli"
    omega("netblock", "create", "omega-test-n-clidisk", "8M", "--local", check=True)
    try:
        bad = omega("vm", "create", name, "--image", "tiny", "--disk", "netblock:n-missing")
        assert bad.returncode == 1 and "no export named 'n-missing'" in bad.stderr
        assert name not in virsh("list", "--all", "--name").stdout.split()
        omega("vm", "create", name, "--image", "tiny", "--disk", "netblock:omega-test-n-clidisk",
              check=True)
        xml = virsh("dumpxml", name).stdout
        sock = config.vms_dir / name / "netblock.sock"
        assert "<disk type='network'" in xml and f"socket='{sock}'" in xml, xml
        assert "name='omega-test-n-clidisk'" in xml
    finally:
        omega("vm", "delete", name, "--force")
        omega("netblock", "delete", "omega-test-n-clidisk")
    assert name not in virsh("list", "--all", "--name").stdout.split()
