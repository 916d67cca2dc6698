"""`omega cluster init` and `omega cluster join`, through the real CLI."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from cryptography import x509

from hypervisor.config import Config


def _env(home: Path) -> dict[str, str]:
    return {"OMEGA_HOME": str(home)}


def test_init_then_join(omega, config: Config, tmp_path: Path) -> None:
    home = tmp_path / "home"
    r = omega("cluster", "init", "--name", "hostA", "--json", env=_env(home))
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["node"] == "hostA"
    assert stat.S_IMODE(os.stat(info["ca_key"]).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(info["key"]).st_mode) == 0o600

    r = omega("cluster", "join", "peer1", "--san", "10.200.1.2", "--san", "peer1.lan",
              "--json", env=_env(home))
    assert r.returncode == 0, r.stderr
    joined = json.loads(r.stdout)
    assert set(joined["sans"]) == {"peer1", "peer1.lan", "10.200.1.2"}
    cert = x509.load_pem_x509_certificate(Path(joined["cert"]).read_bytes())
    ca = x509.load_pem_x509_certificate((home / "cluster" / "ca.pem").read_bytes())
    cert.verify_directly_issued_by(ca)

    out = tmp_path / "for-peer2"
    r = omega("cluster", "join", "peer2", "--out", str(out), env=_env(home))
    assert r.returncode == 0, r.stderr
    assert (out / "ca.pem").read_bytes() == (home / "cluster" / "ca.pem").read_bytes()
    assert stat.S_IMODE((out / "nodes" / "peer2.key").stat().st_mode) == 0o600
    assert not (home / "cluster" / "nodes" / "peer2.pem").exists()


def test_init_refuses_to_overwrite_without_force(omega, tmp_path: Path) -> None:
    home = tmp_path / "home"
    assert omega("cluster", "init", "--name", "a", env=_env(home)).returncode == 0
    ca = (home / "cluster" / "ca.pem").read_bytes()
    r = omega("cluster", "init", "--name", "a", env=_env(home))
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and "already exists" in r.stderr and "--force" in r.stderr
    assert (home / "cluster" / "ca.pem").read_bytes() == ca
    r = omega("cluster", "init", "--name", "a", "--force", env=_env(home))
    assert r.returncode == 0, r.stderr
    assert (home / "cluster" / "ca.pem").read_bytes() != ca


def test_join_error_cases(omega, tmp_path: Path) -> None:
    home = tmp_path / "home"
    r = omega("cluster", "join", "peer1", env=_env(home))
    assert r.returncode == 1 and "omega cluster init" in r.stderr
    assert omega("cluster", "init", "--name", "a", env=_env(home)).returncode == 0
    for args in (["bad name"], ["../x"], ["peer1", "--san", "not valid!"],
                 ["peer1", "--san", "IP:peer1"]):
        r = omega("cluster", "join", *args, env=_env(home))
        assert r.returncode == 2, (args, r.stderr)
        assert r.stderr.startswith("omega: error:") and r.stderr.count("\n") == 1
    assert not list((home / "cluster" / "nodes").glob("peer1*"))


def test_init_with_bad_san_writes_nothing(omega, tmp_path: Path) -> None:
    home = tmp_path / "home"
    r = omega("cluster", "init", "--name", "a", "--san", "in valid", env=_env(home))
    assert r.returncode == 2
    assert not (home / "cluster" / "ca.pem").exists()
