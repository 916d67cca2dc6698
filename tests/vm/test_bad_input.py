"""Bad input through the real CLI: one clear line, exit 1 or 2, nothing left behind."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from hypervisor.config import Config
from hypervisor.errors import SpecError
from hypervisor.vm.lifecycle import VMController, VMHook
from hypervisor.vm.spec import VMSpec
from tests.vm.conftest import defined_domains

NAME = "omega-test-v-bad"


def assert_nothing_left(config: Config, name: str = NAME) -> None:
    assert name not in defined_domains()
    assert not (config.vms_dir / name).exists()


def assert_one_line_error(proc, code: int, needle: str) -> None:
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("omega: error:") and needle in lines[0], lines[0]


HOST_MEM_G = psutil.virtual_memory().total // (1 << 30)


@pytest.mark.parametrize("args, code, needle", [
    (["--memory", "0"], 2, "memory: 0 must be larger than 0"),
    (["--memory", f"{HOST_MEM_G + 64}G"], 2, "more than the host has"),
    (["--memory", "lots"], 2, "not a size"),
    (["--vcpus", "0"], 2, "at least 1"),
    (["--vcpus", str(psutil.cpu_count() + 1)], 2, "more than the host's"),
    (["--graphics", "spice"], 2, "graphics"),
])
def test_create_rejects_bad_sizes(config, tiny_image, omega, args, code, needle):
    proc = omega("vm", "create", NAME, "--image", "tiny", *args)
    assert_one_line_error(proc, code, needle)
    assert_nothing_left(config)


def test_create_rejects_bad_name(config, tiny_image, omega):
    proc = omega("vm", "create", "bad/name", "--image", "tiny")
    assert_one_line_error(proc, 2, "may only hold")
    assert not (config.vms_dir / "bad").exists()


def test_create_requires_image(config, omega):
    assert_one_line_error(omega("vm", "create", NAME), 2, "--image is required")
    assert_nothing_left(config)


def test_unknown_image(config, tiny_image, omega):
    proc = omega("vm", "create", NAME, "--image", "no-such-image")
    assert_one_line_error(proc, 1, "not found")
    assert_nothing_left(config)


@pytest.fixture
def corrupt_home(config: Config, tiny_image) -> Iterator[Path]:
    """An OMEGA_HOME holding a copy of the tiny image with one flipped byte in its initrd."""
    home = Path(tempfile.mkdtemp(prefix="omega-test-v-corrupt-", dir="/var/tmp"))
    home.chmod(0o755)
    src = config.images_dir / tiny_image.digest
    dst = home / "images" / tiny_image.digest
    shutil.copytree(src, dst)
    initrd = dst / tiny_image.initrd.name
    data = bytearray(initrd.read_bytes())
    data[len(data) // 2] ^= 0xFF
    initrd.write_bytes(bytes(data))
    yield home
    shutil.rmtree(home, ignore_errors=True)


def test_corrupt_image(corrupt_home, omega):
    proc = omega("vm", "create", NAME, "--image", "tiny", env={"OMEGA_HOME": str(corrupt_home)})
    assert_one_line_error(proc, 1, "corrupt")
    assert NAME not in defined_domains()
    assert not (corrupt_home / "vms" / NAME).exists()


def test_duplicate_name_keeps_the_first(config, tiny_image, omega, vm_cleanup):
    vm_cleanup.append(NAME)
    omega("vm", "create", NAME, "--image", "tiny", "--memory", "128M", check=True)
    proc = omega("vm", "create", NAME, "--image", "tiny", "--memory", "512M")
    assert_one_line_error(proc, 1, "already exists")
    shown = omega("vm", "show", NAME, "--json", check=True).stdout
    assert f'"memory": {128 << 20}' in shown  # the first definition is untouched
    omega("vm", "delete", NAME, check=True)
    assert_nothing_left(config)


def test_unreachable_libvirt(config, tiny_image, omega):
    env = {"OMEGA_LIBVIRT_URI": "qemu:///system?socket=/var/tmp/omega-test-v-no-such.sock"}
    proc = omega("vm", "create", NAME, "--image", "tiny", env=env)
    assert_one_line_error(proc, 1, "cannot reach libvirt")
    assert_nothing_left(config)
    assert_one_line_error(omega("vm", "list", env=env), 1, "cannot reach libvirt")


@pytest.mark.parametrize("text, needle", [
    ('name = "omega-test-v-bad"\nimage = "tiny"\nmemory = \n', "bad TOML"),
    ('name = "omega-test-v-bad"\nimage = "tiny"\nmemroy = "1G"\n', "unknown key(s) memroy"),
    ('name = "omega-test-v-bad"\nimage = "tiny"\nmemory = "256M"\nlocal_memory = "1G"\n',
     "larger than memory"),
    ('name = "omega-test-v-bad"\nimage = "tiny"\nvcpus = 0\n', "at least 1"),
])
def test_bad_spec_file(config, tiny_image, omega, tmp_path, text, needle):
    path = tmp_path / "vm.toml"
    path.write_text(text)
    assert_one_line_error(omega("vm", "create", "--spec", str(path)), 2, needle)
    assert_nothing_left(config)


def test_unknown_vm_commands(omega):
    for cmd in ("start", "stop", "destroy", "delete", "show"):
        assert_one_line_error(omega("vm", cmd, "omega-test-v-absent"), 1, "no VM named")


class RecordingHook(VMHook):
    """Records calls; optionally fails in prepare or edits the spec badly."""

    def __init__(self, *, fail: bool = False, break_spec: bool = False) -> None:
        self.calls: list[str] = []
        self.fail = fail
        self.break_spec = break_spec

    def prepare(self, spec: VMSpec, vmdir: Path) -> None:
        self.calls.append("prepare")
        assert vmdir.is_dir()
        (vmdir / "hook-file").write_text("x")
        if self.break_spec:
            spec.qemu_env["not valid"] = "x"
        if self.fail:
            raise RuntimeError("hook refused")

    def on_delete(self, spec: VMSpec, vmdir: Path) -> None:
        self.calls.append("on_delete")


def test_failed_hook_undoes_create(config, tiny_image):
    first, failing = RecordingHook(), RecordingHook(fail=True)
    with VMController(config, hooks=[first, failing]) as ctl:
        with pytest.raises(RuntimeError, match="hook refused"):
            ctl.create(VMSpec(name=NAME, image="tiny", disk_size=1 << 20))
    assert first.calls == ["prepare", "on_delete"]
    assert failing.calls == ["prepare", "on_delete"]
    assert_nothing_left(config)


def test_hook_breaking_the_spec_undoes_create(config, tiny_image):
    hook = RecordingHook(break_spec=True)
    with VMController(config, hooks=[hook]) as ctl:
        with pytest.raises(SpecError, match="qemu_env"):
            ctl.create(VMSpec(name=NAME, image="tiny"))
    assert hook.calls == ["prepare", "on_delete"]
    assert_nothing_left(config)
