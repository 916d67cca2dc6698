"""Where Omega keeps its state and how it reaches libvirt.

All paths derive from one state directory so a test (or a second cluster on the
same machine) can run in isolation by setting ``OMEGA_HOME``.

Environment:
    OMEGA_HOME: state directory (default ``/var/lib/omega`` as root,
        ``~/.local/share/omega`` otherwise).
    OMEGA_LIBVIRT_URI: libvirt connection URI (default ``qemu:///system``).
    OMEGA_ACCEL: force the accelerator (``kvm`` or ``tcg``), skipping the probe.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path


def _default_home() -> Path:
    if os.geteuid() == 0:
        return Path("/var/lib/omega")
    return Path.home() / ".local" / "share" / "omega"


@dataclass(frozen=True)
class Config:
    """Resolved configuration, passed explicitly to whatever needs it.

    Attributes:
        home: the state directory.
        libvirt_uri: the libvirt connection URI.
        accel: forced accelerator, or None to use the probe's cached answer.
    """

    home: Path = field(default_factory=_default_home)
    libvirt_uri: str = "qemu:///system"
    accel: str | None = None

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Config:
        """Build a config from the environment.

        Args:
            env: the environment to read (default ``os.environ``).

        Returns:
            The resolved configuration.
        """
        env = dict(os.environ) if env is None else env
        home = Path(env["OMEGA_HOME"]) if env.get("OMEGA_HOME") else _default_home()
        return cls(
            home=home,
            libvirt_uri=env.get("OMEGA_LIBVIRT_URI", "qemu:///system"),
            accel=env.get("OMEGA_ACCEL") or None,
        )

    @property
    def images_dir(self) -> Path:
        """Content-addressed guest images."""
        return self.home / "images"

    @property
    def vms_dir(self) -> Path:
        """Per-VM runtime files (memory files, sockets, logs)."""
        return self.home / "vms"

    @property
    def cluster_dir(self) -> Path:
        """Cluster CA, this node's certificate and key."""
        return self.home / "cluster"

    @property
    def netblock_dir(self) -> Path:
        """Netblock export metadata and keys."""
        return self.home / "netblock"

    @property
    def run_dir(self) -> Path:
        """Sockets and pid files of running daemons."""
        return self.home / "run"

    @property
    def cache_dir(self) -> Path:
        """Cached probe results."""
        return self.home / "cache"

    def ensure(self) -> None:
        """Create the state directories (mode 0755; secrets set their own modes)."""
        for d in (self.home, self.images_dir, self.vms_dir, self.cluster_dir,
                  self.netblock_dir, self.run_dir, self.cache_dir):
            d.mkdir(parents=True, exist_ok=True)
