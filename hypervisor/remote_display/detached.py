"""A display server that outlives the command that started it.

``omega demo`` returns while the guest keeps running, so its desktop must be
served by a process of its own: :func:`spawn_display` starts
``omega display serve VM`` in a new session (tokens passed in the environment,
not on the command line), waits until it listens, and records its pid in
``config.run_dir/display-<vm>.pid`` (output in ``display-<vm>.log``).
:func:`stop_display` ends it, checking first that the pid is still that server.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from hypervisor.config import Config
from hypervisor.errors import OmegaError

__all__ = ["DetachedDisplay", "DisplayStartError", "spawn_display", "stop_display"]


class DisplayStartError(OmegaError):
    """The display server process did not come up."""


@dataclass(frozen=True)
class DetachedDisplay:
    """A running ``omega display serve`` process.

    Attributes:
        vm: the VM served.
        pid: the server's process id.
        url: page URL with the operator token (in the fragment).
        base_url: page URL without credentials.
        operator_token: may send input.
        viewer_token: watch only.
        log: the server's output.
    """

    vm: str
    pid: int
    url: str
    base_url: str
    operator_token: str
    viewer_token: str
    log: Path


def _paths(config: Config, vm: str) -> tuple[Path, Path]:
    return config.run_dir / f"display-{vm}.pid", config.run_dir / f"display-{vm}.log"


def _is_display_server(pid: int, vm: str) -> bool:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"display" in argv and b"serve" in argv and vm.encode() in argv


def spawn_display(config: Config, vm: str, *, listen: str = "127.0.0.1:8443",
                  codec: str = "auto", timeout: float = 60) -> DetachedDisplay:
    """Start ``omega display serve VM`` in the background and wait until it listens.

    An earlier server for the same VM (recorded pid) is stopped first.

    Args:
        config: Omega's configuration (its OMEGA_HOME is passed on).
        vm: a running VM with graphics = "vnc".
        listen: HOST:PORT.
        codec: see ``omega display serve --codec``.
        timeout: seconds to wait for the server to listen.

    Returns:
        The running server.

    Raises:
        DisplayStartError: it exited or did not listen in time (its log is quoted).
    """
    config.ensure()
    stop_display(config, vm)
    pid_path, log_path = _paths(config, vm)
    operator, viewer = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    env = dict(os.environ, OMEGA_HOME=str(config.home), OMEGA_DISPLAY_TOKEN=operator,
               OMEGA_DISPLAY_VIEWER_TOKEN=viewer, PYTHONUNBUFFERED="1")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "hypervisor.cli", "display", "serve", vm,
             "--listen", listen, "--codec", codec],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
            start_new_session=True)
    deadline = time.monotonic() + timeout
    while True:
        text = log_path.read_text(errors="replace")
        for line in text.splitlines():
            if line.startswith("serving ") and " at " in line:
                base_url = line.rsplit(" at ", 1)[1].strip()
                pid_path.write_text(f"{proc.pid}\n")
                return DetachedDisplay(vm, proc.pid, f"{base_url}#token={operator}",
                                       base_url, operator, viewer, log_path)
        if proc.poll() is not None or time.monotonic() > deadline:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            tail = "\n".join(text.strip().splitlines()[-5:])
            raise DisplayStartError(f"display server for {vm!r} did not start: "
                                    f"{tail or f'exit status {proc.returncode}'}")
        time.sleep(0.2)


def stop_display(config: Config, vm: str, *, timeout: float = 15) -> bool:
    """Stop the background display server of ``vm``, if one is recorded and alive.

    Args:
        config: Omega's configuration.
        vm: the VM.
        timeout: seconds to wait after SIGINT before SIGKILL.

    Returns:
        True if a server was stopped.
    """
    pid_path, _ = _paths(config, vm)
    try:
        pid = int(pid_path.read_text().strip())
    except (OSError, ValueError):
        return False
    pid_path.unlink(missing_ok=True)
    if not _is_display_server(pid, vm):  # gone, or the pid was reused: not ours to kill
        return False
    os.kill(pid, signal.SIGINT)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _is_display_server(pid, vm):
            return True
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)
    return True
