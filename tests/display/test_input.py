"""Page input messages → QMP input-send-event events (pure; fuzzed)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hypervisor.errors import ProtocolError
from hypervisor.remote_display.input import (
    AXIS_MAX,
    KEY_CODES,
    InputRefused,
    _per_character,
    input_send_event,
    parse_input_message,
    text_key_events,
)


def keys(events: list) -> list[tuple[str, bool]]:
    return [(e["data"]["key"]["data"], e["data"]["down"]) for e in events if e["type"] == "key"]


def test_pointer_buttons_wheel_keys() -> None:
    assert parse_input_message('{"t":"move","x":0.5,"y":1}')[1] == [
        {"type": "abs", "data": {"axis": "x", "value": round(0.5 * AXIS_MAX)}},
        {"type": "abs", "data": {"axis": "y", "value": AXIS_MAX}}]
    kind, events = parse_input_message('{"t":"button","button":2,"down":true,"x":0,"y":0}')
    assert kind == "button" and events[-1] == {"type": "btn",
                                               "data": {"down": True, "button": "right"}}
    _, events = parse_input_message('{"t":"wheel","dy":-2}')
    assert [e["data"]["button"] for e in events] == ["wheel-up"] * 4
    assert keys(parse_input_message('{"t":"key","code":"ControlLeft","down":true}')[1]) == [
        ("ctrl", True)]
    assert KEY_CODES["KeyQ"] == "q" and KEY_CODES["Enter"] == "ret"


def test_text_is_typed_with_shift_where_needed() -> None:
    assert keys(text_key_events("aB$\n")) == [
        ("a", True), ("a", False),
        ("shift", True), ("b", True), ("b", False), ("shift", False),
        ("shift", True), ("4", True), ("4", False), ("shift", False),
        ("ret", True), ("ret", False)]
    groups = _per_character(text_key_events("aB$\n"))
    assert [len(g) for g in groups] == [2, 4, 4, 2]


@pytest.mark.parametrize("raw, error, message", [
    ("not json", ProtocolError, "not JSON"),
    ("[1]", ProtocolError, "object"),
    ('{"t":"fly"}', ProtocolError, "unknown input message kind"),
    ('{"t":"move","x":2,"y":0}', ProtocolError, "x must be"),
    ('{"t":"move","x":true,"y":0}', ProtocolError, "x must be"),
    ('{"t":"key","code":"KeyA","down":"yes"}', ProtocolError, "down must be"),
    ('{"t":"key","code":"Hyper","down":true}', InputRefused, "unknown key code"),
    ('{"t":"text","text":"caf\\u00e9"}', InputRefused, "cannot type"),
    ('{"t":"char","text":"ab"}', ProtocolError, "one character"),
    ('{"t":"text","text":"' + "a" * 5000 + '"}', InputRefused, "at most"),
    ("x" * 70000, ProtocolError, "limit"),
])
def test_bad_messages_get_one_clear_error(raw: str, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        parse_input_message(raw)


def test_qmp_command_shape() -> None:
    command = json.loads(input_send_event(text_key_events("x")))
    assert command["execute"] == "input-send-event"
    assert len(command["arguments"]["events"]) == 2


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=200), st.binary(max_size=200),
                 st.dictionaries(st.sampled_from(["t", "x", "y", "code", "down", "text", "dy",
                                                  "button"]),
                                 st.one_of(st.none(), st.booleans(), st.integers(),
                                           st.floats(allow_nan=True), st.text(max_size=8),
                                           st.sampled_from(["move", "key", "button", "wheel",
                                                            "text", "char", "KeyA"])))
                 .map(json.dumps)))
def test_fuzz_only_protocol_errors(raw: str | bytes) -> None:
    try:
        kind, events = parse_input_message(raw)
    except ProtocolError:
        return
    json.loads(input_send_event(events))  # whatever passes is valid QMP
    for event in events:
        if event["type"] == "abs":
            assert 0 <= event["data"]["value"] <= AXIS_MAX
