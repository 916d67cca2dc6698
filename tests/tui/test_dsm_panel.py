"""The DSM tab against a real DSM VM: peers (``omega node serve``), handler, agent in QEMU."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest

from hypervisor.config import Config
from hypervisor.vm.spec import VMSpec
from tests.tui.conftest import REPO, select, settle
from tests.vm.conftest import force_remove
from tui import DsmPanel, OmegaAdminApp

pytestmark = [pytest.mark.libvirt, pytest.mark.slow]

NAME = "omega-test-t-dsm"


@pytest.fixture
def peer_env(config: Config) -> Iterator[str]:
    """Two real peers on loopback (ports chosen by the kernel); the OMEGA_DSM_PEERS value."""
    from hypervisor.security import ClusterCA, issue_node_cert

    if not ClusterCA.exists(config):
        ClusterCA.init(config, name="omega-test-t")
    procs: list[subprocess.Popen[bytes]] = []
    entries = []
    try:
        for i in range(2):
            name = f"t-peer{i}"
            issue_node_cert(config, name, sans=[name, "127.0.0.1"])
            proc = subprocess.Popen([sys.executable, "-m", "hypervisor.cli", "node", "serve",
                                     "--name", name, "--listen", "127.0.0.1:0",
                                     "--memory-lend", "512M"], cwd=REPO,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            procs.append(proc)
            line = proc.stdout.readline().decode() if proc.stdout else ""
            assert line.startswith("omega-node-ready"), f"peer {name} did not start: {line}"
            entries.append(f"{name}={line.split()[2]}")
        yield ",".join(entries)
    finally:
        for proc in procs:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


async def test_dsm_tab_shows_live_handler_stats(controller, config: Config, peer_env: str,
                                                monkeypatch: pytest.MonkeyPatch,
                                                admin_app: OmegaAdminApp) -> None:
    monkeypatch.setenv("OMEGA_DSM_PEERS", peer_env)
    try:
        controller.create(VMSpec(name=NAME, image="tiny", memory=256 << 20,
                                 local_memory=192 << 20, accel="tcg"))
        controller.start(NAME)
        async with admin_app.run_test(size=(140, 45)) as pilot:
            await settle(admin_app, pilot)
            select(admin_app, NAME)
            assert str(admin_app.vm_table.get_cell(NAME, "local_memory")) == "192M"
            await pilot.press("r")
            await settle(admin_app, pilot)
            await pilot.press("r")
            await settle(admin_app, pilot)
            panel = admin_app.query_one(DsmPanel)
            text = str(panel.query_one("#dsm-text").render())
            assert text.startswith(NAME) and "faults" in text, text
            # One sample per refresh feeds the faults/s sparkline.
            assert len(panel.query_one("#dsm-faults").data) >= 2
            assert admin_app.errors == []
    finally:
        force_remove(controller, NAME)
