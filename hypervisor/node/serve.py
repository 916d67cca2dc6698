"""Running a node daemon as a process: stores, TLS identity, metrics, signals."""

from __future__ import annotations

import asyncio
import logging
import os
import select
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from hypervisor.config import Config
from hypervisor.errors import OmegaError, UsageError

log = logging.getLogger(__name__)

READY_PREFIX = "omega-node-ready"
_REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class NodeOptions:
    """How to run one node daemon.

    Attributes:
        name: the node name (its certificate ``nodes/<name>.pem`` is used).
        host: address to listen on.
        port: port to listen on (0: any).
        memory_lend: bytes of RAM lent for pages.
        disk_lend: bytes of disk lent for chunks.
        data_dir: where chunks are kept.
        metrics: ``(host, port)`` for the Prometheus endpoint, or None.
        fsync: make each chunk put and delete durable (fdatasync) before
            acknowledging it.
        workers: threads for disk requests on the main port.
        page_port: the data port, serving pages and chunks from C threads (0:
            any free port; None: none). Opened when memory or disk is lent;
            announced in STAT as ``page_port`` (its name on the wire).
        busy_poll_us: how long a data-port connection waits awake for its
            next request before sleeping (wake-ups cost tens of µs on VMs).
    """

    name: str
    host: str
    port: int
    memory_lend: int
    disk_lend: int
    data_dir: Path
    metrics: tuple[str, int] | None = None
    fsync: bool = True
    workers: int = 4
    page_port: int | None = 0
    busy_poll_us: int = 100


def parse_listen(text: str, *, what: str = "--listen") -> tuple[str, int]:
    """Parse ``HOST:PORT`` (``[v6]:PORT`` for IPv6).

    Raises:
        UsageError: malformed.
    """
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise UsageError(f"{what} {text!r}: want HOST:PORT")
    return host.strip("[]"), int(port)


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's loop when installed (lower per-request cost), else asyncio's."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


async def serve_node(config: Config, opts: NodeOptions) -> None:
    """Run a node daemon until SIGTERM/SIGINT, then drain and close.

    Prints one line ``omega-node-ready <name> <host>:<port>`` on stdout once it
    accepts connections (the local cluster waits for it).

    Args:
        config: where the cluster identity lives.
        opts: what to serve.

    Raises:
        OmegaError: identity missing, data directory unusable, address in use.
    """
    from hypervisor.node.daemon import NodeDaemon, NodeMetricsCollector
    from hypervisor.node.stores import ChunkStore, PageStore
    from hypervisor.security import node_paths, server_ssl_context

    ssl_ctx = server_ssl_context(config, node=opts.name)
    daemon = NodeDaemon(name=opts.name, pages=PageStore(opts.memory_lend),
                        chunks=ChunkStore(opts.data_dir, opts.disk_lend, fsync=opts.fsync),
                        ssl_context=ssl_ctx, workers=opts.workers)
    try:
        host, port = await daemon.start(opts.host, opts.port)
    except OSError as exc:
        raise OmegaError(f"cannot listen on {opts.host}:{opts.port}: "
                         f"{exc.strerror or exc}") from None
    if opts.page_port is not None and (opts.memory_lend > 0 or opts.disk_lend > 0):
        ident = node_paths(config, opts.name)
        try:
            daemon.start_data_port(host, opts.page_port, ca=str(ident.ca), cert=str(ident.cert),
                                   keyfile=str(ident.key), busy_poll_us=opts.busy_poll_us)
        except OmegaError:
            await daemon.shutdown()
            raise
    metrics_server = None
    if opts.metrics is not None:
        from prometheus_client import CollectorRegistry, start_http_server

        registry = CollectorRegistry()
        registry.register(NodeMetricsCollector(daemon))
        try:
            metrics_server = start_http_server(opts.metrics[1], addr=opts.metrics[0],
                                               registry=registry)
        except OSError as exc:
            await daemon.shutdown()
            raise OmegaError(f"cannot serve metrics on {opts.metrics[0]}:{opts.metrics[1]}: "
                             f"{exc.strerror or exc}") from None
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    shown = f"[{host}]" if ":" in host else host
    sys.stdout.write(f"{READY_PREFIX} {opts.name} {shown}:{port}\n")
    sys.stdout.flush()
    if not sys.stdout.isatty():
        # Whoever started us may stop reading (``omega cluster up`` exits): nothing
        # more goes to that pipe.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    await stop.wait()
    log.info("node %s: shutting down (draining)", opts.name)
    await daemon.shutdown()
    if metrics_server is not None:
        server = metrics_server[0] if isinstance(metrics_server, tuple) else None
        if server is not None:
            server.shutdown()


def run_node(config: Config, opts: NodeOptions) -> None:
    """Run :func:`serve_node` on a fresh (uvloop) event loop."""
    from hypervisor.memtune import keep_large_buffers

    keep_large_buffers()
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        runner.run(serve_node(config, opts))


class NodeProcess:
    """An ``omega node serve`` child process, started and stopped by its owner.

    Attributes:
        name: the node name.
        address: ``(host, port)`` it listens on (known once ready).
        proc: the child process.
    """

    def __init__(self, proc: subprocess.Popen[str], name: str, address: tuple[str, int],
                 log_path: Path) -> None:
        self.proc = proc
        self.name = name
        self.address = address
        self.log_path = log_path

    @property
    def pid(self) -> int:
        """The daemon's pid."""
        return self.proc.pid

    @classmethod
    def start(cls, config: Config, opts: NodeOptions, *, log_path: Path,
              prefix: list[str] | None = None, timeout: float = 30.0) -> NodeProcess:
        """Start ``omega node serve`` and wait until it accepts connections.

        Args:
            config: whose OMEGA_HOME the child uses.
            opts: what it serves.
            log_path: where its stderr goes.
            prefix: command prefix (e.g. ``["ip", "netns", "exec", NS]``).
            timeout: seconds to wait for the ready line.

        Returns:
            The running node.

        Raises:
            OmegaError: it exited or did not become ready (its log's last line included).
        """
        argv = [sys.executable, "-m", "hypervisor.cli", "node", "serve", "--name", opts.name,
                "--listen", f"{opts.host}:{opts.port}", "--memory-lend", str(opts.memory_lend),
                "--disk-lend", str(opts.disk_lend), "--data", str(opts.data_dir)]
        if opts.metrics:
            argv += ["--metrics", f"{opts.metrics[0]}:{opts.metrics[1]}"]
        if not opts.fsync:
            argv.append("--no-fsync")
        env = dict(os.environ, OMEGA_HOME=str(config.home), PYTHONUNBUFFERED="1")
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log_file:
            proc = subprocess.Popen([*(prefix or []), *argv], stdout=subprocess.PIPE,
                                    stderr=log_file, stdin=subprocess.DEVNULL, text=True,
                                    env=env, cwd=_REPO, start_new_session=True)
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], timeout)
        line = proc.stdout.readline() if ready else ""
        if not line.startswith(READY_PREFIX):
            proc.kill()
            proc.wait()
            tail = log_path.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
            raise OmegaError(f"node {opts.name} did not start: {tail[0]}")
        _, _, addr = line.split()
        host, _, port = addr.rpartition(":")
        return cls(proc, opts.name, (host.strip("[]"), int(port)), log_path)

    def alive(self) -> bool:
        """Whether the process still runs."""
        return self.proc.poll() is None

    def stop(self, *, timeout: float = 15.0) -> int:
        """SIGTERM (drain, then close), SIGKILL after ``timeout``; return the exit status."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL at once (a crashed peer)."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
