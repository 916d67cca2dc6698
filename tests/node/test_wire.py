"""The peer wire protocol: round trips and fuzzing of the pure decoder."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hypervisor.errors import ProtocolError
from hypervisor.node import wire
from hypervisor.node.wire import Item, Namespace, NsKind, Op, Status

u64 = st.integers(0, 2**64 - 1)
names = st.text(alphabet=st.characters(blacklist_characters="/\0", blacklist_categories=("Cs",)),
                min_size=1, max_size=60).filter(lambda s: not s.startswith(".")
                                                and len(s.encode()) <= 255)
namespaces = st.builds(Namespace, st.sampled_from(list(NsKind)), names)
blobs = st.binary(max_size=5000)
items = st.builds(Item, u64, u64, blobs)
keys = st.lists(u64, max_size=50).map(tuple)

requests = st.one_of(
    st.just(wire.Ping()), st.just(wire.Stat()), st.just(wire.ListNs()),
    st.builds(wire.Put, namespaces, items),
    st.builds(wire.Get, namespaces, u64),
    st.builds(wire.Delete, namespaces, keys),
    st.builds(wire.BatchGet, namespaces, keys),
    st.builds(wire.BatchPut, namespaces, st.lists(items, max_size=8).map(tuple)),
    st.builds(wire.ListKeys, namespaces, u64, st.integers(1, wire.MAX_LIST), st.booleans()),
    st.builds(wire.DropNs, namespaces),
)


@given(reqs=st.lists(st.tuples(u64, requests), min_size=1, max_size=6),
       chunk=st.integers(1, 64))
def test_requests_round_trip_through_any_fragmentation(reqs, chunk: int) -> None:
    stream = b"".join(wire.encode_request(rid, r) for rid, r in reqs)
    dec = wire.FrameDecoder()
    frames = []
    for i in range(0, len(stream), chunk):
        frames += dec.feed(stream[i:i + chunk])
    assert dec.buffered == 0
    assert [(f.request_id, wire.decode_request(f)) for f in frames] == reqs


@given(data=st.binary(max_size=400))
@settings(max_examples=500)
def test_random_bytes_give_frames_or_protocol_error(data: bytes) -> None:
    dec = wire.FrameDecoder()
    try:
        frames = dec.feed(data)
    except ProtocolError:
        return
    for f in frames:
        try:
            wire.decode_request(f)
        except ProtocolError:
            pass


@given(op=st.sampled_from(list(Op)), payload=st.binary(max_size=300), rid=u64)
@settings(max_examples=500)
def test_random_payloads_never_crash_the_request_decoder(op: Op, payload: bytes, rid: int) -> None:
    frame = wire.Frame(int(op), 0, rid, payload)
    try:
        req = wire.decode_request(frame)
    except ProtocolError:
        return
    # Whatever decoded re-encodes to the very same bytes (the format is canonical).
    assert wire.encode_request(rid, req)[wire.HEADER_SIZE:] == payload


@given(payload=st.binary(max_size=300))
@settings(max_examples=300)
def test_random_payloads_never_crash_the_response_decoders(payload: bytes) -> None:
    for fn in (wire.decode_get, wire.decode_u64, wire.decode_count, wire.decode_batch_get,
               wire.decode_statuses, wire.decode_list, wire.decode_stat, wire.decode_list_ns):
        try:
            fn(payload)
        except ProtocolError:
            pass


@given(version=u64, blob=blobs)
def test_get_response_round_trip(version: int, blob: bytes) -> None:
    assert wire.decode_get(wire.get_payload(version, blob)) == (version, blob)


@given(found=st.lists(st.one_of(st.none(), st.tuples(u64, blobs)), max_size=10))
def test_batch_get_response_round_trip(found) -> None:
    assert wire.decode_batch_get(wire.batch_get_payload(found)) == found


@given(entries=st.lists(st.tuples(u64, u64), max_size=50), more=st.booleans())
def test_list_response_round_trip(entries, more: bool) -> None:
    assert wire.decode_list(wire.list_payload(entries, more)) == (entries, more)


@given(infos=st.lists(st.builds(wire.NsInfo, namespaces, u64, u64), max_size=10))
def test_list_ns_response_round_trip(infos) -> None:
    assert wire.decode_list_ns(wire.list_ns_payload(infos)) == infos


def test_stat_and_statuses_round_trip() -> None:
    info = wire.StatInfo("peer-1", 1, 2, 3, 4, 5, 6)
    assert wire.decode_stat(wire.stat_payload(info)) == info
    sts = [Status.OK, Status.STALE, Status.OK]
    assert wire.decode_statuses(wire.statuses_payload(sts)) == sts


@pytest.mark.parametrize("header", [
    struct.pack(">IBBHQ", 3, Op.GET, 0, 0, 1),                 # length below the header
    struct.pack(">IBBHQ", wire.MAX_FRAME + 1, Op.GET, 0, 0, 1),  # too long
    struct.pack(">IBBHQ", 12, 0x99, 0, 0, 1),                  # unknown opcode
    struct.pack(">IBBHQ", 12, Op.PING, 0, 7, 1),               # reserved not zero
    struct.pack(">IBBHQ", 12, Op.PING, 1, 0, 1),               # request with a status
])
def test_impossible_headers_are_protocol_errors(header: bytes) -> None:
    with pytest.raises(ProtocolError):
        wire.FrameDecoder().feed(header)


def test_response_decoder_checks_status() -> None:
    with pytest.raises(ProtocolError):
        wire.FrameDecoder(responses=True).feed(struct.pack(">IBBHQ", 12, Op.PING, 99, 0, 1))
    ok = wire.encode_response(Op.PING, 5, Status.FULL)
    assert wire.FrameDecoder(responses=True).feed(ok)[0].status == Status.FULL


def test_bounds_are_enforced_by_the_encoder() -> None:
    ns = Namespace.page("vm")
    with pytest.raises(ProtocolError):
        wire.encode_request(1, wire.Put(ns, Item(0, 0, b"x" * (wire.MAX_BLOB + 1))))
    with pytest.raises(ProtocolError):
        wire.encode_request(1, wire.BatchGet(ns, tuple(range(wire.MAX_BATCH + 1))))
    with pytest.raises(ProtocolError):
        wire.encode_request(1, wire.Get(ns, 2**64))
    with pytest.raises(ProtocolError):
        wire.encode_request(1, wire.ListKeys(ns, 0, 0, True))


def test_declared_sizes_beyond_bounds_are_refused_before_reading() -> None:
    ns = b"\x00\x02vm"
    huge_count = wire.Frame(Op.BATCH_GET, 0, 1, ns + struct.pack(">I", wire.MAX_BATCH + 1))
    with pytest.raises(ProtocolError, match="exceeds"):
        wire.decode_request(huge_count)
    huge_blob = wire.Frame(Op.PUT, 0, 1, ns + struct.pack(">QQI", 1, 1, wire.MAX_BLOB + 1))
    with pytest.raises(ProtocolError, match="exceeds"):
        wire.decode_request(huge_blob)


@pytest.mark.parametrize("name", ["", ".", "..", ".hidden", "a/b", "a\0b", "x" * 256])
def test_bad_namespace_names(name: str) -> None:
    with pytest.raises(ProtocolError):
        Namespace.chunk(name)
    raw = name.encode()
    frame = wire.Frame(Op.DROP_NS, 0, 1, bytes([1, len(raw) % 256]) + raw)
    with pytest.raises(ProtocolError):
        wire.decode_request(frame)
