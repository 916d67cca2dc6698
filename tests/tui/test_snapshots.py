"""Screen snapshot (pytest-textual-snapshot): the delete confirmation dialog.

Only this screen is snapshotted: the main screens show live libvirt data
(other sessions' VMs, the host's probe reason), which no fixed picture matches;
tests/tui/test_app.py checks those through their widgets instead.
"""

from __future__ import annotations

from textual.app import App, ComposeResult
from textual.widgets import Label

from tui import ConfirmScreen


class ConfirmHost(App[None]):
    """A bare app that opens the confirmation dialog the VM tab shows before delete."""

    def compose(self) -> ComposeResult:
        yield Label("behind the dialog")

    def on_mount(self) -> None:
        self.push_screen(ConfirmScreen("Delete VM 'omega-test-t-snap'? It is destroyed first "
                                       "if it runs, and its runtime directory is removed."))


def test_confirm_delete_dialog(snap_compare) -> None:
    assert snap_compare(ConfirmHost(), terminal_size=(80, 20))
