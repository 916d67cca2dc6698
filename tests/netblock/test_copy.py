"""`omega netblock copy`: an export copied into a new one, local <-> replicated on real
peers; bytes equal, holes kept, a failed copy leaves no export behind."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from hypervisor.config import Config
from tests.netblock.conftest import omega_at, omega_ok
from tests.netblock.peers import PeerSet

BASE_PORT = 19284


def _digest(home: Path, name: str, remote: list[str], out: Path) -> str:
    omega_ok(home, "netblock", "export", name, str(out), *remote, "--force")
    return hashlib.sha256(out.read_bytes()).hexdigest()


def test_copy_between_local_and_replicated_keeps_bytes_and_holes(
        peer_home: Config, peers: PeerSet, nbd_tmp: Path) -> None:
    home = peer_home.home
    remote = [*(f"--peer={p.name}=127.0.0.1:{p.port}" for p in peers.peers.values()),
              "--node", "n-host"]
    src = nbd_tmp / "template.raw"
    src.write_bytes(os.urandom(1 << 20) + bytes(2 << 20) + os.urandom(1 << 20))
    omega_ok(home, "netblock", "import", "n-template", str(src), "--local")
    want = hashlib.sha256(src.read_bytes()).hexdigest()

    omega_ok(home, "netblock", "copy", "n-template", "n-vm1", "--replicated", "--replicas", "2",
        *remote)
    shown = json.loads(omega_ok(home, "netblock", "show", "n-vm1", "--json"))
    assert shown["kind"] == "replicated" and shown["replicas"] == 2
    assert shown["size"] == 4 << 20
    assert shown["chunks_written"] == 32  # the 2 MiB of zeroes in the middle stay holes
    assert _digest(home, "n-vm1", remote, nbd_tmp / "vm1.raw") == want

    omega_ok(home, "netblock", "copy", "n-vm1", "n-back", "--local", *remote)
    assert json.loads(omega_ok(home, "netblock", "show", "n-back", "--json"))["kind"] == "local"
    assert _digest(home, "n-back", remote, nbd_tmp / "back.raw") == want

    taken = omega_at(home, "netblock", "copy", "n-template", "n-vm1", *remote)
    assert taken.returncode == 1 and "already exists" in taken.stderr
    missing = omega_at(home, "netblock", "copy", "n-nope", "n-x", *remote)
    assert missing.returncode == 1 and "no export named" in missing.stderr


def test_a_failed_copy_leaves_no_export(peer_home: Config, peers: PeerSet) -> None:
    home = peer_home.home
    omega_ok(home, "netblock", "create", "n-src", "1M", "--local")
    # every peer gone: the replicated copy cannot store a byte
    for name in list(peers.peers):
        peers.kill(name)
    remote = [*(f"--peer={p.name}=127.0.0.1:{p.port}" for p in peers.peers.values()),
              "--node", "n-host"]
    omega_ok(home, "netblock", "serve", "n-src", "--run",
        'qemu-io -f raw -c "write -P 0x44 0 64k" "$uri"')
    failed = omega_at(home, "netblock", "copy", "n-src", "n-dst", "--replicated", *remote)
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert "Traceback" not in failed.stderr
    assert failed.stderr.strip().splitlines()[-1].startswith("omega: error:"), failed.stderr
    names = [e["name"] for e in json.loads(omega_ok(home, "netblock", "list", "--json"))]
    assert "n-dst" not in names and "n-src" in names
