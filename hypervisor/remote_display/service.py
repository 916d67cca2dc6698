"""Serve a running VM's screen: VNC capture + encoder + stream + input + web server.

:func:`open_display` assembles the pieces for one libvirt domain and returns a
:class:`RunningDisplay` (async). :func:`serve_in_background` runs the same on a
private event loop in a daemon thread, for synchronous callers such as
``omega demo``; it returns once the server listens, with the URL and tokens.

The VNC socket comes from the live domain XML (``<graphics type='vnc'
socket=...>``), so it works for any domain with a VNC unix socket, Omega's
(``VMSpec(graphics="vnc")``) or not.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import threading
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from hypervisor.config import Config
from hypervisor.errors import LibvirtError, NotFoundError, SecurityError, UsageError
from hypervisor.remote_display.capture import FramebufferCapture
from hypervisor.remote_display.encoder import VideoEncoder, pick_codec
from hypervisor.remote_display.input import QmpInput
from hypervisor.remote_display.server import Credentials, DisplayServer
from hypervisor.remote_display.track import DisplayStream

__all__ = ["DisplayOptions", "RunningDisplay", "BackgroundDisplay", "open_display",
           "parse_listen", "serve_in_background", "ssl_context_from", "vnc_socket_of"]


@dataclass
class DisplayOptions:
    """How to serve a display.

    Attributes:
        listen: "HOST:PORT" (port 0: any free port).
        codec: "auto", "h264", "vp8" or "h264_nvenc".
        max_fps: frame-rate cap.
        bitrate: starting/default bitrate (bits per second).
        max_bitrate: ceiling congestion feedback may reach.
        watermark: draw capture timestamps into frames (latency benchmark).
        tls_cert: PEM certificate for HTTPS (with tls_key).
        tls_key: PEM key.
    """

    listen: str = "127.0.0.1:0"
    codec: str = "auto"
    max_fps: float = 30
    bitrate: int = 4_000_000
    max_bitrate: int = 20_000_000
    watermark: bool = False
    tls_cert: Path | None = None
    tls_key: Path | None = None


def parse_listen(listen: str) -> tuple[str, int]:
    """Split "HOST:PORT" (IPv6 as "[::1]:PORT").

    Args:
        listen: the address.

    Returns:
        (host, port).

    Raises:
        UsageError: malformed address or port out of range.
    """
    host, sep, port_text = listen.rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise UsageError(f"--listen {listen!r}: expected HOST:PORT")
    return host.strip("[]"), int(port_text)


def ssl_context_from(cert: Path | None, key: Path | None) -> ssl.SSLContext | None:
    """Build the HTTPS context, or None for plain HTTP.

    Args:
        cert: certificate chain (PEM).
        key: private key (PEM).

    Returns:
        A server SSLContext (TLS 1.2+), or None if neither is given.

    Raises:
        UsageError: only one of the two given.
        SecurityError: the files cannot be loaded.
    """
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise UsageError("--tls-cert and --tls-key go together")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(str(cert), str(key))
    except (OSError, ssl.SSLError) as exc:
        raise SecurityError(f"cannot load TLS certificate {cert} / key {key}: {exc}") from exc
    return context


def vnc_socket_of(config: Config, vm: str) -> Path:
    """The VNC unix socket of running domain ``vm``.

    Args:
        config: Omega's configuration (libvirt URI).
        vm: the domain name.

    Returns:
        The socket path.

    Raises:
        NotFoundError: no such domain.
        UsageError: the domain is not running or has no VNC unix socket.
        LibvirtError: libvirtd unreachable.
    """
    import libvirt

    try:
        conn = libvirt.open(config.libvirt_uri)
    except libvirt.libvirtError as exc:
        raise LibvirtError(f"cannot connect to {config.libvirt_uri}: "
                           f"{exc.get_error_message()}") from exc
    try:
        try:
            dom = conn.lookupByName(vm)
        except libvirt.libvirtError:
            raise NotFoundError(f"no VM named {vm!r}") from None
        if not dom.isActive():
            raise UsageError(f"VM {vm!r} is not running; start it first")
        root = ET.fromstring(dom.XMLDesc(0))
    finally:
        conn.close()
    for graphics in root.iter("graphics"):
        if graphics.get("type") == "vnc":
            socket = graphics.get("socket") or next(
                (lst.get("socket") for lst in graphics.iter("listen")
                 if lst.get("type") == "socket"), None)
            if socket:
                return Path(socket)
    raise UsageError(f"VM {vm!r} has no VNC display on a unix socket "
                     "(create it with graphics = \"vnc\")")


@dataclass
class RunningDisplay:
    """A display being served; :meth:`close` undoes everything."""

    vm: str
    server: DisplayServer
    stream: DisplayStream
    capture: FramebufferCapture
    input_sink: QmpInput
    credentials: Credentials
    host: str
    scheme: str

    @property
    def port(self) -> int:
        """The TCP port listened on."""
        return self.server.port

    @property
    def base_url(self) -> str:
        """The page's URL without credentials."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}/"

    @property
    def url(self) -> str:
        """The page's URL with the operator token in the fragment (never sent to the server)."""
        return f"{self.base_url}#token={self.credentials.operator_token}"

    async def close(self) -> None:
        """Stop serving: viewers, web server, stream, input, capture."""
        await self.server.close()
        await self.stream.close()
        await self.input_sink.close()
        await self.capture.close()


async def open_display(config: Config, vm: str, *, options: DisplayOptions | None = None,
                       credentials: Credentials | None = None) -> RunningDisplay:
    """Start serving the screen of running VM ``vm``.

    Args:
        config: Omega's configuration.
        vm: the domain name.
        options: how to serve (defaults: 127.0.0.1, any port, auto codec, 30 fps).
        credentials: login secrets (default: fresh random tokens).

    Returns:
        The running display (its url carries the operator token).

    Raises:
        NotFoundError: no such VM.
        UsageError: VM not running / no VNC / bad options.
        LibvirtError: libvirtd unreachable.
        ProtocolError: the VNC server misbehaves.
        OSError: the listen address cannot be bound.
    """
    options = options or DisplayOptions()
    credentials = credentials or Credentials()
    host, port = parse_listen(options.listen)
    context = ssl_context_from(options.tls_cert, options.tls_key)
    codec = pick_codec(options.codec)
    if not 1 <= options.max_fps <= 240:
        raise UsageError(f"--fps {options.max_fps}: expected 1..240")
    socket = await asyncio.to_thread(vnc_socket_of, config, vm)
    capture = FramebufferCapture(socket)
    await capture.start()
    cleanup: list = [capture.close]
    try:
        encoder = VideoEncoder(codec, bitrate=min(options.bitrate, options.max_bitrate),
                               max_bitrate=options.max_bitrate, fps_hint=int(options.max_fps))
        stream = DisplayStream(capture, encoder, max_fps=options.max_fps,
                               watermark=options.watermark)
        stream.start()
        cleanup.append(stream.close)
        input_sink = QmpInput(config.libvirt_uri, vm)
        await input_sink.start()
        cleanup.append(input_sink.close)
        server = DisplayServer(stream, input_sink=input_sink, credentials=credentials,
                               title=f"Omega — {vm}")
        await server.start(host, port, ssl_context=context)
    except BaseException:
        for undo in reversed(cleanup):
            with contextlib.suppress(Exception):
                await undo()
        raise
    return RunningDisplay(vm, server, stream, capture, input_sink, credentials, host,
                          "https" if context else "http")


class BackgroundDisplay:
    """A display served from a daemon thread with its own event loop.

    Attributes:
        url: page URL with the operator token.
        base_url: page URL without credentials.
        operator_token: the operator's token.
        viewer_token: the viewer's token.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, thread: threading.Thread,
                 display: RunningDisplay) -> None:
        self._loop = loop
        self._thread = thread
        self.display = display
        self.url = display.url
        self.base_url = display.base_url
        self.operator_token = display.credentials.operator_token
        self.viewer_token = display.credentials.viewer_token

    def stop(self, *, timeout: float = 30) -> None:
        """Stop serving and end the thread.

        Args:
            timeout: seconds to wait for a clean shutdown.
        """
        if not self._thread.is_alive():
            return
        future = asyncio.run_coroutine_threadsafe(self.display.close(), self._loop)
        with contextlib.suppress(Exception):
            future.result(timeout)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout)


def serve_in_background(config: Config, vm: str, *, options: DisplayOptions | None = None,
                        credentials: Credentials | None = None,
                        timeout: float = 30) -> BackgroundDisplay:
    """Serve ``vm``'s screen from a daemon thread; return once it listens.

    Args:
        config: Omega's configuration.
        vm: a running domain with a VNC unix socket.
        options: see :class:`DisplayOptions`.
        credentials: login secrets (default: fresh random tokens).
        timeout: seconds to wait for the server to come up.

    Returns:
        A handle with ``url``, tokens and ``stop()``.

    Raises:
        Whatever :func:`open_display` raises, re-raised in the caller's thread.
    """
    loop = asyncio.new_event_loop()
    started = threading.Event()
    outcome: dict[str, object] = {}

    def main() -> None:
        asyncio.set_event_loop(loop)

        async def boot() -> None:
            try:
                outcome["display"] = await open_display(config, vm, options=options,
                                                        credentials=credentials)
            except BaseException as exc:  # handed to the caller's thread
                outcome["error"] = exc
            finally:
                started.set()

        loop.create_task(boot())
        loop.run_forever()
        loop.close()

    thread = threading.Thread(target=main, name=f"display-{vm}", daemon=True)
    thread.start()
    if not started.wait(timeout):
        loop.call_soon_threadsafe(loop.stop)
        raise UsageError(f"display server for {vm!r} did not start within {timeout:.0f} s")
    if "error" in outcome:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)
        raise outcome["error"]  # type: ignore[misc]
    return BackgroundDisplay(loop, thread, outcome["display"])  # type: ignore[arg-type]
