"""Real peer daemons (``omega node serve``) on loopback for replicated-export tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from hypervisor.config import Config
from hypervisor.security import ClusterCA, issue_node_cert

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Peer:
    """One ``omega node serve`` process."""

    name: str
    port: int
    data: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None


@dataclass
class PeerSet:
    """A few peers sharing one cluster CA (in ``config``)."""

    config: Config
    peers: dict[str, Peer] = field(default_factory=dict)

    def start(self, name: str) -> None:
        peer = self.peers[name]
        with open(peer.log, "ab") as out:
            peer.proc = subprocess.Popen(
                [sys.executable, "-m", "hypervisor.cli", "node", "serve", "--name", name,
                 "--listen", f"127.0.0.1:{peer.port}", "--disk-lend", "1G", "--data",
                 str(peer.data), "--no-fsync"], stdout=out, stderr=out, cwd=REPO,
                env={**os.environ, "OMEGA_HOME": str(self.config.home)})
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", peer.port), timeout=1).close()
                return
            except OSError:
                if peer.proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"peer {name} did not start:\n{peer.log.read_text()}")
                time.sleep(0.1)

    def kill(self, name: str) -> None:
        proc = self.peers[name].proc
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    def stop_all(self) -> None:
        for peer in self.peers.values():
            if peer.proc is not None and peer.proc.poll() is None:
                peer.proc.send_signal(signal.SIGTERM)
                try:
                    peer.proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    peer.proc.kill()
                    peer.proc.wait()

    def pool(self, *, request_timeout: float = 5.0):  # noqa: ANN201 - PeerPool
        from hypervisor.node.client import PeerPool
        from hypervisor.security import client_ssl_context

        pool = PeerPool(client_ssl_context(self.config, node="n-host"), connect_timeout=2.0,
                        request_timeout=request_timeout)
        for peer in self.peers.values():
            pool.add(peer.name, ("127.0.0.1", peer.port))
        return pool


def make_peers(config: Config, root: Path, names: list[str], base_port: int) -> PeerSet:
    """Create the CA (if needed), certificates, and start peers named ``names``."""
    if not ClusterCA.exists(config):
        ClusterCA.init(config, name="n-test")
    issue_node_cert(config, "n-host", sans=["127.0.0.1"])
    peers = PeerSet(config)
    for i, name in enumerate(names):
        issue_node_cert(config, name, sans=["127.0.0.1", "localhost"])
        data = root / name
        data.mkdir(parents=True, exist_ok=True)
        peers.peers[name] = Peer(name, base_port + i, data, root / f"{name}.log")
        peers.start(name)
    return peers


class Served:
    """An in-process NBD server of one replicated backend, on a unix socket."""

    def __init__(self, server, sock: Path, backend) -> None:  # noqa: ANN001 - NbdServer, Backend
        self.server, self.sock, self.backend = server, sock, backend

    def uri(self, name: str) -> str:
        return f"nbd+unix:///{name}?socket={self.sock}"


async def healthy_pool(peers: PeerSet):  # noqa: ANN201 - PeerPool
    """A pool of ``peers`` once each answered a ping (fresh Python peers on a
    busy box may miss the first)."""
    import asyncio

    pool = peers.pool()
    for _ in range(20):
        await pool.measure(samples=1)
        if len(pool.healthy()) == len(peers.peers):
            break
        await asyncio.sleep(0.5)
    return pool


async def qemu_io(uri: str, *commands: str, ok: bool = True) -> str:
    """Run qemu-io commands on ``uri``; with ``ok``, fail on any error."""
    import asyncio

    args = ["-f", "raw"]
    for c in commands:
        args += ["-c", c]
    proc = await asyncio.create_subprocess_exec("qemu-io", *args, uri,
                                                stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT)
    out = (await proc.communicate())[0].decode()
    if ok:
        assert proc.returncode == 0 and "fail" not in out.lower() and \
            "error" not in out.lower(), out
    return out
