"""Omega: unmodified VMs under libvirt whose RAM and disk are partly lent by peer PCs.

Subpackages:
    vm: VM specs, libvirt domain XML, lifecycle, accelerator probe, console.
    dsm: guest RAM lent by peers (userfaultfd paging).
    netblock: NBD server whose exports live as replicated chunks on peers.
    remote_display: the guest's screen in a browser over WebRTC.
"""

from __future__ import annotations

from hypervisor._version import __version__
from hypervisor.errors import OmegaError

__all__ = ["OmegaError", "__version__"]
