"""Fixtures for the admin app tests: the real sources against a real libvirtd.

Every domain is named ``omega-test-t-*``; each test that makes one removes it
whatever happens.
"""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from hypervisor.config import Config
from hypervisor.vm.lifecycle import VMController
from hypervisor.vm.spec import VMSpec
from tests.vm.conftest import force_remove
from tui import ClusterView, OmegaAdminApp

REPO = Path(__file__).resolve().parents[2]

#: Seconds between automatic refreshes in tests: long, so only keys refresh.
NO_AUTO_REFRESH = 3600.0


def virsh_state(config: Config, name: str) -> str:
    """``virsh domstate NAME`` (e.g. ``running``, ``shut off``), or ``absent``."""
    proc = subprocess.run(["virsh", "-c", config.libvirt_uri, "domstate", name],
                          capture_output=True, text=True, timeout=60, check=False)
    return proc.stdout.strip() if proc.returncode == 0 else "absent"


async def settle(app: OmegaAdminApp, pilot) -> None:
    """Wait until every worker the app started has finished and its results are shown."""
    await app.workers.wait_for_complete()
    await pilot.pause()


def select(app: OmegaAdminApp, name: str) -> None:
    """Put the VM table's cursor on ``name`` (other sessions' VMs may be listed too)."""
    table = app.vm_table
    table.move_cursor(row=table.get_row_index(name))
    assert table.selected == name


@pytest.fixture(scope="session")
def controller(config: Config, tiny_image) -> Iterator[VMController]:
    """A VM controller on the session's OMEGA_HOME, the tiny image built."""
    ctl = VMController(config)
    yield ctl
    ctl.close()


@pytest.fixture
def make_vm(controller: VMController) -> Iterator[Callable[[], str]]:
    """Define a fresh tiny VM (not started) and return its name; removed afterwards."""
    names: list[str] = []

    def _make() -> str:
        name = f"omega-test-t-{uuid.uuid4().hex[:8]}"
        names.append(name)
        controller.create(VMSpec(name=name, image="tiny", vcpus=1, memory=128 << 20,
                                 accel="tcg"))
        return name

    yield _make
    for name in names:
        force_remove(controller, name)


@pytest.fixture
def admin_app(config: Config) -> OmegaAdminApp:
    """The app wired to the real sources, refreshing only on demand."""
    return OmegaAdminApp(ClusterView.from_config(config), refresh_interval=NO_AUTO_REFRESH)
