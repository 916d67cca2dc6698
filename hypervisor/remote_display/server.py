"""The display server: login, WebRTC signaling, the web page, input routing.

One aiohttp application per served VM:

- ``GET /`` and ``GET /static/*``: the self-contained page in ``web/``.
- ``POST /api/login`` ``{"token": T}`` or ``{"password": P}``: checks the
  credential (constant-time), answers ``{"role": ...}`` and sets an HttpOnly
  session cookie. The operator token or the password gives role ``operator``
  (may send input), the viewer token role ``viewer`` (watches only). Anything
  else: 401, nothing else said.
- ``POST /api/offer`` (session cookie): the page's SDP offer in, aiortc's
  answer out (all ICE candidates included; no trickle). Each offer is one
  viewer: its own RTCPeerConnection and DisplayTrack on the shared stream.
- ``GET /api/status`` (session cookie): stream and viewer counters (JSON).

Input arrives on the viewer's data channels; for a ``viewer`` session every
input message is refused server-side (answered with ``{"t": "refused"}``) and
never reaches QMP. When a viewer's connection fails or closes, only its own
track and connection go; an operator's held keys and buttons are released.

Thread model: one asyncio event loop (aiohttp, aiortc, capture, stream); the
encoder and libvirt monitor calls run on worker threads (see track.py, input.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import secrets
import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from hypervisor.errors import ProtocolError
from hypervisor.remote_display.input import InputRefused, QmpInput, parse_input_message
from hypervisor.remote_display.rtc import add_display_track
from hypervisor.remote_display.track import DisplayStream, DisplayTrack

__all__ = ["Credentials", "DisplayServer", "Session", "hash_password"]

log = logging.getLogger(__name__)

WEB_DIR = Path(__file__).with_name("web")
COOKIE = "omega_display_session"
MAX_VIEWERS = 16
MAX_BODY = 256 * 1024
SCRYPT = {"n": 2**14, "r": 8, "p": 1}


def hash_password(password: str, *, salt: bytes | None = None) -> tuple[bytes, bytes]:
    """scrypt a password.

    Args:
        password: the password.
        salt: 16 random bytes (default: new ones).

    Returns:
        (salt, digest).
    """
    salt = salt or secrets.token_bytes(16)
    return salt, hashlib.scrypt(password.encode(), salt=salt, **SCRYPT)


@dataclass
class Credentials:
    """Who may log in, and as what.

    Attributes:
        operator_token: grants role operator.
        viewer_token: grants role viewer.
        password: (salt, scrypt digest) granting role operator, or None.
    """

    operator_token: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    viewer_token: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    password: tuple[bytes, bytes] | None = None

    def role_for(self, body: dict[str, Any]) -> str | None:
        """Return the role the login body earns, or None.

        Args:
            body: ``{"token": ...}`` or ``{"password": ...}``.

        Returns:
            "operator", "viewer" or None.
        """
        token = body.get("token")
        if isinstance(token, str) and token:
            given = token.encode()
            if hmac.compare_digest(given, self.operator_token.encode()):
                return "operator"
            if hmac.compare_digest(given, self.viewer_token.encode()):
                return "viewer"
            return None
        password = body.get("password")
        if isinstance(password, str) and password and self.password is not None:
            salt, digest = self.password
            if hmac.compare_digest(hash_password(password, salt=salt)[1], digest):
                return "operator"
        return None


@dataclass
class Session:
    """A logged-in browser (one cookie), possibly with several connections."""

    role: str
    created: float = field(default_factory=time.time)


@dataclass(eq=False)  # identity semantics: kept in a set
class _Viewer:
    pc: Any
    track: DisplayTrack
    session: Session
    refused_inputs: int = 0
    input_messages: int = 0


class DisplayServer:
    """Serve one display stream to browsers.

    Args:
        stream: the started DisplayStream of the VM's screen.
        input_sink: where operator input goes (None: input is refused for everyone).
        credentials: login secrets.
        title: shown on the page.
    """

    def __init__(self, stream: DisplayStream, *, input_sink: QmpInput | None,
                 credentials: Credentials, title: str = "Omega display") -> None:
        self.stream = stream
        self.input_sink = input_sink
        self.credentials = credentials
        self.title = title
        self.secure_cookies = False
        self._sessions: dict[str, Session] = {}
        self._viewers: set[_Viewer] = set()
        self.app = web.Application(client_max_size=MAX_BODY)
        self.app.add_routes([
            web.get("/", self._index),
            web.static("/static", WEB_DIR, show_index=False),
            web.post("/api/login", self._login),
            web.post("/api/logout", self._logout),
            web.post("/api/offer", self._offer),
            web.get("/api/status", self._status),
        ])
        self.app.on_shutdown.append(self._on_shutdown)
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def viewer_count(self) -> int:
        """Connections currently served."""
        return len(self._viewers)

    async def start(self, host: str, port: int, *, ssl_context: ssl.SSLContext | None = None
                    ) -> None:
        """Listen on host:port (port 0: any free port; see :attr:`port`).

        Args:
            host: address to bind.
            port: TCP port.
            ssl_context: serve HTTPS with it.

        Raises:
            OSError: the address cannot be bound.
        """
        self.secure_cookies = ssl_context is not None
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, ssl_context=ssl_context)
        try:
            await site.start()
        except OSError:
            await self._runner.cleanup()
            self._runner = None
            raise
        addresses = self._runner.addresses  # the bound port when port 0 was asked
        self.port = int(addresses[0][1]) if addresses else port

    async def close(self) -> None:
        """Close every viewer and stop listening."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await self._on_shutdown(self.app)

    # ------------------------------------------------------------------ HTTP

    async def _index(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(WEB_DIR / "index.html",
                                headers={"Cache-Control": "no-store",
                                         "Content-Security-Policy": "default-src 'self'; "
                                         "media-src 'self' blob:; img-src 'self' data:"})

    async def _json_body(self, request: web.Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            raise web.HTTPBadRequest(text="body must be JSON") from None
        if not isinstance(body, dict):
            raise web.HTTPBadRequest(text="body must be a JSON object")
        return body

    def _session(self, request: web.Request) -> Session:
        session = self._sessions.get(request.cookies.get(COOKIE, ""))
        if session is None:
            raise web.HTTPUnauthorized(text="log in first")
        return session

    async def _login(self, request: web.Request) -> web.Response:
        role = self.credentials.role_for(await self._json_body(request))
        if role is None:
            await asyncio.sleep(0.2)  # slow down guessing a little
            raise web.HTTPUnauthorized(text="wrong token or password")
        session_id = secrets.token_urlsafe(32)
        self._sessions[session_id] = Session(role)
        response = web.json_response({"role": role, "title": self.title})
        response.set_cookie(COOKIE, session_id, httponly=True, samesite="Strict",
                            secure=self.secure_cookies)
        return response

    async def _logout(self, request: web.Request) -> web.Response:
        self._sessions.pop(request.cookies.get(COOKIE, ""), None)
        response = web.json_response({"ok": True})
        response.del_cookie(COOKIE)
        return response

    async def _status(self, request: web.Request) -> web.Response:
        session = self._session(request)
        stats = self.stream.stats
        return web.json_response({
            "role": session.role, "viewers": self.viewer_count,
            "frames": stats.frames, "keyframes": stats.keyframes, "bytes": stats.bytes,
            "encode_seconds": stats.encode_seconds, "size": list(stats.sizes),
            "bitrate_target": self.stream.encoder.bitrate, "codec": self.stream.encoder.codec,
            "max_fps": self.stream.max_fps,
            "input_commands": self.input_sink.commands_sent if self.input_sink else 0,
            "refused_inputs": sum(v.refused_inputs for v in self._viewers),
        })

    async def _offer(self, request: web.Request) -> web.Response:
        from aiortc import RTCPeerConnection, RTCSessionDescription

        session = self._session(request)
        body = await self._json_body(request)
        if body.get("type") != "offer" or not isinstance(body.get("sdp"), str):
            raise web.HTTPBadRequest(text='expected {"type": "offer", "sdp": ...}')
        if self.viewer_count >= MAX_VIEWERS:
            raise web.HTTPServiceUnavailable(text=f"at most {MAX_VIEWERS} viewers")
        pc = RTCPeerConnection()
        track = self.stream.subscribe(f"{session.role}-{secrets.token_hex(3)}")
        viewer = _Viewer(pc, track, session)
        self._viewers.add(viewer)
        self._wire(viewer)
        try:
            add_display_track(pc, track, mime_type=self.stream.encoder.mime_type)
            await pc.setRemoteDescription(RTCSessionDescription(body["sdp"], "offer"))
            await pc.setLocalDescription(await pc.createAnswer())
        except Exception as exc:  # malformed SDP, no common codec: drop this viewer only
            await self._drop(viewer)
            raise web.HTTPBadRequest(text=f"cannot answer this offer: {exc}") from None
        return web.json_response({"type": pc.localDescription.type,
                                  "sdp": pc.localDescription.sdp,
                                  "role": session.role, "viewer": track.viewer_id})

    # -------------------------------------------------------------- viewers

    def _wire(self, viewer: _Viewer) -> None:
        pc = viewer.pc

        @pc.on("connectionstatechange")
        async def on_state() -> None:
            if pc.connectionState in ("failed", "closed"):
                await self._drop(viewer)

        @pc.on("datachannel")
        def on_channel(channel: Any) -> None:
            @channel.on("message")
            def on_message(message: str | bytes) -> None:
                self._input(viewer, channel, message)

    def _input(self, viewer: _Viewer, channel: Any, message: str | bytes) -> None:
        viewer.input_messages += 1
        if viewer.session.role != "operator" or self.input_sink is None:
            viewer.refused_inputs += 1
            if viewer.refused_inputs == 1 or viewer.refused_inputs % 100 == 0:
                self._reply(channel, {"t": "refused",
                                      "reason": "viewer role: input is not allowed",
                                      "count": viewer.refused_inputs})
            return
        try:
            kind, events = parse_input_message(message)
        except (ProtocolError, InputRefused) as exc:
            self._reply(channel, {"t": "error", "message": str(exc)})
            return
        self.input_sink.submit(kind, events)
        if self.input_sink.last_error:
            self._reply(channel, {"t": "error", "message": self.input_sink.last_error})
            self.input_sink.last_error = None

    @staticmethod
    def _reply(channel: Any, message: dict[str, Any]) -> None:
        with contextlib.suppress(Exception):  # the channel may be closing
            channel.send(json.dumps(message))

    async def _drop(self, viewer: _Viewer) -> None:
        if viewer not in self._viewers:
            return
        self._viewers.discard(viewer)
        viewer.track.stop()
        if viewer.session.role == "operator" and self.input_sink is not None:
            self.input_sink.release_all()
        with contextlib.suppress(Exception):
            await viewer.pc.close()

    async def _on_shutdown(self, _app: web.Application) -> None:
        for viewer in list(self._viewers):
            await self._drop(viewer)
