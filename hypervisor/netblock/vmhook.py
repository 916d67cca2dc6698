"""Attaching netblock exports to VMs: the VM hook.

For a VM whose spec lists ``DiskSpec(kind="netblock", export=NAME)`` disks,
the hook checks the exports exist when the VM is defined, points each disk at
a per-VM NBD socket (``<vmdir>/netblock.sock``; V's XML builder turns it into
``<disk type='network'><source protocol='nbd'><host transport='unix'/>``),
starts one ``omega netblock serve`` process for the VM's exports right
before QEMU starts, and stops it (SIGTERM: drain, then close) after QEMU has
gone. A per-VM server keeps one guest's disk traffic, and failures, away from
every other guest's.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from hypervisor.config import Config
from hypervisor.errors import OmegaError
from hypervisor.netblock.exports import ExportStore
from hypervisor.vm.lifecycle import VMHook
from hypervisor.vm.spec import VMSpec

SOCKET_NAME = "netblock.sock"
PID_NAME = "netblock.pid"
LOG_NAME = "netblock.log"


class NetblockServerError(OmegaError):
    """The per-VM NBD server did not start."""


def _exports(spec: VMSpec) -> list[str]:
    return [d.export for d in spec.disks if d.kind == "netblock" and d.export]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"netblock" in cmdline and b"serve" in cmdline


class NetblockVMHook(VMHook):
    """Per-VM NBD server for a VM's netblock disks.

    Args:
        config: the Omega configuration (exports, cluster state).
        start_timeout: seconds to wait for the server's socket.
    """

    def __init__(self, config: Config, *, start_timeout: float = 60.0) -> None:
        self.config = config
        self.start_timeout = start_timeout

    def prepare(self, spec: VMSpec, vmdir: Path) -> None:
        """Check the exports exist; point netblock disks without a socket at the VM's own.

        Raises:
            NotFoundError: an export does not exist.
        """
        names = _exports(spec)
        if not names:
            return
        store = ExportStore(self.config)
        try:
            for name in names:
                store.get(name)
        finally:
            store.close()
        for disk in spec.disks:
            if disk.kind == "netblock" and disk.socket is None:
                disk.socket = vmdir / SOCKET_NAME

    def before_start(self, spec: VMSpec, vmdir: Path) -> None:
        """Start ``omega netblock serve`` for the VM's exports (unless it runs already).

        Raises:
            NetblockServerError: the server exited or did not bind its socket in time.
        """
        names = _exports(spec)
        if not names or not any(d.socket == vmdir / SOCKET_NAME for d in spec.disks
                                if d.kind == "netblock"):
            return
        sock = vmdir / SOCKET_NAME
        pid_file = vmdir / PID_NAME
        if pid_file.exists():
            pid = int(pid_file.read_text().strip() or 0)
            if pid and _alive(pid) and sock.exists():
                return
            pid_file.unlink(missing_ok=True)
        sock.unlink(missing_ok=True)
        log_path = vmdir / LOG_NAME
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "hypervisor.cli", "netblock", "serve", *dict.fromkeys(names),
                 "--socket", str(sock)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
                env={**os.environ, "OMEGA_HOME": str(self.config.home)})
        deadline = time.monotonic() + self.start_timeout
        while not sock.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
                tail = log_path.read_text(errors="replace")[-800:]
                raise NetblockServerError(f"netblock server for VM {spec.name!r} did not start: "
                                          f"{tail.strip().splitlines()[-1] if tail.strip() else ''}")
            time.sleep(0.05)
        pid_file.write_text(f"{proc.pid}\n")

    def after_stop(self, spec: VMSpec, vmdir: Path) -> None:
        """Stop the VM's NBD server (it drains in-flight requests first)."""
        pid_file = vmdir / PID_NAME
        if not pid_file.exists():
            return
        try:
            pid = int(pid_file.read_text().strip() or 0)
        except ValueError:
            pid = 0
        if pid and _alive(pid):
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 30
            while _alive(pid) and time.monotonic() < deadline:
                try:  # reap it when it is our child
                    os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    pass
                time.sleep(0.05)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        pid_file.unlink(missing_ok=True)

    def on_delete(self, spec: VMSpec, vmdir: Path) -> None:
        """Make sure no server is left behind (the exports themselves are kept)."""
        self.after_stop(spec, vmdir)
