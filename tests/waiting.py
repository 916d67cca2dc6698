"""Waiting for a condition in tests instead of assuming how fast the box is."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(probe: Callable[[], T], *, timeout: float = 30.0, interval: float = 0.1,
             what: str = "the condition") -> T:
    """Call ``probe`` until it returns something truthy; return that.

    Raises:
        AssertionError: ``timeout`` seconds passed (the last value is shown).
    """
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not hold within {timeout:.0f} s (last: {value!r})")
        time.sleep(interval)
