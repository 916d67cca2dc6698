"""RFB 3.8 client parser/encoder: handshake, updates, resizes, malformed input."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hypervisor.remote_display.rfb import (
    BGRX32,
    ENCODING_COPYRECT,
    ENCODING_DESKTOP_SIZE,
    ENCODING_EXTENDED_DESKTOP_SIZE,
    ENCODING_RAW,
    Bell,
    CopyRect,
    DesktopResized,
    PixelFormat,
    RawRect,
    RfbClient,
    RfbProtocolError,
    ServerCutText,
    ServerInit,
    UpdateBegin,
    UpdateEnd,
)


def server_greeting(width: int = 4, height: int = 3, name: bytes = b"guest") -> bytes:
    """Version, security types [None], SecurityResult OK, ServerInit."""
    return (b"RFB 003.008\n" + bytes([1, 1]) + struct.pack(">I", 0)
            + struct.pack(">HH", width, height) + BGRX32.pack()
            + struct.pack(">I", len(name)) + name)


def rect(x: int, y: int, w: int, h: int, encoding: int, body: bytes = b"") -> bytes:
    return struct.pack(">HHHHi", x, y, w, h, encoding) + body


def update(*rects: bytes) -> bytes:
    return struct.pack(">BxH", 0, len(rects)) + b"".join(rects)


def handshaken(width: int = 4, height: int = 3) -> RfbClient:
    client = RfbClient()
    client.receive_data(server_greeting(width, height))
    client.data_to_send()
    return client


def test_handshake_sends_version_security_init_format_encodings() -> None:
    client = RfbClient()
    events = client.receive_data(server_greeting(name=b"omega-vm"))
    assert events == [ServerInit(4, 3, BGRX32, "omega-vm")]
    out = client.data_to_send()
    assert out[:12] == b"RFB 003.008\n"
    assert out[12:14] == b"\x01\x01"  # security None, shared
    assert out[14:18] == b"\x00\x00\x00\x00" and PixelFormat.unpack(out[18:34]) == BGRX32
    kind, count = struct.unpack(">BxH", out[34:38])
    assert kind == 2
    encodings = struct.unpack(f">{count}i", out[38:])
    assert set(encodings) == {ENCODING_RAW, ENCODING_COPYRECT, ENCODING_DESKTOP_SIZE,
                              ENCODING_EXTENDED_DESKTOP_SIZE}
    client.request_update(incremental=True)
    assert client.data_to_send() == struct.pack(">BBHHHH", 3, 1, 0, 0, 4, 3)


def test_byte_at_a_time_equals_all_at_once() -> None:
    stream = server_greeting() + update(rect(1, 1, 2, 1, ENCODING_RAW, b"\x01" * 8),
                                        rect(0, 0, 1, 1, ENCODING_COPYRECT, struct.pack(">HH", 3, 2)))
    whole = RfbClient().receive_data(stream)
    client = RfbClient()
    pieces = []
    for byte in stream:
        pieces += client.receive_data(bytes([byte]))
    assert pieces == whole
    assert whole[1:] == [UpdateBegin(2), RawRect(1, 1, 2, 1, b"\x01" * 8),
                         CopyRect(0, 0, 1, 1, 3, 2), UpdateEnd()]


def test_resize_and_other_server_messages() -> None:
    client = handshaken()
    events = client.receive_data(
        update(rect(0, 0, 640, 480, ENCODING_DESKTOP_SIZE))
        + update(rect(0, 0, 800, 600, ENCODING_EXTENDED_DESKTOP_SIZE,
                      struct.pack(">B3x", 1) + bytes(16)))
        + b"\x02" + struct.pack(">BxHH", 1, 0, 1) + bytes(6) + b"\x02"
        + struct.pack(">B3xI", 3, 2) + b"hi")
    assert DesktopResized(640, 480) in events and DesktopResized(800, 600) in events
    assert (client.width, client.height) == (800, 600)
    assert events[-2:] == [Bell(), ServerCutText("hi")]
    # An empty update is complete at once.
    assert client.receive_data(update()) == [UpdateBegin(0), UpdateEnd()]


@pytest.mark.parametrize("stream, message", [
    (b"HTTP/1.1 200\n", "not an RFB server"),
    (b"RFB 003.003\n", "3.8 is needed"),
    (b"RFB 003.008\n\x00" + struct.pack(">I", 4) + b"nope", "refused the connection: nope"),
    (b"RFB 003.008\n\x01\x02", "not None"),
    (b"RFB 003.008\n\x01\x01" + struct.pack(">I", 1) + struct.pack(">I", 3) + b"bad",
     "security handshake failed: bad"),
])
def test_bad_handshakes_raise_one_clear_error(stream: bytes, message: str) -> None:
    client = RfbClient()
    with pytest.raises(RfbProtocolError, match=message):
        client.receive_data(stream)
    with pytest.raises(RfbProtocolError, match="already failed"):
        client.receive_data(b"")


@pytest.mark.parametrize("tail, message", [
    (b"\x09", "unknown server message type 9"),
    (update(rect(3, 0, 2, 1, ENCODING_RAW, bytes(8))), "outside"),
    (update(rect(0, 0, 2, 2, ENCODING_COPYRECT, struct.pack(">HH", 3, 0))), "outside"),
    (update(rect(0, 0, 1, 1, 7)), "never asked for"),
    (update(rect(0, 0, 20000, 1, ENCODING_DESKTOP_SIZE)), "out of range"),
])
def test_bad_updates_raise(tail: bytes, message: str) -> None:
    client = handshaken()
    with pytest.raises(RfbProtocolError, match=message):
        client.receive_data(tail)


def test_update_request_before_handshake_is_refused() -> None:
    with pytest.raises(RfbProtocolError):
        RfbClient().request_update(incremental=True)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=600), st.integers(min_value=1, max_value=64))
def test_fuzz_arbitrary_bytes_only_raise_protocol_error(noise: bytes, split: int) -> None:
    client = handshaken(8, 8)
    try:
        for i in range(0, len(noise), split):
            for event in client.receive_data(noise[i:i + split]):
                if isinstance(event, RawRect):
                    assert len(event.pixels) == event.width * event.height * 4
                    assert event.x + event.width <= client.width
    except RfbProtocolError:
        pass


rects_strategy = st.lists(st.tuples(st.integers(0, 7), st.integers(0, 7), st.integers(1, 8),
                                    st.integers(1, 8), st.binary(min_size=4, max_size=4)),
                          max_size=6)


@settings(max_examples=200, deadline=None)
@given(rects_strategy, st.integers(min_value=1, max_value=97))
def test_fuzz_valid_updates_roundtrip_any_split(rects: list, split: int) -> None:
    body = []
    expected = []
    for x, y, w, h, px in rects:
        w, h = min(w, 8 - x), min(h, 8 - y)
        body.append(rect(x, y, w, h, ENCODING_RAW, px * (w * h)))
        expected.append(RawRect(x, y, w, h, px * (w * h)))
    stream = update(*body)
    client = handshaken(8, 8)
    got = []
    for i in range(0, len(stream), split):
        got += client.receive_data(stream[i:i + split])
    assert got == [UpdateBegin(len(rects)), *expected, UpdateEnd()]
