"""RFB 3.8 (VNC) client protocol: a pure parser/encoder, no I/O.

Only what a local screen grabber needs from QEMU's VNC server: version and
security-type "None" handshake, ServerInit, SetPixelFormat (32 bpp true colour),
SetEncodings, FramebufferUpdateRequest and the server's FramebufferUpdate with
Raw, CopyRect, DesktopSize and ExtendedDesktopSize rectangles, plus the other
server messages (colour map, bell, cut text) so the stream never desyncs.

Use: feed every byte read from the socket to :meth:`RfbClient.receive_data`,
which returns the events it completed; write :meth:`RfbClient.data_to_send`
to the socket. Malformed input raises :class:`RfbProtocolError` and the client
is unusable afterwards (the caller closes the connection).

Reference: RFC 6143 and the community rfbproto document (pseudo-encodings).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import Enum

from hypervisor.errors import ProtocolError

__all__ = [
    "ENCODING_COPYRECT",
    "ENCODING_DESKTOP_SIZE",
    "ENCODING_EXTENDED_DESKTOP_SIZE",
    "ENCODING_RAW",
    "Bell",
    "CopyRect",
    "DesktopResized",
    "PixelFormat",
    "RawRect",
    "RfbClient",
    "RfbEvent",
    "RfbProtocolError",
    "ServerCutText",
    "ServerInit",
    "UpdateBegin",
    "UpdateEnd",
    "BGRX32",
]

ENCODING_RAW = 0
ENCODING_COPYRECT = 1
ENCODING_DESKTOP_SIZE = -223
ENCODING_EXTENDED_DESKTOP_SIZE = -308

SECURITY_NONE = 1
VERSION_3_8 = b"RFB 003.008\n"

# Sizes of everything the server may ask us to buffer; beyond these the peer is broken.
MAX_DIMENSION = 16384
MAX_TEXT = 16 * 1024 * 1024
MAX_RECTS = 65535


class RfbProtocolError(ProtocolError):
    """The server sent bytes that are not valid RFB 3.8."""


@dataclass(frozen=True, slots=True)
class PixelFormat:
    """The RFB PIXEL_FORMAT structure (16 bytes on the wire)."""

    bits_per_pixel: int
    depth: int
    big_endian: bool
    true_colour: bool
    red_max: int
    green_max: int
    blue_max: int
    red_shift: int
    green_shift: int
    blue_shift: int

    _STRUCT = struct.Struct(">BBBBHHHBBB3x")

    def pack(self) -> bytes:
        """Encode as the 16-byte wire structure.

        Returns:
            The packed bytes.
        """
        return self._STRUCT.pack(self.bits_per_pixel, self.depth, int(self.big_endian),
                                 int(self.true_colour), self.red_max, self.green_max,
                                 self.blue_max, self.red_shift, self.green_shift,
                                 self.blue_shift)

    @classmethod
    def unpack(cls, data: bytes) -> PixelFormat:
        """Decode the 16-byte wire structure.

        Args:
            data: exactly 16 bytes.

        Returns:
            The pixel format.

        Raises:
            RfbProtocolError: wrong length or bits-per-pixel not 8/16/32.
        """
        if len(data) != 16:
            raise RfbProtocolError(f"pixel format is 16 bytes, got {len(data)}")
        bpp, depth, be, tc, rm, gm, bm, rs, gs, bs = cls._STRUCT.unpack(data)
        if bpp not in (8, 16, 32):
            raise RfbProtocolError(f"unsupported bits-per-pixel {bpp}")
        return cls(bpp, depth, bool(be), bool(tc), rm, gm, bm, rs, gs, bs)

    @property
    def bytes_per_pixel(self) -> int:
        """Bytes one pixel takes on the wire."""
        return self.bits_per_pixel // 8


# Little-endian 32 bpp with red in bits 16-23: bytes B, G, R, X in memory, which
# numpy and libswscale read directly as "bgra" with no per-pixel conversion.
BGRX32 = PixelFormat(32, 24, False, True, 255, 255, 255, 16, 8, 0)


@dataclass(frozen=True, slots=True)
class ServerInit:
    """Handshake done: the framebuffer size and the server's pixel format."""

    width: int
    height: int
    pixel_format: PixelFormat
    name: str


@dataclass(frozen=True, slots=True)
class UpdateBegin:
    """A FramebufferUpdate with ``count`` rectangles starts."""

    count: int


@dataclass(frozen=True, slots=True)
class RawRect:
    """Raw pixels for a rectangle, in the client's pixel format, row-major."""

    x: int
    y: int
    width: int
    height: int
    pixels: bytes


@dataclass(frozen=True, slots=True)
class CopyRect:
    """Copy the rectangle at (src_x, src_y) of the current framebuffer to (x, y)."""

    x: int
    y: int
    width: int
    height: int
    src_x: int
    src_y: int


@dataclass(frozen=True, slots=True)
class DesktopResized:
    """The framebuffer is now ``width`` x ``height``; its content is undefined."""

    width: int
    height: int


@dataclass(frozen=True, slots=True)
class UpdateEnd:
    """The FramebufferUpdate is complete; the framebuffer is consistent now."""


@dataclass(frozen=True, slots=True)
class Bell:
    """The server rang the bell."""


@dataclass(frozen=True, slots=True)
class ServerCutText:
    """The server's clipboard text (Latin-1 per the RFB spec)."""

    text: str


RfbEvent = ServerInit | UpdateBegin | RawRect | CopyRect | DesktopResized | UpdateEnd | Bell \
    | ServerCutText


class _State(Enum):
    VERSION = "version"
    SECURITY_TYPES = "security-types"
    SECURITY_RESULT = "security-result"
    SERVER_INIT = "server-init"
    NORMAL = "normal"
    FAILED = "failed"


_U8 = struct.Struct(">B")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_RECT_HEADER = struct.Struct(">HHHHi")
_SERVER_INIT = struct.Struct(">HH16sI")


class _NeedMore(Exception):
    """Internal: the buffer does not yet hold the next complete item."""


class RfbClient:
    """Client side of an RFB 3.8 session, as a state machine without I/O.

    Args:
        shared: ask the server to keep other clients connected (ClientInit flag).
        pixel_format: the format to request once ServerInit arrives (32 bpp only).
        encodings: encodings to announce, in preference order.
    """

    def __init__(self, *, shared: bool = True, pixel_format: PixelFormat = BGRX32,
                 encodings: tuple[int, ...] = (ENCODING_COPYRECT, ENCODING_RAW,
                                               ENCODING_EXTENDED_DESKTOP_SIZE,
                                               ENCODING_DESKTOP_SIZE)) -> None:
        if pixel_format.bits_per_pixel != 32 or not pixel_format.true_colour:
            raise ValueError("only 32 bpp true-colour pixel formats are supported")
        self._shared = shared
        self._pixel_format = pixel_format
        self._encodings = encodings
        self._state = _State.VERSION
        self._buf = bytearray()
        self._pos = 0
        self._out = bytearray()
        self._rects_left = 0
        self.width = 0
        self.height = 0
        self.name = ""

    # ------------------------------------------------------------------ output

    def data_to_send(self) -> bytes:
        """Return (and forget) the bytes the client wants written to the server.

        Returns:
            Pending outgoing bytes, possibly empty.
        """
        out = bytes(self._out)
        self._out.clear()
        return out

    def request_update(self, *, incremental: bool, x: int = 0, y: int = 0,
                       width: int | None = None, height: int | None = None) -> None:
        """Queue a FramebufferUpdateRequest (whole screen by default).

        Args:
            incremental: only changed areas (True) or everything (False).
            x: left edge.
            y: top edge.
            width: width (default: to the right edge).
            height: height (default: to the bottom edge).

        Raises:
            RfbProtocolError: called before the handshake completed.
        """
        if self._state is not _State.NORMAL:
            raise RfbProtocolError("update requested before the handshake completed")
        w = self.width - x if width is None else width
        h = self.height - y if height is None else height
        self._out += struct.pack(">BBHHHH", 3, int(incremental), x, y, max(w, 0), max(h, 0))

    @property
    def ready(self) -> bool:
        """True once ServerInit has been received."""
        return self._state is _State.NORMAL

    # ------------------------------------------------------------------- input

    def receive_data(self, data: bytes) -> list[RfbEvent]:
        """Consume bytes from the server.

        Args:
            data: bytes as read from the socket (any split is fine).

        Returns:
            The events completed by these bytes, in order.

        Raises:
            RfbProtocolError: the bytes violate the protocol (or the server refused
                us); the client stays failed.
        """
        if self._state is _State.FAILED:
            raise RfbProtocolError("RFB session already failed")
        self._buf += data
        events: list[RfbEvent] = []
        try:
            while True:
                mark = self._pos
                try:
                    self._step(events)
                except _NeedMore:
                    self._pos = mark
                    break
        except RfbProtocolError:
            self._state = _State.FAILED
            raise
        # Compact lazily: deleting the consumed prefix each call would be quadratic.
        if self._pos and (self._pos > 1 << 20 or self._pos == len(self._buf)):
            del self._buf[:self._pos]
            self._pos = 0
        return events

    def _take(self, n: int) -> bytes:
        end = self._pos + n
        if end > len(self._buf):
            raise _NeedMore
        with memoryview(self._buf) as view:
            chunk = bytes(view[self._pos:end])
        self._pos = end
        return chunk

    def _step(self, events: list[RfbEvent]) -> None:
        state = self._state
        if state is _State.VERSION:
            version = self._take(12)
            if not version.startswith(b"RFB ") or version[-1:] != b"\n":
                raise RfbProtocolError(f"not an RFB server (greeting {version!r})")
            try:
                major, minor = int(version[4:7]), int(version[8:11])
            except ValueError:
                raise RfbProtocolError(f"bad RFB version {version!r}") from None
            if (major, minor) < (3, 8):
                raise RfbProtocolError(f"server speaks RFB {major}.{minor}; 3.8 is needed")
            self._out += VERSION_3_8
            self._state = _State.SECURITY_TYPES
        elif state is _State.SECURITY_TYPES:
            (count,) = _U8.unpack(self._take(1))
            if count == 0:
                raise RfbProtocolError(f"server refused the connection: {self._reason()}")
            types = self._take(count)
            if SECURITY_NONE not in types:
                raise RfbProtocolError(
                    f"server offers security types {list(types)}, not None (1); "
                    "Omega only reads QEMU's VNC over a local unix socket")
            self._out += _U8.pack(SECURITY_NONE)
            self._state = _State.SECURITY_RESULT
        elif state is _State.SECURITY_RESULT:
            (result,) = _U32.unpack(self._take(4))
            if result != 0:
                raise RfbProtocolError(f"security handshake failed: {self._reason()}")
            self._out += _U8.pack(int(self._shared))
            self._state = _State.SERVER_INIT
        elif state is _State.SERVER_INIT:
            width, height, fmt, name_len = _SERVER_INIT.unpack(self._take(24))
            if name_len > MAX_TEXT:
                raise RfbProtocolError(f"desktop name of {name_len} bytes")
            name = self._take(name_len).decode("utf-8", "replace")
            server_format = PixelFormat.unpack(fmt)
            self._check_size(width, height)
            self.width, self.height, self.name = width, height, name
            self._out += b"\x00\x00\x00\x00" + self._pixel_format.pack()
            self._out += struct.pack(">BxH", 2, len(self._encodings))
            self._out += struct.pack(f">{len(self._encodings)}i", *self._encodings)
            self._state = _State.NORMAL
            events.append(ServerInit(width, height, server_format, name))
        elif self._rects_left:
            self._rect(events)
        else:
            self._message(events)

    def _reason(self) -> str:
        (length,) = _U32.unpack(self._take(4))
        if length > MAX_TEXT:
            raise RfbProtocolError(f"reason string of {length} bytes")
        return self._take(length).decode("utf-8", "replace")

    def _check_size(self, width: int, height: int) -> None:
        if not (0 <= width <= MAX_DIMENSION and 0 <= height <= MAX_DIMENSION):
            raise RfbProtocolError(f"framebuffer size {width}x{height} out of range")

    def _message(self, events: list[RfbEvent]) -> None:
        (kind,) = _U8.unpack(self._take(1))
        if kind == 0:  # FramebufferUpdate
            (count,) = struct.unpack(">xH", self._take(3))
            events.append(UpdateBegin(count))
            self._rects_left = count
            if count == 0:
                events.append(UpdateEnd())
        elif kind == 1:  # SetColourMapEntries: meaningless in true colour, skip it
            _first, count = struct.unpack(">xHH", self._take(5))
            self._take(6 * count)
        elif kind == 2:
            events.append(Bell())
        elif kind == 3:  # ServerCutText
            (length,) = struct.unpack(">3xI", self._take(7))
            if length > MAX_TEXT:
                raise RfbProtocolError(f"cut text of {length} bytes")
            events.append(ServerCutText(self._take(length).decode("latin-1")))
        else:
            raise RfbProtocolError(f"unknown server message type {kind}")

    def _rect(self, events: list[RfbEvent]) -> None:
        x, y, w, h, encoding = _RECT_HEADER.unpack(self._take(12))
        if encoding == ENCODING_RAW:
            if x + w > self.width or y + h > self.height:
                raise RfbProtocolError(
                    f"raw rectangle {w}x{h}+{x}+{y} outside {self.width}x{self.height}")
            pixels = self._take(w * h * self._pixel_format.bytes_per_pixel)
            event: RfbEvent = RawRect(x, y, w, h, pixels)
        elif encoding == ENCODING_COPYRECT:
            src_x, src_y = struct.unpack(">HH", self._take(4))
            if (max(x, src_x) + w > self.width) or (max(y, src_y) + h > self.height):
                raise RfbProtocolError(
                    f"copy rectangle {w}x{h} {src_x},{src_y}->{x},{y} outside the screen")
            event = CopyRect(x, y, w, h, src_x, src_y)
        elif encoding == ENCODING_DESKTOP_SIZE:
            self._check_size(w, h)
            self.width, self.height = w, h
            event = DesktopResized(w, h)
        elif encoding == ENCODING_EXTENDED_DESKTOP_SIZE:
            (screens,) = struct.unpack(">B3x", self._take(4))
            self._take(16 * screens)
            self._check_size(w, h)
            self.width, self.height = w, h
            event = DesktopResized(w, h)
        else:
            raise RfbProtocolError(f"rectangle with encoding {encoding} we never asked for")
        self._rects_left -= 1
        events.append(event)
        if self._rects_left == 0:
            events.append(UpdateEnd())
