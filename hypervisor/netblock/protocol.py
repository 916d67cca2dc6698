"""NBD wire protocol: a pure parser/encoder without I/O.

The server side of the fixed-newstyle NBD protocol (the NBD project's
``doc/proto.md``): the handshake as an incremental state machine
(:class:`Handshake`) fed bytes and answering with bytes plus a few
instructions for the transport (start TLS, close, enter transmission), the
transmission phase as an incremental request parser (:class:`RequestParser`),
request validation (:func:`check_request`) and reply encoders.

Nothing here touches a socket, so every parser can be fuzzed directly.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

from hypervisor.errors import ProtocolError

# --- magics ---------------------------------------------------------------
NBDMAGIC: Final = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT: Final = 0x49484156454F5054  # "IHAVEOPT"
REPLY_MAGIC: Final = 0x0003E889045565A9
REQUEST_MAGIC: Final = 0x25609513
SIMPLE_REPLY_MAGIC: Final = 0x67446698
STRUCTURED_REPLY_MAGIC: Final = 0x668E33EF

# --- handshake flags --------------------------------------------------------
FLAG_FIXED_NEWSTYLE: Final = 1 << 0
FLAG_NO_ZEROES: Final = 1 << 1
FLAG_C_FIXED_NEWSTYLE: Final = 1 << 0
FLAG_C_NO_ZEROES: Final = 1 << 1

# --- transmission flags -----------------------------------------------------
TFLAG_HAS_FLAGS: Final = 1 << 0
TFLAG_READ_ONLY: Final = 1 << 1
TFLAG_SEND_FLUSH: Final = 1 << 2
TFLAG_SEND_FUA: Final = 1 << 3
TFLAG_ROTATIONAL: Final = 1 << 4
TFLAG_SEND_TRIM: Final = 1 << 5
TFLAG_SEND_WRITE_ZEROES: Final = 1 << 6
TFLAG_SEND_DF: Final = 1 << 7
TFLAG_CAN_MULTI_CONN: Final = 1 << 8
TFLAG_SEND_RESIZE: Final = 1 << 9
TFLAG_SEND_CACHE: Final = 1 << 10
TFLAG_SEND_FAST_ZERO: Final = 1 << 11

# --- options ----------------------------------------------------------------
OPT_EXPORT_NAME: Final = 1
OPT_ABORT: Final = 2
OPT_LIST: Final = 3
OPT_STARTTLS: Final = 5
OPT_INFO: Final = 6
OPT_GO: Final = 7
OPT_STRUCTURED_REPLY: Final = 8
OPT_LIST_META_CONTEXT: Final = 9
OPT_SET_META_CONTEXT: Final = 10

REP_ACK: Final = 1
REP_SERVER: Final = 2
REP_INFO: Final = 3
REP_META_CONTEXT: Final = 4
_ERR: Final = 1 << 31
REP_ERR_UNSUP: Final = _ERR + 1
REP_ERR_POLICY: Final = _ERR + 2
REP_ERR_INVALID: Final = _ERR + 3
REP_ERR_PLATFORM: Final = _ERR + 4
REP_ERR_TLS_REQD: Final = _ERR + 5
REP_ERR_UNKNOWN: Final = _ERR + 6
REP_ERR_SHUTDOWN: Final = _ERR + 7
REP_ERR_BLOCK_SIZE_REQD: Final = _ERR + 8
REP_ERR_TOO_BIG: Final = _ERR + 9

INFO_EXPORT: Final = 0
INFO_NAME: Final = 1
INFO_DESCRIPTION: Final = 2
INFO_BLOCK_SIZE: Final = 3

# --- commands ---------------------------------------------------------------
CMD_READ: Final = 0
CMD_WRITE: Final = 1
CMD_DISC: Final = 2
CMD_FLUSH: Final = 3
CMD_TRIM: Final = 4
CMD_CACHE: Final = 5
CMD_WRITE_ZEROES: Final = 6
CMD_BLOCK_STATUS: Final = 7

CMD_FLAG_FUA: Final = 1 << 0
CMD_FLAG_NO_HOLE: Final = 1 << 1
CMD_FLAG_DF: Final = 1 << 2
CMD_FLAG_REQ_ONE: Final = 1 << 3
CMD_FLAG_FAST_ZERO: Final = 1 << 4

COMMAND_NAMES: Final = {CMD_READ: "read", CMD_WRITE: "write", CMD_DISC: "disc",
                        CMD_FLUSH: "flush", CMD_TRIM: "trim", CMD_CACHE: "cache",
                        CMD_WRITE_ZEROES: "write_zeroes", CMD_BLOCK_STATUS: "block_status"}

REPLY_FLAG_DONE: Final = 1 << 0
REPLY_TYPE_NONE: Final = 0
REPLY_TYPE_OFFSET_DATA: Final = 1
REPLY_TYPE_OFFSET_HOLE: Final = 2
REPLY_TYPE_BLOCK_STATUS: Final = 5
REPLY_TYPE_ERROR: Final = (1 << 15) + 1
REPLY_TYPE_ERROR_OFFSET: Final = (1 << 15) + 2

STATE_HOLE: Final = 1 << 0
STATE_ZERO: Final = 1 << 1

# errno values on the wire (fixed by the protocol, not the host's errno)
EPERM: Final = 1
EIO: Final = 5
ENOMEM: Final = 12
EINVAL: Final = 22
ENOSPC: Final = 28
EOVERFLOW: Final = 75
ENOTSUP: Final = 95
ESHUTDOWN: Final = 108

BASE_ALLOCATION: Final = "base:allocation"
BASE_ALLOCATION_ID: Final = 1

MAX_OPTION_LENGTH: Final = 64 * 1024
"""Longest option payload accepted; longer ones end the connection."""
MAX_STRING: Final = 4096
"""Longest export name / query string the protocol allows."""
MAX_WRITE_PAYLOAD: Final = 64 * 1024 * 1024
"""Longest WRITE payload read off the wire; longer ones end the connection."""

_OPT_HEADER = struct.Struct(">QII")
_OPT_REPLY = struct.Struct(">QIII")
_REQUEST = struct.Struct(">IHHQQI")
_SIMPLE = struct.Struct(">IIQ")
_STRUCTURED = struct.Struct(">IHHQI")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")


@dataclass(frozen=True)
class ExportInfo:
    """What the handshake needs to know about one export.

    Attributes:
        name: the export name clients ask for.
        size: size in bytes (a multiple of ``min_block``).
        description: free text for NBD_INFO_DESCRIPTION.
        read_only: refuse writes.
        can_flush, can_fua, can_trim, can_zero, can_fast_zero, can_cache,
            can_multi_conn: capabilities of the backend, advertised as
            transmission flags exactly as given.
        min_block, preferred_block, max_block: NBD_INFO_BLOCK_SIZE values.
    """

    name: str
    size: int
    description: str = ""
    read_only: bool = False
    can_flush: bool = True
    can_fua: bool = True
    can_trim: bool = True
    can_zero: bool = True
    can_fast_zero: bool = True
    can_cache: bool = True
    can_multi_conn: bool = False
    min_block: int = 1
    preferred_block: int = 4096
    max_block: int = 32 * 1024 * 1024

    @property
    def transmission_flags(self) -> int:
        """The 16-bit transmission flags advertised for this export."""
        flags = TFLAG_HAS_FLAGS | TFLAG_SEND_DF
        if self.read_only:
            flags |= TFLAG_READ_ONLY
        if self.can_flush:
            flags |= TFLAG_SEND_FLUSH
        if self.can_fua:
            flags |= TFLAG_SEND_FUA
        if self.can_trim and not self.read_only:
            flags |= TFLAG_SEND_TRIM
        if self.can_zero and not self.read_only:
            flags |= TFLAG_SEND_WRITE_ZEROES
            if self.can_fast_zero:
                flags |= TFLAG_SEND_FAST_ZERO
        if self.can_cache:
            flags |= TFLAG_SEND_CACHE
        if self.can_multi_conn:
            flags |= TFLAG_CAN_MULTI_CONN
        return flags


@dataclass
class Negotiated:
    """The outcome of a successful handshake.

    Attributes:
        export: the export chosen by EXPORT_NAME or GO.
        structured_replies: the client asked for structured replies.
        meta_contexts: selected context id -> name (only ``base:allocation``).
        no_zeroes: the client set NBD_FLAG_C_NO_ZEROES.
        tls: the connection was upgraded with STARTTLS.
    """

    export: ExportInfo
    structured_replies: bool
    meta_contexts: dict[int, str]
    no_zeroes: bool
    tls: bool


@dataclass
class HandshakeOutput:
    """What the transport must do after feeding bytes to :class:`Handshake`.

    Attributes:
        send: bytes to write to the client, in order.
        start_tls: after writing ``send``, upgrade the socket to TLS and call
            :meth:`Handshake.tls_established`; feed nothing until then.
        close: after writing ``send``, close the connection.
        done: the handshake finished; enter transmission with this.
        error: why the connection is closing, if it is an error.
    """

    send: bytearray = field(default_factory=bytearray)
    start_tls: bool = False
    close: bool = False
    done: Negotiated | None = None
    error: str | None = None


def greeting() -> bytes:
    """The first bytes the server sends: magics and handshake flags."""
    return struct.pack(">QQH", NBDMAGIC, IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)


def option_reply(option: int, reply_type: int, data: bytes = b"") -> bytes:
    """Encode one option reply.

    Args:
        option: the option being answered.
        reply_type: NBD_REP_*.
        data: reply payload.

    Returns:
        The encoded reply.
    """
    return _OPT_REPLY.pack(REPLY_MAGIC, option, reply_type, len(data)) + data


class Handshake:
    """Server side of the fixed-newstyle handshake, fed bytes incrementally.

    States: ``client_flags`` (waiting for the 32-bit client flags), ``options``
    (option haggling), ``tls_wait`` (STARTTLS acknowledged, waiting for the
    transport), ``done`` and ``closed``.

    Args:
        exports: export name -> info; looked up on every option, so the
            mapping may change while the handshake runs.
        tls_available: STARTTLS can be offered.
        tls_required: refuse everything but STARTTLS/ABORT before TLS.
        default_export: name used when the client asks for "".
    """

    def __init__(self, exports: Mapping[str, ExportInfo], *, tls_available: bool = False,
                 tls_required: bool = False, default_export: str | None = None) -> None:
        if tls_required and not tls_available:
            raise ValueError("tls_required needs tls_available")
        self._exports = exports
        self._tls_available = tls_available
        self._tls_required = tls_required
        self._default_export = default_export
        self._buf = bytearray()
        self.state = "client_flags"
        self._no_zeroes = False
        self._tls = False
        self._structured = False
        self._meta_export: str | None = None
        self._meta: dict[int, str] = {}

    def leftover(self) -> bytes:
        """Bytes received after the handshake ended (the first requests)."""
        data = bytes(self._buf)
        self._buf.clear()
        return data

    def tls_established(self) -> None:
        """The transport finished the TLS handshake; options resume.

        Raises:
            ProtocolError: not waiting for TLS.
        """
        if self.state != "tls_wait":
            raise ProtocolError("TLS established outside STARTTLS")
        self._tls = True
        self._buf.clear()
        # proto.md: STARTTLS resets what was negotiated in plaintext.
        self._structured = False
        self._meta = {}
        self._meta_export = None
        self.state = "options"

    def feed(self, data: bytes) -> HandshakeOutput:
        """Consume client bytes and say what to send and do.

        Args:
            data: bytes just read from the client.

        Returns:
            The actions for the transport.
        """
        out = HandshakeOutput()
        if self.state in ("done", "closed"):
            out.close = self.state == "closed"
            self._buf += data
            return out
        if self.state == "tls_wait":
            # Plaintext after STARTTLS is a client bug (or an injection attack).
            self.state = "closed"
            out.close = True
            out.error = "plaintext data after STARTTLS"
            return out
        self._buf += data
        while self.state in ("client_flags", "options"):
            if self.state == "client_flags":
                if len(self._buf) < 4:
                    break
                (flags,) = _U32.unpack_from(self._buf, 0)
                del self._buf[:4]
                if flags & ~(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES):
                    self._fail(out, f"unknown client flags {flags:#x}")
                    break
                self._no_zeroes = bool(flags & FLAG_C_NO_ZEROES)
                self.state = "options"
                continue
            if len(self._buf) < _OPT_HEADER.size:
                break
            magic, option, length = _OPT_HEADER.unpack_from(self._buf, 0)
            if magic != IHAVEOPT:
                self._fail(out, f"bad option magic {magic:#x}")
                break
            if length > MAX_OPTION_LENGTH:
                self._fail(out, f"option {option} payload of {length} bytes is too big")
                break
            if len(self._buf) < _OPT_HEADER.size + length:
                break
            payload = bytes(self._buf[_OPT_HEADER.size:_OPT_HEADER.size + length])
            del self._buf[:_OPT_HEADER.size + length]
            self._option(option, payload, out)
        return out

    # --- internals ------------------------------------------------------------

    def _fail(self, out: HandshakeOutput, why: str) -> None:
        self.state = "closed"
        out.close = True
        out.error = why

    def _lookup(self, name: str) -> ExportInfo | None:
        if name == "" and self._default_export is not None:
            name = self._default_export
        return self._exports.get(name)

    def _option(self, option: int, payload: bytes, out: HandshakeOutput) -> None:
        send = out.send
        if self._tls_required and not self._tls and option not in (OPT_STARTTLS, OPT_ABORT):
            if option == OPT_EXPORT_NAME:
                self._fail(out, "EXPORT_NAME before STARTTLS on a TLS-only server")
            else:
                send += option_reply(option, REP_ERR_TLS_REQD, b"TLS required")
            return
        if option == OPT_EXPORT_NAME:
            self._export_name(payload, out)
        elif option == OPT_ABORT:
            send += option_reply(option, REP_ACK)
            self.state = "closed"
            out.close = True
        elif option == OPT_LIST:
            if payload:
                send += option_reply(option, REP_ERR_INVALID, b"LIST takes no data")
                return
            for name in list(self._exports):
                raw = name.encode()
                send += option_reply(option, REP_SERVER, _U32.pack(len(raw)) + raw)
            send += option_reply(option, REP_ACK)
        elif option == OPT_STARTTLS:
            if payload:
                send += option_reply(option, REP_ERR_INVALID, b"STARTTLS takes no data")
            elif self._tls:
                send += option_reply(option, REP_ERR_INVALID, b"TLS already active")
            elif not self._tls_available:
                send += option_reply(option, REP_ERR_POLICY, b"TLS not configured")
            else:
                send += option_reply(option, REP_ACK)
                self.state = "tls_wait"
                out.start_tls = True
        elif option in (OPT_INFO, OPT_GO):
            self._info_go(option, payload, out)
        elif option == OPT_STRUCTURED_REPLY:
            if payload:
                send += option_reply(option, REP_ERR_INVALID, b"STRUCTURED_REPLY takes no data")
            else:
                self._structured = True
                send += option_reply(option, REP_ACK)
        elif option in (OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT):
            self._meta_context(option, payload, out)
        else:
            send += option_reply(option, REP_ERR_UNSUP, b"unsupported option")

    def _export_name(self, payload: bytes, out: HandshakeOutput) -> None:
        try:
            name = payload.decode()
        except UnicodeDecodeError:
            self._fail(out, "export name is not UTF-8")
            return
        export = self._lookup(name)
        if export is None:
            # EXPORT_NAME has no error reply; the server must close.
            self._fail(out, f"unknown export {name!r}")
            return
        out.send += _U64.pack(export.size) + _U16.pack(export.transmission_flags)
        if not self._no_zeroes:
            out.send += bytes(124)
        self._finish(export, name, out)

    def _finish(self, export: ExportInfo, name: str, out: HandshakeOutput) -> None:
        meta = self._meta if self._meta_export == name else {}
        self.state = "done"
        out.done = Negotiated(export=export, structured_replies=self._structured,
                              meta_contexts=dict(meta), no_zeroes=self._no_zeroes, tls=self._tls)

    def _info_go(self, option: int, payload: bytes, out: HandshakeOutput) -> None:
        send = out.send
        parsed = _parse_name_and_u16_list(payload)
        if parsed is None:
            send += option_reply(option, REP_ERR_INVALID, b"malformed INFO/GO request")
            return
        name, requests = parsed
        export = self._lookup(name)
        if export is None:
            send += option_reply(option, REP_ERR_UNKNOWN, b"unknown export")
            return
        info = _U16.pack(INFO_EXPORT) + _U64.pack(export.size) + _U16.pack(export.transmission_flags)
        send += option_reply(option, REP_INFO, info)
        for request in dict.fromkeys(requests):
            if request == INFO_NAME:
                send += option_reply(option, REP_INFO, _U16.pack(INFO_NAME) + export.name.encode())
            elif request == INFO_DESCRIPTION and export.description:
                send += option_reply(option, REP_INFO,
                                     _U16.pack(INFO_DESCRIPTION) + export.description.encode())
        if INFO_BLOCK_SIZE in requests:
            send += option_reply(option, REP_INFO, struct.pack(
                ">HIII", INFO_BLOCK_SIZE, export.min_block, export.preferred_block,
                export.max_block))
        elif option == OPT_INFO and export.min_block > 1:
            # Like qemu-nbd: INFO may insist; GO tolerates every client.
            send += option_reply(option, REP_ERR_BLOCK_SIZE_REQD, b"request NBD_INFO_BLOCK_SIZE")
            return
        send += option_reply(option, REP_ACK)
        if option == OPT_GO:
            self._finish(export, name, out)

    def _meta_context(self, option: int, payload: bytes, out: HandshakeOutput) -> None:
        send = out.send
        if option == OPT_SET_META_CONTEXT and not self._structured:
            send += option_reply(option, REP_ERR_INVALID, b"structured replies not negotiated")
            return
        parsed = _parse_meta_request(payload)
        if parsed is None:
            send += option_reply(option, REP_ERR_INVALID, b"malformed meta context request")
            return
        name, queries = parsed
        if self._lookup(name) is None:
            send += option_reply(option, REP_ERR_UNKNOWN, b"unknown export")
            return
        if option == OPT_LIST_META_CONTEXT:
            matches = (not queries) or any(q in ("base:", BASE_ALLOCATION) for q in queries)
        else:
            matches = BASE_ALLOCATION in queries
            self._meta = {BASE_ALLOCATION_ID: BASE_ALLOCATION} if matches else {}
            self._meta_export = name
        if matches:
            send += option_reply(option, REP_META_CONTEXT,
                                 _U32.pack(BASE_ALLOCATION_ID) + BASE_ALLOCATION.encode())
        send += option_reply(option, REP_ACK)


def _parse_name_and_u16_list(payload: bytes) -> tuple[str, list[int]] | None:
    """Parse INFO/GO data: u32 name length, name, u16 count, u16 requests."""
    if len(payload) < 4:
        return None
    (nlen,) = _U32.unpack_from(payload, 0)
    if nlen > MAX_STRING or len(payload) < 4 + nlen + 2:
        return None
    try:
        name = payload[4:4 + nlen].decode()
    except UnicodeDecodeError:
        return None
    (count,) = _U16.unpack_from(payload, 4 + nlen)
    rest = payload[4 + nlen + 2:]
    if len(rest) != 2 * count:
        return None
    return name, [v for (v,) in struct.iter_unpack(">H", rest)]


def _parse_meta_request(payload: bytes) -> tuple[str, list[str]] | None:
    """Parse (LIST|SET)_META_CONTEXT data: name then u32 count of u32-length strings."""
    if len(payload) < 8:
        return None
    (nlen,) = _U32.unpack_from(payload, 0)
    if nlen > MAX_STRING or len(payload) < 4 + nlen + 4:
        return None
    try:
        name = payload[4:4 + nlen].decode()
    except UnicodeDecodeError:
        return None
    pos = 4 + nlen
    (count,) = _U32.unpack_from(payload, pos)
    pos += 4
    queries = []
    for _ in range(count):
        if len(payload) < pos + 4:
            return None
        (qlen,) = _U32.unpack_from(payload, pos)
        pos += 4
        if qlen > MAX_STRING or len(payload) < pos + qlen:
            return None
        try:
            queries.append(payload[pos:pos + qlen].decode())
        except UnicodeDecodeError:
            return None
        pos += qlen
    if pos != len(payload):
        return None
    return name, queries


# --- transmission phase ---------------------------------------------------


@dataclass(slots=True)
class Request:
    """One transmission-phase request.

    Attributes:
        flags: NBD_CMD_FLAG_* bits.
        command: NBD_CMD_*.
        cookie: the client's opaque handle, echoed in the reply.
        offset: byte offset.
        length: byte count (payload length for WRITE).
        payload: WRITE data (``length`` bytes), else empty.
    """

    flags: int
    command: int
    cookie: int
    offset: int
    length: int
    payload: bytes | bytearray | memoryview = b""


class RequestParser:
    """Incremental parser of transmission-phase requests.

    Feed received bytes with :meth:`feed`; it returns every complete request.
    A WRITE's payload is collected before the request is returned. A request
    with a bad magic, or a WRITE longer than :data:`MAX_WRITE_PAYLOAD`, is a
    framing error the stream cannot recover from: :class:`ProtocolError`.
    """

    __slots__ = ("_buf", "_pending")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._pending: Request | None = None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as requests."""
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> list[Request]:
        """Consume bytes, return the requests they complete.

        Args:
            data: bytes just received.

        Returns:
            Complete requests, in arrival order.

        Raises:
            ProtocolError: the stream is not valid NBD framing.
        """
        buf = self._buf
        buf += data
        out: list[Request] = []
        pos = 0
        end = len(buf)
        unpack = _REQUEST.unpack_from
        while True:
            pending = self._pending
            if pending is not None:
                need = pending.length
                if end - pos < need:
                    break
                pending.payload = bytes(buf[pos:pos + need])
                pos += need
                out.append(pending)
                self._pending = None
                continue
            if end - pos < 28:
                break
            magic, flags, command, cookie, offset, length = unpack(buf, pos)
            if magic != REQUEST_MAGIC:
                del buf[:pos]
                raise ProtocolError(f"bad request magic {magic:#x}")
            pos += 28
            request = Request(flags, command, cookie, offset, length)
            if command == CMD_WRITE and length:
                if length > MAX_WRITE_PAYLOAD:
                    del buf[:pos]
                    raise ProtocolError(f"write of {length} bytes exceeds {MAX_WRITE_PAYLOAD}")
                self._pending = request
                continue
            out.append(request)
        if pos:
            del buf[:pos]
        return out


_KNOWN_FLAGS = {
    CMD_READ: CMD_FLAG_FUA | CMD_FLAG_DF,
    CMD_WRITE: CMD_FLAG_FUA,
    CMD_DISC: CMD_FLAG_FUA,
    CMD_FLUSH: CMD_FLAG_FUA,
    CMD_TRIM: CMD_FLAG_FUA,
    CMD_CACHE: CMD_FLAG_FUA,
    CMD_WRITE_ZEROES: CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
    CMD_BLOCK_STATUS: CMD_FLAG_FUA | CMD_FLAG_REQ_ONE,
}


def check_request(request: Request, negotiated: Negotiated) -> int:
    """Validate a request against the negotiated export.

    Args:
        request: the parsed request.
        negotiated: the handshake outcome.

    Returns:
        0 when the request may be executed, else the NBD errno to reply with.
    """
    export = negotiated.export
    command = request.command
    allowed = _KNOWN_FLAGS.get(command)
    if allowed is None:
        return EINVAL
    if request.flags & ~allowed:
        return EINVAL
    if request.flags & CMD_FLAG_DF and not negotiated.structured_replies:
        return EINVAL
    if command == CMD_FLUSH:
        return 0 if request.offset == 0 and request.length == 0 else EINVAL
    if command == CMD_DISC:
        return 0
    if command in (CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES) and export.read_only:
        return EPERM
    if command == CMD_WRITE_ZEROES and (request.flags & CMD_FLAG_FAST_ZERO
                                        and not export.can_fast_zero):
        return ENOTSUP
    if command == CMD_BLOCK_STATUS:
        if not negotiated.meta_contexts:
            return EINVAL
        if request.length == 0:
            return EINVAL
    if request.offset + request.length > export.size:
        return ENOSPC if command in (CMD_WRITE, CMD_WRITE_ZEROES) else EINVAL
    if request.length > export.max_block and command in (CMD_READ, CMD_WRITE):
        return EOVERFLOW if command == CMD_READ else EINVAL
    return 0


def simple_reply(cookie: int, error: int = 0) -> bytes:
    """Encode a simple reply header (READ data follows it on the wire).

    Args:
        cookie: the request's cookie.
        error: NBD errno, 0 for success.

    Returns:
        The 16-byte header.
    """
    return _SIMPLE.pack(SIMPLE_REPLY_MAGIC, error, cookie)


def structured_header(cookie: int, reply_type: int, length: int, *, done: bool) -> bytes:
    """Encode a structured reply chunk header.

    Args:
        cookie: the request's cookie.
        reply_type: NBD_REPLY_TYPE_*.
        length: payload length that follows the header.
        done: this is the last chunk of the reply.

    Returns:
        The 20-byte header.
    """
    return _STRUCTURED.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE if done else 0,
                            reply_type, cookie, length)


def structured_done(cookie: int) -> bytes:
    """A NONE chunk with the DONE flag: success without data."""
    return structured_header(cookie, REPLY_TYPE_NONE, 0, done=True)


def structured_data_header(cookie: int, offset: int, length: int, *, done: bool) -> bytes:
    """Header plus offset of an OFFSET_DATA chunk (``length`` data bytes follow)."""
    return structured_header(cookie, REPLY_TYPE_OFFSET_DATA, 8 + length, done=done) + \
        _U64.pack(offset)


def structured_hole(cookie: int, offset: int, length: int, *, done: bool) -> bytes:
    """An OFFSET_HOLE chunk: ``length`` zero bytes at ``offset``."""
    return structured_header(cookie, REPLY_TYPE_OFFSET_HOLE, 12, done=done) + \
        struct.pack(">QI", offset, length)


def structured_error(cookie: int, error: int, message: str = "") -> bytes:
    """An ERROR chunk with the DONE flag.

    Args:
        cookie: the request's cookie.
        error: NBD errno (non-zero).
        message: human-readable text (truncated to the protocol's limit).

    Returns:
        The encoded chunk.
    """
    raw = message.encode()[:MAX_STRING]
    return structured_header(cookie, REPLY_TYPE_ERROR, 6 + len(raw), done=True) + \
        struct.pack(">IH", error, len(raw)) + raw


def structured_block_status(cookie: int, context_id: int,
                            extents: list[tuple[int, int]], *, done: bool = True) -> bytes:
    """A BLOCK_STATUS chunk.

    Args:
        cookie: the request's cookie.
        context_id: the negotiated meta context id.
        extents: (length, flags) descriptors in offset order.
        done: this is the last chunk.

    Returns:
        The encoded chunk.
    """
    body = bytearray(_U32.pack(context_id))
    for length, flags in extents:
        body += struct.pack(">II", length, flags)
    return structured_header(cookie, REPLY_TYPE_BLOCK_STATUS, len(body), done=done) + bytes(body)


def clip_extents(extents: list[tuple[int, int]], length: int, *,
                 req_one: bool) -> list[tuple[int, int]]:
    """Trim (length, flags) extents so they cover at most ``length`` bytes.

    Adjacent extents with equal flags are merged; zero-length ones dropped.

    Args:
        extents: descriptors starting at the request offset.
        length: the request length.
        req_one: NBD_CMD_FLAG_REQ_ONE: return a single descriptor.

    Returns:
        The clipped list (non-empty when ``length`` > 0 and extents cover
        at least one byte).
    """
    out: list[tuple[int, int]] = []
    left = length
    for ext_len, flags in extents:
        if left <= 0:
            break
        if ext_len <= 0:
            continue
        take = min(ext_len, left, 0xFFFFFFFF)
        if out and out[-1][1] == flags and out[-1][0] + take <= 0xFFFFFFFF:
            out[-1] = (out[-1][0] + take, flags)
        else:
            out.append((take, flags))
        left -= take
    if req_one:
        out = out[:1]
    return out

