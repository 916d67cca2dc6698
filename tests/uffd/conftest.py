"""Fixtures for the userfaultfd primitive tests: a shared memfd mapping and a uffd on it."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from hypervisor.dsm import uffd
from tests.uffd._support import LIVE_TOUCHERS, PAGES, SHMEM_FEATURES, WAIT_S, SharedRegion


@pytest.fixture
def region() -> Iterator[SharedRegion]:
    """A fresh shared memfd mapping of PAGES pages."""
    page = uffd.page_size()
    memfd = uffd.memfd_create("omega-test-uffd")
    os.ftruncate(memfd, PAGES * page)
    mapping = uffd.MappedFile.map(memfd, PAGES * page)
    try:
        yield SharedRegion(memfd, mapping, page)
    finally:
        # A failed test may leave a thread asleep on a fault: fault_fd (torn
        # down first) closing the uffd wakes it; let it finish before munmap.
        for toucher in LIVE_TOUCHERS:
            toucher.thread.join(WAIT_S)
        LIVE_TOUCHERS.clear()
        mapping.close()
        os.close(memfd)


@pytest.fixture
def fault_fd(region: SharedRegion) -> Iterator[uffd.Userfaultfd]:
    """A non-blocking userfaultfd with the shared-memory features (and thread ids).

    It depends on ``region`` so that it is closed (waking any faulting thread)
    before the mapping goes away.
    """
    with uffd.Userfaultfd.create(features=SHMEM_FEATURES) as fd:
        yield fd
