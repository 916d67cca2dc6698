"""A timestamp drawn into the picture, for capture-to-display latency.

The capture time in milliseconds (modulo 2**32) is drawn into the top-left
corner of a BGRX image as a row of :data:`CELLS` square cells: a white start
cell, 32 data bits (most significant first, white = 1) and a black stop cell.
Cells are big and pure black/white so the lossy codec keeps them readable; the
web page reads them back with the same geometry (``web/app.js``,
``readWatermark``) and compares with its own clock (same host on loopback).
"""

from __future__ import annotations

import numpy as np

__all__ = ["CELL", "CELLS", "read_watermark", "stamp_watermark"]

CELL = 16
BITS = 32
CELLS = BITS + 2


def stamp_watermark(image: np.ndarray, millis: int) -> None:
    """Draw ``millis`` into ``image`` in place.

    Args:
        image: (height, width, 4) uint8 BGRX, at least CELLS*CELL wide and CELL high.
        millis: a wall-clock time in milliseconds (taken modulo 2**32).

    Raises:
        ValueError: the image is too small to hold the mark.
    """
    if image.shape[0] < CELL or image.shape[1] < CELLS * CELL:
        raise ValueError(f"image {image.shape[1]}x{image.shape[0]} too small for a watermark")
    value = int(millis) & 0xFFFFFFFF
    bits = [1] + [(value >> (BITS - 1 - i)) & 1 for i in range(BITS)] + [0]
    row = np.repeat(np.array(bits, dtype=np.uint8) * 255, CELL)
    image[:CELL, :CELLS * CELL, :3] = row[None, :, None]


def read_watermark(image: np.ndarray) -> int | None:
    """Read the mark back (the inverse of :func:`stamp_watermark`).

    Args:
        image: (height, width, >=3) uint8 image, B G R order or any grey-preserving order.

    Returns:
        The 32-bit millisecond value, or None if no mark is present.
    """
    if image.shape[0] < CELL or image.shape[1] < CELLS * CELL:
        return None
    centres = image[CELL // 2, CELL // 2:CELLS * CELL:CELL, :3].astype(np.int32).mean(axis=1)
    bits = [1 if c > 127 else 0 for c in centres]
    if bits[0] != 1 or bits[-1] != 0:
        return None
    value = 0
    for bit in bits[1:-1]:
        value = (value << 1) | bit
    return value
