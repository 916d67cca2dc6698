"""Pieces of the tiny recipe: kernel lookup, module ordering, compressed modules, newc."""

from __future__ import annotations

import gzip
import lzma
import os
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hypervisor.errors import ImageError, UsageError
from images.cpio import InitramfsTree
from images.tiny import (
    MODULES,
    build_tiny,
    find_kernel,
    parse_modules_dep,
    resolve_modules,
)


def test_find_kernel_picks_newest_with_modules(tmp_path: Path) -> None:
    boot, mods = tmp_path / "boot", tmp_path / "modules"
    boot.mkdir()
    for rel in ("6.1.0-9-amd64", "6.1.0-10-amd64", "6.1.0-11-amd64", "6.1.0-10-cloud-amd64"):
        (boot / f"vmlinuz-{rel}").write_bytes(b"k")
    for rel in ("6.1.0-9-amd64", "6.1.0-10-amd64"):  # -11 has no modules installed
        (mods / rel).mkdir(parents=True)
        (mods / rel / "modules.dep").write_text("")
    kernel, release = find_kernel(boot=boot, modules_root=mods)
    assert release == "6.1.0-10-amd64" and kernel == boot / "vmlinuz-6.1.0-10-amd64"


def test_missing_kernel_names_the_package(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="install the linux-image-amd64 package"):
        find_kernel(boot=tmp_path, modules_root=tmp_path)


DEP = """\
kernel/drivers/virtio/virtio.ko:
kernel/drivers/virtio/virtio_ring.ko: kernel/drivers/virtio/virtio.ko
kernel/drivers/net/virtio_net.ko.xz: kernel/drivers/net/net_failover.ko.xz \
kernel/net/core/failover.ko kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/drivers/net/net_failover.ko.xz: kernel/net/core/failover.ko
kernel/net/core/failover.ko:
kernel/drivers/x/a-b.ko: kernel/drivers/x/c.ko
kernel/drivers/x/c.ko: kernel/drivers/x/a-b.ko
"""


def test_modules_are_ordered_dependencies_first() -> None:
    table = parse_modules_dep(DEP)
    order = resolve_modules(["virtio_net", "virtio_ring"], table)
    assert len(order) == len(set(order)) == 5
    pos = {p.rsplit("/", 1)[1]: i for i, p in enumerate(order)}
    assert pos["failover.ko"] < pos["net_failover.ko.xz"] < pos["virtio_net.ko.xz"]
    assert pos["virtio.ko"] < pos["virtio_ring.ko"] < pos["virtio_net.ko.xz"]


def test_unknown_and_cyclic_modules_fail_clearly() -> None:
    table = parse_modules_dep(DEP)
    with pytest.raises(ImageError, match="kernel module virtio_gpu not found"):
        resolve_modules(["virtio_gpu"], table)
    with pytest.raises(ImageError, match="dependency cycle"):
        resolve_modules(["a_b"], table)


def test_compressed_modules_are_unpacked_into_the_initramfs(tmp_path: Path) -> None:
    """A kernel whose modules are .ko.xz / .ko.gz builds an initramfs of plain .ko files."""
    _, release = find_kernel()
    real = Path("/lib/modules") / release
    table = parse_modules_dep((real / "modules.dep").read_text())
    order = resolve_modules(MODULES, table)
    fake = tmp_path / "modules" / release
    lines = []
    for i, rel in enumerate(order):
        data = (real / rel).read_bytes()
        suffix, packed = (".xz", lzma.compress(data)) if i % 2 == 0 else \
            (".gz", gzip.compress(data))
        (fake / (rel + suffix)).parent.mkdir(parents=True, exist_ok=True)
        (fake / (rel + suffix)).write_bytes(packed)
        lines.append(rel + suffix)
    (fake / "modules.dep").write_text("".join(
        f"{rel}{lines[order.index(rel)][len(rel):]}: "
        + " ".join(d + lines[order.index(d)][len(d):] for d in table[name][1]) + "\n"
        for name, (rel, _) in table.items() if rel in order))
    staging = tmp_path / "staging"
    staging.mkdir()
    art = build_tiny(staging, modules_root=tmp_path / "modules", guest_src=tmp_path / "none")
    out = tmp_path / "x"
    out.mkdir()
    subprocess.run(["cpio", "-id", "--quiet", "--no-absolute-filenames"], cwd=out, check=True,
                   input=gzip.decompress(art.initrd.read_bytes()), capture_output=True)
    for rel in order:
        assert (out / "lib/modules" / release / rel).read_bytes() == (real / rel).read_bytes()
    assert (out / "etc/omega/modules").read_text().split() == [f"{release}/{r}" for r in order]
    assert not (out / "usr/bin/omega-hello").exists()  # no guest sources given


def test_guest_tool_compile_error_is_reported(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "broken.c").write_text("int main(void) { return undeclared; }\n")
    staging = tmp_path / "staging"
    staging.mkdir()
    with pytest.raises(ImageError, match="compiling guest tool broken.c failed: .*undeclared"):
        build_tiny(staging, guest_src=src)


def test_cpio_rejects_bad_paths() -> None:
    tree = InitramfsTree()
    for bad in ("", "/", "../etc/passwd", "a/../../b"):
        with pytest.raises(UsageError):
            tree.add_file(bad, b"x")
    tree.add_file("f", b"x")
    with pytest.raises(UsageError, match="not a directory"):
        tree.add_file("f/g", b"y")


_names = st.text(alphabet="abcdefgh_-.0123", min_size=1, max_size=6).filter(
    lambda s: s not in (".", ".."))


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(files=st.dictionaries(st.lists(_names, min_size=1, max_size=3).map("/".join),
                             st.binary(max_size=300), min_size=1, max_size=8),
       links=st.dictionaries(_names.map(lambda n: "l/" + n), _names, max_size=3))
def test_cpio_round_trips_through_gnu_cpio(tmp_path_factory: pytest.TempPathFactory,
                                           files: dict[str, bytes],
                                           links: dict[str, str]) -> None:
    tree = InitramfsTree()
    added: dict[str, bytes] = {}
    for path, data in files.items():
        before = tree.encode()
        try:
            tree.add_file(path, data, perm=0o640)
        except UsageError:
            # A file where a directory is (or the reverse): refused, tree unchanged.
            assert tree.encode() == before
            continue
        added[path] = data
    before = tree.encode()
    for path, target in links.items():
        try:
            tree.add_symlink(path, target)
        except UsageError:
            assert tree.encode() == before  # refused without a trace
        before = tree.encode()
    out = tmp_path_factory.mktemp("cpio")
    subprocess.run(["cpio", "-id", "--quiet", "--no-absolute-filenames"], cwd=out, check=True,
                   input=tree.encode(), capture_output=True)
    for path, data in added.items():
        if path in links:
            continue  # replaced by a symlink of the same name
        assert (out / path).read_bytes() == data
        assert (out / path).stat().st_mode & 0o777 == 0o640
    for path, target in links.items():
        if path in tree:
            assert os.readlink(out / path) == target
    assert tree.encode() == tree.encode()  # deterministic
