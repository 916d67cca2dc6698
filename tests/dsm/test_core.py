"""The C fault-handler core, driven in-process on a real userfaultfd."""

from __future__ import annotations

import os
import select
import threading
from collections.abc import Iterator

import numpy as np
import pytest

from hypervisor.dsm.core import EVICTING, LOCAL, REMOTE, FaultHandlerCore
from tests.dsm.guest_region import GuestRegion, region_with_core, touch_read, touch_write

PS = os.sysconf("SC_PAGESIZE")
NPAGES = 64


@pytest.fixture
def region() -> Iterator[tuple[GuestRegion, FaultHandlerCore]]:
    with region_with_core(NPAGES) as (reg, core):
        core.start(threads=2)
        yield reg, core


def wait_fetches(core: FaultHandlerCore, count: int) -> list[int]:
    got: list[int] = []
    while len(got) < count:
        r, _, _ = select.select([core.event_fd], [], [], 10)
        assert r, f"only {len(got)} of {count} remote faults arrived"
        got.extend(int(p) for p in core.take_fetches())
    return got


def test_never_written_pages_read_as_zero(region):
    reg, core = region
    assert touch_read(reg.addr + 5 * PS, PS) == b"\0" * PS
    st = core.stats().counters
    assert st["faults_zero"] == 1 and st["resident"] == 1
    assert core.state[5] == LOCAL


def test_one_batched_copy_wakes_every_waiting_thread(region):
    reg, core = region
    pages = np.arange(8, 16, dtype=np.uint64)
    assert core.mark_remote(pages) == 8
    results: dict[int, bytes] = {}

    def reader(p: int) -> None:
        results[p] = touch_read(reg.addr + p * PS + 100, 16)

    threads = [threading.Thread(target=reader, args=(int(p),)) for p in pages]
    for t in threads:
        t.start()
    queued = wait_fetches(core, 8)
    assert sorted(queued) == list(range(8, 16))
    data = b"".join(bytes([p]) * PS for p in range(8, 16))
    assert core.reserve(8)
    core.install(8, data)  # one UFFDIO_COPY over the whole run
    for t in threads:
        t.join(timeout=10)
        assert not t.is_alive(), "a waiter was not woken by the batched copy"
    assert results == {p: bytes([p]) * 16 for p in range(8, 16)}
    st = core.stats().counters
    assert st["install_calls"] == 1 and st["installed_pages"] == 8 and st["resident"] == 8


def test_evict_punches_and_refault_fetches_back(region):
    reg, core = region
    touch_write(reg.addr + 3 * PS, b"\xab" * PS)
    blocks_before = os.fstat(reg.memfd).st_blocks
    pages, ok, buf = core.evict_begin(np.array([3], dtype=np.uint64))
    assert ok.tolist() == [1] and bytes(buf) == b"\xab" * PS
    assert core.state[3] == EVICTING
    punched = core.evict_commit(pages, ok)
    assert punched.tolist() == [1] and core.state[3] == REMOTE
    assert os.fstat(reg.memfd).st_blocks < blocks_before
    out: list[bytes] = []
    t = threading.Thread(target=lambda: out.append(touch_read(reg.addr + 3 * PS, PS)))
    t.start()
    assert wait_fetches(core, 1) == [3]
    assert core.reserve(1)
    core.install(3, bytes(buf))
    t.join(timeout=10)
    assert out == [b"\xab" * PS]


def test_resident_never_passes_the_hard_limit(region):
    reg, core = region
    core.set_limit(4)
    for p in range(4):
        touch_write(reg.addr + p * PS, b"x")
    assert core.resident() == 4
    assert not core.reserve(1)
    # A fifth zero fault is deferred to the caller instead of being served.
    t = threading.Thread(target=touch_write, args=(reg.addr + 10 * PS, b"y"))
    t.start()
    raw = wait_fetches(core, 1)
    assert raw == [10 | (1 << 63)] and core.resident() == 4
    assert not core.install_zero(10)  # still no room
    pages, ok, _ = core.evict_begin(np.array([0], dtype=np.uint64))
    core.evict_commit(pages, ok)
    assert core.install_zero(10)
    t.join(timeout=10)
    assert not t.is_alive() and core.resident() == 4


def test_guest_write_during_eviction_cancels_it(region):
    reg, core = region
    touch_write(reg.addr + 7 * PS, b"\x01" * PS)
    pages, ok, _ = core.evict_begin(np.array([7], dtype=np.uint64))
    assert ok.tolist() == [1]
    # The write hits the write protection; the reader thread cancels the
    # eviction and lets it through.
    t = threading.Thread(target=touch_write, args=(reg.addr + 7 * PS, b"\x02" * 8))
    t.start()
    t.join(timeout=10)
    assert not t.is_alive()
    assert core.state[7] == LOCAL
    punched = core.evict_commit(pages, ok)
    assert punched.tolist() == [0]
    assert touch_read(reg.addr + 7 * PS, 9) == b"\x02" * 8 + b"\x01"
    assert core.stats().counters["evict_cancelled"] == 1
