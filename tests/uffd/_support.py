"""Helpers shared by the userfaultfd tests (conftest.py holds the fixtures).

Every wait here is bounded (``WAIT_S``), so a broken kernel path or a lost
wakeup fails a test instead of hanging it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hypervisor.dsm import uffd

#: Upper bound for any single wait on a fault, a thread or a child process.
WAIT_S = 20.0
PAGES = 8
SHMEM_FEATURES = (uffd.FEATURE_MISSING_SHMEM | uffd.FEATURE_PAGEFAULT_FLAG_WP
                  | uffd.FEATURE_WP_HUGETLBFS_SHMEM | uffd.FEATURE_THREAD_ID)


@dataclass
class SharedRegion:
    """A memfd of PAGES pages mapped MAP_SHARED in this process."""

    memfd: int
    mapping: uffd.MappedFile
    page: int

    def addr(self, index: int) -> int:
        """Address of page ``index`` in the mapping."""
        return self.mapping.address + index * self.page

#: Toucher threads started in this test; the region fixture joins them before munmap.
LIVE_TOUCHERS: list[Toucher] = []


@dataclass
class Toucher:
    """A thread that runs one memory access, so the test thread can serve its fault."""

    action: Callable[[], Any]
    result: Any = None
    error: BaseException | None = None
    native_id: int | None = None
    thread: threading.Thread = field(init=False)

    def __post_init__(self) -> None:
        self.thread = threading.Thread(target=self._run, daemon=True)
        LIVE_TOUCHERS.append(self)
        self.thread.start()

    def _run(self) -> None:
        self.native_id = threading.get_native_id()
        try:
            self.result = self.action()
        except BaseException as exc:  # noqa: BLE001 - reported to the test thread
            self.error = exc

    def join(self) -> Any:
        """Wait (bounded) for the access to finish and return its result."""
        self.thread.join(WAIT_S)
        assert not self.thread.is_alive(), "faulting thread was never woken"
        if self.error is not None:
            raise self.error
        return self.result


def next_events(fd: uffd.Userfaultfd, count: int) -> list[uffd.FaultEvent]:
    """Collect exactly ``count`` events, waiting at most WAIT_S for each read."""
    events: list[uffd.FaultEvent] = []
    while len(events) < count:
        assert fd.wait(WAIT_S), f"only {len(events)} of {count} fault events arrived"
        events.extend(fd.read_events())
    assert len(events) == count, events
    return events


def pattern(tag: int, page: int) -> bytes:
    """A page of bytes that says which page and which version it is."""
    head = f"omega page {tag}".encode()
    return (head * (page // len(head) + 1))[:page]
