"""The local cluster: peers as separate ``omega node serve`` processes on this machine.

Each peer runs in its own network namespace, joined to the host by a veth pair
(host side ``10.200.<i>.<4k+1>/30``, peer side ``10.200.<i>.<4k+2>/30``, where
``i`` is the peer's number and ``k`` a slot chosen per OMEGA_HOME so that
several local clusters on one machine do not collide), when this process may
create namespaces (root); otherwise every peer listens on loopback with its
own port. The same code paths (mutual TLS, the node daemon) run between real PCs.

Names are unique per OMEGA_HOME: namespaces ``omega-<tag>-<i>`` and veths
``o<tag><i>h`` / ``o<tag><i>p``, with ``tag`` derived from the home path.
``down`` stops every process and removes every namespace and veth it made.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import fcntl
import hashlib
import ipaddress
import os
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from hypervisor.clusterstate import ClusterState, PeerInfo
from hypervisor.config import Config
from hypervisor.errors import AlreadyExistsError, NotFoundError, OmegaError, UsageError
from hypervisor.node.serve import NodeOptions, NodeProcess
from hypervisor.security import ClusterCA, ensure_node_cert, issue_node_cert

DEFAULT_MEMORY_LEND = 256 << 20
DEFAULT_DISK_LEND = 1 << 30
NETNS_PORT = 7400
MAX_PEERS = 16
_SLOTS = 64  # /30 subnets per 10.200.<i>.0/24: 64 local clusters side by side
_LOCK_PATH = Path("/run/lock/omega-localcluster.lock")
T = TypeVar("T")


class LocalClusterError(OmegaError):
    """The local cluster could not be started or changed."""


def home_tag(config: Config) -> str:
    """Six hex digits naming this OMEGA_HOME in global names (netns, veth)."""
    return hashlib.sha256(str(config.home.resolve()).encode()).hexdigest()[:6]


def netns_supported() -> bool:
    """Whether this process may create network namespaces (root and pyroute2)."""
    if os.geteuid() != 0:
        return False
    try:
        import pyroute2  # noqa: F401
    except ImportError:  # pragma: no cover - a dependency
        return False
    return True


@contextlib.contextmanager
def _global_lock() -> Iterator[None]:
    # Slot choice and veth creation race with other OMEGA_HOMEs on this machine.
    path = _LOCK_PATH if _LOCK_PATH.parent.is_dir() else Path("/tmp/omega-localcluster.lock")
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def netlink_call(fn: Callable[..., T], *args: object) -> T:
    """Run a pyroute2 call in a thread of its own.

    pyroute2's synchronous API drives an event loop of its own and refuses to run
    inside a running one; LocalCluster is called from asyncio code (tests, the
    netblock server), so netlink work happens in a short-lived thread.
    """
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(fn, *args).result()


def _addresses_in_use() -> set[str]:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        return {a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(family=2)}


def _pid_is_node(pid: int | None, name: str) -> bool:
    """Whether ``pid`` is (still) the node daemon called ``name`` (not a recycled pid)."""
    if not pid:
        return False
    import psutil

    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        cmd = proc.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False
    return "serve" in cmd and "--name" in cmd and name in cmd


def _stop_pid(pid: int, *, sig: int, timeout: float) -> None:
    import psutil

    try:
        proc = psutil.Process(pid)
        proc.send_signal(sig)
        proc.wait(timeout)
    except psutil.NoSuchProcess:
        return
    except psutil.TimeoutExpired:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
            proc.wait(10)


class LocalCluster:
    """Start, stop, kill and restart the peers of this machine's local cluster.

    The peer list lives in :class:`~hypervisor.clusterstate.ClusterState`, so a
    cluster started by ``omega cluster up`` can be stopped by ``omega cluster
    down`` from another process, and read by the netblock server and DSM handlers.
    """

    def __init__(self, config: Config) -> None:
        """Use the state and certificates of ``config``."""
        self.config = config
        self.state = ClusterState(config)
        self.tag = home_tag(config)
        self.root = config.home / "localcluster"
        self._children: dict[str, NodeProcess] = {}

    # Queries ------------------------------------------------------------------

    def peers(self) -> list[PeerInfo]:
        """The local cluster's peers, with their state refreshed (a killed one shows ``dead``)."""
        out = []
        for peer in self.state.peers(local=True):
            if peer.state == "running" and not _pid_is_node(peer.pid, peer.name):
                peer = self.state.update(peer.name, state="dead")
            out.append(peer)
        return out

    def peer(self, name: str) -> PeerInfo:
        """One local peer.

        Raises:
            NotFoundError: no such peer in the local cluster.
        """
        for p in self.peers():
            if p.name == name:
                return p
        raise NotFoundError(f"no peer named {name!r} in the local cluster")

    def host_node(self) -> str:
        """The node name this host uses as a client (its certificate exists)."""
        name = self.state.get_meta("local_node")
        if name is None:
            name = "host"
            self.state.set_meta("local_node", name)
        ensure_node_cert(self.config, name, sans=["127.0.0.1", "localhost"])
        return name

    def client_context(self):  # noqa: ANN201 - ssl.SSLContext, imported lazily
        """A client TLS context for talking to the peers as this host."""
        from hypervisor.security import client_ssl_context

        return client_ssl_context(self.config, node=self.host_node())

    def pool(self, **kwargs):  # noqa: ANN003, ANN201 - PeerPool
        """A :class:`~hypervisor.node.client.PeerPool` of every local peer."""
        from hypervisor.node.client import PeerPool

        pool = PeerPool(self.client_context(), **kwargs)
        for p in self.peers():
            pool.add(p.name, p.address)
        return pool

    # Lifecycle ----------------------------------------------------------------

    def up(self, n: int, *, memory_lend: int = DEFAULT_MEMORY_LEND,
           disk_lend: int = DEFAULT_DISK_LEND, netns: bool | None = None,
           base_port: int | None = None, fsync: bool = True) -> list[PeerInfo]:
        """Start ``n`` peers.

        Args:
            n: how many peers (1..16).
            memory_lend: RAM each lends.
            disk_lend: disk each lends.
            netns: one network namespace per peer (None: when allowed).
            base_port: loopback mode: peer ``i`` listens on ``base_port + i - 1``
                (default: any free port).
            fsync: peers fsync chunks before acknowledging them.

        Returns:
            The peers, running.

        Raises:
            UsageError: bad ``n``.
            AlreadyExistsError: a local cluster is already up.
            LocalClusterError: a peer could not start (everything started is undone).
        """
        if not 1 <= n <= MAX_PEERS:
            raise UsageError(f"--peers must be between 1 and {MAX_PEERS}")
        if self.state.peers(local=True):
            raise AlreadyExistsError(f"a local cluster is already up "
                                     f"({len(self.state.peers(local=True))} peers); "
                                     "run 'omega cluster down' first")
        use_netns = netns_supported() if netns is None else netns
        if use_netns and not netns_supported():
            raise LocalClusterError("network namespaces need root (run without --netns)")
        if not ClusterCA.exists(self.config):
            ClusterCA.init(self.config, name=self.state.get_meta("local_node") or "host")
        self.host_node()
        try:
            if use_netns:
                with _global_lock():
                    slot = self._free_slot(n)
                    for i in range(1, n + 1):
                        netlink_call(self._create_netns, i, slot)
                for i in range(1, n + 1):
                    self._start_peer(i, memory_lend=memory_lend, disk_lend=disk_lend,
                                     slot=slot, port=NETNS_PORT, fsync=fsync)
            else:
                for i in range(1, n + 1):
                    port = base_port + i - 1 if base_port else 0
                    self._start_peer(i, memory_lend=memory_lend, disk_lend=disk_lend,
                                     slot=None, port=port, fsync=fsync)
        except BaseException:
            self.down()
            raise
        return self.peers()

    def down(self) -> list[str]:
        """Stop every peer (drain, then close), remove namespaces, veths and data.

        Returns:
            The names of the peers that were stopped.
        """
        names = []
        for peer in self.state.peers(local=True):
            self._stop(peer, sig=signal.SIGTERM)
            if peer.netns:
                netlink_call(self._delete_netns, peer.netns, peer.host_veth)
            if peer.data_dir:
                shutil.rmtree(Path(peer.data_dir).parent, ignore_errors=True)
            self.state.remove(peer.name)
            names.append(peer.name)
        # Leftovers of a crashed `up` (namespaces recorded nowhere).
        for ns in netlink_call(self._own_netns):
            netlink_call(self._delete_netns, ns, None)
        return names

    def kill(self, name: str) -> None:
        """SIGKILL a peer at once (a crashed PC); its state becomes ``dead``.

        Raises:
            NotFoundError: no such peer.
        """
        peer = self.peer(name)
        self._stop(peer, sig=signal.SIGKILL)
        self.state.update(name, state="dead", pid=None)

    def stop(self, name: str) -> None:
        """SIGTERM a peer (it drains, then closes); its state becomes ``stopped``."""
        peer = self.peer(name)
        self._stop(peer, sig=signal.SIGTERM)
        self.state.update(name, state="stopped", pid=None)

    def restart(self, name: str) -> PeerInfo:
        """Start a stopped or killed peer again: same address, same data directory.

        Returns:
            The peer, running.

        Raises:
            NotFoundError: no such peer.
            LocalClusterError: it could not start.
        """
        peer = self.peer(name)
        if peer.state == "running":
            self._stop(peer, sig=signal.SIGTERM)
        prefix = ["ip", "netns", "exec", peer.netns] if peer.netns else None
        node = self._spawn(peer.name, host=peer.host, port=peer.port,
                           memory_lend=peer.memory_lend, disk_lend=peer.disk_lend,
                           data_dir=Path(peer.data_dir or self.root / name / "chunks"),
                           log_path=Path(peer.log_path or self.root / name / "node.log"),
                           prefix=prefix, fsync=True)
        return self.state.update(name, state="running", pid=node.pid)

    # Internals ----------------------------------------------------------------

    def _spawn(self, name: str, *, host: str, port: int, memory_lend: int, disk_lend: int,
               data_dir: Path, log_path: Path, prefix: list[str] | None,
               fsync: bool) -> NodeProcess:
        opts = NodeOptions(name=name, host=host, port=port, memory_lend=memory_lend,
                           disk_lend=disk_lend, data_dir=data_dir, fsync=fsync)
        try:
            node = NodeProcess.start(self.config, opts, log_path=log_path, prefix=prefix)
        except OmegaError as exc:
            raise LocalClusterError(str(exc)) from None
        self._children[name] = node
        return node

    def _start_peer(self, i: int, *, memory_lend: int, disk_lend: int, slot: int | None,
                    port: int, fsync: bool) -> None:
        name = f"peer{i}"
        pdir = self.root / name
        if slot is not None:
            host_ip, peer_ip = self._ips(i, slot)
            netns, veth = self._netns_name(i), self._veth(i, "h")
            listen, prefix = str(peer_ip), ["ip", "netns", "exec", netns]
            sans = [str(peer_ip)]
        else:
            netns = veth = None
            listen, prefix, sans = "127.0.0.1", None, ["127.0.0.1"]
        paths = issue_node_cert(self.config, name, sans=sans)
        # Record first: a failure below is then undone by down().
        peer = PeerInfo(name=name, address=f"{listen}:{port}", cert=str(paths.cert),
                        memory_lend=memory_lend, disk_lend=disk_lend, state="starting",
                        netns=netns, host_veth=veth, data_dir=str(pdir / "chunks"),
                        log_path=str(pdir / "node.log"), local=True)
        self.state.put(peer)
        node = self._spawn(name, host=listen, port=port, memory_lend=memory_lend,
                           disk_lend=disk_lend, data_dir=pdir / "chunks",
                           log_path=pdir / "node.log", prefix=prefix, fsync=fsync)
        host, port = node.address
        self.state.update(name, address=f"{host}:{port}", state="running", pid=node.pid)

    def _stop(self, peer: PeerInfo, *, sig: int) -> None:
        child = self._children.pop(peer.name, None)
        if child is not None and child.alive():
            if sig == signal.SIGKILL:
                child.kill()
            else:
                child.stop()
            return
        if child is not None:
            child.kill()  # reap
        if _pid_is_node(peer.pid, peer.name):
            _stop_pid(peer.pid, sig=sig, timeout=15)  # type: ignore[arg-type]

    def _netns_name(self, i: int) -> str:
        return f"omega-{self.tag}-{i}"

    def _veth(self, i: int, side: str) -> str:
        return f"o{self.tag}{i}{side}"  # at most 1+6+2+1 = 10 < 15 characters

    @staticmethod
    def _ips(i: int, slot: int) -> tuple[ipaddress.IPv4Address, ipaddress.IPv4Address]:
        base = ipaddress.IPv4Address(f"10.200.{i}.0") + 4 * slot
        return base + 1, base + 2

    def _free_slot(self, n: int) -> int:
        used = netlink_call(_addresses_in_use)
        preferred = int(self.tag, 16) % _SLOTS
        for k in [preferred, *range(_SLOTS)]:
            if all(str(self._ips(i, k)[0]) not in used for i in range(1, n + 1)):
                return k
        raise LocalClusterError("no free 10.200.<i>.x/30 subnets left for a local cluster")

    def _own_netns(self) -> list[str]:
        if not netns_supported():
            return []
        from pyroute2 import netns as pnetns

        prefix = f"omega-{self.tag}-"
        return [ns for ns in pnetns.listnetns() if ns.startswith(prefix)]

    def _create_netns(self, i: int, slot: int) -> None:
        from pyroute2 import IPRoute, NetNS
        from pyroute2 import netns as pnetns

        name, vh, vp = self._netns_name(i), self._veth(i, "h"), self._veth(i, "p")
        host_ip, peer_ip = self._ips(i, slot)
        try:
            pnetns.create(name)
            with IPRoute() as ipr:
                ipr.link("add", ifname=vh, kind="veth", peer={"ifname": vp, "net_ns_fd": name})
                idx = ipr.link_lookup(ifname=vh)[0]
                ipr.addr("add", index=idx, address=str(host_ip), prefixlen=30)
                ipr.link("set", index=idx, state="up")
            with NetNS(name) as ns:
                pidx = ns.link_lookup(ifname=vp)[0]
                ns.addr("add", index=pidx, address=str(peer_ip), prefixlen=30)
                ns.link("set", index=pidx, state="up")
                ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")
        except Exception as exc:
            self._delete_netns(name, vh)
            raise LocalClusterError(f"cannot create network namespace {name}: {exc}") from exc

    @staticmethod
    def _delete_netns(name: str, host_veth: str | None) -> None:
        from pyroute2 import IPRoute
        from pyroute2 import netns as pnetns

        if host_veth:
            with IPRoute() as ipr:
                idx = ipr.link_lookup(ifname=host_veth)
                if idx:
                    with contextlib.suppress(Exception):
                        ipr.link("del", index=idx[0])
        try:
            pnetns.remove(name)
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise
        except Exception:  # pyroute2 wraps some errors; a missing namespace is fine
            pass
        # The kernel removes a namespace's veths asynchronously; wait for it.
        if host_veth:
            deadline = time.monotonic() + 5
            with IPRoute() as ipr:
                while ipr.link_lookup(ifname=host_veth) and time.monotonic() < deadline:
                    time.sleep(0.05)
