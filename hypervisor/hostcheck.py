"""What this host can do: one check per capability, each with a reason.

``omega host check`` prints these. Two are essential (a host without them
cannot run a VM at all): libvirt reachable and an accelerator (KVM, or TCG as
the fallback, decided by :mod:`hypervisor.vm.accel`). The others say which
Omega features will work here: userfaultfd and memfd (dsm), network
namespaces (the local cluster), DAMON and KSM (memory tiering hints),
hugepages, IOMMU groups (VFIO passthrough) and NVIDIA GPUs (NVENC, passthrough).
Every probe is read-only or creates a throwaway object it removes itself.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from hypervisor.config import Config
from hypervisor.errors import OmegaError

SYS_MM = Path("/sys/kernel/mm")
IOMMU_GROUPS = Path("/sys/kernel/iommu_groups")


@dataclass(frozen=True)
class Check:
    """One capability of the host.

    Attributes:
        name: short identifier (``accelerator``, ``libvirt``, ...).
        ok: whether the capability is usable.
        detail: one line: what was found, or why it is not usable.
        essential: whether Omega cannot run VMs without it.
    """

    name: str
    ok: bool
    detail: str
    essential: bool = False

    def to_dict(self) -> dict[str, Any]:
        """Return the check as a JSON-ready dict."""
        return asdict(self)


def check_accelerator(config: Config, *, force: bool = False) -> Check:
    """KVM or TCG, from the (cached) boot probe."""
    from hypervisor.vm.accel import probe

    if shutil.which("qemu-system-x86_64") is None:
        return Check("accelerator", False, "qemu-system-x86_64 not found; install "
                     "qemu-system-x86", essential=True)
    try:
        result = probe(config, force=force)
    except OmegaError as exc:
        return Check("accelerator", False, f"probe failed: {exc}", essential=True)
    cached = " (cached probe)" if result.cached else ""
    return Check("accelerator", True, f"{result.accel}: {result.reason}{cached}", essential=True)


def check_libvirt(config: Config) -> Check:
    """Open the configured libvirt URI and report the daemon's version."""
    try:
        import libvirt
    except ImportError as exc:
        return Check("libvirt", False, f"libvirt-python not installed ({exc})", essential=True)
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    try:
        conn = libvirt.open(config.libvirt_uri)
    except libvirt.libvirtError as exc:
        return Check("libvirt", False, f"cannot open {config.libvirt_uri}: "
                     f"{exc.get_error_message()}", essential=True)
    try:
        lib = _version_text(conn.getLibVersion())
        hv = _version_text(conn.getVersion())
        return Check("libvirt", True, f"{config.libvirt_uri}: libvirt {lib}, "
                     f"{conn.getType()} {hv}", essential=True)
    finally:
        conn.close()


def _version_text(v: int) -> str:
    return f"{v // 1_000_000}.{v // 1000 % 1000}.{v % 1000}"


def check_userfaultfd() -> Check:
    """The userfaultfd features the dsm layer needs (via the native module)."""
    try:
        from hypervisor.dsm import uffd
    except (ImportError, OmegaError) as exc:
        return Check("userfaultfd", False, f"native module not built ({exc}); run make native")
    try:
        features = uffd.available_features()
    except OmegaError as exc:
        return Check("userfaultfd", False, f"cannot create a userfaultfd: {exc}")
    have = sorted(name for name, ok in features.items() if ok)
    lack = sorted(name for name, ok in features.items() if not ok)
    detail = f"features: {', '.join(have) or 'none'}"
    if lack:
        detail += f"; missing: {', '.join(lack)}"
    return Check("userfaultfd", True, detail)


def check_memfd() -> Check:
    """memfd_create works (guest RAM as a shareable file)."""
    try:
        fd = os.memfd_create("omega-hostcheck", os.MFD_CLOEXEC)
    except OSError as exc:
        return Check("memfd", False, f"memfd_create failed: {exc.strerror}")
    try:
        os.ftruncate(fd, 1 << 20)
    except OSError as exc:
        return Check("memfd", False, f"ftruncate on a memfd failed: {exc.strerror}")
    finally:
        os.close(fd)
    return Check("memfd", True, "memfd_create works")


def check_netns() -> Check:
    """A new network namespace can be created (``unshare --net``)."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return Check("netns", False, "unshare not found (util-linux); peers will use loopback")
    proc = subprocess.run([unshare, "--net", "true"], capture_output=True, text=True,
                          timeout=30)
    if proc.returncode != 0:
        why = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"
        return Check("netns", False, f"cannot create a network namespace ({why}); "
                     "peers will use loopback")
    return Check("netns", True, "network namespaces can be created")


def check_damon(*, sys_mm: Path = SYS_MM) -> Check:
    """DAMON's sysfs interface (access monitoring for hotness hints)."""
    admin = sys_mm / "damon" / "admin"
    if admin.is_dir():
        return Check("damon", True, f"sysfs interface at {admin}")
    return Check("damon", False, f"{admin} missing (kernel without CONFIG_DAMON_SYSFS)")


def check_ksm(*, sys_mm: Path = SYS_MM) -> Check:
    """Kernel samepage merging."""
    run = sys_mm / "ksm" / "run"
    try:
        state = run.read_text().strip()
    except OSError:
        return Check("ksm", False, f"{run} missing (kernel without CONFIG_KSM)")
    sharing = _read_int(sys_mm / "ksm" / "pages_sharing")
    mode = {"0": "stopped", "1": "running", "2": "unmerging"}.get(state, state)
    return Check("ksm", True, f"available ({mode}, pages_sharing={sharing})")


def check_hugepages(*, sys_mm: Path = SYS_MM) -> Check:
    """Huge page pools and transparent huge pages."""
    pools = sorted((sys_mm / "hugepages").glob("hugepages-*kB"))
    if not pools:
        return Check("hugepages", False, f"{sys_mm / 'hugepages'} has no pools")
    parts = [f"{p.name.removeprefix('hugepages-')}: {_read_int(p / 'nr_hugepages')} reserved, "
             f"{_read_int(p / 'free_hugepages')} free" for p in pools]
    try:
        thp = (sys_mm / "transparent_hugepage" / "enabled").read_text().strip()
        parts.append(f"THP {thp}")
    except OSError:
        pass
    return Check("hugepages", True, "; ".join(parts))


def check_iommu(*, groups: Path = IOMMU_GROUPS) -> Check:
    """IOMMU groups exist (needed for VFIO device passthrough)."""
    n = len(list(groups.iterdir())) if groups.is_dir() else 0
    if n == 0:
        return Check("iommu", False, "no IOMMU groups (IOMMU off or absent): "
                     "no VFIO passthrough")
    return Check("iommu", True, f"{n} IOMMU groups")


def check_gpus() -> Check:
    """NVIDIA GPUs through NVML (pynvml)."""
    try:
        import pynvml
    except ImportError:
        return Check("gpus", False, "nvidia-ml-py not installed")
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        return Check("gpus", False, f"no NVIDIA driver (NVML: {exc})")
    try:
        count = pynvml.nvmlDeviceGetCount()
        names = []
        for i in range(count):
            name = pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(i))
            names.append(name.decode() if isinstance(name, bytes) else str(name))
        driver = pynvml.nvmlSystemGetDriverVersion()
        driver = driver.decode() if isinstance(driver, bytes) else str(driver)
    except pynvml.NVMLError as exc:
        return Check("gpus", False, f"NVML query failed: {exc}")
    finally:
        pynvml.nvmlShutdown()
    if count == 0:
        return Check("gpus", False, f"NVIDIA driver {driver} but no GPU")
    return Check("gpus", True, f"{count} GPU(s): {', '.join(names)} (driver {driver})")


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def check_host(config: Config, *, reprobe: bool = False) -> list[Check]:
    """Run every check.

    Args:
        config: Omega's configuration.
        reprobe: re-run the accelerator boot probe instead of using its cache.

    Returns:
        One :class:`Check` per capability, essentials first.
    """
    checks: list[Callable[[], Check]] = [
        lambda: check_accelerator(config, force=reprobe),
        lambda: check_libvirt(config),
        check_userfaultfd,
        check_memfd,
        check_netns,
        check_damon,
        check_ksm,
        check_hugepages,
        check_iommu,
        check_gpus,
    ]
    return [c() for c in checks]


def essentials_ok(checks: list[Check]) -> bool:
    """True when every essential check passed."""
    return all(c.ok for c in checks if c.essential)
