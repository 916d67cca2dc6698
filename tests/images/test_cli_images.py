"""`omega images build|list|show|delete` through the real CLI."""

from __future__ import annotations

import json

from hypervisor.config import Config
from images.store import Image


def test_build_json_prints_the_image_record(omega, tiny_image: Image) -> None:
    proc = omega("images", "build", "tiny", "--json", check=True)
    record = json.loads(proc.stdout)
    assert record["digest"] == tiny_image.digest
    assert record["kernel"] == str(tiny_image.kernel)
    assert record["initrd"] == str(tiny_image.initrd)
    assert record["cmdline"] == tiny_image.cmdline
    assert record["name"] == "tiny" and record["size"] == tiny_image.size


def test_build_shows_progress(omega, tiny_image: Image) -> None:
    proc = omega("images", "build", "tiny", check=True)
    assert proc.stdout.startswith(f"built tiny {tiny_image.digest[:12]} (")
    assert "100%" in proc.stderr  # the rich progress bar, on stderr


def test_list_and_show(omega, tiny_image: Image) -> None:
    listed = json.loads(omega("images", "list", "--json", check=True).stdout)
    assert tiny_image.digest in [im["digest"] for im in listed]
    table = omega("images", "list", check=True).stdout
    assert "tiny" in table and tiny_image.digest[:12] in table
    shown = json.loads(omega("images", "show", tiny_image.digest[:8], "--json",
                             check=True).stdout)
    assert shown["digest"] == tiny_image.digest


def test_unknown_ref_is_one_line_exit_1(omega, config: Config) -> None:
    for args in (("images", "show", "nope"), ("images", "delete", "nope")):
        proc = omega(*args)
        assert proc.returncode == 1
        assert proc.stderr.strip().splitlines() == [
            "omega: error: image 'nope' not found (see `omega images list`)"]


def test_unknown_recipe_is_usage_exit_2(omega, config: Config) -> None:
    proc = omega("images", "build", "windows95")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == \
        "omega: error: unknown image recipe 'windows95' (known: tiny)"


def test_corrupt_image_is_one_line_exit_1_and_delete_works(omega, scratch_config: Config,
                                                           ) -> None:
    env = {"OMEGA_HOME": str(scratch_config.home)}
    record = json.loads(omega("images", "build", "tiny", "--json", env=env,
                              check=True).stdout)
    with open(record["initrd"], "r+b") as f:
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 0xFF]))
    proc = omega("images", "show", "tiny", env=env)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"omega: error: image tiny@{record['digest'][:12]} is corrupt: "
        "initrd.img sha256 mismatch"]
    proc = omega("images", "delete", record["digest"][:12], env=env, check=True)
    assert proc.stdout.strip() == f"deleted tiny {record['digest'][:12]}"
    assert json.loads(omega("images", "list", "--json", env=env, check=True).stdout) == []
