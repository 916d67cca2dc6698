"""Random request streams against a live server: it answers or disconnects, never dies."""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hypervisor.netblock import protocol as nbd
from hypervisor.netblock.backend import MemoryBackend
from hypervisor.netblock.memfd import MemfdBackend
from hypervisor.netblock.server import Export, NbdServer

SIZE = 1 << 20


@pytest.fixture(scope="module")
def live_socket(tmp_path_factory) -> Iterator[Path]:
    sock = Path(tmp_path_factory.mktemp("fuzz")) / "s.sock"
    loop = asyncio.new_event_loop()
    # "f": anonymous memory, served in Python; "m": a memfd, served by the native
    # fast path after the handshake (when it is built)
    server = NbdServer({"f": Export.of("f", MemoryBackend(SIZE)),
                        "m": Export.of("m", MemfdBackend(SIZE))})
    loop.run_until_complete(server.listen_unix(sock))
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield sock
    asyncio.run_coroutine_threadsafe(server.shutdown(timeout=5), loop).result(30)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


def session(sock: Path, structured: bool, export: str = "f") -> socket.socket:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(5)
    s.connect(str(sock))
    assert len(s.recv(18)) == 18
    s.sendall(struct.pack(">I", 3))
    if structured:
        s.sendall(struct.pack(">QII", nbd.IHAVEOPT, nbd.OPT_STRUCTURED_REPLY, 0))
        s.recv(20)
    s.sendall(struct.pack(">QII", nbd.IHAVEOPT, nbd.OPT_EXPORT_NAME, 1) + export.encode())
    assert len(s.recv(10)) == 10
    return s


def drain(s: socket.socket) -> None:
    try:
        while s.recv(1 << 16):
            pass
    except (TimeoutError, ConnectionResetError, BrokenPipeError):
        pass


requests = st.lists(st.tuples(
    st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7, 8, 77]), st.integers(0, 0x3F),
    st.sampled_from([0, 1, SIZE - 1, SIZE, 1 << 40]), st.integers(0, 70000),
    st.booleans()), min_size=1, max_size=6)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(reqs=requests, structured=st.booleans(), junk=st.binary(max_size=30),
       export=st.sampled_from(["f", "m"]))
def test_random_requests_never_break_the_server(live_socket: Path, reqs, structured: bool,
                                                junk: bytes, export: str) -> None:
    s = session(live_socket, structured, export)
    stream = b""
    for cmd, flags, offset, length, bad_magic in reqs:
        magic = 0x12345678 if bad_magic and cmd == 77 else nbd.REQUEST_MAGIC
        payload = bytes(min(length, 4096)) if cmd == nbd.CMD_WRITE else b""
        if cmd == nbd.CMD_WRITE:
            length = len(payload)
        stream += struct.pack(">IHHQQI", magic, flags, cmd, 1, offset, length) + payload
    try:
        s.sendall(stream + junk)
        s.shutdown(socket.SHUT_WR)
    except (BrokenPipeError, ConnectionResetError):
        pass
    drain(s)
    s.close()
    # a well-behaved client still gets served
    good = session(live_socket, True, export)
    good.sendall(struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, 0, nbd.CMD_READ, 7, 0, 512))
    header = good.recv(28)
    magic, flags, rtype, cookie, length, offset = struct.unpack(">IHHQIQ", header)
    assert (magic, rtype, cookie, length) == (nbd.STRUCTURED_REPLY_MAGIC,
                                              nbd.REPLY_TYPE_OFFSET_DATA, 7, 520)
    good.close()
