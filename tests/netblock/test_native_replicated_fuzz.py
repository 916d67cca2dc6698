"""The native replicated backend against a peer that answers garbage.

One holder of every chunk is swapped for a fake peer (tests/fakepeer.py: a
real TLS server with a cluster certificate) answering BATCH_GET, BATCH_PUT,
GET and DELETE with bytes the test chooses: hypothesis-random frames, lying
counts and lengths, versions older than recorded, blobs that fail
authentication, wrong ops or ids, a closed connection, a stall. Whatever it
sends, the C client must not crash or return its bytes: reads come from the
other replica (or fail with EIO when there is none), writes stand on the
honest replica and the liar stops being a holder.
"""

from __future__ import annotations

import asyncio
import os
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hypervisor.config import Config
from hypervisor.netblock.backend import BackendError
from hypervisor.netblock.exports import ExportStore
from hypervisor.netblock.native_replicated import NativeReplicatedBackend
from hypervisor.node import wire
from tests.fakepeer import FakePeer
from tests.netblock.peers import PeerSet, healthy_pool

BASE_PORT = 19260
FAKE = "n-liar"
SPAN = 256 << 10  # four 64 KiB chunks of 4 KiB blocks


@dataclass
class Rig:
    backend: NativeReplicatedBackend
    fake: FakePeer
    data: bytes
    liar: str  # the real holder the fake stands in for


def frame(op: int, rid: int, payload: bytes, status: int = 0) -> bytes:
    return wire.HEADER.pack(wire.HEADER_SIZE - 4 + len(payload), op, status, 0, rid) + payload


@pytest.fixture
async def rig(peer_home: Config, peers: PeerSet) -> AsyncIterator[Rig]:
    """Data written to two replicas, then reopened with one holder faked."""
    store = ExportStore(peer_home)
    record = store.create("n-fuzz", 4 << 20, replicas=2, chunk_size=64 << 10,
                          block_size=4 << 10)
    data = os.urandom(SPAN)
    writer = NativeReplicatedBackend(record, store, await healthy_pool(peers),
                                     store.key(record), node="n-host", config=peer_home,
                                     own_pool=True)
    await writer.start()
    await writer.write(0, data, fua=True)
    holders = {p for i in range(4) for p in writer.states()[i].peers}
    await writer.close()
    liar = sorted(holders)[0]
    fake = FakePeer(peer_home, FAKE)
    backend = NativeReplicatedBackend(record, store, await healthy_pool(peers),
                                      store.key(record), node="n-host", config=peer_home,
                                      own_pool=True)
    await backend.start()
    backend._monitor.cancel()  # the test says who is healthy and near, not pings
    # the liar's entry now points at the fake (it presents its own name), and
    # it is the nearest holder: asked first for every chunk it holds
    backend._set_peer(backend._names.index(liar), FAKE, "127.0.0.1", fake.port)
    for i, name in enumerate(backend._names):
        backend._lib.nbr_set_peer_state(backend._h, i, 1, 1e-4 if name == liar else 1e-2, 1e12)
    yield Rig(backend, fake, data, liar)
    await backend.close()
    fake.close()
    store.close()


GARBAGE = st.one_of(
    st.binary(max_size=300),
    st.builds(lambda n, body: (n, body), st.integers(0, 2**32 - 1), st.binary(max_size=200)),
    st.builds(lambda items: items, st.lists(
        st.tuples(st.integers(0, 1), st.integers(0, 2**64 - 1), st.integers(0, 8000),
                  st.binary(max_size=64)), max_size=20)),
)


def encode(op: int, rid: int, how: object) -> bytes | None:
    """A hostile answer to request (op, rid), from a GARBAGE example."""
    if isinstance(how, bytes):
        return how  # raw bytes: possibly not even a frame
    if isinstance(how, tuple):  # a frame whose count lies
        count, body = how
        return frame(op, rid, struct.pack(">I", count) + body)
    items = b"".join(struct.pack(">BQI", found, version, length) + blob
                     for found, version, length, blob in how)  # lying lengths
    return frame(op, rid, struct.pack(">I", len(how)) + items)


async def test_reads_never_return_a_liars_bytes(rig: Rig) -> None:
    backend, fake = rig.backend, rig.fake

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(GARBAGE)
    def check(how: object) -> None:
        fake.answer = lambda op, rid, payload: encode(op, rid, how)
        backend.clear_cache()
        assert backend._exec("read", 0, SPAN) == rig.data

    before = fake.requests
    await asyncio.to_thread(check)
    assert fake.requests > before  # the fake was asked, and lied every time


async def test_plausible_lies_are_refused(rig: Rig) -> None:
    """Well-formed answers that lie: old versions, other blocks' blobs, not found."""
    backend, fake = rig.backend, rig.fake
    blob_len = 4096 + 29

    def answers(kind: str):  # noqa: ANN202
        def answer(op: int, rid: int, payload: bytes) -> bytes | None:
            if op != wire.Op.BATCH_GET:
                return None
            keys = _keys(payload)
            if kind == "stale":
                items = b"".join(struct.pack(">BQI", 1, 0, blob_len) + bytes(blob_len)
                                 for _ in keys)
            elif kind == "garbage-blob":
                items = b"".join(struct.pack(">BQI", 1, 1, blob_len) + os.urandom(blob_len)
                                 for _ in keys)
            elif kind == "missing":
                items = b"".join(struct.pack(">BQI", 0, 0, 0) for _ in keys)
            else:  # one item short
                items = b"".join(struct.pack(">BQI", 0, 0, 0) for _ in keys[1:])
            return frame(op, rid, struct.pack(">I", len(keys)) + items)
        return answer

    fake.keep_open = True  # whole frames: the connection stays usable
    for kind in ("stale", "garbage-blob", "missing", "short"):
        fake.answer = answers(kind)
        backend.clear_cache()
        asked = fake.requests
        assert await asyncio.to_thread(backend._exec, "read", 0, SPAN) == rig.data, kind
        assert fake.requests > asked, kind


async def test_no_honest_holder_is_an_error_never_garbage(rig: Rig, peers: PeerSet) -> None:
    backend, fake = rig.backend, rig.fake
    fake.answer = lambda op, rid, payload: frame(op, rid, struct.pack(">I", 16) + bytes(300))
    honest = {p for i in range(4) for p in backend.states()[i].peers} - {rig.liar}
    for name in honest:
        peers.kill(name)
    backend.clear_cache()
    with pytest.raises(BackendError, match="no current copy readable"):
        await asyncio.to_thread(backend._exec, "read", 0, SPAN)


async def test_a_stalled_peer_times_out_and_the_replica_serves(rig: Rig) -> None:
    backend, fake = rig.backend, rig.fake
    fake.keep_open = True
    fake.answer = lambda op, rid, payload: frame(op, rid, b"")[:10]  # half a header, then nothing
    backend.clear_cache()
    assert await asyncio.to_thread(backend._exec, "read", 0, SPAN) == rig.data
    fake.keep_open = False


async def test_writes_stand_on_the_honest_replica(rig: Rig) -> None:
    backend, fake = rig.backend, rig.fake
    fake.answer = lambda op, rid, payload: frame(op, rid, b"\x07" * 9)
    new = os.urandom(SPAN)
    await asyncio.to_thread(backend._exec, "write", 0, SPAN, data=new)
    for i in range(4):
        assert rig.liar not in backend.states()[i].peers  # the liar holds nothing now
    backend.clear_cache()
    assert await asyncio.to_thread(backend._exec, "read", 0, SPAN) == new


def _keys(payload: bytes) -> list[int]:
    """The keys of a BATCH_GET payload (namespace, count, keys)."""
    ns_len = 2 + payload[1]
    (count,) = struct.unpack_from(">I", payload, ns_len)
    return list(struct.unpack_from(f">{count}Q", payload, ns_len + 4))
