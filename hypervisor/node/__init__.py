"""The node daemon and its clients: pages and chunks lent by peers.

Modules: :mod:`~hypervisor.node.wire` (the protocol, pure),
:mod:`~hypervisor.node.stores` (page and chunk stores),
:mod:`~hypervisor.node.daemon` (the asyncio server),
:mod:`~hypervisor.node.client` (PeerClient, PeerPool),
:mod:`~hypervisor.node.tlsio` (the TLS transport both use),
:mod:`~hypervisor.node.serve` (running a daemon as a process).
"""

from __future__ import annotations

from hypervisor.node.wire import Item, Namespace, NsKind, StatInfo, Status

__all__ = ["Item", "Namespace", "NsKind", "StatInfo", "Status"]
