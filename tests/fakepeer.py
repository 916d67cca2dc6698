"""A fake peer for the native clients' bad-input tests.

A real TLS server with a certificate from the cluster CA (so a C client's
mutual TLS and name check pass) that answers each request frame with bytes
the test chooses: garbage, truncated frames, lying lengths, wrong ops or
ids, a closed connection.
"""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Callable

from hypervisor.node import wire
from hypervisor.security import issue_node_cert, server_ssl_context

Answer = Callable[[int, int, bytes], bytes | None]  # (op, request id, payload) -> bytes
FRAMES = 0x18  # the native clients' switch to AES-GCM frames (pc_frames.c)

class FakePeer:
    """A TLS server answering every request frame with ``self.answer(...)``.

    The connection is closed after each answer unless ``keep_open`` (then the
    client must time out on a short answer); ``None`` closes it at once.
    """

    def __init__(self, config, name: str) -> None:  # noqa: ANN001 - Config
        issue_node_cert(config, name, sans=[name, "127.0.0.1"])
        self.name = name
        self.ctx = server_ssl_context(config, node=name)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.answer: Answer = lambda op, rid, payload: None
        self.keep_open = False
        # False: FRAMES is refused as by a node that predates it (the C
        # client then reconnects in TLS records); True: passed to answer().
        self.frames = False
        self.requests = 0
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        self.listener.settimeout(0.2)
        while not self._stop:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                continue
            threading.Thread(target=self._conn, args=(conn,), daemon=True).start()

    def _conn(self, raw: socket.socket) -> None:
        try:
            conn = self.ctx.wrap_socket(raw, server_side=True)
        except (ssl.SSLError, OSError):
            raw.close()
            return
        try:
            while True:
                head = _read(conn, wire.HEADER_SIZE)
                length, op, _, _, rid = wire.HEADER.unpack(head)
                payload = _read(conn, length + 4 - wire.HEADER_SIZE)
                if op == FRAMES and not self.frames:
                    # as a node from before FRAMES: unknown opcode, hang up
                    why = b"unknown opcode"
                    conn.sendall(wire.HEADER.pack(wire.MIN_LENGTH + len(why), op,
                                                  wire.Status.BAD_REQUEST, 0, rid) + why)
                    break
                self.requests += 1
                out = self.answer(op, rid, payload)
                if out is None:
                    break
                conn.sendall(out)
                if not self.keep_open:
                    break
        except (OSError, EOFError, ssl.SSLError):
            pass
        finally:
            conn.close()

    def close(self) -> None:
        self._stop = True
        self.listener.close()


def _read(conn: ssl.SSLSocket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        got = conn.recv(n - len(buf))
        if not got:
            raise EOFError
        buf += got
    return buf
