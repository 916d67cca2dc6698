"""Small asyncio helpers shared by the display modules."""

from __future__ import annotations

import asyncio
import contextlib

__all__ = ["cancel_task"]


async def cancel_task(task: asyncio.Task[None] | None) -> None:
    """Cancel ``task`` (if any) and wait until it has ended, whatever it raised.

    Args:
        task: the task, or None (nothing to do).
    """
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
