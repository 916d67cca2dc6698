"""The wheel meson-python builds, and the native modules' version check.

Builds a real wheel with the venv's pip (no build isolation: meson,
meson-python, ninja and cffi come from the venv), then imports the native
module from the unpacked wheel, not from the development tree.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

import hypervisor
from hypervisor import _native, _version
from hypervisor.errors import NativeError

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    build_dir = tmp_path_factory.mktemp("wheel-build")
    env = dict(os.environ, PATH=f"{VENV_BIN}:{os.environ.get('PATH', '')}")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps",
         f"--config-settings=build-dir={build_dir}", "-w", str(out), str(REPO)],
        env=env, capture_output=True, text=True, timeout=540, check=False,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    (built,) = out.glob("*.whl")
    return built


def test_wheel_holds_packages_native_modules_and_version(wheel: Path) -> None:
    version = (REPO / "VERSION").read_text().strip()
    assert version == hypervisor.__version__
    assert wheel.name.startswith(f"omega_hypervisor-{version}-")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        metadata = zf.read(f"omega_hypervisor-{version}.dist-info/METADATA").decode()
        version_py = zf.read("hypervisor/_version.py").decode()
    assert len(names) == len(set(names)), "duplicate entries in the wheel"
    assert f"\nVersion: {version}\n" in metadata
    assert f'__version__ = "{version}"' in version_py
    uffd_modules = [n for n in names if n.startswith("hypervisor/_native/_uffd") and n.endswith(".so")]
    assert len(uffd_modules) == 1, uffd_modules
    for module in ["hypervisor/__init__.py", "hypervisor/_native/__init__.py",
                   "hypervisor/dsm/uffd.py", "hypervisor/cli/__init__.py",
                   "hypervisor/errors.py", "policies/__init__.py", "tui/__init__.py",
                   "images/__init__.py"]:
        assert module in names, module
    assert not [n for n in names if "__pycache__" in n]
    assert not [n for n in names if n.startswith("hypervisor/_native/") and n.endswith(".c")]


def test_native_module_from_the_wheel_loads(wheel: Path, tmp_path: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(tmp_path)
    # -S: no site, so the venv's .pth pointing at the development tree is not
    # read; the venv's site-packages is added back for cffi only, after the wheel.
    site_packages = sysconfig.get_paths()["purelib"]
    code = ("import hypervisor.dsm.uffd as u; print(u.__file__); print(u._module.__file__); "
            "print(u.page_size())")
    result = subprocess.run(
        [sys.executable, "-S", "-c", code],
        env=dict(os.environ, PYTHONPATH=f"{tmp_path}:{site_packages}"),
        capture_output=True, text=True, timeout=60, check=False, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    module_file, native_file, page = result.stdout.split()
    assert module_file.startswith(str(tmp_path))
    assert native_file.startswith(str(tmp_path / "hypervisor" / "_native"))
    assert int(page) == os.sysconf("SC_PAGESIZE")


def test_compiled_version_matches_package() -> None:
    module = _native.load("uffd")
    built = module.ffi.string(module.lib.omega_uffd_version()).decode()
    assert built == hypervisor.__version__ == (REPO / "VERSION").read_text().strip()


def test_version_mismatch_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(NativeError, match=r"built for version 0\.0\.1.*run `make native`"):
        _native.check_version("hypervisor._native._uffd", "0.0.1", hypervisor.__version__)
    _native.check_version("hypervisor._native._uffd", "1.2.3", "1.2.3")
    monkeypatch.setattr(_version, "__version__", "99.0.0")
    with pytest.raises(NativeError, match=r"hypervisor package is 99\.0\.0"):
        _native.load("uffd")


def test_missing_native_module_says_how_to_build() -> None:
    with pytest.raises(NativeError, match=r"_no_such_job is not built.*run `make native`"):
        _native.load("no_such_job")
