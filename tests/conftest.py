"""Suite-wide fixtures.

Every test session gets its own Omega state directory (``OMEGA_HOME``) under
/var/tmp with mode 0755, because QEMU runs as ``libvirt-qemu`` and must reach
kernels, initramfs and disks kept there. Subsystem fixtures live in the
conftest.py of each test folder.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from hypervisor.config import Config

# The suite runs on small, shared machines: hypothesis's 200 ms per-example
# deadline measures the machine's load, not the code.
settings.register_profile("omega", deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("omega")

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def omega_home() -> Iterator[Path]:
    """A fresh, world-traversable OMEGA_HOME for this test session."""
    home = Path(tempfile.mkdtemp(prefix="omega-test-", dir="/var/tmp"))
    home.chmod(0o755)
    old = os.environ.get("OMEGA_HOME")
    os.environ["OMEGA_HOME"] = str(home)
    try:
        yield home
    finally:
        if old is None:
            os.environ.pop("OMEGA_HOME", None)
        else:
            os.environ["OMEGA_HOME"] = old
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="session")
def config(omega_home: Path) -> Config:
    """The Config every test in the session shares."""
    cfg = Config.from_env()
    cfg.ensure()
    return cfg


def run_omega(*args: str, check: bool = False, timeout: float = 300,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the real ``omega`` command in a subprocess and capture its output.

    Args:
        *args: command-line arguments after ``omega``.
        check: raise if the exit status is non-zero.
        timeout: seconds before the command is killed.
        env: extra environment on top of os.environ.

    Returns:
        The completed process (text mode).
    """
    full_env = dict(os.environ)
    full_env.update(env or {})
    proc = subprocess.run([sys.executable, "-m", "hypervisor.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env=full_env, cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"omega {' '.join(args)} exited {proc.returncode}:\n"
                             f"{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture
def omega(config: Config):
    """Return :func:`run_omega` bound to the session's OMEGA_HOME."""
    return run_omega


@pytest.fixture(scope="session")
def tiny_image(config: Config):
    """The tiny guest image, built once per session into the session's store.

    Returns:
        An :class:`images.store.Image` (kernel, initrd, cmdline; contract in images/tiny.py).
    """
    from images.store import ImageStore

    return ImageStore(config).build("tiny")
