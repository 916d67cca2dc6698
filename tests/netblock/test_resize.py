"""`omega netblock resize`: local and replicated exports grow and shrink offline; the
bytes past a shrink never come back; a served export is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hypervisor.config import Config
from tests.netblock.conftest import omega_at, omega_ok, start_server
from tests.netblock.peers import PeerSet

BASE_PORT = 19280


def test_local_export_grows_shrinks_and_never_shows_old_bytes(config: Config,
                                                              nbd_tmp: Path) -> None:
    home = config.home
    omega_ok(home, "netblock", "create", "n-resize", "16M", "--local")
    try:
        omega_ok(home, "netblock", "serve", "n-resize", "--run",
            'qemu-io -f raw -c "write -P 0x55 6M 10M" "$uri"')
        assert "16M -> 32M" in omega_ok(home, "netblock", "resize", "n-resize", "+16M")
        refused = omega_at(home, "netblock", "resize", "n-resize", "8M")
        assert refused.returncode == 2 and "pass --shrink" in refused.stderr
        shrunk = json.loads(omega_ok(home, "netblock", "resize", "n-resize", "--shrink", "-24M",
                                "--json"))
        assert shrunk == {"name": "n-resize", "old_size": 32 << 20, "size": 8 << 20}
        assert json.loads(omega_ok(home, "netblock", "show", "n-resize", "--json"))["size"] == 8 << 20
        omega_ok(home, "netblock", "resize", "n-resize", "20M")
        out = omega_ok(home, "netblock", "serve", "n-resize", "--run",
                  'qemu-img info --output=json "$uri"; '
                  'qemu-io -f raw -c "read -P 0x55 6M 2M" -c "read -P 0 8M 12M" "$uri"')
        assert '"virtual-size": 20971520' in out
        assert out.count("read ") == 2 and "fail" not in out.lower(), out
        # a served export has one owner: resize and delete wait for the server to stop
        server = start_server(config, nbd_tmp, "n-resize")
        try:
            busy = omega_at(home, "netblock", "resize", "n-resize", "30M")
            assert busy.returncode == 1 and "in use by process" in busy.stderr, busy.stderr
            busy = omega_at(home, "netblock", "delete", "n-resize")
            assert busy.returncode == 1 and "in use by process" in busy.stderr, busy.stderr
            # list and show say which process holds it
            listed = {e["name"]: e for e in json.loads(omega_ok(home, "netblock", "list", "--json"))}
            assert listed["n-resize"]["in_use_by"] == server.proc.pid
            assert f"pid {server.proc.pid}" in omega_ok(home, "netblock", "list")
        finally:
            assert server.stop() == 0, server.log.read_text()
        shown = json.loads(omega_ok(home, "netblock", "show", "n-resize", "--json"))
        assert shown["size"] == 20 << 20 and shown["in_use_by"] is None
    finally:
        omega_at(home, "netblock", "delete", "n-resize")


def test_bad_resizes_fail_with_one_clear_error(config: Config) -> None:
    home = config.home
    omega_ok(home, "netblock", "create", "n-resize-bad", "4M", "--local")
    try:
        for args, message in [(["abc"], "is not a size"),
                              (["1000"], "multiple of 512"),
                              (["-8M", "--shrink"], "cannot shrink by 8M"),
                              (["0"], "positive multiple")]:
            proc = omega_at(home, "netblock", "resize", "n-resize-bad", *args)
            assert proc.returncode == 2 and message in proc.stderr, (args, proc.stderr)
            assert "Traceback" not in proc.stderr
        missing = omega_at(home, "netblock", "resize", "n-nope", "1G")
        assert missing.returncode == 1 and "no export named" in missing.stderr
        assert json.loads(omega_ok(home, "netblock", "show", "n-resize-bad", "--json"))["size"] \
            == 4 << 20
    finally:
        omega_at(home, "netblock", "delete", "n-resize-bad")


@pytest.mark.parametrize("backend", ["native", "python"])
def test_replicated_shrink_frees_chunks_on_peers_and_zeroes_the_tail(
        peer_home: Config, peers: PeerSet, backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both replicated backends: the native one (4 KiB blocks in 64 KiB chunks)
    and the Python one (each chunk sealed whole)."""
    home = peer_home.home
    peer_args = [f"--peer={p.name}=127.0.0.1:{p.port}" for p in peers.peers.values()]
    remote = [*peer_args, "--node", "n-host"]
    layout = []
    if backend == "python":
        monkeypatch.setenv("OMEGA_NETBLOCK_NATIVE", "0")  # omega_at passes os.environ on
        layout = ["--block-size", "64K"]
    omega_ok(home, "netblock", "create", "n-rep-resize", "2M", "--replicas", "2", *layout)
    omega_ok(home, "netblock", "serve", "n-rep-resize", *remote, "--no-repair", "--run",
        'qemu-io -f raw -c "write -P 0x3c 0 2M" -c flush "$uri"')
    shown = json.loads(omega_ok(home, "netblock", "show", "n-rep-resize", "--json"))
    assert shown["chunks_written"] == 32
    before = sum(shown["chunks_per_peer"].values())
    # 1 MiB + 4.5 KiB: chunk 16 keeps its first block and half of the second
    keep = (1 << 20) + 4608
    omega_ok(home, "netblock", "resize", "n-rep-resize", str(keep), "--shrink", *remote)
    shown = json.loads(omega_ok(home, "netblock", "show", "n-rep-resize", "--json"))
    assert shown["size"] == keep and shown["chunks_written"] == 17
    assert sum(shown["chunks_per_peer"].values()) == 17 * 2 < before
    omega_ok(home, "netblock", "resize", "n-rep-resize", "2M", *remote)
    out = omega_ok(home, "netblock", "serve", "n-rep-resize", *remote, "--no-repair", "--run",
              f'qemu-io -f raw -c "read -P 0x3c 0 {keep}" '
              f'-c "read -P 0 {keep} {(2 << 20) - keep}" "$uri" && '
              'nbdinfo --map --json "$uri"')
    assert out.count("read ") == 2 and "fail" not in out.lower(), out
    extents = json.loads(out[out.index("["):])
    # allocation is per block (native: chunk 16's first two blocks hold data) or per
    # chunk (python: chunk 16 holds data), the rest are holes
    data_end = (1 << 20) + ((8 << 10) if backend == "native" else (64 << 10))
    assert [(e["offset"], e["type"]) for e in extents] == [(0, 0), (data_end, 3)]
    omega_ok(home, "netblock", "delete", "n-rep-resize", *remote)
