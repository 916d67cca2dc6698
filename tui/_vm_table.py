"""The table of Omega VMs."""

from __future__ import annotations

from textual.widgets import DataTable

#: Columns shown, in order: (row key, header).
VM_COLUMNS: tuple[tuple[str, str], ...] = (
    ("name", "Name"), ("state", "State"), ("vcpus", "vCPUs"), ("memory", "Memory"),
    ("local_memory", "Local memory"), ("accel", "Accel"), ("disks", "Disks"),
)


class VMTable(DataTable[str]):
    """One row per Omega VM, keyed by VM name; the cursor row is the selected VM."""

    def on_mount(self) -> None:
        """Add the columns."""
        self.cursor_type = "row"
        for key, label in VM_COLUMNS:
            self.add_column(label, key=key)

    @property
    def selected(self) -> str | None:
        """The VM under the cursor, or None when the table is empty."""
        if self.row_count == 0:
            return None
        row_key, _col = self.coordinate_to_cell_key(self.cursor_coordinate)
        return row_key.value

    def show_rows(self, rows: list[dict[str, str]]) -> None:
        """Replace the rows, keeping the cursor on the same VM where it still exists.

        Args:
            rows: rows as :attr:`tui.ClusterView.list_vms` returns them.
        """
        keep = self.selected
        self.clear()
        for row in rows:
            self.add_row(*(row.get(key, "") for key, _ in VM_COLUMNS), key=row["name"])
        names = [row["name"] for row in rows]
        if keep in names:
            self.move_cursor(row=names.index(keep))
