"""A synthetic screen: a :class:`~hypervisor.remote_display.track.FrameSource`
that changes at a set rate, for benchmarks at resolutions the tiny guest's VGA
text console cannot show (720p, 1080p) and for tests of the stream alone.

The content looks like a desktop being used: a static background with text-like
detail and a window-sized block of it scrolling, so the encoder sees realistic
partial damage rather than noise.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import numpy as np

from hypervisor.remote_display._tasks import cancel_task

__all__ = ["MovingPattern"]


class MovingPattern:
    """A framebuffer updated ``fps`` times a second while running.

    Args:
        width: pixels.
        height: pixels.
        fps: updates per second (0: static until :meth:`damage` is called).
    """

    def __init__(self, width: int, height: int, *, fps: float = 30) -> None:
        rng = np.random.default_rng(7)
        glyphs = rng.integers(0, 2, (height // 8 + 1, width // 8 + 1), dtype=np.uint8)
        text = np.kron(glyphs, np.ones((8, 8), dtype=np.uint8))[:height, :width] * 200
        self._texture = np.concatenate([text, text], axis=0)
        self.framebuffer = np.zeros((height, width, 4), dtype=np.uint8)
        self.framebuffer[..., 0] = 60
        self.framebuffer[..., 1] = 40 + text // 4
        self.framebuffer[..., 2] = 30
        self.fps = fps
        self.damage_seq = 0
        self.damage_time = 0.0
        self._offset = 0
        self._changed = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Begin changing the picture ``fps`` times a second."""
        if self._task is None and self.fps > 0:
            self._task = asyncio.create_task(self._run(), name="moving-pattern")

    async def close(self) -> None:
        """Stop changing the picture."""
        await cancel_task(self._task)
        self._task = None

    async def damage(self) -> None:
        """Scroll the window once and signal damage."""
        height, width = self.framebuffer.shape[:2]
        top, left = height // 8, width // 8
        bottom, right = height - height // 8, width - width // 8
        self._offset = (self._offset + 3) % height
        window = self._texture[self._offset:self._offset + bottom - top, left:right]
        self.framebuffer[top:bottom, left:right, 0] = window
        self.framebuffer[top:bottom, left:right, 1] = window
        self.framebuffer[top:bottom, left:right, 2] = 255 - window
        self.damage_seq += 1
        self.damage_time = time.time()
        async with self._changed:
            self._changed.notify_all()

    async def wait_damage(self, after_seq: int, *, timeout: float | None = None) -> int:
        """Wait for damage after ``after_seq`` (see FrameSource).

        Args:
            after_seq: last sequence number seen.
            timeout: seconds at most.

        Returns:
            The current sequence number.
        """
        async with self._changed:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(
                    self._changed.wait_for(lambda: self.damage_seq != after_seq), timeout)
        return self.damage_seq

    async def _run(self) -> None:
        period = 1.0 / self.fps
        next_tick = time.monotonic()
        while True:
            await self.damage()
            next_tick += period
            await asyncio.sleep(max(0.0, next_tick - time.monotonic()))
