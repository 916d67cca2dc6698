"""`omega tui`: the Textual admin app."""

from __future__ import annotations

import typer


def tui(
    refresh: float = typer.Option(2.0, "--refresh", min=0.2,
                                  help="Seconds between automatic refreshes."),
) -> None:
    """Open the terminal admin UI: VMs, cluster peers, netblock exports, DSM stats."""
    from hypervisor.config import Config
    from tui import ClusterView, OmegaAdminApp

    OmegaAdminApp(ClusterView.from_config(Config.from_env()), refresh_interval=refresh).run()
