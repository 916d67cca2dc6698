"""The native fetch path against a peer that answers garbage.

A fake peer (tests/fakepeer.py: a real TLS server with a certificate from the
cluster CA, so the C client's mutual TLS and name check pass) answers each
GET / BATCH_GET with bytes the test chooses: random (hypothesis), truncated frames, lying lengths,
wrong ops or ids, a closed connection. Whatever comes back, the C parser must
not crash or install anything: the page stays FETCHING and is handed to the
Python queue, and the waiting guest thread is released only by the correct
data installed from there.
"""

from __future__ import annotations

import os
import select
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hypervisor.dsm.core import FETCHING, LOCAL, QUEUE_LANDED, FaultHandlerCore
from hypervisor.node import wire
from hypervisor.node.wire import Namespace
from hypervisor.sealing import Sealer, build_aad
from hypervisor.security import node_paths
from tests.dsm.conftest import HOST_NODE
from tests.dsm.guest_region import region_with_core, touch_read, touch_write
from tests.fakepeer import FakePeer

PS = os.sysconf("SC_PAGESIZE")
NPAGES = 64
VM_ID = "vm-fuzz"
FAKE = "d-fakepeer"
KEY = Sealer.generate_key()

@pytest.fixture(scope="module")
def fake(cluster_ca) -> Iterator[FakePeer]:
    peer = FakePeer(cluster_ca, FAKE)
    yield peer
    peer.close()


@contextmanager
def native_core(config, fake: FakePeer) -> Iterator[tuple]:
    """A core over a fresh guest-like region, fetching natively from ``fake``."""
    paths = node_paths(config, HOST_NODE)
    ns = wire.encode_namespace(Namespace.page(VM_ID))
    with region_with_core(NPAGES) as (reg, c):
        c.setup_remote(key=KEY, aad_prefix=build_aad("page", VM_ID, 0, 0)[:-16], ns=ns,
                       ca=str(paths.ca), cert=str(paths.cert), keyfile=str(paths.key),
                       peers=[(FAKE, "127.0.0.1", fake.port)], workers=1)
        c.start(threads=2)
        yield reg, c


@pytest.fixture
def core(cluster_ca, fake) -> Iterator[tuple]:
    with native_core(cluster_ca, fake) as made:
        yield made


def evict_page(reg, core: FaultHandlerCore, page: int, version: int = 1) -> bytes:
    """Make ``page`` REMOTE on the fake peer; return its content."""
    data = os.urandom(PS)
    touch_write(reg.addr + page * PS, data)
    arr, ok, _ = core.evict_begin(np.array([page], dtype=np.uint64))
    assert ok.all()
    core.locate(arr, np.array([version], dtype=np.uint64), np.array([1], dtype=np.uint16))
    assert core.evict_commit(arr, ok).all()
    return data


def sealed(page: int, version: int, data: bytes) -> bytes:
    return Sealer(KEY).seal(build_aad("page", VM_ID, page, version), data)


def handed_over(reg, core: FaultHandlerCore, page: int, data: bytes) -> None:
    """Fault the page; it must come to the Python queue, never be installed."""
    out: list[bytes] = []
    t = threading.Thread(target=lambda: out.append(touch_read(reg.addr + page * PS, PS)),
                         daemon=True)
    t.start()
    r, _, _ = select.select([core.event_fd], [], [], 30)
    assert r, "the fault was neither served nor handed over"
    queued = [int(x) for x in core.take_fetches()]
    assert queued == [page], queued
    assert core.state[page] == FETCHING and t.is_alive() and not out
    assert core.reserve(1)
    core.install(page, data)  # what the Python path does with the right copy
    t.join(10)
    assert out == [data]


GARBAGE = [
    b"",                                                              # closes at once
    b"\x00\x00",                                                      # truncated header
    struct.pack(">IBBHQ", 0xFFFFFFF0, wire.Op.GET, 0, 0, 1),           # huge length
    struct.pack(">IBBHQ", 3, wire.Op.GET, 0, 0, 1),                    # length below header
]


@pytest.mark.parametrize("reply", range(8))
def test_malformed_answers_to_a_get_are_handed_to_python(fake, core, reply):
    reg, c = core
    # one case stalls mid-header with the connection open: the read times out
    fake.keep_open = reply == 1
    page = 3 + reply
    data = evict_page(reg, c, page)
    good = sealed(page, 1, data)

    def answer(op: int, rid: int, payload: bytes) -> bytes | None:
        cases = [
            *GARBAGE,
            # a well-formed frame for another request id
            wire.encode_response(op, rid + 7, 0, wire.get_payload(1, good)),
            # the right id, another opcode
            wire.encode_response(wire.Op.PING, rid, 0, b"\0" * 8),
            # blob length larger than the payload
            wire.encode_response(op, rid, 0, struct.pack(">QI", 1, 99999) + good),
            # a valid frame with a blob for another page (swapped)
            wire.encode_response(op, rid, 0, wire.get_payload(1, sealed(page + 1, 1, data))),
        ]
        out = cases[reply]
        return out or None

    fake.answer = answer
    handed_over(reg, c, page, data)


@settings(max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.binary(max_size=200), keep_header=st.booleans(), status=st.integers(0, 255))
def test_random_answers_never_install_anything(cluster_ca, fake, body, keep_header, status):
    def answer(op: int, rid: int, payload: bytes) -> bytes:
        if keep_header:  # a plausible header, then random bytes
            return struct.pack(">IBBHQ", 12 + len(body), op, status, 0, rid) + body
        return body or b"\0"

    with native_core(cluster_ca, fake) as (reg, c):
        data = evict_page(reg, c, 5)
        fake.keep_open = False
        fake.answer = answer
        handed_over(reg, c, 5, data)


def test_malformed_batch_answers_fall_back_page_by_page(fake, core):
    reg, c = core
    pages = list(range(20, 28))
    data = {p: evict_page(reg, c, p) for p in pages}

    def answer(op: int, rid: int, payload: bytes) -> bytes | None:
        assert op == wire.Op.BATCH_GET
        # Claims 8 items but the third lies about its blob length.
        items = []
        for i, p in enumerate(pages):
            blob = sealed(p, 1, data[p])
            n = len(blob) + (1 << 20) if i == 2 else len(blob)
            items.append(struct.pack(">BQI", 1, 1, n) + blob)
        body = struct.pack(">I", len(pages)) + b"".join(items)
        return wire.encode_response(op, rid, 0, body)

    fake.keep_open = False
    fake.answer = answer
    c.submit(c.claim(np.array(pages, dtype=np.uint64)))
    queued: list[int] = []
    while not any(q & QUEUE_LANDED for q in queued):
        r, _, _ = select.select([c.event_fd], [], [], 30)
        assert r, "the prefetch job never finished"
        queued += [int(x) for x in c.take_fetches()]
    handed = sorted(q for q in queued if not q & QUEUE_LANDED)
    # The two pages before the lie were valid and installed; the rest went to Python.
    assert [p for p in pages if c.state[p] == LOCAL] == pages[:2]
    assert handed == pages[2:]
    for p in pages[:2]:
        assert touch_read(reg.addr + p * PS, PS) == data[p]
    assert c.stats().counters["native_fallbacks"] >= 6
