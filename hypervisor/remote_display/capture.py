"""Screen capture from QEMU's VNC server on a unix socket.

A thin asyncio layer over :class:`~hypervisor.remote_display.rfb.RfbClient`:
it keeps the guest's framebuffer in one numpy array (height x width x 4,
bytes B, G, R, X) and applies each damaged rectangle in place. After every
complete FramebufferUpdate it asks for the next *incremental* update, so QEMU
only sends what changed and a static screen costs no traffic and no CPU (QEMU
answers an incremental request only once something is dirty). A resolution
change replaces the array and asks for one full update.

Readers take a consistent copy with :meth:`FramebufferCapture.snapshot` on the
event loop thread; rectangles are never applied while a snapshot is being taken.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import numpy as np

from hypervisor.errors import ProtocolError
from hypervisor.remote_display._tasks import cancel_task
from hypervisor.remote_display.rfb import (
    CopyRect,
    DesktopResized,
    RawRect,
    RfbClient,
    ServerInit,
    UpdateEnd,
)

__all__ = ["FramebufferCapture"]

READ_SIZE = 1 << 20


class FramebufferCapture:
    """Keep a live copy of a VNC server's framebuffer.

    Args:
        socket_path: QEMU's VNC unix socket (``<vmdir>/vnc.sock``).
    """

    def __init__(self, socket_path: Path | str) -> None:
        self.socket_path = Path(socket_path)
        self.framebuffer: np.ndarray = np.zeros((0, 0, 4), dtype=np.uint8)
        self.damage_seq = 0
        self.damage_time = 0.0
        self.updates = 0
        self.bytes_received = 0
        self.name = ""
        self._rfb = RfbClient()
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None
        self._damage = asyncio.Condition()
        self._dirty = False
        self._resized = False
        self._error: BaseException | None = None

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the framebuffer."""
        return int(self.framebuffer.shape[1]), int(self.framebuffer.shape[0])

    async def start(self, *, timeout: float = 10.0) -> None:
        """Connect, complete the handshake and start following updates.

        Args:
            timeout: seconds for connect + handshake.

        Raises:
            ProtocolError: the socket is missing, refuses us or speaks no RFB 3.8.
        """
        try:
            self._reader, self._writer = await asyncio.wait_for(
                asyncio.open_unix_connection(str(self.socket_path), limit=READ_SIZE), timeout)
        except (OSError, asyncio.TimeoutError) as exc:
            raise ProtocolError(f"cannot connect to VNC socket {self.socket_path}: {exc}") from exc
        deadline = time.monotonic() + timeout
        while not self._rfb.ready:
            remaining = deadline - time.monotonic()
            try:
                data = await asyncio.wait_for(self._reader.read(READ_SIZE), max(remaining, 0.01))
            except asyncio.TimeoutError:
                await self.close()
                raise ProtocolError(f"VNC handshake on {self.socket_path} timed out") from None
            if not data:
                await self.close()
                raise ProtocolError(f"VNC server on {self.socket_path} closed during handshake")
            try:
                self._apply(self._rfb.receive_data(data))
            except ProtocolError:
                await self.close()
                raise
            await self._flush()
        self._rfb.request_update(incremental=False)
        self._resized = False  # ServerInit's size is what this full request covers
        await self._flush()
        self._task = asyncio.create_task(self._read_loop(), name="vnc-capture")

    async def close(self) -> None:
        """Stop following updates and close the socket."""
        await cancel_task(self._task)
        self._task = None
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(Exception):
                await self._writer.wait_closed()
            self._writer = None

    async def wait_damage(self, after_seq: int, *, timeout: float | None = None) -> int:
        """Wait until the framebuffer changed after update number ``after_seq``.

        Args:
            after_seq: the last :attr:`damage_seq` the caller has seen.
            timeout: seconds to wait at most (None: forever).

        Returns:
            The current damage sequence number (== after_seq on timeout).

        Raises:
            ProtocolError: the VNC connection failed.
        """
        async with self._damage:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(
                    self._damage.wait_for(lambda: self.damage_seq != after_seq
                                          or self._error is not None), timeout)
        if self._error is not None:
            raise ProtocolError(f"VNC capture failed: {self._error}")
        return self.damage_seq

    def snapshot(self) -> np.ndarray:
        """Return a copy of the framebuffer (call on the event loop thread).

        Returns:
            A (height, width, 4) uint8 array, B G R X per pixel.
        """
        return self.framebuffer.copy()

    async def _flush(self) -> None:
        data = self._rfb.data_to_send()
        if data and self._writer is not None:
            self._writer.write(data)
            await self._writer.drain()

    async def _read_loop(self) -> None:
        assert self._reader is not None
        try:
            while True:
                data = await self._reader.read(READ_SIZE)
                if not data:
                    raise ProtocolError("VNC server closed the connection")
                self.bytes_received += len(data)
                completed = self._apply(self._rfb.receive_data(data))
                if completed:
                    # Ask for the next change only now: one request in flight keeps
                    # QEMU from queueing stale frames behind a slow reader.
                    self._rfb.request_update(incremental=not self._resized)
                    self._resized = False
                await self._flush()
                if completed and self._dirty:
                    self._dirty = False
                    self.damage_seq += 1
                    self.damage_time = time.time()
                    async with self._damage:
                        self._damage.notify_all()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the connection is dead; wake every waiter with it
            self._error = exc
            async with self._damage:
                self._damage.notify_all()

    def _apply(self, events: list) -> bool:
        """Apply events to the framebuffer; return True if an update completed."""
        completed = False
        fb = self.framebuffer
        for event in events:
            if isinstance(event, RawRect):
                view = np.frombuffer(event.pixels, dtype=np.uint8)
                fb[event.y:event.y + event.height, event.x:event.x + event.width] = \
                    view.reshape(event.height, event.width, 4)
                self._dirty = True
            elif isinstance(event, CopyRect):
                src = fb[event.src_y:event.src_y + event.height,
                         event.src_x:event.src_x + event.width].copy()
                fb[event.y:event.y + event.height, event.x:event.x + event.width] = src
                self._dirty = True
            elif isinstance(event, UpdateEnd):
                self.updates += 1
                completed = True
            elif isinstance(event, (DesktopResized, ServerInit)):
                if isinstance(event, ServerInit):
                    self.name = event.name
                # QEMU repeats the current size after every full-update request;
                # only a real change replaces the array (and asks for everything).
                if (event.width, event.height) != self.size:
                    fb = np.zeros((event.height, event.width, 4), dtype=np.uint8)
                    self.framebuffer = fb
                    self._resized = True
                    self._dirty = True
        return completed
