"""The pure NBD parser/encoder: handshake machine, request parser, fuzzing."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hypervisor.errors import ProtocolError
from hypervisor.netblock import protocol as nbd

EXPORT = nbd.ExportInfo(name="disk", size=1 << 20, description="d", min_block=512)
EXPORTS = {"disk": EXPORT}


def opt(option: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", nbd.IHAVEOPT, option, len(data)) + data


def replies(data: bytes) -> list[tuple[int, int, bytes]]:
    """Split server output into (option, reply type, payload)."""
    out = []
    pos = 0
    while pos < len(data):
        magic, option, rtype, length = struct.unpack_from(">QIII", data, pos)
        assert magic == nbd.REPLY_MAGIC
        out.append((option, rtype, data[pos + 20:pos + 20 + length]))
        pos += 20 + length
    return out


def go_payload(name: str, *infos: int) -> bytes:
    raw = name.encode()
    return struct.pack(">I", len(raw)) + raw + struct.pack(">H", len(infos)) + \
        b"".join(struct.pack(">H", i) for i in infos)


def meta_payload(name: str, *queries: str) -> bytes:
    raw = name.encode()
    body = struct.pack(">I", len(raw)) + raw + struct.pack(">I", len(queries))
    for q in queries:
        body += struct.pack(">I", len(q)) + q.encode()
    return body


def start(**kw) -> nbd.Handshake:
    hs = nbd.Handshake(EXPORTS, **kw)
    assert nbd.greeting()[:16] == struct.pack(">QQ", nbd.NBDMAGIC, nbd.IHAVEOPT)
    out = hs.feed(struct.pack(">I", nbd.FLAG_C_FIXED_NEWSTYLE | nbd.FLAG_C_NO_ZEROES))
    assert not out.send and not out.close
    return hs


def test_go_with_structured_replies_and_meta_context() -> None:
    hs = start()
    out = hs.feed(opt(nbd.OPT_STRUCTURED_REPLY)
                  + opt(nbd.OPT_SET_META_CONTEXT, meta_payload("disk", nbd.BASE_ALLOCATION))
                  + opt(nbd.OPT_GO, go_payload("disk", nbd.INFO_BLOCK_SIZE, nbd.INFO_NAME)))
    reps = replies(bytes(out.send))
    assert reps[0][:2] == (nbd.OPT_STRUCTURED_REPLY, nbd.REP_ACK)
    assert reps[1][:2] == (nbd.OPT_SET_META_CONTEXT, nbd.REP_META_CONTEXT)
    assert reps[1][2][4:] == b"base:allocation"
    infos = {struct.unpack_from(">H", p)[0]: p[2:] for o, t, p in reps if t == nbd.REP_INFO}
    size, flags = struct.unpack(">QH", infos[nbd.INFO_EXPORT])
    assert size == 1 << 20 and flags & nbd.TFLAG_SEND_FLUSH and flags & nbd.TFLAG_SEND_DF
    assert not flags & nbd.TFLAG_CAN_MULTI_CONN
    assert struct.unpack(">III", infos[nbd.INFO_BLOCK_SIZE]) == (512, 4096, 32 << 20)
    assert infos[nbd.INFO_NAME] == b"disk"
    assert reps[-1][:2] == (nbd.OPT_GO, nbd.REP_ACK)
    assert out.done is not None and out.done.structured_replies
    assert out.done.meta_contexts == {nbd.BASE_ALLOCATION_ID: nbd.BASE_ALLOCATION}


def test_unknown_option_and_export() -> None:
    hs = start()
    out = hs.feed(opt(99, b"xyz") + opt(nbd.OPT_GO, go_payload("nope")) + opt(nbd.OPT_INFO,
                                                                              go_payload("disk")))
    reps = replies(bytes(out.send))
    assert reps[0][:2] == (99, nbd.REP_ERR_UNSUP)
    assert reps[1][:2] == (nbd.OPT_GO, nbd.REP_ERR_UNKNOWN)
    # INFO without a block size request on an export with min_block > 1
    assert reps[-1][:2] == (nbd.OPT_INFO, nbd.REP_ERR_BLOCK_SIZE_REQD)
    assert out.done is None and not out.close


def test_list_and_abort() -> None:
    hs = start()
    out = hs.feed(opt(nbd.OPT_LIST) + opt(nbd.OPT_LIST, b"x") + opt(nbd.OPT_ABORT))
    reps = replies(bytes(out.send))
    assert reps[0] == (nbd.OPT_LIST, nbd.REP_SERVER, b"\0\0\0\4disk")
    assert reps[1][:2] == (nbd.OPT_LIST, nbd.REP_ACK)
    assert reps[2][:2] == (nbd.OPT_LIST, nbd.REP_ERR_INVALID)
    assert reps[3][:2] == (nbd.OPT_ABORT, nbd.REP_ACK)
    assert out.close


def test_set_meta_context_needs_structured_replies() -> None:
    hs = start()
    out = hs.feed(opt(nbd.OPT_SET_META_CONTEXT, meta_payload("disk", nbd.BASE_ALLOCATION)))
    assert replies(bytes(out.send))[0][1] == nbd.REP_ERR_INVALID
    out = hs.feed(opt(nbd.OPT_LIST_META_CONTEXT, meta_payload("disk")))
    reps = replies(bytes(out.send))
    assert reps[0][1] == nbd.REP_META_CONTEXT and reps[1][1] == nbd.REP_ACK


def test_export_name_without_no_zeroes_pads() -> None:
    hs = nbd.Handshake(EXPORTS)
    hs.feed(struct.pack(">I", nbd.FLAG_C_FIXED_NEWSTYLE))
    out = hs.feed(opt(nbd.OPT_EXPORT_NAME, b"disk") + b"extra")
    assert len(out.send) == 8 + 2 + 124 and out.done is not None
    assert hs.leftover() == b"extra"


def test_export_name_unknown_closes() -> None:
    out = start().feed(opt(nbd.OPT_EXPORT_NAME, b"zzz"))
    assert out.close and not out.send


def test_bad_client_flags_and_magic_close() -> None:
    hs = nbd.Handshake(EXPORTS)
    assert hs.feed(struct.pack(">I", 0x80)).close
    hs = start()
    assert hs.feed(struct.pack(">QII", 0x1234, 1, 0)).close
    hs = start()
    assert hs.feed(struct.pack(">QII", nbd.IHAVEOPT, 1, nbd.MAX_OPTION_LENGTH + 1)).close


def test_tls_required_and_starttls_resets_state() -> None:
    hs = start(tls_available=True, tls_required=True)
    out = hs.feed(opt(nbd.OPT_GO, go_payload("disk")))
    assert replies(bytes(out.send))[0][1] == nbd.REP_ERR_TLS_REQD
    assert start(tls_available=True, tls_required=True).feed(
        opt(nbd.OPT_EXPORT_NAME, b"disk")).close
    hs = start(tls_available=True)
    hs.feed(opt(nbd.OPT_STRUCTURED_REPLY))
    out = hs.feed(opt(nbd.OPT_STARTTLS))
    assert out.start_tls and replies(bytes(out.send))[0][1] == nbd.REP_ACK
    hs.tls_established()
    out = hs.feed(opt(nbd.OPT_STARTTLS))
    assert replies(bytes(out.send))[0][1] == nbd.REP_ERR_INVALID
    out = hs.feed(opt(nbd.OPT_GO, go_payload("disk")))
    assert out.done is not None and out.done.tls and not out.done.structured_replies


def test_starttls_refused_without_credentials() -> None:
    out = start().feed(opt(nbd.OPT_STARTTLS))
    assert replies(bytes(out.send))[0][1] == nbd.REP_ERR_POLICY and not out.start_tls


def request(command: int, *, flags: int = 0, cookie: int = 7, offset: int = 0,
            length: int = 0, payload: bytes = b"") -> bytes:
    return struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, flags, command, cookie, offset,
                       length) + payload


def test_request_parser_split_anywhere() -> None:
    stream = (request(nbd.CMD_WRITE, offset=4096, length=5, payload=b"hello")
              + request(nbd.CMD_READ, cookie=8, length=512) + request(nbd.CMD_DISC))
    for cut in range(len(stream) + 1):
        parser = nbd.RequestParser()
        got = parser.feed(stream[:cut]) + parser.feed(stream[cut:])
        assert [(r.command, r.cookie, bytes(r.payload)) for r in got] == [
            (nbd.CMD_WRITE, 7, b"hello"), (nbd.CMD_READ, 8, b""), (nbd.CMD_DISC, 7, b"")]


def test_request_parser_rejects_bad_magic_and_huge_write() -> None:
    with pytest.raises(ProtocolError):
        nbd.RequestParser().feed(b"\0" * 28)
    with pytest.raises(ProtocolError):
        nbd.RequestParser().feed(request(nbd.CMD_WRITE, length=nbd.MAX_WRITE_PAYLOAD + 1))


NEG = nbd.Negotiated(export=EXPORT, structured_replies=False, meta_contexts={},
                     no_zeroes=True, tls=False)


@pytest.mark.parametrize(("req", "errno"), [
    (nbd.Request(0, nbd.CMD_READ, 1, 0, 4096), 0),
    (nbd.Request(0, nbd.CMD_READ, 1, (1 << 20) - 1, 2), nbd.EINVAL),
    (nbd.Request(0, nbd.CMD_WRITE, 1, (1 << 20), 1), nbd.ENOSPC),
    (nbd.Request(0, 42, 1, 0, 0), nbd.EINVAL),
    (nbd.Request(nbd.CMD_FLAG_DF, nbd.CMD_READ, 1, 0, 1), nbd.EINVAL),
    (nbd.Request(nbd.CMD_FLAG_FAST_ZERO, nbd.CMD_WRITE, 1, 0, 1), nbd.EINVAL),
    (nbd.Request(nbd.CMD_FLAG_FUA, nbd.CMD_CACHE, 1, 0, 1), 0),
    (nbd.Request(0, nbd.CMD_FLUSH, 1, 1, 0), nbd.EINVAL),
    (nbd.Request(0, nbd.CMD_BLOCK_STATUS, 1, 0, 1), nbd.EINVAL),
    (nbd.Request(1 << 9, nbd.CMD_READ, 1, 0, 1), nbd.EINVAL),
])
def test_check_request(req: nbd.Request, errno: int) -> None:
    assert nbd.check_request(req, NEG) == errno


def test_read_only_refuses_writes() -> None:
    ro = nbd.Negotiated(export=nbd.ExportInfo(name="r", size=4096, read_only=True),
                        structured_replies=True, meta_contexts={}, no_zeroes=True, tls=False)
    assert nbd.check_request(nbd.Request(0, nbd.CMD_TRIM, 1, 0, 1), ro) == nbd.EPERM
    assert ro.export.transmission_flags & nbd.TFLAG_READ_ONLY
    assert not ro.export.transmission_flags & nbd.TFLAG_SEND_TRIM


def test_encoders() -> None:
    assert nbd.simple_reply(5, nbd.EIO) == struct.pack(">IIQ", nbd.SIMPLE_REPLY_MAGIC, 5, 5)
    err = nbd.structured_error(9, nbd.EINVAL, "bad")
    magic, flags, rtype, cookie, length = struct.unpack_from(">IHHQI", err)
    assert (flags, rtype, cookie, length) == (nbd.REPLY_FLAG_DONE, nbd.REPLY_TYPE_ERROR, 9, 9)
    bs = nbd.structured_block_status(1, 1, [(4096, 0), (512, 3)])
    assert struct.unpack_from(">IIIII", bs, 20) == (1, 4096, 0, 512, 3)
    assert nbd.clip_extents([(10, 0), (10, 0), (50, 3)], 25, req_one=False) == [(20, 0), (5, 3)]
    assert nbd.clip_extents([(10, 0), (50, 3)], 25, req_one=True) == [(10, 0)]


# --- fuzzing -------------------------------------------------------------------

option_frames = st.builds(
    lambda o, d: opt(o, d),
    st.sampled_from([1, 2, 3, 5, 6, 7, 8, 9, 10, 11, 0xFFFF]) | st.integers(0, 2**32 - 1),
    st.binary(max_size=64) | st.builds(lambda n, i: go_payload(n, *i), st.text(max_size=8),
                                       st.lists(st.integers(0, 5), max_size=4))
    | st.builds(lambda n, q: meta_payload(n, *q), st.sampled_from(["disk", ""]),
                                  st.lists(st.text(max_size=20), max_size=3)))


@settings(max_examples=400, deadline=None)
@given(flags=st.integers(0, 2**32 - 1), frames=st.lists(option_frames, max_size=6),
       junk=st.binary(max_size=40), cuts=st.lists(st.integers(1, 64), max_size=10),
       tls=st.booleans())
def test_fuzz_handshake(flags: int, frames: list[bytes], junk: bytes, cuts: list[int],
                        tls: bool) -> None:
    hs = nbd.Handshake(EXPORTS, tls_available=tls, default_export="disk")
    stream = struct.pack(">I", flags) + b"".join(frames) + junk
    pos = 0
    sent = bytearray()
    for cut in cuts + [len(stream)]:
        out = hs.feed(stream[pos:pos + cut])
        pos += cut
        sent += out.send
        if out.start_tls:
            hs.tls_established()
        if out.close or out.done:
            break
    # every byte sent is a whole option reply, except EXPORT_NAME's size+flags at the end
    pos = 0
    while pos + 20 <= len(sent) and sent[pos:pos + 8] == nbd.REPLY_MAGIC.to_bytes(8, "big"):
        pos += 20 + struct.unpack_from(">I", sent, pos + 16)[0]
    assert len(sent) - pos in (0, 10, 134)
    if len(sent) - pos:
        assert hs.state == "done"


@settings(max_examples=400, deadline=None)
@given(data=st.binary(max_size=400), cut=st.integers(0, 400))
def test_fuzz_request_parser(data: bytes, cut: int) -> None:
    parser = nbd.RequestParser()
    try:
        reqs = parser.feed(data[:cut]) + parser.feed(data[cut:])
    except ProtocolError:
        return
    for r in reqs:
        nbd.check_request(r, NEG)
        assert r.command != nbd.CMD_WRITE or len(r.payload) == r.length


@settings(max_examples=300, deadline=None)
@given(reqs=st.lists(st.tuples(st.integers(0, 9), st.integers(0, 31), st.integers(0, 2**64 - 1),
                                 st.integers(0, 2**64 - 1), st.integers(0, 300)), max_size=8))
def test_fuzz_valid_framing_roundtrip(reqs: list[tuple[int, int, int, int, int]]) -> None:
    stream = b""
    for cmd, flags, cookie, offset, length in reqs:
        payload = bytes(length) if cmd == nbd.CMD_WRITE else b""
        stream += request(cmd, flags=flags, cookie=cookie, offset=offset, length=length,
                          payload=payload)
    got = nbd.RequestParser().feed(stream)
    assert [(r.command, r.cookie, r.offset, r.length) for r in got] == \
        [(c, k, o, n) for c, f, k, o, n in reqs]
    for r in got:
        assert nbd.check_request(r, NEG) in (0, nbd.EINVAL, nbd.ENOSPC, nbd.EOVERFLOW,
                                              nbd.EPERM, nbd.ENOTSUP)
