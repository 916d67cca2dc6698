"""Native fast path: C serves the transmission phase of plain fd-backed connections.

Profiling the pure-Python server (``server.py``) on a local backend shows the
time going to the per-request Python work (parse, dispatch, encode, one
asyncio write per batch): it tops out well below nbdkit. Here the handshake
stays in Python (it is not hot and is where the protocol's options live);
once it completes on a connection that is plain (no TLS) and whose export's
bytes are in a file descriptor (:class:`~hypervisor.netblock.backend.SparseFileBackend`,
:class:`~hypervisor.netblock.memfd.MemfdBackend`), :func:`take_over` hands the
socket, the export's fd and the negotiated state to ``omega_nbd_serve``
(native/nbd), which serves requests until NBD_CMD_DISC, end of file or a
framing error.

Threads: one dedicated OS thread per fast-path connection runs the C loop
with the GIL released; the asyncio loop only learns when it ends (a future)
and folds the C counters into the export's :class:`~hypervisor.netblock.stats.ExportStats`
every second and at the end, so Prometheus metrics stay honest.

Handing over: the asyncio transport keeps the socket but stops reading; C
uses its own duplicates of the socket and of the export's fd (closing the
backend while C still serves is safe). The connection's transport is replaced
by :class:`_NativeTransport`, through which the server's ordinary drain
(``drain_and_close``) reaches C: stop reading (``shutdown(SHUT_RD)``), wait
for the replies in flight, close.

Replies are byte-for-byte those of the Python path (tests/netblock/test_fastpath.py
compares them), with one allowed difference: a READ of 64 KiB or more is
sent with sendfile (pages by reference), so a write overlapping it that the
client sends before receiving its reply may show in it. NBD leaves
overlapping in-flight requests unordered; real clients never issue them.

``OMEGA_NBD_FASTPATH=0`` turns the fast path off (both paths stay tested).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hypervisor.errors import NativeError, OmegaError
from hypervisor.netblock import protocol as nbd
from hypervisor.netblock.backend import Backend, SparseFileBackend
from hypervisor.netblock.memfd import MemfdBackend
from hypervisor.netblock.stats import LATENCY_BUCKETS_S, ExportStats, LatencyHistogram

if TYPE_CHECKING:
    from hypervisor.netblock.server import NbdConnection

log = logging.getLogger(__name__)

ENV_SWITCH = "OMEGA_NBD_FASTPATH"
"""Environment variable: ``0`` serves every connection in Python."""

FOLD_INTERVAL_S = 1.0
"""How often a running connection's C counters reach its ExportStats."""

_END_NAMES = ("disc", "eof", "protocol", "socket", "internal")
_native: Any = None
_native_error: str | None = None


def _module() -> Any:
    """The loaded ``_nbd`` module, or None (the reason is logged once)."""
    global _native, _native_error
    if _native is None and _native_error is None:
        from hypervisor import _native as native_pkg

        try:
            _native = native_pkg.load("nbd")
        except NativeError as exc:
            _native_error = str(exc)
            log.warning("nbd fast path unavailable: %s", exc)
    return _native


def enabled() -> bool:
    """The fast path is on (``OMEGA_NBD_FASTPATH`` is not ``0``) and built."""
    return os.environ.get(ENV_SWITCH, "1") != "0" and _module() is not None


def export_fd(backend: Backend) -> int | None:
    """The descriptor C serves an export from, if it has one.

    Args:
        backend: the export's backend.

    Returns:
        The fd, or None when the backend is not a plain file descriptor
        (replicated, anonymous memory, or a subclass with its own semantics).
    """
    if isinstance(backend, MemfdBackend):
        fd = backend.fd
    elif type(backend) is SparseFileBackend:
        fd = backend._fd  # noqa: SLF001 - the file's descriptor; C gets a dup of it
    else:
        return None
    return fd if fd >= 0 else None


@dataclass(frozen=True)
class NativeResult:
    """How a natively served connection ended.

    Attributes:
        status: ``disc``, ``eof``, ``protocol`` (framing error), ``socket``
            (send/recv failed) or ``internal`` (no memory).
        errno: errno of a failed socket call, else 0.
        reason: one line for the log.
    """

    status: str
    errno: int
    reason: str

    @property
    def clean(self) -> bool:
        """The client disconnected or closed; nothing went wrong."""
        return self.status in ("disc", "eof")


def new_counters() -> Any:
    """A zeroed ``struct omega_nbd_counters`` (owned by the returned cdata)."""
    module = _module()
    if module is None:
        raise NativeError(_native_error or "nbd fast path unavailable")
    return module.ffi.new("struct omega_nbd_counters *")


def serve_connection_native(sock_fd: int, file_fd: int, state: nbd.Negotiated, *,
                            initial: bytes = b"", counters: Any = None,
                            repl: Any = None, busy_poll_us: int = 0) -> NativeResult:
    """Serve one connection's transmission phase in C until it ends. Blocks.

    Call it from a thread of its own (the GIL is released inside).

    Args:
        sock_fd: the connected socket (borrowed; switched to blocking mode).
        file_fd: the export's data (borrowed); -1 with ``repl``.
        state: what the handshake negotiated.
        initial: bytes received after the handshake (the first requests).
        counters: a :func:`new_counters` struct to count into (default: a fresh one).
        repl: a replicated export's ``struct nbr_export *``
            (:class:`~hypervisor.netblock.native_replicated.NativeReplicatedBackend`)
            to serve instead of ``file_fd``.
        busy_poll_us: wait awake this long for the next request before
            sleeping in ``recv`` (0: never).

    Returns:
        How it ended.

    Raises:
        NativeError: the native module is not available.
        ValueError: the negotiated state has more than one meta context.
    """
    module = _module()
    if module is None:
        raise NativeError(_native_error or "nbd fast path unavailable")
    ffi, lib = module.ffi, module.lib
    if len(state.meta_contexts) > 1:
        raise ValueError("the fast path serves at most one meta context")
    export = state.export
    cfg = ffi.new("struct omega_nbd_config *")
    cfg.sock_fd = sock_fd
    cfg.file_fd = file_fd
    cfg.size = export.size
    cfg.max_block = export.max_block
    cfg.max_write_payload = nbd.MAX_WRITE_PAYLOAD
    cfg.meta_context_id = next(iter(state.meta_contexts), 0)
    cfg.structured = int(state.structured_replies)
    cfg.read_only = int(export.read_only)
    cfg.can_fast_zero = int(export.can_fast_zero)
    cfg.repl = repl if repl is not None else ffi.NULL
    for i, bound in enumerate(LATENCY_BUCKETS_S):
        cfg.latency_bounds_ns[i] = int(bound * 1e9)  # as stats._BOUNDS_NS
    cfg.busy_poll_ns = max(0, busy_poll_us) * 1000
    if counters is None:
        counters = ffi.new("struct omega_nbd_counters *")
    result = ffi.new("struct omega_nbd_result *")
    lib.omega_nbd_serve(cfg, initial, len(initial), counters, result)
    return NativeResult(status=_END_NAMES[result.status], errno=result.sys_errno,
                        reason=ffi.string(result.reason).decode(errors="replace"))


class CounterFolder:
    """Adds what a connection's C counters gained since the last call to ExportStats.

    Args:
        counters: the connection's ``struct omega_nbd_counters``.
        stats: the export's counters.
    """

    def __init__(self, counters: Any, stats: ExportStats) -> None:
        ffi = _module().ffi
        self._ffi = ffi
        self._counters = counters
        self._stats = stats
        self._last = ffi.new("struct omega_nbd_counters *")
        self._now = ffi.new("struct omega_nbd_counters *")

    def fold(self) -> None:
        """Read the counters (atomically per field) and add the deltas."""
        _module().lib.omega_nbd_counters_read(self._counters, self._now)
        now, last, stats = self._now, self._last, self._stats
        stats.bytes_read += now.bytes_read - last.bytes_read
        stats.bytes_written += now.bytes_written - last.bytes_written
        stats.errors += now.errors - last.errors
        for cmd, name in nbd.COMMAND_NAMES.items():
            ops = now.ops[cmd] - last.ops[cmd]
            if not ops:
                continue
            stats.ops[name] = stats.ops.get(name, 0) + ops
            hist = stats.latency.get(name)
            if hist is None:
                hist = stats.latency[name] = LatencyHistogram()
            for i in range(len(hist.counts)):
                hist.counts[i] += now.latency[cmd][i] - last.latency[cmd][i]
            hist.total_ns += now.latency_total_ns[cmd] - last.latency_total_ns[cmd]
        self._ffi.memmove(self._last, self._now, self._ffi.sizeof("struct omega_nbd_counters"))


class NativeSession:
    """One connection served by C on a thread of its own.

    Args:
        sock: the connection's socket (a duplicate is served; the original
            stays with the asyncio transport until the end).
        file_fd: the export's descriptor (a duplicate is served), or -1 for
            a replicated export (``repl``).
        state: what the handshake negotiated.
        stats: the export's counters.
        initial: bytes received after the handshake.
        name: for the thread name and the log.
        repl: a replicated export's backend, served instead of ``file_fd``.
        busy_poll_us: wait awake this long for the next request (0: never).
    """

    def __init__(self, sock: socket.socket | Any, file_fd: int, state: nbd.Negotiated,
                 stats: ExportStats, *, initial: bytes, name: str, repl: Any = None,
                 busy_poll_us: int = 0) -> None:
        self.state = state
        self._busy_poll_us = busy_poll_us
        self.name = name
        self._initial = initial
        self._repl = repl
        self._sock_fd = os.dup(sock.fileno())
        try:
            self._file_fd = os.dup(file_fd) if file_fd >= 0 else -1
        except OSError:
            os.close(self._sock_fd)
            raise
        self._counters = new_counters()
        self._folder = CounterFolder(self._counters, stats)
        self._stop_lock = threading.Lock()
        self.result: NativeResult | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> asyncio.Future[NativeResult]:
        """Start the serving thread.

        Returns:
            A future resolved (on ``loop``) with the result when C returns.
        """
        future: asyncio.Future[NativeResult] = loop.create_future()

        def finish(result: NativeResult) -> None:
            self._folder.fold()
            if not future.done():
                future.set_result(result)

        def run() -> None:
            try:
                result = serve_connection_native(
                    self._sock_fd, self._file_fd, self.state, initial=self._initial,
                    counters=self._counters, busy_poll_us=self._busy_poll_us,
                    repl=self._repl.native_handle if self._repl is not None else None)
            except Exception as exc:  # reported through the future, never lost
                result = NativeResult("internal", 0, f"{type(exc).__name__}: {exc}")
            finally:
                with self._stop_lock:
                    os.close(self._sock_fd)
                    if self._file_fd >= 0:
                        os.close(self._file_fd)
                    self._sock_fd = self._file_fd = -1
                if self._repl is not None:
                    self._repl.release()
            self.result = result
            try:
                loop.call_soon_threadsafe(finish, result)
            except RuntimeError:  # the loop is gone (process exiting)
                pass

        def periodic() -> None:
            if future.done():
                return
            self._folder.fold()
            loop.call_later(FOLD_INTERVAL_S, periodic)

        threading.Thread(target=run, name=f"nbd-native {self.name}", daemon=True).start()
        loop.call_later(FOLD_INTERVAL_S, periodic)
        return future

    def stop(self, *, hard: bool = False) -> None:
        """Make C stop: no more requests are read (those read are answered).

        Args:
            hard: also stop sending (replies not yet sent are lost).
        """
        with self._stop_lock:
            if self._sock_fd < 0:
                return
            view = socket.socket(fileno=os.dup(self._sock_fd))
        try:
            view.shutdown(socket.SHUT_RDWR if hard else socket.SHUT_RD)
        except OSError:
            pass  # already disconnected
        finally:
            view.close()


class _NativeTransport(asyncio.Transport):
    """Stands in for the connection's transport once C serves it.

    The server's own code keeps working on it: ``pause_reading`` (its drain
    begins with it) and ``close`` make C stop reading and finish; the real
    transport closes, and the connection sees ``connection_lost``, when C has
    returned. Nothing may be written through it: C owns the byte stream.

    Args:
        real: the asyncio transport that accepted the connection (paused).
        session: the native session serving it.
    """

    def __init__(self, real: asyncio.Transport, session: NativeSession) -> None:
        super().__init__()
        self._real = real
        self._session = session
        self._closing = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._real.get_extra_info(name, default)

    def is_closing(self) -> bool:
        return self._closing or self._real.is_closing()

    def close(self) -> None:
        self._closing = True
        self._session.stop()

    def abort(self) -> None:
        self._closing = True
        self._session.stop(hard=True)

    def is_reading(self) -> bool:
        return not self._closing

    def pause_reading(self) -> None:
        # C cannot resume after SHUT_RD; the server pauses only to drain.
        self._closing = True
        self._session.stop()

    def resume_reading(self) -> None:
        return None

    def get_write_buffer_size(self) -> int:
        return 0

    def write(self, data: Any) -> None:
        raise RuntimeError("the native fast path owns this connection's byte stream")

    def writelines(self, list_of_data: Any) -> None:
        raise RuntimeError("the native fast path owns this connection's byte stream")


def take_over(conn: NbdConnection, leftover: bytes) -> bool:
    """Hand a connection whose handshake just completed to C, if it qualifies.

    Qualifies: fast path enabled, no TLS, the export's backend is a plain
    file descriptor or a native replicated export, at most one meta context,
    and every handshake byte already written to the socket (nothing queued in
    the transport).

    Args:
        conn: the connection (``negotiated``, ``export`` and ``transport`` set).
        leftover: bytes received after the handshake (the first requests).

    Returns:
        True if C now serves the connection; False to keep serving it in Python.
    """
    negotiated, export, real = conn.negotiated, conn.export, conn.transport
    if negotiated is None or export is None or real is None:
        return False
    if negotiated.tls or len(negotiated.meta_contexts) > 1 or not enabled():
        return False
    target = export_fd(export.backend)
    repl = export.backend if hasattr(export.backend, "native_handle") else None
    sock = real.get_extra_info("socket")
    if (target is None and repl is None) or sock is None or real.get_write_buffer_size() \
            or real.is_closing():
        return False
    peer = str(real.get_extra_info("peername") or "unix")
    try:
        if repl is not None:
            repl.acquire()  # the C export outlives this connection's thread
        try:
            session = NativeSession(sock, -1 if target is None else target, negotiated,
                                    export.stats, initial=leftover, name=peer, repl=repl,
                                    busy_poll_us=conn.server.busy_poll_us)
        except BaseException:
            if repl is not None:
                repl.release()
            raise
    except (OSError, OmegaError) as exc:
        log.warning("nbd %s: fast path not taken: %s", peer, exc)
        return False
    real.pause_reading()
    proxy = _NativeTransport(real, session)
    conn.transport = proxy
    future = session.start(asyncio.get_running_loop())

    async def finished() -> None:
        result = await future
        if not result.clean:
            log.info("nbd %s: closing: %s", peer, result.reason)
        proxy._closing = True
        real.close()  # connection_lost follows: the server's accounting runs

    task = asyncio.ensure_future(finished())
    # the server's drain waits for its in-flight work; C's is all of it
    conn._inflight.add(task)  # noqa: SLF001
    task.add_done_callback(conn._inflight.discard)  # noqa: SLF001
    return True
