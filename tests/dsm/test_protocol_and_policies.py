"""Pure parts: the agent hello codec (fuzzed), CLOCK, stride prefetch, placement."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from hypervisor.dsm import hello
from hypervisor.dsm.core import LOCAL, REMOTE
from hypervisor.errors import ProtocolError
from policies.clock import ClockVictims
from policies.placement import SpreadPlacement
from policies.prefetch import StridePrefetch


@given(st.binary(max_size=128))
def test_hello_decoder_accepts_or_refuses_cleanly(data):
    try:
        msg = hello.decode_hello(data)
    except ProtocolError:
        return
    assert len(data) == hello.SIZE
    assert hello.decode_hello(hello.encode_hello(msg)) == msg


@given(flags=st.integers(0, 7), pages=st.integers(1, 1 << 20), addr_pages=st.integers(0, 1 << 30),
       off_pages=st.integers(0, 1 << 20), pid=st.integers(1, 1 << 22))
def test_hello_roundtrip(flags, pages, addr_pages, off_pages, pid):
    msg = hello.Hello(flags, addr_pages * 4096, pages * 4096, off_pages * 4096, 4096, pid)
    assert hello.decode_hello(hello.encode_hello(msg)) == msg


@pytest.mark.parametrize("mutate,reason", [
    (lambda b: b"XMEGADSM" + b[8:], "magic"),
    (lambda b: b[:8] + (2).to_bytes(4, "little") + b[12:], "version"),
    (lambda b: b[:-1], "bytes"),
])
def test_hello_bad_fields_are_named(mutate, reason):
    good = hello.encode_hello(hello.Hello(1, 1 << 30, 1 << 28, 0, 4096, 42))
    with pytest.raises(ProtocolError, match=reason):
        hello.decode_hello(mutate(good))


def test_clock_gives_referenced_pages_a_second_chance():
    state = np.full(8, LOCAL, dtype=np.uint8)
    state[5] = REMOTE
    ref = np.array([1, 0, 1, 0, 0, 0, 1, 1], dtype=np.uint8)
    clock = ClockVictims()
    assert clock.victims(state, ref, 2).tolist() == [1, 3]
    # The hand passed pages 0..3: their bits are cleared (second chance used).
    assert ref.tolist() == [0, 0, 0, 0, 0, 0, 1, 1]
    assert clock.victims(state, ref, 1).tolist() == [4]
    # From page 5 (remote, skipped): 6 and 7 are referenced, so they survive
    # and lose their bit; the victims are the next unreferenced pages.
    assert clock.victims(state, ref, 3).tolist() == [0, 1, 2]
    assert ref[6] == 0 and ref[7] == 0


def test_clock_with_nothing_local_returns_nothing():
    state = np.full(4, REMOTE, dtype=np.uint8)
    assert ClockVictims().victims(state, np.zeros(4, np.uint8), 3).size == 0


def test_stride_prefetch_ramps_and_follows_the_stream():
    pf = StridePrefetch(10_000, min_depth=4, max_depth=16)
    assert pf.on_fault(100) == [] and pf.on_fault(101) == []
    first = pf.on_fault(102)
    assert first == [103, 104, 105, 106]
    # The stream runs through the window and faults just past it: a hit.
    second = pf.on_fault(107)
    assert second == list(range(108, 116))
    # A stride of 3 pages.
    pf2 = StridePrefetch(10_000, min_depth=2)
    pf2.on_fault(0), pf2.on_fault(3)
    assert pf2.on_fault(6) == [9, 12]
    # A random jump resets.
    assert pf.on_fault(5000) == []


def test_placement_spreads_replicas_on_distinct_peers():
    place = SpreadPlacement()
    peers = ["a", "b", "c"]
    for page in range(30):
        chosen = place.place(page, 2, peers)
        assert len(set(chosen)) == 2
    assert place.place(7, 2, ["a"]) == ["a"]
    assert place.place(7, 2, []) == []


def test_stride_prefetch_extends_a_confirmed_stream_within_bounds():
    pf = StridePrefetch(10_000, min_depth=4, max_depth=16)
    assert pf.extend(8, max_ahead=100) == []  # no stream yet
    pf.on_fault(10), pf.on_fault(11)
    assert pf.on_fault(12) == [13, 14, 15, 16]
    assert pf.extend(4, max_ahead=100) == [17, 18, 19, 20]
    # Never further than max_ahead strides past the last demand fault (12).
    assert pf.extend(50, max_ahead=10) == [21, 22]
    # A demand fault inside the extended window keeps the stream; pages
    # already predicted (up to 22) are not returned again.
    assert pf.on_fault(18) == [23, 24, 25, 26]
    assert pf.on_fault(19) == list(range(27, 36))
