"""The Omega admin app: VMs, cluster, DSM, and host facts."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.widgets import Footer, Log, TabbedContent, TabPane

from hypervisor.errors import OmegaError
from tui._cluster_panel import ClusterPanel
from tui._confirm import ConfirmScreen
from tui._dsm_panel import DsmPanel
from tui._host_header import HostHeader
from tui._sources import ClusterView
from tui._vm_table import VMTable


def one_line(exc: BaseException) -> str:
    """The first line of an error's message (what a notification shows)."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


class OmegaAdminApp(App[None]):
    """Drive Omega VMs and watch the cluster from a terminal.

    Every call into ``view`` runs in a worker thread, so a slow libvirt never
    freezes the screen; an :class:`OmegaError` becomes a one-line notification.

    Args:
        view: the data sources and actions.
        refresh_interval: seconds between automatic refreshes.

    Attributes:
        errors: the error lines notified so far, oldest first.
    """

    TITLE = "Omega"
    CSS = """
    HostHeader { height: 1; background: $primary-background; padding: 0 1; }
    VMTable { height: 1fr; }
    #serial { height: 12; border: round $secondary; }
    ClusterPanel DataTable { height: auto; max-height: 50%; }
    #dsm-faults { height: 4; margin-top: 1; }
    """
    BINDINGS = [
        Binding("s", "start", "Start"),
        Binding("t", "stop", "Stop"),
        Binding("d", "destroy", "Destroy"),
        Binding("p", "pause", "Pause/Resume"),
        Binding("b", "reboot", "Reboot"),
        Binding("x", "delete", "Delete"),
        Binding("c", "serial", "Serial log"),
        Binding("r", "refresh", "Refresh"),
        Binding("q", "quit", "Quit"),
    ]

    def __init__(self, view: ClusterView, *, refresh_interval: float = 2.0) -> None:
        super().__init__()
        self.view = view
        self.refresh_interval = refresh_interval
        self.errors: list[str] = []
        self._refreshing = False

    # ------------------------------------------------------------ layout

    def compose(self) -> ComposeResult:
        """Header, three tabs, footer."""
        yield HostHeader("Omega host  (probing…)", id="host")
        with TabbedContent(initial="vms"):
            with TabPane("VMs", id="vms"):
                yield VMTable(id="vm-table")
                yield Log(id="serial")
            with TabPane("Cluster", id="cluster"):
                yield ClusterPanel(id="cluster-panel")
            with TabPane("DSM", id="dsm"):
                yield DsmPanel(id="dsm-panel")
        yield Footer()

    def on_mount(self) -> None:
        """Load host facts once, data now and on a timer."""
        self.query_one(VMTable).focus()
        self.run_worker(self._load_host_facts, thread=True, group="host")
        self.action_refresh()
        self.set_interval(self.refresh_interval, self.action_refresh)

    @property
    def vm_table(self) -> VMTable:
        """The VM table."""
        return self.query_one(VMTable)

    # ------------------------------------------------------------ workers

    def _report(self, exc: BaseException) -> None:
        line = one_line(exc)
        if not isinstance(exc, OmegaError):
            line = f"{type(exc).__name__}: {line}"
        self.errors.append(line)
        self.notify(line, title="omega", severity="error")

    def _to_ui(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """From a worker thread: run ``fn`` on the UI thread (dropped once the app has quit)."""
        if self.is_running:
            try:
                self.call_from_thread(fn, *args, **kwargs)
            except RuntimeError:  # the app stopped between the check and the call
                pass

    def _guarded(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` in a worker thread; report any failure on the UI thread."""
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - the UI must survive any failure
            self._to_ui(self._report, exc)
            return None

    def _load_host_facts(self) -> None:
        facts = self._guarded(self.view.host_facts)
        if facts is not None:
            self._to_ui(lambda: self.query_one(HostHeader).show_facts(facts))

    def _fetch_all(self, selected: str | None) -> None:
        """Read every source (worker thread) and hand the results to the UI."""
        vms = self._guarded(self.view.list_vms)
        if vms is not None:
            self._to_ui(lambda: self.vm_table.show_rows(vms))
        peers = self._guarded(self.view.peers)
        exports = self._guarded(self.view.exports)
        if peers is not None and exports is not None:
            self._to_ui(lambda: self.query_one(ClusterPanel).show_rows(peers, exports))
        if selected is not None:
            note: str | None = None
            try:
                stats = self.view.dsm_stats(selected)
            except Exception as exc:  # noqa: BLE001 - shown in the panel, not notified each tick
                stats, note = None, one_line(exc)
            self._to_ui(lambda: self.query_one(DsmPanel).show_stats(selected, stats, note=note))

    def _refresh_worker(self, selected: str | None) -> None:
        try:
            self._fetch_all(selected)
        finally:
            self._refreshing = False

    def _act(self, verb: str, fn: Callable[[str], Any], name: str) -> None:
        """Run one VM action in a worker thread, then refresh."""
        def _work() -> None:
            outcome = self._guarded(lambda: fn(name))
            if isinstance(outcome, str):  # e.g. stop: shutdown, destroyed, not-running
                self._to_ui(self.notify, f"{verb} {name}: {outcome}", timeout=3)
            self._fetch_all(name)
        self.notify(f"{verb} {name}…", timeout=2)
        self.run_worker(_work, thread=True, group="action", name=f"{verb} {name}")

    # ------------------------------------------------------------ actions

    def action_refresh(self) -> None:
        """Re-read VMs, peers, exports and DSM stats (skipped while one runs)."""
        if self._refreshing:
            return
        self._refreshing = True
        selected = self.vm_table.selected
        self.run_worker(lambda: self._refresh_worker(selected), thread=True, group="refresh")

    def _selected_or_warn(self) -> str | None:
        name = self.vm_table.selected
        if name is None:
            self.notify("no VM selected", severity="warning")
        return name

    def action_start(self) -> None:
        """Start the selected VM."""
        if (name := self._selected_or_warn()) is not None:
            self._act("start", self.view.start_vm, name)

    def action_stop(self) -> None:
        """Stop the selected VM (ACPI, then destroy)."""
        if (name := self._selected_or_warn()) is not None:
            self._act("stop", self.view.stop_vm, name)

    def action_destroy(self) -> None:
        """Power the selected VM off at once."""
        if (name := self._selected_or_warn()) is not None:
            self._act("destroy", self.view.destroy_vm, name)

    def action_pause(self) -> None:
        """Pause the selected VM, or resume it if paused."""
        if (name := self._selected_or_warn()) is not None:
            self._act("pause/resume", self.view.pause_vm, name)

    def action_reboot(self) -> None:
        """Ask the selected VM to reboot."""
        if (name := self._selected_or_warn()) is not None:
            self._act("reboot", self.view.reboot_vm, name)

    def action_delete(self) -> None:
        """Delete the selected VM after a confirmation."""
        name = self._selected_or_warn()
        if name is None:
            return

        def _answer(confirmed: bool | None) -> None:
            if confirmed:
                self._act("delete", self.view.delete_vm, name)

        self.push_screen(ConfirmScreen(f"Delete VM {name!r}? It is destroyed first if it "
                                       "runs, and its runtime directory is removed."),
                         _answer)

    def action_serial(self) -> None:
        """Show the tail of the selected VM's serial log."""
        name = self._selected_or_warn()
        if name is None:
            return

        def _work() -> None:
            text = self._guarded(lambda: self.view.serial_tail(name))
            if text is not None:
                self._to_ui(self._show_serial, name, text)
        self.run_worker(_work, thread=True, group="serial")

    def _show_serial(self, name: str, text: str) -> None:
        log = self.query_one("#serial", Log)
        log.clear()
        log.border_title = f"serial: {name}"
        log.write(text)
