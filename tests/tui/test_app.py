"""The admin app driven by keys, observed through libvirt (virsh) and its widgets."""

from __future__ import annotations

import os

from hypervisor.clusterstate import ClusterState, PeerInfo
from hypervisor.config import Config
from hypervisor.netblock.exports import ExportStore
from tui import ConfirmScreen, DsmPanel, HostHeader, OmegaAdminApp
from tests.tui.conftest import select, settle, virsh_state

SIZE = (140, 45)


def cell(app: OmegaAdminApp, name: str, column: str) -> str:
    """One cell of the VM table."""
    return str(app.vm_table.get_cell(name, column))


async def test_keys_start_stop_destroy_delete(admin_app: OmegaAdminApp, make_vm,
                                              controller, config: Config) -> None:
    name = make_vm()
    async with admin_app.run_test(size=SIZE) as pilot:
        await settle(admin_app, pilot)
        select(admin_app, name)
        assert cell(admin_app, name, "state") == "shut-off"
        assert cell(admin_app, name, "vcpus") == "1"
        assert cell(admin_app, name, "memory") == "128M"
        assert cell(admin_app, name, "accel") == "tcg"
        assert "accel:" in str(admin_app.query_one(HostHeader).render())

        await pilot.press("s")
        await settle(admin_app, pilot)
        assert virsh_state(config, name) == "running"
        assert cell(admin_app, name, "state") == "running"

        # c: the serial log tail holds what the guest printed.
        controller.wait_for_serial(name, r"OMEGA-GUEST-READY", timeout=300)
        await pilot.press("c")
        await settle(admin_app, pilot)
        serial = admin_app.query_one("#serial")
        assert any("OMEGA-GUEST-READY" in line for line in serial.lines)
        assert serial.border_title == f"serial: {name}"

        # p pauses the vCPUs and resumes them; b asks the guest to reboot
        await pilot.press("p")
        await settle(admin_app, pilot)
        assert virsh_state(config, name) == "paused"
        assert cell(admin_app, name, "state") == "paused"
        await pilot.press("p")
        await settle(admin_app, pilot)
        assert virsh_state(config, name) == "running"
        log = controller.runtime_dir(name).serial_log
        before = log.stat().st_size
        await pilot.press("b")
        await settle(admin_app, pilot)
        controller.wait_for_serial(name, r"OMEGA-GUEST-READY", timeout=300, after=before)
        assert "reboot: Restarting system" in log.read_text(errors="replace")

        # t: ACPI stop (the tiny guest gets `poweroff` typed on its console).
        await pilot.press("t")
        await settle(admin_app, pilot)
        assert virsh_state(config, name) == "shut off"
        assert cell(admin_app, name, "state") == "shut-off"

        await pilot.press("s")
        await settle(admin_app, pilot)
        assert virsh_state(config, name) == "running"
        await pilot.press("d")
        await settle(admin_app, pilot)
        assert virsh_state(config, name) == "shut off"

        # x asks first; "n" keeps the VM.
        await pilot.press("x")
        await pilot.pause()
        assert isinstance(admin_app.screen, ConfirmScreen)
        await pilot.press("n")
        await settle(admin_app, pilot)
        assert not isinstance(admin_app.screen, ConfirmScreen)
        assert virsh_state(config, name) == "shut off"

        await pilot.press("x")
        await pilot.pause()
        await pilot.press("y")
        await settle(admin_app, pilot)
        assert virsh_state(config, name) == "absent"
        assert name not in {key.value for key in admin_app.vm_table.rows}
        assert not controller.runtime_dir(name).path.exists()
        assert admin_app.errors == []


async def test_action_on_vanished_vm_is_one_notification(admin_app: OmegaAdminApp, make_vm,
                                                         controller, config: Config) -> None:
    name = make_vm()
    async with admin_app.run_test(size=SIZE) as pilot:
        await settle(admin_app, pilot)
        select(admin_app, name)
        controller.delete(name)  # behind the app's back
        assert virsh_state(config, name) == "absent"

        await pilot.press("s")
        await settle(admin_app, pilot)
        assert len(admin_app.errors) == 1
        assert name in admin_app.errors[0] and "\n" not in admin_app.errors[0]
        assert admin_app.is_running
        # The refresh after the failed action dropped the row; the app still answers keys.
        assert name not in {key.value for key in admin_app.vm_table.rows}
        await pilot.press("r")
        await settle(admin_app, pilot)
        assert admin_app.is_running


async def test_serial_of_never_started_vm_is_an_error_line(admin_app: OmegaAdminApp,
                                                           make_vm) -> None:
    name = make_vm()
    async with admin_app.run_test(size=SIZE) as pilot:
        await settle(admin_app, pilot)
        select(admin_app, name)
        await pilot.press("c")
        await settle(admin_app, pilot)
        assert admin_app.errors and "no serial log" in admin_app.errors[-1]
        assert admin_app.is_running


async def test_cluster_and_dsm_tabs(admin_app: OmegaAdminApp, make_vm, config: Config) -> None:
    name = make_vm()
    state = ClusterState(config)
    peer = "omega-test-t-peer"
    state.put(PeerInfo(name=peer, address="127.0.0.1:19999", memory_lend=1 << 30,
                       disk_lend=4 << 30, state="stopped"))
    exports = ExportStore(config)
    exports.create("omega-test-t-export", 1 << 20, local=True)
    held = exports.create("omega-test-t-held", 1 << 20, local=True)
    lock = exports.lock(held)  # as a server holds an export it serves
    try:
        async with admin_app.run_test(size=SIZE) as pilot:
            await settle(admin_app, pilot)
            peers_table = admin_app.query_one("#peers")
            assert str(peers_table.get_cell(peer, "address")) == "127.0.0.1:19999"
            assert str(peers_table.get_cell(peer, "lends")) == "RAM 1G, disk 4G"
            assert str(peers_table.get_cell(peer, "state")) == "stopped"
            export_table = admin_app.query_one("#exports")
            assert str(export_table.get_cell("omega-test-t-export", "kind")) == "local"
            assert str(export_table.get_cell("omega-test-t-export", "size")) == "1M"
            assert str(export_table.get_cell("omega-test-t-export", "in_use_by")) == "-"
            assert str(export_table.get_cell("omega-test-t-held", "in_use_by")) == \
                f"pid {os.getpid()}"

            # The DSM tab describes the selected VM; this one keeps all its memory local.
            select(admin_app, name)
            await pilot.press("r")
            await settle(admin_app, pilot)
            text = str(admin_app.query_one(DsmPanel).query_one("#dsm-text").render())
            assert text.startswith(name) and "no DSM" in text
    finally:
        os.close(lock)
        exports.delete("omega-test-t-held")
        exports.delete("omega-test-t-export")
        exports.close()
        state.remove(peer)
