"""The NBD server: a thin asyncio transport over :mod:`hypervisor.netblock.protocol`.

Threads: one asyncio event loop; no other threads. Every connection is an
:class:`NbdConnection` (an ``asyncio.Protocol``): received bytes go to the
pure handshake machine, then to the request parser. Requests for a
synchronous backend are executed inside ``data_received`` and all replies of a
pipelined batch leave in one ``writelines`` (no task per request); requests
for an asynchronous backend each get a task, and the replies of those that
complete in the same pass of the loop leave together at its end.

Failure containment: an exception while handling one connection closes that
connection only. Shutdown drains: listeners close, connections stop reading,
in-flight requests finish and their replies are written, then sockets close
(QEMU's ``reconnect-delay`` then reconnects to the next server instance and
resends whatever had no reply).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import socket
import ssl
import struct
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hypervisor.errors import UsageError
from hypervisor.netblock import protocol as nbd
from hypervisor.netblock.backend import Backend, BackendError
from hypervisor.netblock.stats import ExportStats

log = logging.getLogger(__name__)

_DATA_CHUNK = struct.Struct(">IHHQIQ")
_STRUCTURED = struct.Struct(">IHHQI")
_SIMPLE = struct.Struct(">IIQ")

_MAX_INFLIGHT = 256
"""Async requests in flight per connection before reading pauses."""

DEFAULT_BUSY_POLL_US = 100
"""How long a connection served in C waits awake for its next request."""


@dataclass
class Export:
    """One served export.

    Attributes:
        info: what the handshake advertises.
        backend: where the bytes live.
        stats: counters for metrics.
    """

    info: nbd.ExportInfo
    backend: Backend
    stats: ExportStats = field(default_factory=ExportStats)

    @classmethod
    def of(cls, name: str, backend: Backend, *, description: str = "") -> Export:
        """Build an export whose advertised flags come from its backend.

        Args:
            name: export name.
            backend: storage.
            description: NBD_INFO_DESCRIPTION text.

        Returns:
            The export.
        """
        return cls(info=backend.export_info(name, description=description), backend=backend,
                   stats=ExportStats(name))


class _InfoView(Mapping[str, nbd.ExportInfo]):
    """Read-only name -> ExportInfo view the handshake looks exports up in."""

    def __init__(self, exports: dict[str, Export]) -> None:
        self._exports = exports

    def __getitem__(self, name: str) -> nbd.ExportInfo:
        return self._exports[name].info

    def __iter__(self) -> Iterator[str]:
        return iter(self._exports)

    def __len__(self) -> int:
        return len(self._exports)


class NbdServer:
    """Serves a set of exports on any number of listeners.

    Args:
        exports: the exports, by name (may be changed while serving).
        tls_context: server-side SSL context for STARTTLS, or None.
        tls_required: refuse to serve before STARTTLS.
        default_export: export served to clients asking for "".
        busy_poll_us: how long a connection served in C waits awake for its
            next request before it sleeps (0: never; see ``omega netblock
            serve --busy-poll-us``).
    """

    def __init__(self, exports: dict[str, Export], *, tls_context: ssl.SSLContext | None = None,
                 tls_required: bool = False, default_export: str | None = None,
                 busy_poll_us: int = DEFAULT_BUSY_POLL_US) -> None:
        self.exports = exports
        self.busy_poll_us = busy_poll_us
        self.tls_context = tls_context
        self.tls_required = tls_required
        self.default_export = default_export
        self._view = _InfoView(exports)
        self._servers: list[asyncio.AbstractServer] = []
        self.connections: set[NbdConnection] = set()
        self._closed = asyncio.Event()

    def handshake(self, *, tls_required: bool | None = None) -> nbd.Handshake:
        """A fresh handshake machine for a new connection."""
        required = self.tls_required if tls_required is None else tls_required
        return nbd.Handshake(self._view, tls_available=self.tls_context is not None,
                             tls_required=required and self.tls_context is not None,
                             default_export=self.default_export)

    def _factory(self, *, tls_required: bool | None = None) -> NbdConnection:
        return NbdConnection(self, tls_required=tls_required)

    async def listen_unix(self, path: Path) -> None:
        """Listen on a unix socket (replacing a stale socket file).

        Args:
            path: the socket path; created mode 0660 (QEMU connects as its user).
        """
        loop = asyncio.get_running_loop()
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_socket():
            path.unlink()
        server = await loop.create_unix_server(self._factory, str(path))
        os.chmod(path, 0o666)
        self._servers.append(server)

    async def listen_tcp(self, host: str, port: int, *, tls_required: bool = True) -> int:
        """Listen on TCP.

        Off loopback, TLS is mandatory unless ``tls_required`` is False.

        Args:
            host: address to bind.
            port: port (0 picks one).
            tls_required: insist on STARTTLS when ``host`` is not loopback.

        Returns:
            The bound port.

        Raises:
            UsageError: TLS is required but no TLS credentials were given.
        """
        loopback = _is_loopback(host)
        need_tls = tls_required and not loopback
        if need_tls and self.tls_context is None:
            raise UsageError(f"listening on {host} needs TLS credentials "
                             "(or --no-tls-required)")
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: self._factory(tls_required=need_tls or self.tls_required), host, port,
            reuse_address=True)
        self._servers.append(server)
        return server.sockets[0].getsockname()[1]

    async def adopt_listening_socket(self, sock: socket.socket) -> None:
        """Serve on an already listening socket (systemd socket activation)."""
        loop = asyncio.get_running_loop()
        sock.setblocking(False)
        if sock.family == socket.AF_UNIX:
            server = await loop.create_unix_server(self._factory, sock=sock)
        else:
            server = await loop.create_server(self._factory, sock=sock)
        self._servers.append(server)

    async def serve_connected_socket(self, sock: socket.socket) -> None:
        """Serve one already connected socket until it closes (``-s`` mode)."""
        loop = asyncio.get_running_loop()
        sock.setblocking(False)
        done = loop.create_future()
        conn = NbdConnection(self, on_lost=done)
        await loop.connect_accepted_socket(lambda: conn, sock)
        await done

    async def serve_forever(self) -> None:
        """Wait until :meth:`shutdown` has finished."""
        await self._closed.wait()

    async def shutdown(self, *, timeout: float = 30.0) -> None:
        """Stop listening, drain every connection, close.

        Args:
            timeout: seconds to wait for in-flight requests.
        """
        for server in self._servers:
            server.close()
        drains = [conn.drain_and_close() for conn in list(self.connections)]
        if drains:
            try:
                await asyncio.wait_for(asyncio.gather(*drains, return_exceptions=True), timeout)
            except asyncio.TimeoutError:
                log.warning("nbd: %d connections did not drain in %.0f s", len(drains), timeout)
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()
        for export in self.exports.values():
            result = export.backend.close()
            if asyncio.iscoroutine(result):
                await result
        self._closed.set()


_SOCKET_BUFFER = 4 * 1024 * 1024
"""Send/receive buffer asked for per connection: a whole pipelined batch of
large replies then leaves in one write instead of many event-loop turns."""


def _grow_buffers(sock: socket.socket) -> None:
    for opt, force in ((socket.SO_SNDBUF, 32), (socket.SO_RCVBUF, 33)):  # *BUFFORCE
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, _SOCKET_BUFFER)
        except OSError:  # not privileged: the sysctl maximum applies
            try:
                sock.setsockopt(socket.SOL_SOCKET, opt, _SOCKET_BUFFER)
            except OSError:
                pass


def _is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class NbdConnection(asyncio.Protocol):
    """One client: handshake, then transmission.

    Args:
        server: the owning server.
        tls_required: override the server's TLS requirement for this listener.
        on_lost: future resolved when the connection ends.
    """

    def __init__(self, server: NbdServer, *, tls_required: bool | None = None,
                 on_lost: asyncio.Future[None] | None = None) -> None:
        self.server = server
        self.handshake = server.handshake(tls_required=tls_required)
        self.transport: asyncio.Transport | None = None
        self.negotiated: nbd.Negotiated | None = None
        self.export: Export | None = None
        self.parser = nbd.RequestParser()
        self._inflight: set[asyncio.Task[None]] = set()
        # replies of asynchronous requests finished in one loop pass, sent together
        self._replies: list[Any] = []
        self._reading_paused = False
        self._write_paused = False
        self._closing = False
        self._on_lost = on_lost
        self._peer = "?"
        self._tls_early: list[bytes] | None = None

    # --- asyncio.Protocol -----------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:  # type: ignore[override]
        if self.transport is not None:  # after STARTTLS the SSL transport calls again
            self.transport = transport
            return
        self.transport = transport
        self._peer = str(transport.get_extra_info("peername") or "unix")
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if sock is not None:
            _grow_buffers(sock)
        self.server.connections.add(self)
        transport.write(nbd.greeting())

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        self._closing = True
        if self.export is not None:
            self.export.stats.connections -= 1
        if self._on_lost is not None and not self._on_lost.done():
            self._on_lost.set_result(None)

    def pause_writing(self) -> None:
        self._write_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._update_reading()

    def data_received(self, data: bytes) -> None:
        try:
            if self._tls_early is not None:
                # decrypted bytes that arrive before start_tls() has returned
                self._tls_early.append(data)
            elif self.negotiated is None:
                self._handshake_bytes(data)
            else:
                self._requests(self.parser.feed(data))
        except Exception as exc:  # contain every failure to this connection
            self._abort(f"{type(exc).__name__}: {exc}")

    def eof_received(self) -> bool | None:
        return None

    # --- handshake ------------------------------------------------------------

    def _handshake_bytes(self, data: bytes) -> None:
        assert self.transport is not None
        out = self.handshake.feed(data)
        if out.send:
            self.transport.write(bytes(out.send))
        if out.error:
            log.info("nbd %s: handshake ended: %s", self._peer, out.error)
        if out.close:
            self._close()
            return
        if out.start_tls:
            # Raw reads stay paused until start_tls() takes the socket over;
            # from then on data_received only sees decrypted bytes.
            self.transport.pause_reading()
            self._tls_early = []
            asyncio.ensure_future(self._start_tls())
            return
        if out.done is not None:
            self.negotiated = out.done
            self.export = self.server.exports[out.done.export.name]
            self.export.stats.connections += 1
            leftover = self.handshake.leftover()
            # --- native fast path hook (hypervisor/netblock/fastpath.py, native/nbd):
            # plain connections to fd-backed exports are served by C from here on.
            from hypervisor.netblock import fastpath
            if fastpath.take_over(self, leftover):
                return
            # --- end of hook
            if leftover:
                self._requests(self.parser.feed(leftover))

    async def _start_tls(self) -> None:
        assert self.transport is not None and self.server.tls_context is not None
        loop = asyncio.get_running_loop()
        try:
            new = await loop.start_tls(self.transport, self, self.server.tls_context,
                                       server_side=True)
        except (OSError, ssl.SSLError, ConnectionError, asyncio.TimeoutError) as exc:
            log.info("nbd %s: TLS handshake failed: %s", self._peer, exc)
            self.transport.abort()
            return
        if new is None:
            return
        self.transport = new
        self.handshake.tls_established()
        early, self._tls_early = self._tls_early or [], None
        for data in early:
            self.data_received(data)

    # --- transmission -----------------------------------------------------------

    def _requests(self, requests: list[nbd.Request]) -> None:
        export = self.export
        negotiated = self.negotiated
        assert export is not None and negotiated is not None and self.transport is not None
        if self._closing:
            return
        out: list[bytes | bytearray | memoryview] = []
        backend = export.backend
        stats = export.stats
        if backend.is_async:
            for request in requests:
                if request.command == nbd.CMD_DISC:
                    self._closing = True
                    break
                err = nbd.check_request(request, negotiated)
                if err:
                    stats.errors += 1
                    self._error(out, request, err, "invalid request")
                    continue
                task = asyncio.ensure_future(self._execute_async(request))
                self._inflight.add(task)
                task.add_done_callback(self._inflight_done)
        else:
            self._run_sync(requests, backend, stats, negotiated, out)
        if out:
            self.transport.writelines(out)
        if self._closing:
            asyncio.ensure_future(self.drain_and_close())
        self._update_reading()

    def _run_sync(self, requests: list[nbd.Request], backend: Backend, stats: ExportStats,
                  negotiated: nbd.Negotiated, out: list[Any]) -> None:
        """Execute a batch against a synchronous backend, appending replies to ``out``.

        READ and WRITE without flags take an inlined path (this loop is the
        server's hot spot); everything else goes through :meth:`_execute_sync`.
        """
        start = time.perf_counter_ns()
        size = negotiated.export.size
        max_block = negotiated.export.max_block
        structured = negotiated.structured_replies
        writable = not negotiated.export.read_only
        append = out.append
        read = backend.read
        write = backend.write
        pack_data = _DATA_CHUNK.pack
        pack_simple = _SIMPLE.pack
        reads = writes = read_bytes = written = 0
        for request in requests:
            command = request.command
            length = request.length
            offset = request.offset
            if (command == nbd.CMD_READ and not request.flags and offset + length <= size
                    and 0 < length <= max_block):
                data = read(offset, length)
                if structured:
                    append(pack_data(nbd.STRUCTURED_REPLY_MAGIC, nbd.REPLY_FLAG_DONE,
                                     nbd.REPLY_TYPE_OFFSET_DATA, request.cookie, length + 8,
                                     offset))
                else:
                    append(pack_simple(nbd.SIMPLE_REPLY_MAGIC, 0, request.cookie))
                append(data)
                reads += 1
                read_bytes += length
                continue
            if (command == nbd.CMD_WRITE and not request.flags and writable
                    and offset + length <= size and length <= max_block):
                try:
                    write(offset, request.payload, fua=False)
                except (BackendError, OSError) as exc:
                    stats.errors += 1
                    self._error(out, request, getattr(exc, "nbd_errno", nbd.EIO), str(exc))
                    continue
                if structured:
                    append(_STRUCTURED.pack(nbd.STRUCTURED_REPLY_MAGIC, nbd.REPLY_FLAG_DONE,
                                            nbd.REPLY_TYPE_NONE, request.cookie, 0))
                else:
                    append(pack_simple(nbd.SIMPLE_REPLY_MAGIC, 0, request.cookie))
                writes += 1
                written += length
                continue
            if command == nbd.CMD_DISC:
                self._closing = True
                break
            err = nbd.check_request(request, negotiated)
            if err:
                stats.errors += 1
                self._error(out, request, err, "invalid request")
                continue
            t0 = time.perf_counter_ns()
            try:
                self._execute_sync(backend, request, out)
            except BackendError as exc:
                stats.errors += 1
                self._error(out, request, exc.nbd_errno, str(exc))
            except OSError as exc:
                stats.errors += 1
                self._error(out, request, nbd.EIO, exc.strerror or str(exc))
            stats.record(command, length, time.perf_counter_ns() - t0)
        if reads or writes:
            # one latency sample per batch, spread over its fast-path requests
            stats.record_batch(reads=reads, read_bytes=read_bytes, writes=writes,
                               written=written, elapsed_ns=time.perf_counter_ns() - start)

    def _inflight_done(self, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        self._update_reading()

    def _update_reading(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        want_pause = self._write_paused or len(self._inflight) >= _MAX_INFLIGHT or self._closing
        if want_pause and not self._reading_paused:
            transport.pause_reading()
            self._reading_paused = True
        elif not want_pause and self._reading_paused:
            transport.resume_reading()
            self._reading_paused = False

    def _error(self, out: list[Any], request: nbd.Request, err: int, message: str) -> None:
        assert self.negotiated is not None
        if self.negotiated.structured_replies:
            out.append(nbd.structured_error(request.cookie, err, message))
        else:
            out.append(nbd.simple_reply(request.cookie, err))

    def _ok(self, out: list[Any], cookie: int) -> None:
        assert self.negotiated is not None
        if self.negotiated.structured_replies:
            out.append(nbd.structured_done(cookie))
        else:
            out.append(nbd.simple_reply(cookie))

    def _read_reply(self, out: list[Any], request: nbd.Request, data: bytes) -> None:
        assert self.negotiated is not None
        if self.negotiated.structured_replies:
            if request.length == 0:
                out.append(nbd.structured_done(request.cookie))
                return
            out.append(nbd.structured_data_header(request.cookie, request.offset,
                                                  request.length, done=True))
        else:
            out.append(nbd.simple_reply(request.cookie))
        out.append(data)

    def _block_status_reply(self, out: list[Any], request: nbd.Request,
                            extents: list[tuple[int, int]]) -> None:
        assert self.negotiated is not None
        clipped = nbd.clip_extents(extents, request.length,
                                   req_one=bool(request.flags & nbd.CMD_FLAG_REQ_ONE))
        if not clipped:
            self._error(out, request, nbd.EIO, "backend returned no extents")
            return
        ids = list(self.negotiated.meta_contexts)
        for i, context_id in enumerate(ids):
            out.append(nbd.structured_block_status(request.cookie, context_id, clipped,
                                                   done=i == len(ids) - 1))

    def _execute_sync(self, backend: Backend, request: nbd.Request, out: list[Any]) -> None:
        command = request.command
        fua = bool(request.flags & nbd.CMD_FLAG_FUA)
        if command == nbd.CMD_READ:
            self._read_reply(out, request, backend.read(request.offset, request.length))
            return
        if command == nbd.CMD_WRITE:
            backend.write(request.offset, request.payload, fua=fua)
        elif command == nbd.CMD_FLUSH:
            backend.flush()
        elif command == nbd.CMD_TRIM:
            backend.trim(request.offset, request.length, fua=fua)
        elif command == nbd.CMD_WRITE_ZEROES:
            backend.write_zeroes(request.offset, request.length, fua=fua,
                                 may_trim=not request.flags & nbd.CMD_FLAG_NO_HOLE,
                                 fast_only=bool(request.flags & nbd.CMD_FLAG_FAST_ZERO))
        elif command == nbd.CMD_CACHE:
            backend.cache(request.offset, request.length)
        elif command == nbd.CMD_BLOCK_STATUS:
            self._block_status_reply(out, request,
                                     backend.block_status(request.offset, request.length))
            return
        self._ok(out, request.cookie)

    async def _execute_async(self, request: nbd.Request) -> None:
        export = self.export
        assert export is not None
        backend = export.backend
        out: list[Any] = []
        start = time.perf_counter_ns()
        command = request.command
        fua = bool(request.flags & nbd.CMD_FLAG_FUA)
        try:
            if command == nbd.CMD_READ:
                data = await backend.read(request.offset, request.length)
                self._read_reply(out, request, data)
            elif command == nbd.CMD_BLOCK_STATUS:
                extents = await backend.block_status(request.offset, request.length)
                self._block_status_reply(out, request, extents)
            else:
                if command == nbd.CMD_WRITE:
                    await backend.write(request.offset, request.payload, fua=fua)
                elif command == nbd.CMD_FLUSH:
                    await backend.flush()
                elif command == nbd.CMD_TRIM:
                    await backend.trim(request.offset, request.length, fua=fua)
                elif command == nbd.CMD_WRITE_ZEROES:
                    await backend.write_zeroes(
                        request.offset, request.length, fua=fua,
                        may_trim=not request.flags & nbd.CMD_FLAG_NO_HOLE,
                        fast_only=bool(request.flags & nbd.CMD_FLAG_FAST_ZERO))
                elif command == nbd.CMD_CACHE:
                    await backend.cache(request.offset, request.length)
                self._ok(out, request.cookie)
        except BackendError as exc:
            export.stats.errors += 1
            self._error(out, request, exc.nbd_errno, str(exc))
        except Exception as exc:  # the client gets EIO, the connection lives on
            log.warning("nbd %s: %s failed: %s", self._peer,
                        nbd.COMMAND_NAMES.get(command, command), exc)
            export.stats.errors += 1
            self._error(out, request, nbd.EIO, str(exc))
        export.stats.record(command, request.length, time.perf_counter_ns() - start)
        # Many requests often finish in the same pass (one batched peer answer
        # completes them all): their replies leave in one write at its end.
        if not self._replies:
            asyncio.get_running_loop().call_soon(self._send_replies)
        self._replies.extend(out)

    def _send_replies(self) -> None:
        out, self._replies = self._replies, []
        transport = self.transport
        if out and transport is not None and not transport.is_closing():
            transport.writelines(out)

    # --- closing --------------------------------------------------------------

    def _abort(self, why: str) -> None:
        log.info("nbd %s: closing: %s", self._peer, why)
        self._closing = True
        if self.transport is not None:
            self.transport.close()

    def _close(self) -> None:
        self._closing = True
        if self.transport is not None:
            self.transport.close()

    async def drain_and_close(self) -> None:
        """Stop reading, finish in-flight requests, write their replies, close."""
        self._closing = True
        self._update_reading()
        if self._inflight:
            await asyncio.gather(*list(self._inflight), return_exceptions=True)
        self._send_replies()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
