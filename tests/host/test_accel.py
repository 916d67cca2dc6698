"""The accelerator probe: a real KVM boot attempt, its cache, and the override."""

from __future__ import annotations

import base64
import json
from dataclasses import replace
from pathlib import Path

import pytest

from hypervisor.config import Config
from hypervisor.errors import UsageError
from hypervisor.vm.accel import CACHE_FILE, AccelResult, boot_and_watch, cache_key, probe
from images.store import Image


@pytest.fixture(scope="module")
def unforced(config: Config) -> Config:
    """The session config with any OMEGA_ACCEL from the caller's environment dropped."""
    return replace(config, accel=None)


@pytest.fixture(scope="module")
def measured(unforced: Config, tiny_image: Image) -> AccelResult:
    """A fresh probe (cache ignored), as run once per host."""
    result = probe(unforced, force=True)
    print(f"\naccelerator probe: {result.accel} in {result.probe_seconds} s: {result.reason}")
    return result


def test_probe_answer_boots_a_guest(measured, tiny_image: Image) -> None:
    """Whatever the probe decides must actually run the tiny guest."""
    assert measured.accel in ("kvm", "tcg")
    assert measured.reason and not measured.cached
    assert measured.key == cache_key()
    if measured.accel == "tcg" and Path("/dev/kvm").exists():
        assert measured.reason.startswith("KVM unusable:")
        assert measured.probe_seconds is not None
    cpu = ["-cpu", "host"] if measured.accel == "kvm" else []
    cmd = base64.b64encode(b"echo accel-check").decode()
    ok, detail = boot_and_watch(
        ["qemu-system-x86_64", "-accel", measured.accel, *cpu, "-m", "128", "-nodefaults",
         "-display", "none", "-no-reboot", "-serial", "stdio", "-kernel", str(tiny_image.kernel),
         "-initrd", str(tiny_image.initrd), "-append",
         f"console=ttyS0 panic=-1 omega.run={cmd} omega.poweroff=1"],
        expect="accel-check", timeout=240)
    assert ok, detail


def test_second_call_comes_from_the_cache(measured, unforced: Config) -> None:
    config = unforced
    again = probe(config)
    assert again.cached
    assert (again.accel, again.reason) == (measured.accel, measured.reason)
    on_disk = json.loads((config.cache_dir / CACHE_FILE).read_text())
    assert on_disk["accel"] == measured.accel and on_disk["key"] == cache_key()


def test_cache_for_another_host_is_ignored(measured, unforced: Config) -> None:
    config = unforced
    path = config.cache_dir / CACHE_FILE
    record = json.loads(path.read_text())
    other = "kvm" if measured.accel == "tcg" else "tcg"
    record.update(accel=other, key=dict(record["key"], kernel="0.0.0-other-host"))
    path.write_text(json.dumps(record))
    fresh = probe(config)
    assert not fresh.cached and fresh.accel == measured.accel
    assert probe(config).cached


def test_missing_kvm_device_means_tcg(tmp_path: Path) -> None:
    cfg = Config(home=tmp_path)
    result = probe(cfg, kvm_device=tmp_path / "no-kvm")
    assert result.accel == "tcg" and "does not exist" in result.reason
    assert result.probe_seconds is None  # decided without booting
    assert probe(cfg, kvm_device=tmp_path / "no-kvm").cached


def test_omega_accel_overrides(config: Config) -> None:
    for accel in ("kvm", "tcg"):
        result = probe(replace(config, accel=accel))
        assert result.accel == accel and result.reason == f"forced by OMEGA_ACCEL={accel}"
        assert not result.cached
    with pytest.raises(UsageError, match="OMEGA_ACCEL='vmx' is not one of kvm, tcg"):
        probe(replace(config, accel="vmx"))
    forced = Config.from_env({"OMEGA_HOME": str(config.home), "OMEGA_ACCEL": "kvm"})
    assert probe(forced).accel == "kvm"


def test_cli_accel(omega, measured) -> None:
    shown = json.loads(omega("host", "accel", "--json", env={"OMEGA_ACCEL": ""},
                             check=True).stdout)
    assert shown["accel"] == measured.accel and shown["cached"] is True
    forced = json.loads(omega("host", "accel", "--json", env={"OMEGA_ACCEL": "tcg"},
                              check=True).stdout)
    assert forced["reason"] == "forced by OMEGA_ACCEL=tcg"
    bad = omega("host", "accel", env={"OMEGA_ACCEL": "vmx"})
    assert bad.returncode == 2
    assert bad.stderr.strip() == "omega: error: OMEGA_ACCEL='vmx' is not one of kvm, tcg"
