"""Clients of the node daemon: one pipelined connection per peer, and a pool.

:class:`PeerClient` keeps one mutual-TLS connection and any number of requests
in flight on it; each call costs one frame written and one future awaited (no
task per request; timeouts are loop timers). A dead peer fails every pending
and later call with :class:`~hypervisor.errors.PeerError` at once (connection
reset or refused), or after ``connect_timeout`` / ``request_timeout`` when it
stops answering. The next call after a failure reconnects.

:class:`PeerPool` holds clients to several peers, measures each one's round-trip
time with PING (an exponentially weighted average) and marks peers unhealthy
after a failed call, so placement can prefer near, live peers.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from hypervisor.errors import PeerError, ProtocolError
from hypervisor.node import wire
from hypervisor.node.tlsio import open_tls_connection, set_nodelay
from hypervisor.node.wire import Item, Namespace, Op, Status

DEFAULT_CONNECT_TIMEOUT = 3.0
DEFAULT_REQUEST_TIMEOUT = 10.0


class PeerFullError(PeerError):
    """The peer has no room for the blob (its lent capacity is used up)."""


class StaleVersionError(PeerError):
    """The peer holds a newer version of the key than the one put."""


class PeerShuttingDownError(PeerError):
    """The peer is shutting down and refuses new requests."""


class PeerForbiddenError(PeerError):
    """The namespace belongs to another cluster member (this node's certificate may not use it)."""


def parse_address(address: str | tuple[str, int]) -> tuple[str, int]:
    """Turn ``"host:port"`` / ``"[v6]:port"`` / ``(host, port)`` into ``(host, port)``.

    Raises:
        PeerError: the address is malformed.
    """
    if isinstance(address, tuple):
        return address[0], int(address[1])
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise PeerError(f"bad peer address {address!r} (want HOST:PORT)")
    return host.strip("[]"), int(port)


class _ClientProtocol(asyncio.Protocol):
    """Routes response frames to the futures waiting for them."""

    def __init__(self, owner: PeerClient) -> None:
        self._owner = owner
        self._decoder = wire.FrameDecoder(responses=True)
        self.transport: asyncio.Transport | None = None
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        set_nodelay(transport.get_extra_info("socket"))

    def data_received(self, data: bytes) -> None:
        try:
            frames = self._decoder.feed(data)
        except ProtocolError as exc:
            self._owner._connection_failed(self, PeerError(
                f"peer {self._owner.name} sent malformed bytes: {exc}"))
            if self.transport is not None:
                self.transport.abort()
            return
        pending = self._owner._pending
        for frame in frames:
            entry = pending.pop(frame.request_id, None)
            if entry is None:
                continue  # its caller timed out
            fut = entry[0]
            if not fut.done():
                fut.set_result(frame)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._owner._connection_failed(self, PeerError(
            f"peer {self._owner.name} closed the connection"
            + (f": {exc}" if exc else "")))


class PeerClient:
    """A pipelined mutual-TLS client of one node daemon.

    Attributes:
        address: ``(host, port)`` of the peer.
        name: the peer's node name (checked against its certificate).
    """

    def __init__(self, address: str | tuple[str, int], ssl_context: ssl.SSLContext | None, *,
                 server_name: str | None = None,
                 connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
                 request_timeout: float = DEFAULT_REQUEST_TIMEOUT) -> None:
        """Create a client (not yet connected; the first call connects).

        Args:
            address: ``"host:port"`` or ``(host, port)``.
            ssl_context: from :func:`hypervisor.security.client_ssl_context`.
            server_name: the peer's node name, which its certificate must carry
                (default: the host part of ``address``).
            connect_timeout: seconds to establish TCP + TLS.
            request_timeout: seconds to wait for each answer.
        """
        self.address = parse_address(address)
        self.name = server_name or self.address[0]
        self._ssl = ssl_context
        self._server_name = server_name or self.address[0]
        self.connect_timeout = connect_timeout
        self.request_timeout = request_timeout
        self._sweep_interval = max(0.005, min(0.1, request_timeout / 10))
        self._protocol: _ClientProtocol | None = None
        self._connecting: asyncio.Future[_ClientProtocol] | None = None
        # request id -> (future, deadline, connection); ids grow, so the dict is in
        # deadline order
        self._pending: dict[int, tuple[asyncio.Future[wire.Frame], float,
                                       _ClientProtocol]] = {}
        self._sweeper: asyncio.TimerHandle | None = None
        self._next_id = 1
        self._closed = False

    def __repr__(self) -> str:
        return f"PeerClient({self.name!r} at {self.address[0]}:{self.address[1]})"

    @property
    def connected(self) -> bool:
        """Whether a connection is open now."""
        return self._protocol is not None and not self._protocol.lost

    @property
    def inflight(self) -> int:
        """Requests sent and not yet answered."""
        return len(self._pending)

    async def connect(self) -> None:
        """Open the connection (idempotent).

        Raises:
            PeerError: the peer is unreachable, refused TLS, or did not answer in time.
        """
        await self._ensure()

    async def _ensure(self) -> _ClientProtocol:
        proto = self._protocol
        if proto is not None and not proto.lost:
            if proto.transport is not None and not proto.transport.is_closing():
                return proto
            self._protocol = None  # closing: its connection_lost will fail what is pending
        if self._closed:
            raise PeerError(f"client of peer {self.name} is closed")
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._open())
        fut = self._connecting
        try:
            return await asyncio.shield(fut)
        finally:
            if fut.done() and self._connecting is fut:
                self._connecting = None

    async def _open(self) -> _ClientProtocol:
        loop = asyncio.get_running_loop()
        host, port = self.address
        if self._ssl is not None:
            connecting = open_tls_connection(lambda: _ClientProtocol(self), host, port, self._ssl,
                                             server_hostname=self._server_name)
        else:
            connecting = loop.create_connection(lambda: _ClientProtocol(self), host, port)
        try:
            _, proto = await asyncio.wait_for(connecting, self.connect_timeout)
        except asyncio.TimeoutError:
            raise PeerError(f"peer {self.name} at {host}:{port}: no connection within "
                            f"{self.connect_timeout:g}s") from None
        except ssl.SSLError as exc:
            raise PeerError(f"peer {self.name} at {host}:{port}: TLS failed: "
                            f"{exc.reason or exc}") from None
        except OSError as exc:
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            raise PeerError(f"peer {self.name} at {host}:{port}: {reason}") from None
        self._protocol = proto
        return proto

    async def close(self) -> None:
        """Close the connection; pending calls fail with PeerError."""
        self._closed = True
        proto, self._protocol = self._protocol, None
        if proto is not None and proto.transport is not None:
            proto.transport.close()
        self._fail_pending(PeerError(f"client of peer {self.name} closed"))

    def _connection_failed(self, proto: _ClientProtocol, exc: PeerError) -> None:
        if self._protocol is proto:
            self._protocol = None
        # Only the requests sent on that connection: a newer one may be up already.
        self._fail_pending(exc, only=proto)

    def _fail_pending(self, exc: PeerError, *, only: _ClientProtocol | None = None) -> None:
        if only is None:
            failed, self._pending = self._pending, {}
        else:
            failed = {rid: e for rid, e in self._pending.items() if e[2] is only}
            for rid in failed:
                del self._pending[rid]
        for fut, _, _ in failed.values():
            if not fut.done():
                fut.set_exception(exc)

    def _sweep(self) -> None:
        # One timer per client rather than one per request: cheaper on the hot path.
        self._sweeper = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        expired = []
        for rid, (_, deadline, _) in self._pending.items():
            if deadline > now:
                break
            expired.append(rid)
        for rid in expired:
            fut = self._pending.pop(rid)[0]
            if not fut.done():
                fut.set_exception(PeerError(
                    f"peer {self.name}: no answer within {self.request_timeout:g}s"))
        if self._pending:
            self._sweeper = loop.call_later(self._sweep_interval, self._sweep)

    async def call(self, req: wire.Request) -> wire.Frame:
        """Send one request and wait for its answer frame.

        Args:
            req: the request.

        Returns:
            The response frame (any status).

        Raises:
            PeerError: the connection failed or no answer came in time.
            ProtocolError: the request cannot be encoded (out-of-range field).
        """
        proto = self._protocol
        if proto is None or proto.lost or proto.transport is None or proto.transport.is_closing():
            proto = await self._ensure()
            if proto.lost or proto.transport is None or proto.transport.is_closing():
                # Closed between connecting and now: with TLS 1.3 this is how a server
                # that refuses our certificate answers.
                raise PeerError(f"peer {self.name} closed the connection at once "
                                "(our certificate refused?)")
        rid = self._next_id
        self._next_id = rid + 1
        data = wire.encode_request(rid, req)
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[wire.Frame] = loop.create_future()
        self._pending[rid] = (fut, loop.time() + self.request_timeout, proto)
        if self._sweeper is None:
            self._sweeper = loop.call_later(self._sweep_interval, self._sweep)
        assert proto.transport is not None
        proto.transport.write(data)
        return await fut

    def _check(self, frame: wire.Frame, *, ok: Sequence[int] = (Status.OK,)) -> None:
        if frame.status in ok:
            return
        status = Status(frame.status)
        detail = frame.payload.decode("utf-8", "replace") if frame.payload else ""
        msg = f"peer {self.name}: {Op(frame.op).name} → {status.name}" + \
            (f": {detail}" if detail else "")
        if status is Status.FULL:
            raise PeerFullError(msg)
        if status is Status.STALE:
            raise StaleVersionError(msg)
        if status is Status.SHUTTING_DOWN:
            raise PeerShuttingDownError(msg)
        if status is Status.FORBIDDEN:
            raise PeerForbiddenError(msg)
        raise PeerError(msg)

    def _decode(self, fn, payload: bytes):  # noqa: ANN001, ANN202 - small private adapter
        try:
            return fn(payload)
        except ProtocolError as exc:
            raise PeerError(f"peer {self.name} answered malformed data: {exc}") from None

    # Operations ---------------------------------------------------------------

    async def ping(self) -> float:
        """Round trip to the peer; return its duration in seconds."""
        t0 = time.perf_counter()
        frame = await self.call(wire.Ping())
        rtt = time.perf_counter() - t0
        self._check(frame)
        return rtt

    async def stat(self) -> wire.StatInfo:
        """The peer's capacity and use."""
        frame = await self.call(wire.Stat())
        self._check(frame)
        return self._decode(wire.decode_stat, frame.payload)

    async def put(self, ns: Namespace, key: int, version: int, blob: bytes) -> None:
        """Store a blob.

        Raises:
            PeerFullError: the peer has no room.
            StaleVersionError: the peer holds a newer version.
            PeerError: any other failure.
        """
        frame = await self.call(wire.Put(ns, Item(key, version, blob)))
        self._check(frame)

    async def get(self, ns: Namespace, key: int) -> tuple[int, bytes] | None:
        """Fetch a blob; return ``(version, blob)`` or None when the peer lacks it."""
        frame = await self.call(wire.Get(ns, key))
        if frame.status == Status.NOT_FOUND:
            return None
        self._check(frame)
        return self._decode(wire.decode_get, frame.payload)

    async def delete(self, ns: Namespace, keys: Iterable[int]) -> int:
        """Delete keys (in frames of at most MAX_BATCH); return how many existed."""
        keys = list(keys)
        total = 0
        for i in range(0, len(keys), wire.MAX_BATCH):
            frame = await self.call(wire.Delete(ns, tuple(keys[i:i + wire.MAX_BATCH])))
            self._check(frame)
            total += self._decode(wire.decode_count, frame.payload)
        return total

    async def batch_get(self, ns: Namespace, keys: Sequence[int]) -> list[tuple[int, bytes] | None]:
        """Fetch many blobs in one frame; per key ``(version, blob)`` or None."""
        if len(keys) > wire.MAX_BATCH:
            parts = await asyncio.gather(*(self.batch_get(ns, keys[i:i + wire.MAX_BATCH])
                                           for i in range(0, len(keys), wire.MAX_BATCH)))
            return [x for part in parts for x in part]
        frame = await self.call(wire.BatchGet(ns, tuple(keys)))
        self._check(frame)
        out = self._decode(wire.decode_batch_get, frame.payload)
        if len(out) != len(keys):
            raise PeerError(f"peer {self.name}: BATCH_GET answered {len(out)} of {len(keys)}")
        return out

    async def batch_put(self, ns: Namespace,
                        items: Iterable[Item | tuple[int, int, bytes]]) -> list[Status]:
        """Store many blobs in one frame.

        Args:
            ns: the namespace.
            items: :class:`Item` or ``(key, version, blob)`` tuples.

        Returns:
            Per item: OK or STALE (OK for all in the usual case).

        Raises:
            PeerFullError: the batch did not fit; nothing of it was stored.
            PeerError: any other failure.
        """
        its = tuple(it if isinstance(it, Item) else Item(*it) for it in items)
        frame = await self.call(wire.BatchPut(ns, its))
        self._check(frame)
        out = self._decode(wire.decode_statuses, frame.payload)
        if len(out) != len(its):
            raise PeerError(f"peer {self.name}: BATCH_PUT answered {len(out)} of {len(its)}")
        if Status.FULL in out:
            raise PeerFullError(f"peer {self.name}: full after {out.index(Status.FULL)} items")
        return out

    async def list(self, ns: Namespace, *, page_size: int = 65536) -> list[tuple[int, int]]:
        """Every ``(key, version)`` in the namespace, in key order (paged)."""
        out: list[tuple[int, int]] = []
        after, first = 0, True
        while True:
            frame = await self.call(wire.ListKeys(ns, after, page_size, first))
            self._check(frame)
            entries, more = self._decode(wire.decode_list, frame.payload)
            out.extend(entries)
            if not more or not entries:
                return out
            after, first = entries[-1][0], False

    async def drop_ns(self, ns: Namespace) -> int:
        """Drop a namespace; return how many blobs it held."""
        frame = await self.call(wire.DropNs(ns))
        self._check(frame)
        return self._decode(wire.decode_u64, frame.payload)

    async def list_ns(self) -> list[wire.NsInfo]:
        """Every namespace the peer holds for this node, with key and byte counts."""
        frame = await self.call(wire.ListNs())
        self._check(frame)
        return self._decode(wire.decode_list_ns, frame.payload)


@dataclass
class PeerHealth:
    """What a pool knows about one peer.

    Attributes:
        name: the node name.
        address: ``(host, port)``.
        rtt: smoothed round-trip time in seconds (None before the first PING).
        healthy: whether the last contact succeeded.
        last_error: the last failure's message.
        failures: consecutive failures.
    """

    name: str
    address: tuple[str, int]
    rtt: float | None = None
    healthy: bool = True
    last_error: str | None = None
    failures: int = 0


class PeerPool:
    """Clients to several peers, with RTT measurement and health.

    Use :meth:`client` for requests; report failures with :meth:`mark_failed`
    (the pool does so itself for PINGs). :meth:`start_monitor` pings every peer
    periodically in the background.
    """

    def __init__(self, ssl_context: ssl.SSLContext | None, *,
                 connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
                 request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
                 rtt_alpha: float = 0.3) -> None:
        """Create an empty pool.

        Args:
            ssl_context: client context for every peer.
            connect_timeout: per-connection connect timeout.
            request_timeout: per-request timeout.
            rtt_alpha: weight of a new RTT sample in the moving average.
        """
        self._ssl = ssl_context
        self._connect_timeout = connect_timeout
        self._request_timeout = request_timeout
        self._alpha = rtt_alpha
        self._clients: dict[str, PeerClient] = {}
        self._health: dict[str, PeerHealth] = {}
        self._monitor: asyncio.Task[None] | None = None

    @classmethod
    def from_cluster(cls, config, *, node: str, **kwargs) -> PeerPool:  # noqa: ANN001
        """A pool of every peer in the cluster state, connecting as ``node``.

        Args:
            config: the :class:`~hypervisor.config.Config`.
            node: this node's name (its certificate is presented).
            **kwargs: passed to the constructor.

        Returns:
            The pool (not yet connected).
        """
        from hypervisor.clusterstate import ClusterState
        from hypervisor.security import client_ssl_context

        pool = cls(client_ssl_context(config, node=node), **kwargs)
        for peer in ClusterState(config).peers():
            pool.add(peer.name, peer.address)
        return pool

    def add(self, name: str, address: str | tuple[str, int]) -> PeerClient:
        """Add a peer (replacing one of the same name)."""
        client = PeerClient(address, self._ssl, server_name=name,
                            connect_timeout=self._connect_timeout,
                            request_timeout=self._request_timeout)
        old = self._clients.pop(name, None)
        if old is not None and _loop_running():
            asyncio.ensure_future(old.close())
        self._clients[name] = client
        self._health[name] = PeerHealth(name, client.address)
        return client

    async def remove(self, name: str) -> None:
        """Close and forget a peer."""
        client = self._clients.pop(name, None)
        self._health.pop(name, None)
        if client is not None:
            await client.close()

    def names(self) -> list[str]:
        """Every peer's name."""
        return list(self._clients)

    def client(self, name: str) -> PeerClient:
        """The client of peer ``name``.

        Raises:
            PeerError: no such peer in the pool.
        """
        try:
            return self._clients[name]
        except KeyError:
            raise PeerError(f"no peer named {name!r} in the pool") from None

    def health(self, name: str) -> PeerHealth:
        """What the pool knows about ``name``."""
        return self._health[name]

    def healthy(self) -> list[str]:
        """Healthy peers, nearest (lowest RTT) first; unmeasured ones last."""
        live = [h for h in self._health.values() if h.healthy]
        live.sort(key=lambda h: (h.rtt is None, h.rtt or 0.0))
        return [h.name for h in live]

    def mark_failed(self, name: str, exc: BaseException) -> None:
        """Record a failed call to ``name``."""
        h = self._health.get(name)
        if h is not None:
            h.healthy = False
            h.failures += 1
            h.last_error = str(exc)

    def mark_ok(self, name: str, rtt: float | None = None) -> None:
        """Record a successful contact (and an RTT sample)."""
        h = self._health.get(name)
        if h is None:
            return
        h.healthy, h.failures, h.last_error = True, 0, None
        if rtt is not None:
            h.rtt = rtt if h.rtt is None else (1 - self._alpha) * h.rtt + self._alpha * rtt

    async def measure(self, *, samples: int = 3) -> dict[str, float | None]:
        """PING every peer ``samples`` times (concurrently across peers).

        Returns:
            Per peer, the smoothed RTT in seconds, or None when it is down.
        """
        async def one(name: str) -> None:
            client = self._clients[name]
            try:
                await client.connect()  # a handshake is not a round trip
                for _ in range(samples):
                    self.mark_ok(name, await client.ping())
            except PeerError as exc:
                self.mark_failed(name, exc)

        await asyncio.gather(*(one(n) for n in list(self._clients)))
        return {n: (h.rtt if h.healthy else None) for n, h in self._health.items()}

    def start_monitor(self, *, interval: float = 1.0) -> None:
        """Ping every peer every ``interval`` seconds in the background."""
        if self._monitor is not None:
            return

        async def loop() -> None:
            while True:
                await self.measure(samples=1)
                await asyncio.sleep(interval)

        self._monitor = asyncio.ensure_future(loop())

    async def close(self) -> None:
        """Stop the monitor and close every connection."""
        if self._monitor is not None:
            self._monitor.cancel()
            try:
                await self._monitor
            except asyncio.CancelledError:
                pass
            self._monitor = None
        await asyncio.gather(*(c.close() for c in self._clients.values()))

    async def __aenter__(self) -> PeerPool:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _loop_running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True
