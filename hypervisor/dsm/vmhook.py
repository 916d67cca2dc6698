"""The VM hook that gives a VM with ``local_memory < memory`` its DSM.

prepare: guest RAM becomes a shared memfd (libvirt memoryBacking memfd,
access shared); QEMU gets the agent by LD_PRELOAD and the handler's socket in
its environment; the VM's settings and sealing key are written to its
runtime directory.

QEMU runs as root for a DSM VM. Here ``/proc/sys/vm/unprivileged_userfaultfd``
is 0 and ``/dev/userfaultfd`` is root-only, so QEMU as ``libvirt-qemu`` could
only get a user-mode-only userfaultfd: enough for TCG's own loads and stores,
but a kernel access to a missing page (a read(2) or virtio-blk preadv into
guest RAM, vhost) would fail with EFAULT instead of being served. Running as
root keeps every access served.

before_start: the handler (under its supervisor) is started and must answer
before QEMU starts; if it cannot, the start fails with its reason, and the
agent would in any case stop QEMU rather than run a guest unbacked.
after_stop: the handler frees every page on every peer and exits.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hypervisor.config import Config
from hypervisor.dsm.settings import DEFAULT_SLACK, DsmPaths, DsmSettings
from hypervisor.errors import NativeError, NotFoundError, OmegaError
from hypervisor.vm.lifecycle import VMHook

if TYPE_CHECKING:
    from hypervisor.vm.spec import VMSpec

AGENT = Path(__file__).resolve().parent.parent / "_native" / "libomega_agent.so"
HOST_NODE = "omega-host"
READY_TIMEOUT = 60.0
STOP_TIMEOUT = 15.0


class DsmStartError(OmegaError):
    """The VM's DSM handler could not start; the VM was not started."""


class DsmVMHook(VMHook):
    """Attaches a DSM handler to every VM whose spec uses DSM.

    Args:
        config: the Omega configuration.
    """

    def __init__(self, config: Config) -> None:
        self.config = config

    def prepare(self, spec: VMSpec, vmdir: Path) -> None:
        """Switch the spec to memfd-shared RAM with the agent; write settings and key."""
        if not spec.uses_dsm:
            return
        if not AGENT.exists():
            raise NativeError(f"the DSM agent {AGENT} is not built; run `make native`")
        from hypervisor.sealing import Sealer

        paths = DsmPaths(vmdir)
        spec.memory_backing = "memfd-shared"
        spec.run_as_root = True
        spec.qemu_env["LD_PRELOAD"] = str(AGENT)
        spec.qemu_env["OMEGA_DSM_SOCKET"] = str(paths.agent_socket)
        spec.qemu_env["OMEGA_DSM_MIN_BYTES"] = str(spec.memory)
        settings = DsmSettings(vm_name=spec.name, vm_id=f"vm-{uuid.uuid4().hex}",
                               memory=spec.memory, local_memory=int(spec.local_memory or 0),
                               slack=min(DEFAULT_SLACK, max(1 << 20, spec.memory // 32)),
                               node=HOST_NODE, peers=parse_peer_list(
                                   os.environ.get("OMEGA_DSM_PEERS", "")))
        settings.validate()
        settings.save(paths.settings)
        fd = os.open(paths.key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(Sealer.generate_key())
        from hypervisor.security import ClusterCA, ensure_node_cert

        if ClusterCA.exists(self.config):
            ensure_node_cert(self.config, HOST_NODE)

    def before_start(self, spec: VMSpec, vmdir: Path) -> None:
        """Start the supervised handler and wait until it answers.

        Raises:
            DsmStartError: the handler exited or did not answer in time.
        """
        if not spec.uses_dsm:
            return
        start_handler(self.config, spec.name, vmdir)

    def after_stop(self, spec: VMSpec, vmdir: Path) -> None:
        """Ask the handler to free every page on every peer and exit."""
        if not spec.uses_dsm:
            return
        stop_handler(vmdir, free=True, config=self.config)

    def on_delete(self, spec: VMSpec, vmdir: Path) -> None:
        """Make sure no handler is left (pages were freed at stop)."""
        if not spec.uses_dsm:
            return
        stop_handler(vmdir, free=True, config=self.config)


def parse_peer_list(text: str) -> list[list[str]]:
    """Parse ``OMEGA_DSM_PEERS``: ``name=host:port,name=host:port`` (empty: the
    cluster state's peers are used).

    Raises:
        SpecError: an entry is malformed.
    """
    from hypervisor.errors import SpecError

    out: list[list[str]] = []
    for entry in filter(None, (e.strip() for e in text.split(","))):
        name, sep, address = entry.partition("=")
        if not sep or not name or ":" not in address:
            raise SpecError(f"OMEGA_DSM_PEERS: {entry!r} is not NAME=HOST:PORT")
        out.append([name, address])
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _log_tail(path: Path, lines: int = 3) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(text[-lines:])


def start_handler(config: Config, vm_name: str, vmdir: Path, *,
                  timeout: float = READY_TIMEOUT) -> subprocess.Popen[bytes]:
    """Spawn ``omega dsm handler VM --supervise`` and wait for it to answer.

    Returns:
        The supervisor process.

    Raises:
        DsmStartError: it exited or did not answer within ``timeout``.
    """
    from hypervisor.dsm.control import control_request

    paths = DsmPaths(vmdir)
    stop_handler(vmdir, free=False)  # a leftover from a crash
    env = dict(os.environ, OMEGA_HOME=str(config.home))
    with open(paths.log, "ab") as logf:
        proc = subprocess.Popen([sys.executable, "-m", "hypervisor.cli", "dsm", "handler",
                                 vm_name, "--supervise"], stdin=subprocess.DEVNULL,
                                stdout=logf, stderr=logf, env=env, start_new_session=True,
                                cwd=str(Path(__file__).resolve().parents[2]))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise DsmStartError(f"the DSM handler of {vm_name} could not start (exit "
                                f"{proc.returncode}): {_log_tail(paths.log)}")
        try:
            control_request(paths.control_socket, {"op": "stats"}, timeout=2)
            return proc
        except OmegaError:
            time.sleep(0.1)
    proc.terminate()
    raise DsmStartError(f"the DSM handler of {vm_name} did not answer within {timeout:.0f} s: "
                        f"{_log_tail(paths.log)}")


def stop_handler(vmdir: Path, *, free: bool, timeout: float = STOP_TIMEOUT,
                 config: Config | None = None) -> None:
    """Ask the handler to exit (freeing pages when ``free``) and reap its supervisor.

    Args:
        vmdir: the VM's runtime directory.
        free: free the VM's pages on every peer.
        timeout: seconds to wait for the supervisor to exit.
        config: when given and no handler answers, pages are freed from here.
    """
    from hypervisor.dsm.control import control_request

    paths = DsmPaths(vmdir)
    sup = _read_pid(paths.supervisor_pid)
    try:
        control_request(paths.control_socket, {"op": "shutdown", "free": free}, timeout=5)
    except OmegaError:
        if free and config is not None and paths.settings.exists():
            from hypervisor.dsm.handler import free_pages

            try:
                free_pages(config, vmdir)
            except OmegaError as exc:  # best effort: the VM is going away anyway
                import logging

                logging.getLogger("omega.dsm").warning("freeing pages of %s: %s",
                                                       vmdir.name, exc)
    deadline = time.monotonic() + timeout
    while sup is not None and _alive(sup) and time.monotonic() < deadline:
        try:
            os.waitpid(sup, os.WNOHANG)  # reap when it is our child
        except ChildProcessError:
            pass
        time.sleep(0.05)
    if sup is not None and _alive(sup):
        try:
            os.kill(sup, signal.SIGTERM)
        except ProcessLookupError:
            pass
    paths.supervisor_pid.unlink(missing_ok=True)


def handler_stats(vmdir: Path) -> dict[str, Any] | None:
    """The handler's stats, or None when no handler runs for the VM."""
    from hypervisor.dsm.control import control_request

    paths = DsmPaths(vmdir)
    if not paths.settings.exists():
        return None
    try:
        return control_request(paths.control_socket, {"op": "stats"}, timeout=5)["stats"]
    except (NotFoundError, OmegaError):
        return None
