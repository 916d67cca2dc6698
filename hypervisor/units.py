"""Parsing and printing sizes such as ``512M`` or ``2G`` (binary units)."""

from __future__ import annotations

import re

from hypervisor.errors import UsageError

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)


def parse_size(text: str | int, *, what: str = "size") -> int:
    """Parse a size such as ``512M``, ``2G``, ``4096`` or ``1.5GiB`` into bytes.

    Args:
        text: the size; a bare number is bytes.
        what: what the size is of, for the error message.

    Returns:
        The size in bytes.

    Raises:
        UsageError: the text is not a size.
    """
    if isinstance(text, int):
        if text < 0:
            raise UsageError(f"{what} must not be negative: {text}")
        return text
    m = _SIZE_RE.match(text)
    if not m:
        raise UsageError(f"{what}: {text!r} is not a size (examples: 512M, 2G, 4096)")
    value = float(m.group(1)) * _UNITS[m.group(2).upper()]
    return int(value)


def format_size(n: int) -> str:
    """Format bytes with a binary unit, e.g. ``format_size(1536 << 20) == '1.5G'``."""
    for unit in ("T", "G", "M", "K"):
        scale = _UNITS[unit]
        if n >= scale:
            v = n / scale
            return f"{v:.0f}{unit}" if v == int(v) else f"{v:.1f}{unit}"
    return f"{n}B"
