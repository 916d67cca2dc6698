"""`omega host check`: every capability with a reason; exit status from the essentials."""

from __future__ import annotations

import json
from pathlib import Path

from hypervisor.config import Config
from hypervisor.hostcheck import (
    check_damon,
    check_gpus,
    check_hugepages,
    check_iommu,
    check_ksm,
    check_libvirt,
    check_memfd,
    essentials_ok,
)

NAMES = ["accelerator", "libvirt", "userfaultfd", "memfd", "netns", "damon", "ksm",
         "hugepages", "iommu", "gpus"]


def test_host_check_json_shape(omega, tiny_image) -> None:
    proc = omega("host", "check", "--json", env={"OMEGA_ACCEL": ""})
    data = json.loads(proc.stdout)
    assert set(data) == {"ok", "checks"}
    assert [c["name"] for c in data["checks"]] == NAMES
    for c in data["checks"]:
        assert set(c) == {"name", "ok", "detail", "essential"}
        assert isinstance(c["ok"], bool) and isinstance(c["essential"], bool)
        assert c["detail"].strip()
    essential = {c["name"]: c for c in data["checks"] if c["essential"]}
    assert set(essential) == {"accelerator", "libvirt"}
    assert data["ok"] == all(c["ok"] for c in essential.values())
    assert proc.returncode == (0 if data["ok"] else 1)
    # This test suite runs against a live libvirtd and QEMU, so the essentials hold.
    assert data["ok"], data
    accel = essential["accelerator"]["detail"]
    assert accel.startswith(("kvm: ", "tcg: "))
    assert essential["libvirt"]["detail"].startswith("qemu:///system: libvirt ")


def test_host_check_table(omega, tiny_image) -> None:
    proc = omega("host", "check", check=True)
    for name in NAMES:
        assert name in proc.stdout


def test_unreachable_libvirt_fails_the_check(omega, tiny_image) -> None:
    uri = "qemu+unix:///system?socket=/nonexistent/omega-test-i.sock"
    proc = omega("host", "check", "--json", env={"OMEGA_LIBVIRT_URI": uri})
    assert proc.returncode == 1
    data = json.loads(proc.stdout)
    libvirt = next(c for c in data["checks"] if c["name"] == "libvirt")
    assert not libvirt["ok"] and libvirt["detail"].startswith(f"cannot open {uri}: ")
    assert data["ok"] is False
    check = check_libvirt(Config(home=Path("/nonexistent"), libvirt_uri=uri))
    assert not essentials_ok([check])


def test_sysfs_checks_report_missing_features(tmp_path: Path) -> None:
    for check in (check_damon(sys_mm=tmp_path), check_ksm(sys_mm=tmp_path),
                  check_hugepages(sys_mm=tmp_path)):
        assert not check.ok and str(tmp_path) in check.detail
    assert not check_iommu(groups=tmp_path / "none").ok
    assert "no VFIO passthrough" in check_iommu(groups=tmp_path / "none").detail


def test_sysfs_checks_read_what_is_there(tmp_path: Path) -> None:
    (tmp_path / "damon" / "admin").mkdir(parents=True)
    (tmp_path / "ksm").mkdir()
    (tmp_path / "ksm" / "run").write_text("1\n")
    (tmp_path / "ksm" / "pages_sharing").write_text("42\n")
    pool = tmp_path / "hugepages" / "hugepages-2048kB"
    pool.mkdir(parents=True)
    (pool / "nr_hugepages").write_text("8\n")
    (pool / "free_hugepages").write_text("3\n")
    assert check_damon(sys_mm=tmp_path).ok
    assert check_ksm(sys_mm=tmp_path).detail == "available (running, pages_sharing=42)"
    assert check_hugepages(sys_mm=tmp_path).detail == "2048kB: 8 reserved, 3 free"
    groups = tmp_path / "groups"
    (groups / "0").mkdir(parents=True)
    (groups / "1").mkdir()
    assert check_iommu(groups=groups).detail == "2 IOMMU groups"


def test_memfd_and_gpus_report_consistently() -> None:
    assert check_memfd().ok
    gpus = check_gpus()
    if not gpus.ok:
        # No GPU on this machine: the reason must say what is missing.
        assert gpus.detail.startswith(("no NVIDIA driver", "NVIDIA driver", "nvidia-ml-py"))
    else:
        assert "GPU(s):" in gpus.detail
