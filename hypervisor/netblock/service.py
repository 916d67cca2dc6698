"""Running the NBD server for stored exports: backends, listeners, TLS, signals.

This is what ``omega netblock serve`` (and import/export, which serve an
export on a private socket to ``qemu-img``) run. It opens a backend for each
export, builds the TLS context, binds the listeners (unix socket, TCP,
systemd socket activation or a connected stdin socket), and on SIGTERM /
SIGINT drains connections before exiting. With ``run`` it is a captive server
(as ``nbdkit --run``): once listening it runs a shell command with the URI in
its environment, and drains and exits with that command's status when it ends.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import ssl
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hypervisor.config import Config
from hypervisor.errors import NotFoundError, OmegaError, UsageError
from hypervisor.netblock.backend import Backend, SparseFileBackend
from hypervisor.netblock.exports import ExportRecord, ExportStore, validate_size
from hypervisor.netblock.memfd import MemfdBackend
from hypervisor.netblock.server import DEFAULT_BUSY_POLL_US, Export, NbdServer
from hypervisor.units import format_size

log = logging.getLogger(__name__)


class ServeError(OmegaError):
    """The server could not start serving (a listener failed)."""


def default_socket(config: Config) -> Path:
    """The unix socket ``omega netblock serve`` listens on by default."""
    return config.run_dir / "netblock.sock"


def tls_context_from_x509_dir(directory: Path, *, verify_peer: bool = True) -> ssl.SSLContext:
    """A server context from a QEMU ``tls-creds-x509`` style directory.

    Args:
        directory: holds ``ca-cert.pem``, ``server-cert.pem``, ``server-key.pem``.
        verify_peer: require a client certificate signed by ``ca-cert.pem``.

    Returns:
        The context.

    Raises:
        UsageError: files are missing or unusable.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(str(directory / "server-cert.pem"), str(directory / "server-key.pem"))
        ctx.load_verify_locations(cafile=str(directory / "ca-cert.pem"))
    except (OSError, ssl.SSLError) as exc:
        raise UsageError(f"TLS credentials in {directory}: {exc}") from exc
    ctx.verify_mode = ssl.CERT_REQUIRED if verify_peer else ssl.CERT_NONE
    return ctx


@dataclass
class ServeOptions:
    """What ``omega netblock serve`` was asked to do.

    Attributes:
        names: stored exports to serve (empty: all).
        memory: extra (name, size) exports held in RAM only, gone at exit.
        socket: unix socket path (None: no unix listener).
        listen: TCP (host, port) listeners.
        stdin: serve the already connected socket on fd 0 and exit when it closes.
        tls_dir: QEMU-style x509 credentials directory.
        tls_node: use this cluster node's certificate (hypervisor.security).
        tls_required: refuse clients that do not STARTTLS (forced off loopback).
        no_tls_required: allow plaintext TCP off loopback.
        read_only: serve every export read-only.
        metrics: serve Prometheus metrics on (host, port).
        repair: re-replicate stale chunks in the background.
        peers: explicit (name, HOST:PORT) peers instead of the cluster state's.
        node: this host's node name for mutual TLS with peers.
        announce: print where the server listens on stderr.
        replicated_options: extra keyword arguments for the replicated backend.
        busy_poll_us: how long a connection served in C waits awake for its
            next request before it sleeps (0: never).
        run: shell command to run once listening (captive mode); the server
            drains and stops when it exits. Needs a unix socket.
        pidfile: written with this process's pid once every listener is
            bound (so its appearance means "ready"), removed at exit.
    """

    names: Sequence[str] = ()
    memory: Sequence[tuple[str, int]] = ()
    socket: Path | None = None
    listen: Sequence[tuple[str, int]] = ()
    stdin: bool = False
    tls_dir: Path | None = None
    tls_node: str | None = None
    tls_required: bool = False
    no_tls_required: bool = False
    read_only: bool = False
    metrics: tuple[str, int] | None = None
    repair: bool = True
    peers: Sequence[tuple[str, str]] = ()
    node: str | None = None
    announce: bool = True
    replicated_options: dict[str, Any] = field(default_factory=dict)
    busy_poll_us: int = DEFAULT_BUSY_POLL_US
    run: str | None = None
    pidfile: Path | None = None


def open_backend(config: Config, store: ExportStore, record: ExportRecord, *,
                 read_only: bool = False, **replicated: Any) -> Backend:
    """Open the backend of a stored export.

    Args:
        config: configuration (cluster state for replicated exports).
        store: the export store.
        record: the export.
        read_only: open read-only.
        **replicated: options passed to the replicated backend.

    Returns:
        The backend (call ``close()`` when done).
    """
    if record.kind == "local":
        # one server at a time, as for replicated exports: resize and delete
        # must not change the file under a server that sized it at open
        lock = store.lock(record)
        try:
            return SparseFileBackend(store.data_path(record), read_only=read_only,
                                     owner_lock=lock)
        except BaseException:
            os.close(lock)
            raise
    from hypervisor.netblock import native_replicated
    from hypervisor.netblock.replicated import ReplicatedBackend

    if native_replicated.enabled():
        return native_replicated.NativeReplicatedBackend.open(
            config, store, record, read_only=read_only, **replicated)
    return ReplicatedBackend.open(config, store, record, read_only=read_only, **replicated)


def build_exports(config: Config, store: ExportStore, options: ServeOptions) -> dict[str, Export]:
    """Open every export named in ``options``.

    Raises:
        NotFoundError: a named export does not exist.
        UsageError: no export to serve.
    """
    if options.names:
        records = [store.get(n) for n in options.names]
    else:  # all stored exports, unless only in-memory ones were asked for
        records = [] if options.memory else store.list()
    exports: dict[str, Export] = {}
    replicated = dict(options.replicated_options)
    if any(r.kind == "replicated" for r in records) and "pool" not in replicated:
        replicated["pool"] = peer_pool(config, options)
        replicated.setdefault("node", options.node)
    try:
        for record in records:
            backend = open_backend(config, store, record, read_only=options.read_only,
                                   **replicated)
            exports[record.name] = Export.of(record.name, backend,
                                             description=record.description)
        for name, size in options.memory:
            if name in exports:
                raise UsageError(f"export {name!r} given twice")
            # a memfd, not anonymous memory: fd-backed, so the native fast path serves it
            memory = MemfdBackend(size)
            memory.read_only = options.read_only
            exports[name] = Export.of(name, memory, description="in memory")
    except BaseException:
        for export in exports.values():
            _close_sync(export.backend)
        raise
    if not exports:
        raise NotFoundError("no exports to serve (create one with 'omega netblock create')")
    return exports


def peer_pool(config: Config, options: ServeOptions) -> Any:
    """The pool of peers replicated exports use: ``--peer`` ones, else the cluster's."""
    return make_peer_pool(config, peers=options.peers, node=options.node)


def make_peer_pool(config: Config, *, peers: Sequence[tuple[str, str]] = (),
                   node: str | None = None) -> Any:
    """A ``PeerPool`` of explicit peers, or of every peer in the cluster state.

    Args:
        config: configuration (this node's certificate, the cluster state).
        peers: (name, HOST:PORT) pairs; empty means the cluster state's peers.
        node: this host's node name (default :func:`~.replicated.host_node_name`).

    Returns:
        The pool (connections open lazily).
    """
    from hypervisor.netblock.replicated import host_node_name
    from hypervisor.node.client import PeerPool
    from hypervisor.security import client_ssl_context, ensure_node_cert

    name = node or host_node_name(config)
    ensure_node_cert(config, name)
    if not peers:
        return PeerPool.from_cluster(config, node=name)
    pool = PeerPool(client_ssl_context(config, node=name))
    for peer, address in peers:
        pool.add(peer, address)
    return pool


def delete_export(config: Config, name: str, *, peers: Sequence[tuple[str, str]] = (),
                  node: str | None = None) -> ExportRecord:
    """Delete an export: its chunks on peers, its key and its metadata.

    Args:
        config: configuration.
        name: the export.
        peers: explicit (name, HOST:PORT) peers; empty means the cluster state's.
        node: this host's node name for peer TLS.

    Returns:
        The deleted record.

    Raises:
        NotFoundError: no such export.
        OmegaError: a server has the export open, or its peers refused.
    """
    config.ensure()
    store = ExportStore(config)
    try:
        record = store.get(name)
        with store.locked(record):  # refuses while a server has the export open
            if record.kind == "replicated":
                from hypervisor.netblock.replicated import drop_export_chunks

                pool = make_peer_pool(config, peers=peers, node=node)
                asyncio.run(drop_export_chunks(config, store, record, pool=pool))
        return store.delete(name)
    finally:
        store.close()


_ZERO_STEP = 256 << 20  # bytes zeroed per request when a replicated export shrinks


def resize_export(config: Config, name: str, size: int, *, change: bool = False,
                  shrink: bool = False, peers: Sequence[tuple[str, str]] = (),
                  node: str | None = None) -> tuple[ExportRecord, ExportRecord]:
    """Grow or shrink an export that no server has open.

    Growing adds a hole (it reads as zeroes, costs nothing). Shrinking needs
    ``shrink`` (as ``qemu-img resize --shrink``): the bytes past the new end
    are zeroed first — whole chunks freed on the peers, a partial last block
    rewritten — so that growing again later shows zeroes, never old data.

    Args:
        config: configuration.
        name: the export.
        size: the new size in bytes, a positive multiple of 512; with
            ``change``, what to add to the current size (negative: shrink).
        change: ``size`` is relative to the current size.
        shrink: allow a smaller size (data past it is lost).
        peers: explicit (name, HOST:PORT) peers; empty means the cluster state's.
        node: this host's node name for peer TLS.

    Returns:
        (the record before, the record after).

    Raises:
        NotFoundError: no such export.
        UsageError: a bad size, or a smaller one without ``shrink``.
        AlreadyExistsError: a server has the export open.
        OmegaError: the peers refused the zeroing (the size is then unchanged).
    """
    config.ensure()
    store = ExportStore(config)
    try:
        record = store.get(name)
        if change:
            if record.size + size <= 0:
                raise UsageError(f"export {name} is {format_size(record.size)}: it cannot "
                                 f"shrink by {format_size(-size)}")
            size += record.size
        validate_size(size)
        if size < record.size and not shrink:
            raise UsageError(f"{format_size(size)} is smaller than export {name}'s "
                             f"{format_size(record.size)}: the data past it would be lost "
                             "(pass --shrink)")
        if size == record.size:
            return record, record
        if record.kind == "replicated" and size < record.size:
            return record, asyncio.run(_shrink_replicated(config, store, record, size,
                                                          peers=peers, node=node))
        with store.locked(record):  # refuses while a server has the export open
            if record.kind == "local":
                try:  # truncating down frees the tail, so growing later reads zeroes
                    os.truncate(store.data_path(record), size)
                except OSError as exc:
                    raise ServeError(f"cannot resize {store.data_path(record)}: "
                                     f"{exc.strerror}") from exc
            return record, store.set_size(record, size)
    finally:
        store.close()


async def _shrink_replicated(config: Config, store: ExportStore, record: ExportRecord,
                             size: int, *, peers: Sequence[tuple[str, str]],
                             node: str | None) -> ExportRecord:
    pool = make_peer_pool(config, peers=peers, node=node)
    try:
        await pool.measure(samples=1)
        backend = open_backend(config, store, record, pool=pool, node=node)  # takes the lock
        try:
            if hasattr(backend, "start"):
                await backend.start()
            offset = size
            while offset < record.size:
                step = min(_ZERO_STEP - offset % _ZERO_STEP, record.size - offset)
                await backend.write_zeroes(offset, step, fua=False, may_trim=True,
                                           fast_only=False)
                offset += step
            await backend.flush()
            return store.set_size(record, size)  # still under the backend's lock
        finally:
            await backend.close()
    finally:
        await pool.close()


def _close_sync(backend: Backend) -> None:
    result = backend.close()
    if asyncio.iscoroutine(result):
        result.close()


def _tls_context(config: Config, options: ServeOptions) -> ssl.SSLContext | None:
    if options.tls_dir is not None:
        return tls_context_from_x509_dir(options.tls_dir)
    if options.tls_node is not None:
        from hypervisor.security import server_ssl_context

        return server_ssl_context(config, node=options.tls_node)
    return None


def _activation_sockets() -> list[socket.socket]:
    """Listening sockets passed by systemd-style socket activation."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return []
    count = int(os.environ.get("LISTEN_FDS", "0") or 0)
    socks = [socket.socket(fileno=3 + i) for i in range(count)]
    for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(var, None)
    return socks


async def serve(config: Config, options: ServeOptions, *,
                exports: dict[str, Export] | None = None,
                ready: asyncio.Future[NbdServer] | None = None,
                stop: asyncio.Event | None = None) -> int | None:
    """Serve until SIGTERM/SIGINT (or, in stdin mode, until the client leaves;
    in captive mode, until the command ends).

    Args:
        config: configuration.
        options: what to serve and where.
        exports: already opened exports (default: open them from the store).
        ready: resolved with the server once every listener is bound.
        stop: set it to drain and stop (default: SIGTERM/SIGINT set it).

    Returns:
        In captive mode (``options.run``) the command's exit status (128 + N
        for a command killed by signal N); otherwise None.
    """
    if options.run is not None:
        if options.stdin:
            raise UsageError("--run starts its own clients; it cannot serve stdin (-s)")
        if options.socket is None:
            raise UsageError("--run needs a unix socket to hand to the command")
    store: ExportStore | None = None
    if exports is None:
        # the store stays open while serving: replicated exports record chunk versions
        store = ExportStore(config)
        try:
            exports = await asyncio.to_thread(build_exports, config, store, options)
        except BaseException:
            store.close()
            raise
    try:
        return await _serve_exports(config, options, exports, ready=ready, stop=stop)
    finally:
        if store is not None:
            store.close()


async def _serve_exports(config: Config, options: ServeOptions, exports: dict[str, Export], *,
                         ready: asyncio.Future[NbdServer] | None,
                         stop: asyncio.Event | None) -> int | None:
    tls = _tls_context(config, options)
    default = next(iter(exports)) if len(exports) == 1 else None
    server = NbdServer(exports, tls_context=tls, tls_required=options.tls_required,
                       default_export=default, busy_poll_us=options.busy_poll_us)
    loop = asyncio.get_running_loop()
    try:
        if options.stdin:
            fd = os.dup(0)
            try:
                sock = socket.socket(fileno=fd)
            except OSError as exc:
                os.close(fd)
                raise UsageError("-s serves a connected socket on stdin (as nbdkit -s does); "
                                 f"stdin is not one ({exc.strerror})") from None
            if ready is not None:
                ready.set_result(server)
            await server.serve_connected_socket(sock)
            await server.shutdown()
            return None
        activated = _activation_sockets()
        if activated and options.run is not None:
            raise UsageError("--run serves its own private socket, not sockets passed by "
                             "socket activation")
        for sock in activated:
            await server.adopt_listening_socket(sock)
        if options.socket is not None and not activated:
            await server.listen_unix(options.socket)
            if options.announce:
                print(f"netblock: serving {', '.join(exports)} on unix:{options.socket}",
                      file=sys.stderr, flush=True)
        for host, port in options.listen:
            bound = await server.listen_tcp(host, port,
                                            tls_required=not options.no_tls_required)
            print(f"netblock: serving {', '.join(exports)} on tcp:{host}:{bound}",
                  file=sys.stderr, flush=True)
    except BaseException as exc:
        await server.shutdown(timeout=5)
        if options.socket is not None and options.socket.is_socket():
            options.socket.unlink()  # leave nothing behind
        if isinstance(exc, OSError):  # a listener could not be bound (in use, no permission)
            raise ServeError(f"cannot listen: {exc.strerror or exc}") from exc
        raise
    pools = {id(e.backend.pool): e.backend.pool for e in exports.values()
             if hasattr(e.backend, "pool")}
    for pool in pools.values():
        await pool.measure(samples=1)
        pool.start_monitor(interval=1.0)
    for export in exports.values():
        if hasattr(export.backend, "start"):  # the native backend: peers' data ports
            await export.backend.start()
    for export in exports.values():
        if options.repair and hasattr(export.backend, "start_repair_loop"):
            export.backend.start_repair_loop()
    metrics_server = None
    if options.metrics is not None:
        from prometheus_client import CollectorRegistry, start_http_server

        from hypervisor.netblock.metrics import NetblockMetricsCollector

        registry = CollectorRegistry()
        registry.register(NetblockMetricsCollector(server))
        metrics_server, _thread = start_http_server(options.metrics[1], addr=options.metrics[0],
                                                    registry=registry)
    signals = stop is None
    if stop is None:
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
    status: int | None = None
    pidfile: Path | None = None
    try:
        if options.pidfile is not None:
            _write_pidfile(options.pidfile)
            pidfile = options.pidfile
        if ready is not None:
            ready.set_result(server)
        if options.run is None:
            await stop.wait()
        else:
            assert options.socket is not None  # checked in serve()
            status = await _run_captive(options.run, options.socket, list(exports), stop)
    finally:
        if pidfile is not None:
            pidfile.unlink(missing_ok=True)
        if signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
        await server.shutdown()
        for pool in pools.values():
            await pool.close()
        if metrics_server is not None:
            metrics_server.shutdown()
        if options.socket is not None and options.socket.is_socket():
            options.socket.unlink()
    return status


def exit_with_parent() -> None:
    """Have the kernel send this process SIGTERM (which drains and stops the
    server) when its parent exits: ``prctl(PR_SET_PDEATHSIG)``.

    Raises:
        ServeError: the call failed, or the parent is already gone.
    """
    import ctypes

    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1
    if libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0) != 0:
        raise ServeError(f"--exit-with-parent: prctl failed: "
                         f"{os.strerror(ctypes.get_errno())}")
    if os.getppid() != parent or parent == 1:  # it went before the call took hold
        raise ServeError("--exit-with-parent: the parent process has already exited")


def _write_pidfile(path: Path) -> None:
    """Write this process's pid to ``path`` atomically (readers never see it half written)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(f"{os.getpid()}\n")
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ServeError(f"cannot write the pid file {path}: {exc.strerror or exc}") from exc


def nbd_unix_uri(socket_path: Path, export: str) -> str:
    """The NBD URI of ``export`` on a unix socket (nbd+unix, as libnbd, qemu
    and nbdinfo read it), with the name and path percent-encoded."""
    from urllib.parse import quote

    return f"nbd+unix:///{quote(export, safe='')}?socket={quote(str(socket_path))}"


def captive_env(socket_path: Path, names: Sequence[str]) -> dict[str, str]:
    """The variables a ``--run`` command gets: ``uri`` (:func:`nbd_unix_uri` of
    the first export), ``unixsocket``, ``exportname`` and ``exports`` (every
    export's name, space-separated)."""
    first = names[0] if names else ""
    return {"uri": nbd_unix_uri(socket_path, first), "unixsocket": str(socket_path),
            "exportname": first, "exports": " ".join(names)}


async def _run_captive(command: str, socket_path: Path, names: Sequence[str],
                       stop: asyncio.Event) -> int:
    """Run ``command`` in a shell until it exits (its status is returned) or
    ``stop`` is set (a signal to the server: the command gets SIGTERM, then
    SIGKILL after 10 s)."""
    env = {**os.environ, **captive_env(socket_path, names)}
    proc = await asyncio.create_subprocess_shell(command, env=env)
    waiter = asyncio.ensure_future(proc.wait())
    stopper = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if not waiter.done():
            log.warning("stopping: sending SIGTERM to the --run command (pid %d)", proc.pid)
            proc.terminate()
            try:
                await asyncio.wait_for(asyncio.shield(waiter), timeout=10)
            except asyncio.TimeoutError:
                proc.kill()
        code = await waiter
    finally:
        stopper.cancel()
        if proc.returncode is None:  # cancelled (the loop is going away): leave nothing behind
            proc.kill()
    return 128 - code if code < 0 else code
