"""Keeps a VM's DSM handler running: restarts it when it dies unexpectedly.

One supervisor process per DSM VM (spawned by the VM hook). The handler is
its child; a clean exit (0, after a shutdown request) ends the supervisor
too; any other death is restarted after a short pause, at most
``MAX_RESTARTS`` times a minute, so the agent in QEMU finds a handler again.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import deque
from pathlib import Path

MAX_RESTARTS = 10
RESTART_PAUSE = 0.2


def supervise(vm_name: str, vmdir: Path) -> int:
    """Run and restart ``omega dsm handler VM``; return the final exit status."""
    from hypervisor.dsm.settings import DsmPaths

    paths = DsmPaths(vmdir)
    paths.supervisor_pid.write_text(f"{os.getpid()}\n")
    restarts: deque[float] = deque()
    child: subprocess.Popen[bytes] | None = None
    stopping = False

    def on_term(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True
        if child is not None and child.poll() is None:
            child.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    with open(paths.log, "ab") as logf:
        while True:
            child = subprocess.Popen([sys.executable, "-m", "hypervisor.cli", "dsm", "handler",
                                      vm_name], stdout=logf, stderr=logf,
                                     stdin=subprocess.DEVNULL)
            rc = child.wait()
            if rc == 0 or stopping:
                return rc
            if not restarts and not paths.agent_socket.exists():
                # It never got as far as listening: a restart would fail alike.
                return rc
            now = time.monotonic()
            restarts.append(now)
            while restarts and now - restarts[0] > 60:
                restarts.popleft()
            if len(restarts) > MAX_RESTARTS:
                logf.write(f"omega-dsm-supervisor: handler died {len(restarts)} times in a "
                           f"minute (last status {rc}); giving up\n".encode())
                return rc or 1
            logf.write(f"omega-dsm-supervisor: handler exited with {rc}; restarting\n".encode())
            logf.flush()
            time.sleep(RESTART_PAUSE)
