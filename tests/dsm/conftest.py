"""Fixtures for the dsm tests: real peers (``omega node serve`` processes with
mutual TLS from a real cluster CA), the tiny guest image, and VMs named
``omega-test-d-*`` run by the real libvirtd/QEMU with the agent preloaded.

Ports come from D's range (19400-19499).
"""

from __future__ import annotations

import asyncio
import base64
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from hypervisor.config import Config

REPO = Path(__file__).resolve().parents[2]
AGENT = REPO / "hypervisor" / "_native" / "libomega_agent.so"
HOST_NODE = "omega-host"


@dataclass
class Peer:
    """One running ``omega node serve``."""

    name: str
    address: str
    proc: subprocess.Popen[bytes]

    def kill(self) -> None:
        """SIGKILL the peer (a PC losing power)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)


@dataclass
class Cluster:
    """Peers started for one test; ``env`` names them for the dsm hook."""

    config: Config
    peers: list[Peer]

    @property
    def env(self) -> dict[str, str]:
        return {"OMEGA_DSM_PEERS": ",".join(f"{p.name}={p.address}" for p in self.peers)}

    def namespaces(self) -> dict[str, list[tuple[str, int]]]:
        """Each live peer's page namespaces with their key counts."""
        from hypervisor.node.client import PeerClient
        from hypervisor.node.wire import NsKind
        from hypervisor.security import client_ssl_context

        async def one(peer: Peer) -> list[tuple[str, int]]:
            client = PeerClient(peer.address, client_ssl_context(self.config, node=HOST_NODE),
                                server_name=peer.name)
            try:
                infos = await client.list_ns()
            finally:
                await client.close()
            return [(i.ns.name, i.keys) for i in infos if i.ns.kind == NsKind.PAGE]

        async def every() -> dict[str, list[tuple[str, int]]]:
            live = [p for p in self.peers if p.proc.poll() is None]
            res = await asyncio.gather(*(one(p) for p in live))
            return {p.name: r for p, r in zip(live, res)}

        return asyncio.run(every())


def _omega(*args: str, env: dict[str, str] | None = None, timeout: float = 120
           ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hypervisor.cli", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=REPO, env={**os.environ, **(env or {})})


@pytest.fixture(scope="session")
def cluster_ca(config: Config) -> Config:
    """The session's cluster CA and this host's node certificate."""
    from hypervisor.security import ClusterCA, ensure_node_cert

    if not ClusterCA.exists(config):
        ClusterCA.init(config, name="omega-test-d")
    ensure_node_cert(config, HOST_NODE)
    return config


_ports_taken: set[int] = set()


def _free_port() -> int:
    """A port of D's range (19410-19479) nothing listens on now; shuffled, so
    two sessions running these tests at once do not collide."""
    import random
    import socket

    ports = [p for p in range(19410, 19480) if p not in _ports_taken]
    random.shuffle(ports)
    for port in ports:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _ports_taken.add(port)  # a peer binds it a moment later
        return port
    raise RuntimeError("no free port in 19410-19479")


def start_peers(config: Config, count: int, *, memory_lend: str = "1G") -> list[Peer]:
    """Start ``count`` peers on loopback and wait until each is ready."""
    from hypervisor.security import issue_node_cert

    peers: list[Peer] = []
    for i in range(count):
        port = _free_port()
        name = f"d-peer{port}"
        issue_node_cert(config, name, sans=[name, "127.0.0.1"])
        proc = subprocess.Popen([sys.executable, "-m", "hypervisor.cli", "node", "serve",
                                 "--name", name, "--listen", f"127.0.0.1:{port}",
                                 "--memory-lend", memory_lend], cwd=REPO,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        peers.append(Peer(name, f"127.0.0.1:{port}", proc))
    for peer in peers:
        line = peer.proc.stdout.readline().decode() if peer.proc.stdout else ""
        assert "omega-node-ready" in line, f"peer {peer.name} did not start: {line}"
    return peers


def restart_peer(peer: Peer, *, memory_lend: str = "1G") -> Peer:
    """Start a killed peer again: same name, address and certificate (a
    rebooted PC); waits until it is ready."""
    proc = subprocess.Popen([sys.executable, "-m", "hypervisor.cli", "node", "serve",
                             "--name", peer.name, "--listen", peer.address,
                             "--memory-lend", memory_lend], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    line = proc.stdout.readline().decode() if proc.stdout else ""
    assert "omega-node-ready" in line, f"peer {peer.name} did not restart: {line}"
    peer.proc = proc
    return peer


@pytest.fixture
def cluster(cluster_ca: Config) -> Iterator[Cluster]:
    """Three live peers lending 1 GiB each; stopped after the test."""
    peers = start_peers(cluster_ca, 3)
    try:
        yield Cluster(cluster_ca, peers)
    finally:
        stop_peers(peers)


def stop_peers(peers: list[Peer]) -> None:
    """Stop peers and give their ports back to the range (70 ports serve
    every test of a session only if they are reused)."""
    for p in peers:
        if p.proc.poll() is None:
            p.proc.terminate()
            try:
                p.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        _ports_taken.discard(int(p.address.rsplit(":", 1)[1]))


@pytest.fixture(scope="session")
def tiny_image(config: Config):
    """The tiny guest image (built once per session; it carries memtest)."""
    from images.store import ImageStore

    return ImageStore(config).build("tiny")


def guest_run_arg(command: str) -> str:
    """The kernel argument that makes the tiny guest run ``command`` and power off."""
    return f"omega.run={base64.b64encode(command.encode()).decode()} omega.poweroff=1"


@dataclass
class DsmVM:
    """A DSM VM under test."""

    name: str
    vmdir: Path
    env: dict[str, str]

    def stats(self) -> dict | None:
        from hypervisor.dsm.vmhook import handler_stats

        return handler_stats(self.vmdir)

    def serial(self) -> str:
        try:
            return (self.vmdir / "serial.log").read_text(errors="replace")
        except OSError:
            return ""

    def wait_serial(self, regex: str, *, timeout: float, watch=None) -> re.Match[str]:
        """Wait for ``regex`` on the serial log, calling ``watch()`` every 0.5 s.

        Fails early when the guest has been gone for 10 s (the handler serves
        no guest any more) without the text appearing.
        """
        deadline = time.monotonic() + timeout
        served = False
        gone_since: float | None = None
        while time.monotonic() < deadline:
            m = re.search(regex, self.serial())
            if m:
                return m
            if watch is not None:
                watch()
            st = self.stats()
            if st is not None and st.get("serving"):
                served, gone_since = True, None
            elif served and st is not None:
                gone_since = gone_since or time.monotonic()
                if time.monotonic() - gone_since > 10:
                    m = re.search(regex, self.serial())
                    if m:
                        return m
                    raise AssertionError(f"the guest stopped before {regex!r}; serial tail:\n"
                                         f"{self.serial()[-1500:]}")
            time.sleep(0.5)
        raise AssertionError(f"{regex!r} not seen in {timeout} s; serial tail:\n"
                             f"{self.serial()[-1500:]}\nhandler log tail:\n"
                             f"{(self.vmdir / 'dsm-handler.log').read_text()[-2000:]}")


@pytest.fixture
def dsm_vms(config: Config, tiny_image) -> Iterator[list[DsmVM]]:
    """A list of DSM VMs the test made; each is destroyed and deleted after it."""
    made: list[DsmVM] = []
    yield made
    for vm in made:
        _omega("vm", "destroy", vm.name, env=vm.env)
        _omega("vm", "delete", vm.name, "--force", env=vm.env)


def session_vm_name(config: Config, name: str) -> str:
    """``name`` made unique to this test session: libvirt's domain names are
    global, and another session may run the same tests at the same time."""
    return f"{name}-{config.home.name.rsplit('-', 1)[-1].lower().replace('_', '0')}"


def create_dsm_vm(config: Config, made: list[DsmVM], name: str, *, memory: str,
                  local_memory: str, command: str, env: dict[str, str],
                  start: bool = True) -> tuple[DsmVM, subprocess.CompletedProcess[str]]:
    """Create (and start) a DSM VM running ``command`` with the real CLI.

    The domain is named ``name`` plus a session suffix (see session_vm_name).
    """
    name = session_vm_name(config, name)
    vm = DsmVM(name, config.vms_dir / name, env)
    made.append(vm)
    args = ["vm", "create", name, "--image", "tiny", "--memory", memory,
            "--local-memory", local_memory, "--cmdline-extra", guest_run_arg(command)]
    if start:
        args.append("--start")
    proc = _omega(*args, env=env)
    return vm, proc


def omega_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the real CLI."""
    return _omega(*args, env=env)
