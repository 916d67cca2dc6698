"""The content-addressed image store: build, list, get (verified), delete."""

from __future__ import annotations

import gzip
import json
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hypervisor.errors import ImageError, NotFoundError, UsageError
from images.store import (
    MANIFEST,
    BuiltArtifacts,
    Image,
    ImageStore,
    image_digest,
    sha256_file,
)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_tiny_image_is_stored_content_addressed(tiny_image: Image,
                                                image_store: ImageStore) -> None:
    d = tiny_image.kernel.parent
    assert d.parent == image_store.root
    assert d.name == tiny_image.digest
    assert tiny_image.initrd.parent == d
    manifest = json.loads((d / MANIFEST).read_text())
    assert manifest["files"]["kernel"]["sha256"] == sha256_file(tiny_image.kernel)
    assert manifest["files"]["initrd"]["sha256"] == sha256_file(tiny_image.initrd)
    assert image_digest(kernel_sha256=sha256_file(tiny_image.kernel),
                        initrd_sha256=sha256_file(tiny_image.initrd),
                        cmdline=tiny_image.cmdline) == tiny_image.digest
    assert tiny_image.size == tiny_image.kernel.stat().st_size + tiny_image.initrd.stat().st_size
    assert "console=ttyS0" in tiny_image.cmdline
    assert tiny_image.name == tiny_image.recipe == "tiny"
    # QEMU runs as libvirt-qemu: everything world-readable, directories traversable.
    assert _mode(d) == 0o755 and _mode(image_store.root) == 0o755
    for f in (tiny_image.kernel, tiny_image.initrd, d / MANIFEST):
        assert _mode(f) == 0o644


def test_kernel_is_debians_not_the_host_running_one(tiny_image: Image) -> None:
    manifest = json.loads((tiny_image.kernel.parent / MANIFEST).read_text())
    release = manifest["source"]["kernel_release"]
    assert release.endswith("-amd64")
    assert tiny_image.kernel.read_bytes() == Path(f"/boot/vmlinuz-{release}").read_bytes()
    assert manifest["source"]["modules"][-1] == "virtio_console"


def test_initramfs_holds_init_busybox_modules_and_guest_tools(tiny_image: Image,
                                                              tmp_path: Path) -> None:
    archive = gzip.decompress(tiny_image.initrd.read_bytes())
    listing = subprocess.run(["cpio", "-itv"], input=archive, capture_output=True,
                             check=True).stdout.decode()
    lines = {line.split()[-1] if "->" not in line else line.split()[-3]: line
             for line in listing.splitlines()}
    assert lines["init"].startswith("-rwxr-xr-x")
    assert lines["dev/console"].startswith("crw-------")
    assert lines["bin/sh"].startswith("l") and "-> /bin/busybox" in lines["bin/sh"]
    assert lines["usr/bin/omega-hello"].startswith("-rwxr-xr-x")
    for mod in ("virtio_pci", "virtio_blk", "virtio_net", "virtio_console", "virtio_ring"):
        assert any(name.endswith(f"/{mod}.ko") for name in lines), mod
    # Every directory precedes its contents (the kernel creates files in order).
    names = [(line.split()[-1] if "->" not in line else line.split()[-3])
             for line in listing.splitlines()]
    seen: set[str] = set()
    for name in names:
        parent = name.rpartition("/")[0]
        assert not parent or parent in seen, f"{name} before its directory"
        seen.add(name)


def test_rebuild_is_reproducible(tiny_image: Image, image_store: ImageStore) -> None:
    again = image_store.build("tiny")
    assert again.digest == tiny_image.digest
    assert again.created == tiny_image.created  # same content: the stored copy is reused


def test_list_and_get_by_name_and_prefix(tiny_image: Image, image_store: ImageStore) -> None:
    assert tiny_image.digest in {im.digest for im in image_store.list()}
    assert image_store.get("tiny").digest == tiny_image.digest
    assert image_store.get(tiny_image.digest[:10]) == tiny_image
    assert image_store.get(tiny_image.digest.upper()) == tiny_image


def test_unknown_ref_is_not_found(image_store: ImageStore) -> None:
    with pytest.raises(NotFoundError, match="image 'no-such-image' not found"):
        image_store.get("no-such-image")
    with pytest.raises(NotFoundError):
        image_store.get("ffffffffffffffff")
    with pytest.raises(UsageError):
        image_store.get("  ")


def test_unknown_recipe_is_a_usage_error(image_store: ImageStore) -> None:
    with pytest.raises(UsageError, match="unknown image recipe 'windows95'"):
        image_store.build("windows95")


@pytest.mark.parametrize("victim", ["initrd.img", "vmlinuz"])
def test_flipped_byte_is_caught_on_get(scratch_store: ImageStore, victim: str) -> None:
    image = scratch_store.get("tiny")
    path = image.kernel.parent / victim
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ImageError, match=f"image tiny@{image.digest[:12]} is corrupt: "
                                         f"{victim} sha256 mismatch"):
        scratch_store.get("tiny")
    # Still listed (listing does not hash) and deletable.
    assert [im.digest for im in scratch_store.list()] == [image.digest]
    scratch_store.delete("tiny")
    # Rebuilding restores a good copy.
    assert scratch_store.build("tiny").digest == image.digest
    scratch_store.get("tiny")


def test_missing_file_and_tampered_manifest_are_caught(scratch_store: ImageStore) -> None:
    image = scratch_store.get("tiny")
    image.initrd.unlink()
    with pytest.raises(ImageError, match="initrd.img is missing"):
        scratch_store.get(image.digest)
    scratch_store.delete(image.digest)

    image = scratch_store.build("tiny")
    mpath = image.kernel.parent / MANIFEST
    manifest = json.loads(mpath.read_text())
    manifest["cmdline"] += " init=/bin/evil"
    mpath.write_text(json.dumps(manifest))
    with pytest.raises(ImageError, match="does not match its digest"):
        scratch_store.get(image.digest)

    mpath.write_text("{not json")
    with pytest.raises(ImageError, match="unreadable manifest.json"):
        scratch_store.get(image.digest)


def test_delete_removes_the_files(scratch_store: ImageStore) -> None:
    image = scratch_store.get("tiny")
    gone = scratch_store.delete("tiny")
    assert gone.digest == image.digest
    assert not image.kernel.parent.exists()
    assert scratch_store.list() == []
    with pytest.raises(NotFoundError):
        scratch_store.get("tiny")
    with pytest.raises(NotFoundError):
        scratch_store.delete("tiny")
    leftovers = [p.name for p in scratch_store.root.iterdir() if p.name != ".lock"]
    assert leftovers == []


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12)
_manifests = st.fixed_dictionaries({}, optional={
    "name": _json, "recipe": _json, "cmdline": _json, "created": _json,
    "files": st.dictionaries(st.sampled_from(["kernel", "initrd", "x"]),
                             st.fixed_dictionaries({}, optional={
                                 "path": st.sampled_from(["vmlinuz", "initrd.img", "../x",
                                                          "/etc/passwd", ""]) | _json,
                                 "sha256": _json, "size": _json}), max_size=3) | _json,
})


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(manifest=_manifests | _json, raw=st.binary(max_size=40))
def test_malformed_manifests_are_image_errors(scratch_store: ImageStore, manifest: object,
                                              raw: bytes) -> None:
    """Whatever is in manifest.json, get() says ImageError and list() keeps working."""
    d = scratch_store.root / ("ab" * 32)
    d.mkdir(exist_ok=True)
    for text in (json.dumps(manifest).encode(), raw):
        (d / MANIFEST).write_bytes(text)
        with pytest.raises(ImageError):
            scratch_store.get("ab" * 32)
        listed = scratch_store.list()
        assert "tiny" in [im.name for im in listed]
        assert all(isinstance(im.name, str) and isinstance(im.size, int) for im in listed)


def test_newest_of_a_name_wins_and_ambiguous_prefix_is_refused(scratch_store: ImageStore,
                                                               tmp_path: Path) -> None:
    first = scratch_store.get("tiny")
    # A second "tiny" that differs only in its command line, chosen so both
    # digests share their first hex digit.
    cmdline = next(c for c in (f"{first.cmdline} omega.variant={i}" for i in range(1000))
                   if image_digest(kernel_sha256=sha256_file(first.kernel),
                                   initrd_sha256=sha256_file(first.initrd),
                                   cmdline=c)[0] == first.digest[0])
    for f in (first.kernel, first.initrd):
        shutil.copyfile(f, tmp_path / f.name)
    second = scratch_store.add(BuiltArtifacts(
        name="tiny", recipe="tiny", kernel=tmp_path / first.kernel.name,
        initrd=tmp_path / first.initrd.name, cmdline=cmdline, source={}))
    assert second.digest != first.digest and second.created > first.created
    assert scratch_store.get("tiny") == second
    assert [im.digest for im in scratch_store.list()] == [second.digest, first.digest]
    with pytest.raises(UsageError, match="is ambiguous"):
        scratch_store.get(first.digest[0])
    assert scratch_store.get(first.digest[:12]) == first
    scratch_store.delete(second.digest)
    assert scratch_store.get("tiny") == first
