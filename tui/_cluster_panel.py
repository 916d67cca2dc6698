"""Peers of the cluster and netblock exports."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import DataTable, Label

PEER_COLUMNS: tuple[tuple[str, str], ...] = (
    ("name", "Peer"), ("address", "Address"), ("lends", "Lends"), ("state", "State"))
EXPORT_COLUMNS: tuple[tuple[str, str], ...] = (
    ("name", "Export"), ("kind", "Kind"), ("size", "Size"), ("replicas", "Replicas"),
    ("in_use_by", "In use by"))


def _fill(table: DataTable[str], columns: tuple[tuple[str, str], ...],
          rows: list[dict[str, str]]) -> None:
    if not table.columns:
        for key, label in columns:
            table.add_column(label, key=key)
    table.clear()
    for row in rows:
        table.add_row(*(row.get(key, "") for key, _ in columns), key=row["name"])


class ClusterPanel(Vertical):
    """Two tables: peers (name, address, lends, state) and netblock exports."""

    def compose(self) -> ComposeResult:
        """Labels and tables."""
        yield Label("Peers")
        yield DataTable(id="peers", cursor_type="row")
        yield Label("Netblock exports")
        yield DataTable(id="exports", cursor_type="row")

    def show_rows(self, peers: list[dict[str, str]], exports: list[dict[str, str]]) -> None:
        """Replace both tables' rows.

        Args:
            peers: rows from :attr:`tui.ClusterView.peers`.
            exports: rows from :attr:`tui.ClusterView.exports`.
        """
        _fill(self.query_one("#peers", DataTable), PEER_COLUMNS, peers)
        _fill(self.query_one("#exports", DataTable), EXPORT_COLUMNS, exports)
