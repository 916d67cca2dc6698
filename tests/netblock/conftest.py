"""Fixtures for netblock tests: a real ``omega netblock serve`` process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any
from dataclasses import dataclass
from pathlib import Path

import pytest

from hypervisor.config import Config

REPO = Path(__file__).resolve().parents[2]


@dataclass
class RunningServer:
    """An ``omega netblock serve`` subprocess and where to reach it."""

    proc: subprocess.Popen[bytes]
    socket: Path
    log: Path

    def uri(self, export: str) -> str:
        return f"nbd+unix:///{export}?socket={self.socket}"

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def thread_policies(pid: int, name: str | None = None) -> list[int]:
    """The scheduling policy (os.SCHED_*) of each thread of a process, or of
    those named ``name``."""
    policies = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            if name is None or (task / "comm").read_text().strip() == name:
                stat = (task / "stat").read_text()
                policies.append(int(stat[stat.rindex(")") + 2:].split()[38]))
        except (FileNotFoundError, ProcessLookupError):  # the thread ended meanwhile (ESRCH
            continue                                       # once it is gone, ENOENT later)
    return policies


def native_thread_policies(pid: int) -> list[int]:
    """The policies of a process's threads serving NBD connections in C
    (named by prctl in omega_nbd_serve)."""
    return thread_policies(pid, "nbd-fastpath")


def native_threads(pid: int) -> int:
    """Threads of a process serving NBD connections in C."""
    return len(native_thread_policies(pid))


def start_server(config: Config, tmp: Path, *args: str, socket: Path | None = None,
                 wait_for: Path | None = None) -> RunningServer:
    """Start ``omega netblock serve`` and wait until its socket exists.

    Raises:
        AssertionError: the server exited or never bound its socket.
    """
    sock = socket or tmp / "nbd.sock"
    log = tmp / f"serve-{time.monotonic_ns()}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "hypervisor.cli", "netblock", "serve",
                                 "--socket", str(sock), *args], stdout=out, stderr=out,
                                cwd=REPO, env={**os.environ, "OMEGA_HOME": str(config.home)})
    target = wait_for or sock
    deadline = time.monotonic() + 60
    while not target.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"netblock serve did not start:\n{log.read_text()}")
        time.sleep(0.05)
    return RunningServer(proc, sock, log)


@pytest.fixture
def nbd_tmp() -> Iterator[Path]:
    """A world-traversable scratch dir (short path: unix socket names are limited)."""
    import shutil
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="omega-n-", dir="/var/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def mem_server(config: Config, nbd_tmp: Path) -> Iterator[RunningServer]:
    """A server with two in-RAM exports, ``mem`` (64 MiB) and ``other`` (8 MiB)."""
    server = start_server(config, nbd_tmp, "--memory", "mem:64M", "--memory", "other:8M")
    yield server
    assert server.stop() == 0, server.log.read_text()


def run(*cmd: str, input: bytes | None = None, timeout: float = 120,
        check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a client tool, failing the test with its output on error."""
    proc = subprocess.run(list(cmd), capture_output=True, text=input is None, input=input,
                          timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}:\n"
                             f"{proc.stdout}\n{proc.stderr}")
    return proc


def omega_at(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the real ``omega`` with OMEGA_HOME=``home`` (the rest of the environment
    passes on), capturing its output."""
    return subprocess.run([sys.executable, "-m", "hypervisor.cli", *args], cwd=REPO,
                          env={**os.environ, "OMEGA_HOME": str(home)}, capture_output=True,
                          text=True, timeout=180, check=False)


def omega_ok(home: Path, *args: str) -> str:
    """:func:`omega_at` that must succeed; returns its stdout."""
    proc = omega_at(home, *args)
    assert proc.returncode == 0, f"omega {' '.join(args)}: {proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.fixture
def peer_home(nbd_tmp: Path) -> Config:
    """A fresh OMEGA_HOME for a cluster of peers."""
    cfg = Config(home=nbd_tmp / "home")
    cfg.ensure()
    return cfg


@pytest.fixture
def peers(request: pytest.FixtureRequest, peer_home: Config, nbd_tmp: Path) -> Iterator[Any]:
    """Three real peers, on ports from the test module's ``BASE_PORT``."""
    from tests.netblock.peers import make_peers

    ps = make_peers(peer_home, nbd_tmp / "peers", ["n-p1", "n-p2", "n-p3"],
                    request.module.BASE_PORT)
    yield ps
    ps.stop_all()
