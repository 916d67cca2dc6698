"""The per-VM runtime directory and the files Omega keeps in it.

``config.vms_dir/<name>/`` (mode 0755) holds the scratch disk, the serial log
and the sockets of one VM. Hooks (dsm, netblock) may add their own files; the
directory goes away with ``omega vm delete``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hypervisor.config import Config


@dataclass(frozen=True)
class VMRuntimeDir:
    """Paths inside one VM's runtime directory.

    Attributes:
        path: the directory itself.
    """

    path: Path

    @classmethod
    def of(cls, config: Config, name: str) -> VMRuntimeDir:
        """Return the runtime directory of VM ``name`` under ``config.vms_dir``."""
        return cls(config.vms_dir / name)

    @property
    def scratch_disk(self) -> Path:
        """The local raw scratch disk (``vda``)."""
        return self.path / "scratch.img"

    @property
    def serial_log(self) -> Path:
        """Everything the guest wrote on its first serial port (truncated each boot)."""
        return self.path / "serial.log"

    @property
    def vnc_socket(self) -> Path:
        """QEMU's VNC server (graphics ``vnc``)."""
        return self.path / "vnc.sock"
