"""The Textual admin app (``omega tui``).

The app takes its data sources as a :class:`ClusterView` of callables;
``ClusterView.from_config`` wires the real ones (libvirt, cluster state,
netblock exports, DSM handlers).
"""

from __future__ import annotations

from tui._app import OmegaAdminApp, one_line
from tui._cluster_panel import ClusterPanel
from tui._confirm import ConfirmScreen
from tui._dsm_panel import DsmPanel, describe_stats
from tui._host_header import HostHeader
from tui._sources import ClusterView
from tui._vm_table import VMTable

__all__ = [
    "ClusterPanel", "ClusterView", "ConfirmScreen", "DsmPanel", "HostHeader",
    "OmegaAdminApp", "VMTable", "describe_stats", "one_line",
]
