"""FramebufferCapture over a real unix socket, against a scripted RFB server.

The server side here is test scaffolding speaking the RFB bytes of the spec
(built with the helpers of test_rfb); the capture under test does real socket
I/O. The real QEMU VNC server is exercised by test_browser.py.
"""

from __future__ import annotations

import asyncio
import struct
from pathlib import Path

import numpy as np
import pytest

from hypervisor.errors import ProtocolError
from hypervisor.remote_display.capture import FramebufferCapture
from hypervisor.remote_display.rfb import (
    ENCODING_COPYRECT,
    ENCODING_DESKTOP_SIZE,
    ENCODING_RAW,
)
from tests.display.test_rfb import rect, server_greeting, update

CLIENT_HELLO = 12 + 1 + 1  # version, security choice, ClientInit
REQUEST = struct.Struct(">BBHHHH")


async def read_request(reader: asyncio.StreamReader) -> tuple[int, int, int]:
    """Skip SetPixelFormat/SetEncodings; return (incremental, w, h) of the next request."""
    while True:
        kind = (await reader.readexactly(1))[0]
        if kind == 0:
            await reader.readexactly(19)
        elif kind == 2:
            _, count = struct.unpack(">BH", await reader.readexactly(3))
            await reader.readexactly(4 * count)
        elif kind == 3:
            incremental, _x, _y, w, h = struct.unpack(">BHHHH", await reader.readexactly(9))
            return incremental, w, h
        else:
            raise AssertionError(f"unexpected client message {kind}")


async def test_updates_copyrect_and_resize_follow_the_server(tmp_path: Path) -> None:
    requests: list[tuple[int, int, int]] = []
    proceed = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(server_greeting(4, 2))
        await reader.readexactly(CLIENT_HELLO)
        requests.append(await read_request(reader))
        red = bytes([0, 0, 255, 0])
        writer.write(update(rect(0, 0, 4, 2, ENCODING_RAW, red * 8)))
        requests.append(await read_request(reader))
        writer.write(update(rect(2, 0, 1, 1, ENCODING_RAW, bytes([255, 0, 0, 0])),
                            rect(0, 1, 1, 1, ENCODING_COPYRECT, struct.pack(">HH", 2, 0))))
        requests.append(await read_request(reader))
        await proceed.wait()
        writer.write(update(rect(0, 0, 6, 4, ENCODING_DESKTOP_SIZE)))
        requests.append(await read_request(reader))
        writer.write(update(rect(0, 0, 6, 4, ENCODING_RAW, bytes([9, 9, 9, 0]) * 24)))
        requests.append(await read_request(reader))
        await asyncio.sleep(30)

    path = tmp_path / "vnc.sock"
    server = await asyncio.start_unix_server(serve, path=str(path))
    capture = FramebufferCapture(path)
    try:
        await capture.start()
        seq = 0
        while capture.framebuffer.shape[:2] != (2, 4) or capture.damage_seq < 2:
            seq = await capture.wait_damage(seq, timeout=30)
        fb = capture.framebuffer
        assert fb[0, 0].tolist() == [0, 0, 255, 0] and fb[0, 2].tolist() == [255, 0, 0, 0]
        assert fb[1, 0].tolist() == [255, 0, 0, 0]  # copied from (2, 0)
        proceed.set()
        while capture.size != (6, 4) or not np.all(capture.framebuffer[..., 0] == 9):
            seq = await capture.wait_damage(seq, timeout=30)
        # first a full request, then incremental ones; after the resize a full one again
        assert [r[0] for r in requests] == [0, 1, 1, 0, 1]
        assert requests[3][1:] == (6, 4)
    finally:
        await capture.close()
        server.close()


async def test_a_server_that_is_not_rfb_is_one_clear_error(tmp_path: Path) -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"SSH-2.0-OpenSSH_9.2\r\n")
        await writer.drain()
        await asyncio.sleep(5)

    path = tmp_path / "not-vnc.sock"
    server = await asyncio.start_unix_server(serve, path=str(path))
    try:
        with pytest.raises(ProtocolError, match="not an RFB server"):
            await FramebufferCapture(path).start()
        with pytest.raises(ProtocolError, match="cannot connect"):
            await FramebufferCapture(tmp_path / "missing.sock").start()
    finally:
        server.close()


async def test_server_going_away_wakes_waiters_with_an_error(tmp_path: Path) -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(server_greeting(2, 2))
        await reader.readexactly(CLIENT_HELLO)
        await read_request(reader)
        writer.close()

    path = tmp_path / "vnc.sock"
    server = await asyncio.start_unix_server(serve, path=str(path))
    capture = FramebufferCapture(path)
    try:
        await capture.start()
        with pytest.raises(ProtocolError, match="closed the connection"):
            await capture.wait_damage(capture.damage_seq, timeout=30)
    finally:
        await capture.close()
        server.close()
