"""The peer blob protocol: a pure encoder/decoder, no I/O.

One connection carries many requests at once (pipelined); each frame names its
request, so answers may come back in any order.

Frame (both directions; integers big-endian)::

    u32 length      bytes after this field (header rest + payload), >= 12
    u8  opcode      :class:`Op`
    u8  status      :class:`Status` in responses, 0 in requests
    u16 reserved    0
    u64 request id  chosen by the client, echoed in the response
    ... payload     per opcode, below

Payload pieces: ``ns`` = u8 kind (:class:`NsKind`) + u8 name length (1..255) +
UTF-8 name; ``key``/``version`` = u64; ``blob`` = u32 length + bytes;
``count`` = u32.

=========  =====================================  ====================================
opcode     request                                response (status OK)
=========  =====================================  ====================================
PING       (empty)                                u64 server monotonic ns
STAT       (empty)                                name, 6 x u64, [u16 data port]
                                                  (see :class:`StatInfo`)
PUT        ns key version blob                    (empty); FULL / STALE
GET        ns key                                 version blob; NOT_FOUND
DELETE     ns count key*                          count (deleted)
BATCH_GET  ns count key*                          count (u8 found, version, blob)*
BATCH_PUT  ns count (key version blob)*           count u8-status*; FULL (none stored)
LIST       ns after(u64) limit(u32) first(u8)     count (key version)* u8 more
DROP_NS    ns                                     u64 dropped
LIST_NS    (empty)                                count (ns u64 keys u64 bytes)*
=========  =====================================  ====================================

Every namespace belongs to the cluster member whose certificate created it
(its first PUT); any other member's request naming it is answered FORBIDDEN,
and LIST_NS lists only the caller's own namespaces. PING and STAT are open to
every member.

A request whose bytes do not parse gets a BAD_REQUEST response (when its
header was readable) and the connection is closed: after malformed bytes the
stream position cannot be trusted.

Opcode 0x18 (FRAMES, empty request and answer) exists only between the C
clients and a node's data port: after its OK both ends carry the stream in
AES-GCM frames keyed from the TLS session (native/peerclient/pc_frames.c,
docs/architecture.md). This module and the main port do not speak it; to
them it is an unknown opcode.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

from hypervisor.errors import ProtocolError

HEADER = struct.Struct(">IBBHQ")
HEADER_SIZE = HEADER.size  # 16
MIN_LENGTH = HEADER_SIZE - 4
MAX_BLOB = 16 << 20
MAX_FRAME = 64 << 20
MAX_BATCH = 4096
MAX_LIST = 65536

_U8 = struct.Struct(">B")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_U64U64 = struct.Struct(">QQ")
_ITEM_HEAD = struct.Struct(">QQI")
_GET_HEAD = struct.Struct(">QI")
_FOUND_HEAD = struct.Struct(">BQI")
_LIST_REQ = struct.Struct(">QIB")
_STAT = struct.Struct(">6Q")


class Op(IntEnum):
    """Operation codes."""

    PING = 0x01
    STAT = 0x02
    PUT = 0x10
    GET = 0x11
    DELETE = 0x12
    BATCH_GET = 0x13
    BATCH_PUT = 0x14
    LIST = 0x15
    DROP_NS = 0x16
    LIST_NS = 0x17


class Status(IntEnum):
    """Response status codes."""

    OK = 0
    NOT_FOUND = 1
    FULL = 2
    STALE = 3
    BAD_REQUEST = 4
    INTERNAL = 5
    SHUTTING_DOWN = 6
    FORBIDDEN = 7      # the namespace belongs to another cluster member


class NsKind(IntEnum):
    """Namespace kinds: where a peer keeps the blobs."""

    PAGE = 0   # RAM, bounded by --memory-lend
    CHUNK = 1  # disk, bounded by --disk-lend


_OPS = frozenset(int(o) for o in Op)
_STATUSES = frozenset(int(s) for s in Status)


@dataclass(frozen=True, slots=True)
class Namespace:
    """A namespace on a peer: its kind and an owner-chosen name (e.g. a VM id).

    Attributes:
        kind: page (RAM) or chunk (disk).
        name: 1..255 bytes of UTF-8, no ``/`` or NUL, not starting with ``.``.
    """

    kind: NsKind
    name: str

    def __post_init__(self) -> None:
        raw = self.name.encode("utf-8", "surrogatepass") if isinstance(self.name, str) else b""
        if not isinstance(self.name, str) or not 1 <= len(raw) <= 255 or "/" in self.name \
                or "\0" in self.name or self.name.startswith("."):
            raise ProtocolError(f"bad namespace name {self.name!r}")
        if int(self.kind) not in (0, 1):
            raise ProtocolError(f"bad namespace kind {self.kind!r}")
        object.__setattr__(self, "kind", NsKind(self.kind))

    @classmethod
    def page(cls, name: str) -> Namespace:
        """A page (RAM) namespace."""
        return cls(NsKind.PAGE, name)

    @classmethod
    def chunk(cls, name: str) -> Namespace:
        """A chunk (disk) namespace."""
        return cls(NsKind.CHUNK, name)

    def __str__(self) -> str:
        return f"{self.kind.name.lower()}:{self.name}"


@dataclass(slots=True)
class Frame:
    """One decoded frame (header fields and the raw payload).

    Frames and requests are plain (not frozen) dataclasses: a frozen one costs
    four times as much to build, and one is built per request on the hot path.
    """

    op: int
    status: int
    request_id: int
    payload: bytes


@dataclass(slots=True)
class Item:
    """A key with its version and blob."""

    key: int
    version: int
    blob: bytes


@dataclass(slots=True)
class StatInfo:
    """A peer's capacity and use (bytes; counts)."""

    name: str
    memory_capacity: int
    memory_used: int
    disk_capacity: int
    disk_used: int
    pages: int
    chunks: int
    page_port: int = 0  # the data port (native/peer; pages and chunks), 0: none


@dataclass(slots=True)
class NsInfo:
    """One namespace on a peer, with how many keys and bytes it holds."""

    ns: Namespace
    keys: int
    bytes: int


# Requests ------------------------------------------------------------------


@dataclass(slots=True)
class Ping:
    """PING request."""


@dataclass(slots=True)
class Stat:
    """STAT request."""


@dataclass(slots=True)
class Put:
    """PUT request."""

    ns: Namespace
    item: Item


@dataclass(slots=True)
class Get:
    """GET request."""

    ns: Namespace
    key: int


@dataclass(slots=True)
class Delete:
    """DELETE request."""

    ns: Namespace
    keys: tuple[int, ...]


@dataclass(slots=True)
class BatchGet:
    """BATCH_GET request."""

    ns: Namespace
    keys: tuple[int, ...]


@dataclass(slots=True)
class BatchPut:
    """BATCH_PUT request."""

    ns: Namespace
    items: tuple[Item, ...]


@dataclass(slots=True)
class ListKeys:
    """LIST request: keys greater than ``after`` (or from the start when ``first``)."""

    ns: Namespace
    after: int
    limit: int
    first: bool


@dataclass(slots=True)
class DropNs:
    """DROP_NS request."""

    ns: Namespace


@dataclass(slots=True)
class ListNs:
    """LIST_NS request."""


Request = Ping | Stat | Put | Get | Delete | BatchGet | BatchPut | ListKeys | DropNs | ListNs

_OP_OF = {Ping: Op.PING, Stat: Op.STAT, Put: Op.PUT, Get: Op.GET, Delete: Op.DELETE,
          BatchGet: Op.BATCH_GET, BatchPut: Op.BATCH_PUT, ListKeys: Op.LIST, DropNs: Op.DROP_NS,
          ListNs: Op.LIST_NS}


# Low-level pieces -------------------------------------------------------------


class _Reader:
    """A cursor over a payload; every short read is a ProtocolError."""

    __slots__ = ("buf", "pos")

    def __init__(self, buf: bytes) -> None:
        self.buf = buf
        self.pos = 0

    def take(self, n: int) -> bytes:
        end = self.pos + n
        if end > len(self.buf):
            raise ProtocolError(f"payload truncated (wanted {n} bytes at {self.pos}, "
                                f"have {len(self.buf) - self.pos})")
        out = self.buf[self.pos:end]
        self.pos = end
        return out

    def unpack(self, st: struct.Struct) -> tuple:
        end = self.pos + st.size
        if end > len(self.buf):
            raise ProtocolError("payload truncated")
        out = st.unpack_from(self.buf, self.pos)
        self.pos = end
        return out

    def ns(self) -> Namespace:
        kind, n = self.unpack(_NS_HEAD)
        raw = self.take(n)
        cached = _NS_CACHE.get((kind, raw))
        if cached is not None:
            return cached
        if kind not in (0, 1):
            raise ProtocolError(f"unknown namespace kind {kind}")
        try:
            name = bytes(raw).decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError("namespace name is not UTF-8") from None
        ns = Namespace(NsKind(kind), name)
        if len(_NS_CACHE) >= _NS_CACHE_MAX:
            _NS_CACHE.clear()
        _NS_CACHE[(kind, raw)] = ns
        return ns

    def count(self, limit: int) -> int:
        (n,) = self.unpack(_U32)
        if n > limit:
            raise ProtocolError(f"count {n} exceeds the limit {limit}")
        return n

    def blob(self) -> bytes:
        (n,) = self.unpack(_U32)
        if n > MAX_BLOB:
            raise ProtocolError(f"blob of {n} bytes exceeds the limit {MAX_BLOB}")
        return bytes(self.take(n))

    def end(self) -> None:
        if self.pos != len(self.buf):
            raise ProtocolError(f"{len(self.buf) - self.pos} trailing bytes in payload")


_NS_HEAD = struct.Struct(">BB")
# Decoding a namespace (UTF-8, validation) costs more than the rest of a GET;
# the same few namespaces recur on every request, so decoded ones are kept.
_NS_CACHE: dict[tuple[int, bytes], Namespace] = {}
_NS_CACHE_MAX = 4096
_NS_BYTES: dict[Namespace, bytes] = {}


def _ns_bytes(ns: Namespace) -> bytes:
    out = _NS_BYTES.get(ns)
    if out is None:
        raw = ns.name.encode("utf-8")
        out = _NS_HEAD.pack(int(ns.kind), len(raw)) + raw
        if len(_NS_BYTES) >= _NS_CACHE_MAX:
            _NS_BYTES.clear()
        _NS_BYTES[ns] = out
    return out


def encode_namespace(ns: Namespace) -> bytes:
    """Return a namespace as it is encoded in requests (kind, length, name)."""
    return _ns_bytes(ns)


def _check_u64(*values: int) -> None:
    for v in values:
        if not 0 <= v < 1 << 64:
            raise ProtocolError(f"value {v} is not a u64")


def _check_blob(blob: bytes) -> None:
    if len(blob) > MAX_BLOB:
        raise ProtocolError(f"blob of {len(blob)} bytes exceeds the limit {MAX_BLOB}")


def encode_frame(op: int, request_id: int, payload: bytes = b"", *, status: int = 0) -> bytes:
    """Encode one frame.

    Args:
        op: the opcode.
        request_id: the request id (u64).
        payload: the payload bytes.
        status: the status (responses only).

    Returns:
        The frame's bytes.

    Raises:
        ProtocolError: the frame would exceed :data:`MAX_FRAME`.
    """
    length = MIN_LENGTH + len(payload)
    if length > MAX_FRAME:
        raise ProtocolError(f"frame of {length} bytes exceeds the limit {MAX_FRAME}")
    return HEADER.pack(length, op, status, 0, request_id) + payload


class FrameDecoder:
    """Splits a byte stream into frames. Feed it whatever the socket gave.

    Raises ProtocolError (and stays broken) on an impossible header: the stream
    cannot be resynchronised after that.
    """

    __slots__ = ("_buf", "_max_frame", "_responses")

    def __init__(self, *, max_frame: int = MAX_FRAME, responses: bool = False) -> None:
        """Create a decoder.

        Args:
            max_frame: the largest ``length`` accepted.
            responses: whether frames are responses (status must be known) or
                requests (status must be 0).
        """
        self._buf = bytearray()
        self._max_frame = max_frame
        self._responses = responses

    @property
    def buffered(self) -> int:
        """Bytes received but not yet part of a whole frame."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[Frame]:
        """Add bytes; return every frame now complete.

        Args:
            data: bytes from the stream.

        Returns:
            Complete frames, in order.

        Raises:
            ProtocolError: a header is malformed (bad length, opcode, status or reserved field).
        """
        buf = self._buf
        if not buf and len(data) >= HEADER_SIZE:
            # Fast path: nothing buffered and ``data`` is exactly one whole frame
            # (one answer per read is the common case of a page fault).
            length, op, status, reserved, rid = HEADER.unpack_from(data, 0)
            if length + 4 == len(data) and MIN_LENGTH <= length <= self._max_frame \
                    and op in _OPS and not reserved and (
                        status in _STATUSES if self._responses else not status):
                return [Frame(op, status, rid, bytes(data[HEADER_SIZE:]))]
        buf += data
        frames: list[Frame] = []
        pos = 0
        n = len(buf)
        while n - pos >= HEADER_SIZE:
            length, op, status, reserved, rid = HEADER.unpack_from(buf, pos)
            if length < MIN_LENGTH or length > self._max_frame:
                raise ProtocolError(f"frame length {length} out of range")
            if op not in _OPS:
                raise ProtocolError(f"unknown opcode {op:#x}")
            if reserved:
                raise ProtocolError("reserved header field is not zero")
            if self._responses:
                if status not in _STATUSES:
                    raise ProtocolError(f"unknown status {status}")
            elif status:
                raise ProtocolError("request with a non-zero status")
            end = pos + 4 + length
            if end > n:
                break
            # One copy out of the buffer (slicing the bytearray first would
            # make two: megabytes per BATCH_PUT frame).
            with memoryview(buf) as view:
                payload = bytes(view[pos + HEADER_SIZE:end])
            frames.append(Frame(op, status, rid, payload))
            pos = end
        if pos:
            del buf[:pos]
        return frames


# Requests: encode / decode ----------------------------------------------------


def encode_request(request_id: int, req: Request) -> bytes:
    """Encode a request frame.

    Args:
        request_id: the id the response will carry.
        req: the request.

    Returns:
        The frame's bytes.

    Raises:
        ProtocolError: a field is out of range (u64, blob size, batch size).
    """
    if type(req) is Get:  # the hot path
        nsb = _ns_bytes(req.ns)
        if not 0 <= req.key < 1 << 64:
            raise ProtocolError(f"value {req.key} is not a u64")
        return b"".join((HEADER.pack(MIN_LENGTH + len(nsb) + 8, Op.GET, 0, 0, request_id), nsb,
                         _U64.pack(req.key)))
    op = _OP_OF[type(req)]
    if op in (Op.PING, Op.STAT, Op.LIST_NS):
        return encode_frame(op, request_id)
    parts: list[bytes] = [_ns_bytes(req.ns)]
    if op is Op.PUT:
        it = req.item
        _check_u64(it.key, it.version)
        _check_blob(it.blob)
        parts += [_ITEM_HEAD.pack(it.key, it.version, len(it.blob)), it.blob]
    elif op is Op.GET:
        _check_u64(req.key)
        parts.append(_U64.pack(req.key))
    elif op in (Op.DELETE, Op.BATCH_GET):
        if len(req.keys) > MAX_BATCH:
            raise ProtocolError(f"more than {MAX_BATCH} keys in one request")
        _check_u64(*req.keys)
        parts += [_U32.pack(len(req.keys)), struct.pack(f">{len(req.keys)}Q", *req.keys)]
    elif op is Op.BATCH_PUT:
        if len(req.items) > MAX_BATCH:
            raise ProtocolError(f"more than {MAX_BATCH} items in one request")
        parts.append(_U32.pack(len(req.items)))
        for it in req.items:
            _check_u64(it.key, it.version)
            _check_blob(it.blob)
            parts += [_ITEM_HEAD.pack(it.key, it.version, len(it.blob)), it.blob]
    elif op is Op.LIST:
        _check_u64(req.after)
        if not 1 <= req.limit <= MAX_LIST:
            raise ProtocolError(f"list limit must be in 1..{MAX_LIST}")
        parts.append(_LIST_REQ.pack(req.after, req.limit, 1 if req.first else 0))
    return encode_frame(op, request_id, b"".join(parts))


def decode_request(frame: Frame) -> Request:
    """Decode a request frame's payload.

    Args:
        frame: a frame from a request stream.

    Returns:
        The request.

    Raises:
        ProtocolError: the payload does not match the opcode.
    """
    r = _Reader(frame.payload)
    op = frame.op
    req: Request
    if op == Op.PING:
        req = Ping()
    elif op == Op.STAT:
        req = Stat()
    elif op == Op.LIST_NS:
        req = ListNs()
    else:
        ns = r.ns()
        if op == Op.GET:  # the hot path: one page fault
            req = Get(ns, r.unpack(_U64)[0])
        elif op == Op.PUT:
            key, version, n = r.unpack(_ITEM_HEAD)
            if n > MAX_BLOB:
                raise ProtocolError(f"blob of {n} bytes exceeds the limit {MAX_BLOB}")
            req = Put(ns, Item(key, version, bytes(r.take(n))))
        elif op in (Op.DELETE, Op.BATCH_GET):
            n = r.count(MAX_BATCH)
            keys = struct.unpack(f">{n}Q", r.take(8 * n))
            req = Delete(ns, keys) if op == Op.DELETE else BatchGet(ns, keys)
        elif op == Op.BATCH_PUT:
            n = r.count(MAX_BATCH)
            items = []
            for _ in range(n):
                key, version, size = r.unpack(_ITEM_HEAD)
                if size > MAX_BLOB:
                    raise ProtocolError(f"blob of {size} bytes exceeds the limit {MAX_BLOB}")
                items.append(Item(key, version, bytes(r.take(size))))
            req = BatchPut(ns, tuple(items))
        elif op == Op.LIST:
            after, limit, first = r.unpack(_LIST_REQ)
            if not 1 <= limit <= MAX_LIST or first > 1:
                raise ProtocolError("bad LIST request")
            req = ListKeys(ns, after, limit, bool(first))
        elif op == Op.DROP_NS:
            req = DropNs(ns)
        else:  # pragma: no cover - FrameDecoder only yields known opcodes
            raise ProtocolError(f"unknown opcode {op:#x}")
    r.end()
    return req


# Responses: encode / decode ---------------------------------------------------


def encode_response(op: int, request_id: int, status: int = Status.OK,
                    payload: bytes = b"") -> bytes:
    """Encode a response frame (see the per-opcode ``*_payload`` helpers)."""
    return encode_frame(op, request_id, payload, status=status)


def get_payload(version: int, blob: bytes) -> bytes:
    """GET response payload."""
    return _GET_HEAD.pack(version, len(blob)) + blob


def decode_get(payload: bytes) -> tuple[int, bytes]:
    """Decode a GET response payload into ``(version, blob)``."""
    if len(payload) >= _GET_HEAD.size:
        version, n = _GET_HEAD.unpack_from(payload)
        if n == len(payload) - _GET_HEAD.size and n <= MAX_BLOB:
            return version, payload[_GET_HEAD.size:]
    r = _Reader(payload)
    version, n = r.unpack(_GET_HEAD)
    if n > MAX_BLOB:
        raise ProtocolError(f"blob of {n} bytes exceeds the limit {MAX_BLOB}")
    blob = bytes(r.take(n))
    r.end()
    return version, blob


def u64_payload(value: int) -> bytes:
    """A payload of one u64 (PING, DROP_NS)."""
    return _U64.pack(value)


def decode_u64(payload: bytes) -> int:
    """Decode a one-u64 payload."""
    r = _Reader(payload)
    (v,) = r.unpack(_U64)
    r.end()
    return v


def count_payload(n: int) -> bytes:
    """A payload of one u32 count (DELETE)."""
    return _U32.pack(n)


def decode_count(payload: bytes) -> int:
    """Decode a one-u32 payload."""
    r = _Reader(payload)
    (v,) = r.unpack(_U32)
    r.end()
    return v


def batch_get_payload(found: list[tuple[int, bytes] | None]) -> bytes:
    """BATCH_GET response payload: per key, ``(version, blob)`` or None."""
    parts = [_U32.pack(len(found))]
    for entry in found:
        if entry is None:
            parts.append(_FOUND_HEAD.pack(0, 0, 0))
        else:
            parts += [_FOUND_HEAD.pack(1, entry[0], len(entry[1])), entry[1]]
    return b"".join(parts)


def decode_batch_get(payload: bytes) -> list[tuple[int, bytes] | None]:
    """Decode a BATCH_GET response payload."""
    r = _Reader(payload)
    n = r.count(MAX_BATCH)
    out: list[tuple[int, bytes] | None] = []
    for _ in range(n):
        found, version, size = r.unpack(_FOUND_HEAD)
        if found > 1 or size > MAX_BLOB or (not found and (version or size)):
            raise ProtocolError("bad BATCH_GET entry")
        out.append((version, bytes(r.take(size))) if found else None)
    r.end()
    return out


def statuses_payload(statuses: list[int]) -> bytes:
    """BATCH_PUT response payload: one status per item."""
    return _U32.pack(len(statuses)) + bytes(statuses)


def decode_statuses(payload: bytes) -> list[Status]:
    """Decode a BATCH_PUT response payload."""
    r = _Reader(payload)
    n = r.count(MAX_BATCH)
    raw = r.take(n)
    r.end()
    try:
        return [Status(b) for b in raw]
    except ValueError:
        raise ProtocolError("unknown item status in BATCH_PUT response") from None


def list_payload(entries: list[tuple[int, int]], more: bool) -> bytes:
    """LIST response payload: ``(key, version)`` pairs and whether more follow."""
    flat = [v for kv in entries for v in kv]
    return _U32.pack(len(entries)) + struct.pack(f">{len(flat)}Q", *flat) + _U8.pack(int(more))


def decode_list(payload: bytes) -> tuple[list[tuple[int, int]], bool]:
    """Decode a LIST response payload into ``(entries, more)``."""
    r = _Reader(payload)
    n = r.count(MAX_LIST)
    flat = struct.unpack(f">{2 * n}Q", r.take(16 * n))
    (more,) = r.unpack(_U8)
    r.end()
    if more > 1:
        raise ProtocolError("bad LIST 'more' flag")
    return list(zip(flat[0::2], flat[1::2])), bool(more)


def stat_payload(info: StatInfo) -> bytes:
    """STAT response payload."""
    name = info.name.encode("utf-8")[:255]
    return _U8.pack(len(name)) + name + _STAT.pack(
        info.memory_capacity, info.memory_used, info.disk_capacity, info.disk_used,
        info.pages, info.chunks) + _U16.pack(info.page_port)


def decode_stat(payload: bytes) -> StatInfo:
    """Decode a STAT response payload."""
    r = _Reader(payload)
    (n,) = r.unpack(_U8)
    try:
        name = bytes(r.take(n)).decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("node name is not UTF-8") from None
    vals = r.unpack(_STAT)
    page_port = r.unpack(_U16)[0] if r.pos < len(r.buf) else 0  # absent from older nodes
    r.end()
    return StatInfo(name, *vals, page_port=page_port)


def list_ns_payload(entries: list[NsInfo]) -> bytes:
    """LIST_NS response payload."""
    parts = [_U32.pack(len(entries))]
    for e in entries:
        parts += [_ns_bytes(e.ns), _U64U64.pack(e.keys, e.bytes)]
    return b"".join(parts)


def decode_list_ns(payload: bytes) -> list[NsInfo]:
    """Decode a LIST_NS response payload."""
    r = _Reader(payload)
    n = r.count(MAX_LIST)
    out = []
    for _ in range(n):
        ns = r.ns()
        keys, size = r.unpack(_U64U64)
        out.append(NsInfo(ns, keys, size))
    r.end()
    return out
