"""A VM's DSM settings and runtime paths (written by the VM hook, read by the handler)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from hypervisor.errors import SpecError

DEFAULT_SLACK = 8 << 20
DEFAULT_REPLICAS = 2


@dataclass
class DsmSettings:
    """What one VM's handler needs to know.

    Attributes:
        vm_name: the VM's name.
        vm_id: the VM's uuid (namespace on peers, part of every page's aad).
        memory: guest RAM bytes.
        local_memory: bytes kept resident on this host (the target).
        slack: bytes above the target the resident set may reach before
            zero faults wait for reclaim (the hard limit is target + slack).
        replicas: copies of each evicted page on distinct peers (R).
        store: ``peers`` (the cluster's node daemons) or ``memory`` (this
            process only: the benchmark's floor; not for real guests).
        node: this host's node name (its certificate authenticates us to peers).
        peers: ``[[name, "host:port"], ...]``; empty: the cluster state's peers.
        prefetch: sequential/stride prefetch on remote faults.
        threads: reader threads in the fault handler core (each serves one
            remote fault at a time on the native fetch path).
        native: serve remote faults in C (native/dsm/dsm_remote.c); off, every
            fetch goes through the Python store (slower; for comparison).
        prefetch_workers: the native path's prefetch threads.
        busy_poll_us: how long a native-path thread waits awake for a
            peer's answer before sleeping on the socket (0: never).
    """

    vm_name: str
    vm_id: str
    memory: int
    local_memory: int
    slack: int = DEFAULT_SLACK
    replicas: int = DEFAULT_REPLICAS
    store: str = "peers"
    node: str = "host"
    peers: list[list[str]] = field(default_factory=list)
    prefetch: bool = True
    threads: int = 4
    native: bool = True
    prefetch_workers: int = 2
    busy_poll_us: int = 100

    def validate(self) -> None:
        """Check the settings.

        Raises:
            SpecError: something is out of range.
        """
        if self.local_memory <= 0 or self.local_memory > self.memory:
            raise SpecError(f"dsm: local memory {self.local_memory} must be in (0, {self.memory}]")
        if self.slack < 0:
            raise SpecError("dsm: slack must be >= 0")
        if self.replicas < 1:
            raise SpecError("dsm: replicas must be >= 1")
        if self.store not in ("peers", "memory"):
            raise SpecError(f"dsm: store {self.store!r} is not 'peers' or 'memory'")
        if not 1 <= self.threads <= 16:
            raise SpecError("dsm: threads must be 1..16")
        if not 0 <= self.prefetch_workers <= 16:
            raise SpecError("dsm: prefetch_workers must be 0..16")
        if not 0 <= self.busy_poll_us <= 100_000:
            raise SpecError("dsm: busy_poll_us must be 0..100000")

    def save(self, path: Path) -> None:
        """Write as JSON (0644)."""
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")
        os.chmod(path, 0o644)

    @classmethod
    def load(cls, path: Path) -> DsmSettings:
        """Read from JSON.

        Raises:
            SpecError: the file is missing or malformed.
        """
        try:
            data = json.loads(path.read_text())
            s = cls(**data)
        except (OSError, ValueError, TypeError) as exc:
            raise SpecError(f"dsm settings {path}: {exc}") from exc
        s.validate()
        return s


@dataclass(frozen=True)
class DsmPaths:
    """Files of one VM's DSM handler inside its runtime directory."""

    vmdir: Path

    @property
    def settings(self) -> Path:
        return self.vmdir / "dsm.json"

    @property
    def agent_socket(self) -> Path:
        return self.vmdir / "dsm.sock"

    @property
    def control_socket(self) -> Path:
        return self.vmdir / "dsm-control.sock"

    @property
    def directory(self) -> Path:
        return self.vmdir / "dsm-directory.sqlite"

    @property
    def key(self) -> Path:
        return self.vmdir / "dsm.key"

    @property
    def log(self) -> Path:
        return self.vmdir / "dsm-handler.log"

    @property
    def handler_pid(self) -> Path:
        return self.vmdir / "dsm-handler.pid"

    @property
    def supervisor_pid(self) -> Path:
        return self.vmdir / "dsm-supervisor.pid"
