"""The `omega` command's shape: help, version, usage errors."""

from __future__ import annotations

from hypervisor._version import __version__
from tests.conftest import REPO


def test_version_matches_meson(omega) -> None:
    proc = omega("--version", check=True)
    assert proc.stdout.strip() == f"omega {__version__}"
    assert (REPO / "VERSION").read_text().strip() == __version__


def test_help_lists_groups(omega) -> None:
    proc = omega("--help", check=True)
    for group in ("host", "images", "vm", "cluster", "node", "netblock", "dsm", "display",
                  "metrics", "demo"):
        assert group in proc.stdout


def test_unknown_command_is_usage_error(omega) -> None:
    proc = omega("no-such-command")
    assert proc.returncode == 2
    assert "no-such-command" in proc.stderr


def test_usage_errors_are_one_line(omega) -> None:
    for args in (("no-such-command",), ("vm", "create", "x", "--vcpus", "abc"),
                 ("images", "build", "--no-such-flag")):
        proc = omega(*args)
        assert proc.returncode == 2, args
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("omega: error: "), proc.stderr


def test_bare_group_prints_its_help(omega) -> None:
    proc = omega("vm")
    assert proc.returncode == 2
    assert "create" in proc.stdout and "console" in proc.stdout
