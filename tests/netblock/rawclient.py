"""A minimal raw NBD client for byte-level tests (parity, malformed input).

It speaks the fixed-newstyle handshake itself (optionally structured replies
and ``base:allocation``), then lets a test send arbitrary request bytes and
read back everything the server sends, so two servers can be compared byte
for byte. Client-side encoding lives here because the project's protocol
module is the server side.
"""

from __future__ import annotations

import socket
import struct
from pathlib import Path

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513

OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_SET_META_CONTEXT = 10
REP_ACK = 1

CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM, CMD_CACHE = 0, 1, 2, 3, 4, 5
CMD_WRITE_ZEROES, CMD_BLOCK_STATUS = 6, 7
FLAG_FUA, FLAG_NO_HOLE, FLAG_DF, FLAG_REQ_ONE, FLAG_FAST_ZERO = 1, 2, 4, 8, 16


def request(cmd: int, offset: int, length: int, *, flags: int = 0, cookie: int = 0,
            payload: bytes = b"", magic: int = REQUEST_MAGIC) -> bytes:
    """Encode one request (plus its payload)."""
    return struct.pack(">IHHQQI", magic, flags, cmd, cookie, offset, length) + payload


class RawNbd:
    """One connection after a completed handshake.

    Args:
        path: the server's unix socket, or a (host, port) TCP address.
        export: export name.
        structured: negotiate structured replies.
        meta: also select ``base:allocation`` (needs ``structured``).
        early: request bytes sent in the same write as NBD_OPT_GO, before its
            reply (the server finds them left over from the handshake).

    Raises:
        AssertionError: the handshake did not go as expected.
    """

    def __init__(self, path: Path | tuple[str, int], export: str, *, structured: bool = True,
                 meta: bool = True, early: bytes = b"") -> None:
        if isinstance(path, tuple):  # (host, port): TCP
            self.sock = socket.create_connection(path, timeout=60)
        else:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(60)
            self.sock.connect(str(path))
        magic, opt, _flags = struct.unpack(">QQH", self.recv_exact(18))
        assert magic == NBDMAGIC and opt == IHAVEOPT
        self.sock.sendall(struct.pack(">I", 3))  # FIXED_NEWSTYLE | NO_ZEROES
        name = export.encode()
        if structured:
            self._option(OPT_STRUCTURED_REPLY, b"")
            if meta:
                query = b"base:allocation"
                self._option(OPT_SET_META_CONTEXT, struct.pack(">I", len(name)) + name +
                             struct.pack(">II", 1, len(query)) + query)
        self._option(OPT_GO, struct.pack(">I", len(name)) + name + struct.pack(">H", 0),
                     early=early)

    def _option(self, option: int, data: bytes, *, early: bytes = b"") -> None:
        self.sock.sendall(struct.pack(">QII", IHAVEOPT, option, len(data)) + data + early)
        while True:
            magic, opt, kind, length = struct.unpack(">QIII", self.recv_exact(20))
            assert magic == REPLY_MAGIC and opt == option, (magic, opt)
            self.recv_exact(length)
            assert kind < 1 << 31, f"option {option} refused: {kind:#x}"
            if kind == REP_ACK:
                return

    def recv_exact(self, n: int) -> bytes:
        """Read exactly ``n`` bytes.

        Raises:
            ConnectionError: the server closed first.
        """
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError(f"closed after {len(buf)} of {n} bytes")
            buf += chunk
        return bytes(buf)

    def send(self, data: bytes) -> None:
        """Send raw bytes."""
        self.sock.sendall(data)

    def read_until_eof(self) -> bytes:
        """Everything the server sends until it closes."""
        out = bytearray()
        while True:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                return bytes(out)
            out += chunk

    def close(self) -> None:
        """Close the socket."""
        self.sock.close()

    def __enter__(self) -> RawNbd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def exchange(path: Path, export: str, requests: bytes, *, structured: bool = True,
             meta: bool = True) -> bytes:
    """Send requests followed by DISC on a fresh connection; return every reply byte.

    A background sender keeps the pipe full while replies are read, so large
    batches cannot deadlock on full socket buffers.
    """
    import threading

    with RawNbd(path, export, structured=structured, meta=meta) as conn:
        errors: list[BaseException] = []

        def sender() -> None:
            try:
                conn.send(requests + request(CMD_DISC, 0, 0, cookie=0xD15C))
            except OSError as exc:  # the server may close first (framing error)
                errors.append(exc)

        thread = threading.Thread(target=sender)
        thread.start()
        data = conn.read_until_eof()
        thread.join()
        return data
