"""The node daemon: a peer's page service and chunk service over mutual TLS.

Threads: one asyncio event loop does all network I/O and serves page requests
inline (RAM, never blocks; no task per request). Chunk requests (disk) go to a
small pool of worker threads, their answers written back from a done callback
on the loop. Both stores are C (native/peer) and release the GIL; the data
port (:mod:`hypervisor.node.dataport`) serves the same stores from its own C
threads. A connection that sends malformed bytes gets one BAD_REQUEST
answer and is closed; it shares no state with other connections beyond the
stores, so no other client notices.

Access: a connection's identity is the node name in its client certificate
(verified against the cluster CA by the TLS handshake), read once when the
connection is made. Each namespace belongs to the member whose put created it;
a request naming another member's namespace is answered FORBIDDEN (the store
checks it with one dict lookup), LIST_NS lists the caller's namespaces only,
and PING/STAT are open to every member.

Shutdown (SIGTERM/SIGINT): stop accepting, answer new requests with
SHUTTING_DOWN, wait for in-flight chunk requests to finish and answers to be
written, then close every connection (TLS close_notify) and exit.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import ssl
import threading
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from hypervisor.errors import ProtocolError
from hypervisor.node import wire
from hypervisor.node.stores import ChunkStore, NotOwnerError, PageStore, StoreError
from hypervisor.node.tlsio import TlsServer, create_tls_server, set_nodelay

if TYPE_CHECKING:
    from hypervisor.node.dataport import DataPort
from hypervisor.node.wire import NsKind, Op, Status

log = logging.getLogger(__name__)

_PAUSE_AT = 256    # in-flight chunk requests per connection before reading pauses
_RESUME_AT = 64
_KIND_NAMES = {NsKind.PAGE: "page", NsKind.CHUNK: "chunk"}
_OP_NAMES = {int(op): op.name for op in Op}
ANONYMOUS = ""  # the identity of every connection of a daemon without TLS (wire tests only)


def certificate_identity(cert: dict[str, Any] | None) -> str | None:
    """The cluster member a verified peer certificate names.

    Args:
        cert: :meth:`ssl.SSLSocket.getpeercert` of the connection.

    Returns:
        Its subject common name (the node name the cluster CA signed), else its
        first DNS subjectAltName; None when it names neither.
    """
    if not cert:
        return None
    for rdn in cert.get("subject", ()):
        for attr, value in rdn:
            if attr == "commonName" and value:
                return str(value)
    for kind, value in cert.get("subjectAltName", ()):
        if kind == "DNS" and value:
            return str(value)
    return None


@dataclass
class NodeCounters:
    """Monotonic counters the daemon keeps for metrics (cheap plain ints)."""

    ops: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))
    bytes_in: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    bytes_out: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    errors: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    connections_total: int = 0


class NodeDaemon:
    """Serves a :class:`PageStore` and a :class:`ChunkStore` to cluster members.

    Attributes:
        name: this node's name.
        pages: the page store.
        chunks: the chunk store.
        counters: request counters for metrics.
    """

    def __init__(self, *, name: str, pages: PageStore, chunks: ChunkStore,
                 ssl_context: ssl.SSLContext | None, workers: int = 4) -> None:
        """Create a daemon (not yet listening).

        Args:
            name: this node's name (reported by STAT).
            pages: the page store (RAM).
            chunks: the chunk store (disk).
            ssl_context: a server context requiring client certificates
                (:func:`hypervisor.security.server_ssl_context`); None only in tests
                of the wire layer.
            workers: threads for chunk (disk) requests.
        """
        self.name = name
        self.pages = pages
        self.chunks = chunks
        self.counters = NodeCounters()
        self._counter_lock = threading.Lock()
        self._loop_thread = threading.get_ident()
        self._ssl = ssl_context
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix="omega-chunk")
        self._server: asyncio.AbstractServer | TlsServer | None = None
        self._connections: set[_PeerConnection] = set()
        self._draining = False
        self._closed = asyncio.Event()
        self.data_port: DataPort | None = None

    @property
    def draining(self) -> bool:
        """Whether shutdown has begun."""
        return self._draining

    @property
    def connections(self) -> int:
        """Open connections."""
        return len(self._connections)

    async def start(self, host: str, port: int) -> tuple[str, int]:
        """Listen on ``host:port`` (port 0: any free port).

        Returns:
            The address actually bound.

        Raises:
            OSError: the address cannot be bound.
        """
        loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        if self._ssl is not None:
            self._server = await create_tls_server(lambda: _PeerConnection(self), host, port,
                                                   self._ssl, backlog=512)
        else:
            self._server = await loop.create_server(lambda: _PeerConnection(self), host, port,
                                                    reuse_address=True, backlog=512)
        sockname = self._server.sockets[0].getsockname()
        return sockname[0], sockname[1]

    def start_data_port(self, host: str, port: int, *, ca: str, cert: str, keyfile: str,
                        busy_poll_us: int = 0) -> int:
        """Serve the page and chunk data opcodes from C threads on a second port (dataport.py).

        Args:
            host, port: where to listen (port 0: any free port).
            ca, cert, keyfile: the cluster CA and this node's identity (PEM paths).
            busy_poll_us: a connection waits awake this long for its next request.

        Returns:
            The port bound (announced in STAT as ``page_port``).

        Raises:
            OmegaError: it cannot listen or load the identity.
        """
        from hypervisor.node.dataport import DataPort

        self.data_port = DataPort(self.pages, self.chunks, host, port, ca=ca, cert=cert,
                                  keyfile=keyfile, busy_poll_us=busy_poll_us)
        return self.data_port.port

    async def wait_closed(self) -> None:
        """Wait until :meth:`shutdown` has finished."""
        await self._closed.wait()

    async def shutdown(self, *, drain_timeout: float = 10.0, close_timeout: float = 2.0) -> None:
        """Drain, then close: stop accepting, finish in-flight work, close connections.

        Args:
            drain_timeout: seconds to wait for in-flight requests to finish.
            close_timeout: seconds to wait for connections to close cleanly (TLS
                close_notify) before they are aborted.
        """
        if self._draining:
            await self._closed.wait()
            return
        self._draining = True
        if self._server is not None:
            self._server.close()
        if self.data_port is not None:
            # Each connection finishes the burst it is answering (its chunk
            # writes included), then closes.
            await asyncio.get_running_loop().run_in_executor(None, self.data_port.stop)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + drain_timeout
        while any(c.inflight for c in self._connections) and loop.time() < deadline:
            await asyncio.sleep(0.01)
        for conn in list(self._connections):
            conn.close()
        # A client that never answers our TLS close_notify must not hold shutdown up.
        deadline = min(deadline, loop.time() + close_timeout)
        while self._connections and loop.time() < deadline:
            await asyncio.sleep(0.01)
        for conn in list(self._connections):
            conn.abort()
        self._executor.shutdown(wait=True)
        self._closed.set()

    # Request handling ---------------------------------------------------------

    def stat(self) -> wire.StatInfo:
        """This node's capacity and use."""
        return wire.StatInfo(self.name, self.pages.capacity, self.pages.used,
                             self.chunks.capacity, self.chunks.used, self.pages.count,
                             self.chunks.count,
                             self.data_port.port if self.data_port is not None else 0)

    def handle(self, req: wire.Request, owner: str) -> tuple[int, bytes]:
        """Serve one request against a store (pages inline; chunks from a worker thread).

        Args:
            req: the decoded request.
            owner: the identity of the connection it came on.

        Returns:
            ``(status, response payload)``; FORBIDDEN when it names another
            member's namespace.
        """
        try:
            return self._serve(req, owner)
        except NotOwnerError as exc:
            self._count(self.counters.errors, "forbidden", 1)
            return Status.FORBIDDEN, str(exc).encode()[:512]

    def _serve(self, req: wire.Request, owner: str) -> tuple[int, bytes]:
        if isinstance(req, wire.Ping):
            return Status.OK, wire.u64_payload(_monotonic_ns())
        if isinstance(req, wire.Stat):
            return Status.OK, wire.stat_payload(self.stat())
        if isinstance(req, wire.ListNs):
            infos = [wire.NsInfo(wire.Namespace(NsKind.PAGE, n), k, b)
                     for n, k, b in self.pages.namespaces(owner=owner)]
            infos += [wire.NsInfo(wire.Namespace(NsKind.CHUNK, n), k, b)
                      for n, k, b in self.chunks.namespaces(owner=owner)]
            return Status.OK, wire.list_ns_payload(infos[:wire.MAX_LIST])
        ns = req.ns
        store: PageStore | ChunkStore = self.pages if ns.kind is NsKind.PAGE else self.chunks
        kind = _KIND_NAMES[ns.kind]
        if isinstance(req, wire.Get):
            found = store.get(ns.name, req.key, owner=owner)
            if found is None:
                return Status.NOT_FOUND, b""
            self._count(self.counters.bytes_out, kind, len(found[1]))
            return Status.OK, wire.get_payload(*found)
        if isinstance(req, wire.Put):
            status = store.put(ns.name, req.item, owner=owner)
            if status is Status.OK:
                self._count(self.counters.bytes_in, kind, len(req.item.blob))
            return status, b""
        if isinstance(req, wire.BatchGet):
            found = [store.get(ns.name, k, owner=owner) for k in req.keys]
            size = 4 + 13 * len(found) + sum(len(f[1]) for f in found if f)
            if size > wire.MAX_FRAME - (wire.HEADER_SIZE - 4):
                return Status.BAD_REQUEST, b"answer would exceed the frame limit"
            self._count(self.counters.bytes_out, kind, sum(len(f[1]) for f in found if f))
            return Status.OK, wire.batch_get_payload(found)
        if isinstance(req, wire.BatchPut):
            status, statuses = store.put_many(ns.name, req.items, owner=owner)
            self._count(self.counters.bytes_in, kind, sum(
                len(it.blob) for it, s in zip(req.items, statuses) if s is Status.OK))
            return status, wire.statuses_payload(statuses) if status is Status.OK else b""
        if isinstance(req, wire.Delete):
            return Status.OK, wire.count_payload(store.delete(ns.name, req.keys, owner=owner))
        if isinstance(req, wire.ListKeys):
            entries, more = store.list(ns.name, owner=owner, after=req.after,
                                       limit=req.limit, first=req.first)
            return Status.OK, wire.list_payload(entries, more)
        if isinstance(req, wire.DropNs):
            return Status.OK, wire.u64_payload(store.drop(ns.name, owner=owner))
        raise ProtocolError(f"unhandled request {req!r}")  # pragma: no cover

    def _count(self, counter: dict[str, int], key: str, n: int) -> None:
        # The loop thread counts page work without a lock; chunk work runs on several
        # worker threads, whose read-modify-write needs one (keys never overlap).
        if threading.get_ident() == self._loop_thread:
            counter[key] += n
        else:
            with self._counter_lock:
                counter[key] += n

    def handle_guarded(self, req: wire.Request, owner: str) -> tuple[int, bytes]:
        """:meth:`handle`, with store failures turned into an INTERNAL answer."""
        try:
            return self.handle(req, owner)
        except StoreError as exc:
            log.error("%s", exc)
            self._count(self.counters.errors, "store", 1)
            return Status.INTERNAL, str(exc).encode()[:512]

    def submit_chunk(self, req: wire.Request, owner: str) -> asyncio.Future[tuple[int, bytes]]:
        """Run a chunk request (from a connection of identity ``owner``) in a worker thread."""
        return asyncio.get_running_loop().run_in_executor(self._executor, self.handle_guarded,
                                                          req, owner)

    def _register(self, conn: _PeerConnection) -> None:
        self._connections.add(conn)
        self.counters.connections_total += 1

    def _unregister(self, conn: _PeerConnection) -> None:
        self._connections.discard(conn)


def _monotonic_ns() -> int:
    import time
    return time.monotonic_ns()


def _kind_of(req: wire.Request) -> str:
    ns = getattr(req, "ns", None)
    return "node" if ns is None else _KIND_NAMES[ns.kind]


class _PeerConnection(asyncio.Protocol):
    """One client connection: frames in, answers out, nothing shared with others."""

    def __init__(self, daemon: NodeDaemon) -> None:
        self._daemon = daemon
        self._decoder = wire.FrameDecoder()
        self._transport: asyncio.Transport | None = None
        self._closing = False
        self.inflight = 0
        self._paused_reading = False
        self._write_paused = False
        self._peer = "?"
        self.owner = ANONYMOUS

    # asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        set_nodelay(transport.get_extra_info("socket"))
        self._peer = str(transport.get_extra_info("peername"))
        self._daemon._register(self)
        if self._daemon._ssl is not None:
            # Once per connection: every request on it acts as this member.
            owner = certificate_identity(transport.get_extra_info("peercert"))
            if owner is None:
                log.warning("closing connection from %s: its certificate names no node",
                            self._peer)
                self.close()
                return
            self.owner = owner

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        self._transport = None
        self._daemon._unregister(self)

    def pause_writing(self) -> None:
        self._write_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._update_reading()

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        try:
            frames = self._decoder.feed(data)
        except ProtocolError as exc:
            self._reject(None, exc)
            return
        for frame in frames:
            if self._closing:
                return
            self._dispatch(frame)

    def eof_received(self) -> bool | None:
        # The client finished sending: answer what is in flight, then close.
        if not self.inflight:
            return None
        self._closing = True
        return True

    # handling

    def _dispatch(self, frame: wire.Frame) -> None:
        daemon = self._daemon
        try:
            req = wire.decode_request(frame)
        except ProtocolError as exc:
            self._reject(frame, exc)
            return
        kind = _kind_of(req)
        daemon.counters.ops[(kind, _OP_NAMES[frame.op])] += 1
        if daemon.draining:
            self._answer(frame.op, frame.request_id, Status.SHUTTING_DOWN, b"")
            return
        if kind != "chunk":
            status, payload = daemon.handle(req, self.owner)
            self._answer(frame.op, frame.request_id, status, payload)
            return
        self.inflight += 1
        self._update_reading()
        fut = daemon.submit_chunk(req, self.owner)
        fut.add_done_callback(lambda f, op=frame.op, rid=frame.request_id: self._chunk_done(
            op, rid, f))

    def _chunk_done(self, op: int, rid: int, fut: asyncio.Future[tuple[int, bytes]]) -> None:
        self.inflight -= 1
        try:
            status, payload = fut.result()
        except Exception as exc:  # a bug, not a store error: answer, keep serving
            log.exception("chunk request failed")
            status, payload = Status.INTERNAL, str(exc).encode()[:512]
        if self._transport is not None:
            self._answer(op, rid, status, payload)
            if self._closing and not self.inflight:
                self._transport.close()
        self._update_reading()

    def _answer(self, op: int, rid: int, status: int, payload: bytes) -> None:
        if self._transport is None:
            return
        self._transport.write(wire.encode_response(op, rid, status, payload))

    def _reject(self, frame: wire.Frame | None, exc: ProtocolError) -> None:
        log.warning("closing connection from %s: %s", self._peer, exc)
        self._daemon.counters.errors["protocol"] += 1
        if frame is not None and self._transport is not None:
            self._answer(frame.op, frame.request_id, Status.BAD_REQUEST, str(exc).encode()[:512])
        self._closing = True
        if self._transport is not None:
            self._transport.close()

    def _update_reading(self) -> None:
        if self._transport is None:
            return
        want_pause = self._write_paused or self.inflight >= _PAUSE_AT
        if want_pause and not self._paused_reading:
            self._transport.pause_reading()
            self._paused_reading = True
        elif self._paused_reading and not self._write_paused and self.inflight <= _RESUME_AT:
            self._transport.resume_reading()
            self._paused_reading = False

    def close(self) -> None:
        self._closing = True
        if self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()


class NodeMetricsCollector:
    """Prometheus collector reading the daemon's counters at scrape time."""

    def __init__(self, daemon: NodeDaemon) -> None:
        """Collect for ``daemon``."""
        self._daemon = daemon

    def collect(self) -> Iterator[Any]:
        """Yield the metric families (called by prometheus-client on scrape)."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        d = self._daemon
        c = d.counters
        ops = CounterMetricFamily("omega_node_ops", "Requests served, by namespace kind and op",
                                  labels=["kind", "op"])
        port = d.data_port.counters() if d.data_port is not None else {}
        merged: dict[tuple[str, str], int] = defaultdict(int, c.ops)
        for op in ("PING", "GET", "BATCH_GET", "PUT", "BATCH_PUT", "DELETE"):
            if port.get(op):
                merged[("node" if op == "PING" else "page", op)] += port[op]
            if port.get(f"chunk_{op}"):
                merged[("chunk", op)] += port[f"chunk_{op}"]
        for (kind, op), n in list(merged.items()):
            ops.add_metric([kind, op], n)
        yield ops
        nbytes = CounterMetricFamily("omega_node_bytes", "Blob bytes stored (in) and served (out)",
                                     labels=["kind", "direction"])
        for kind, prefix in (("page", ""), ("chunk", "chunk_")):
            extra_in = port.get(f"{prefix}bytes_in", 0)
            extra_out = port.get(f"{prefix}bytes_out", 0)
            nbytes.add_metric([kind, "in"], c.bytes_in.get(kind, 0) + extra_in)
            nbytes.add_metric([kind, "out"], c.bytes_out.get(kind, 0) + extra_out)
        yield nbytes
        errors = CounterMetricFamily("omega_node_errors", "Errors, by cause", labels=["cause"])
        for cause, extra in (("protocol", port.get("bad_request", 0)),
                             ("store", port.get("store_errors", 0)),
                             ("forbidden", port.get("forbidden", 0)),
                             ("handshake", port.get("handshake_failed", 0))):
            errors.add_metric([cause], c.errors.get(cause, 0) + extra)
        yield errors
        used = GaugeMetricFamily("omega_node_used_bytes", "Bytes held", labels=["kind"])
        cap = GaugeMetricFamily("omega_node_capacity_bytes", "Bytes lent", labels=["kind"])
        blobs = GaugeMetricFamily("omega_node_blobs", "Blobs held", labels=["kind"])
        for kind, store in (("page", d.pages), ("chunk", d.chunks)):
            used.add_metric([kind], store.used)
            cap.add_metric([kind], store.capacity)
            blobs.add_metric([kind], store.count)
        yield used
        yield cap
        yield blobs
        conns = GaugeMetricFamily("omega_node_connections", "Open peer connections")
        conns.add_metric([], d.connections + port.get("open", 0))
        yield conns
        total = CounterMetricFamily("omega_node_connections_accepted", "Connections accepted")
        total.add_metric([], c.connections_total + port.get("connections", 0))
        yield total
