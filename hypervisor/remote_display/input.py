"""Keyboard and mouse from the web page into the guest, through QMP.

The page sends small JSON messages on two data channels (pointer motion on an
unordered, no-retransmit channel; keys, buttons, wheel and text on an ordered
one). :func:`parse_input_message` validates one message and turns it into QMP
``input-send-event`` events (pure, no I/O, fuzzed). :class:`QmpInput` sends
them to the running domain with ``libvirt_qemu.qemuMonitorCommand`` (libvirt's
own monitor connection; Omega opens no second QMP socket).

Mapping:
- pointer: absolute, through the domain's usb-tablet; page coordinates are
  fractions of the picture (0..1), scaled to QEMU's 0..0x7fff axis range;
- buttons left/middle/right (page button 0/1/2), wheel as wheel-up/-down clicks;
- keys: the browser's ``KeyboardEvent.code`` (the physical key) → QEMU qcode,
  pressed and released separately, so modifiers combine as on a real keyboard;
- printable characters (``{"t": "char"}``) and pasted text (``{"t": "text"}``)
  are *typed* as key presses for a US keymap in the guest, with Shift where the
  character needs it. That is how the clipboard reaches the guest: the tiny
  guest has no clipboard agent, so text is typed, not pasted; characters
  outside printable ASCII are refused with an error naming them.

Thread model: :class:`QmpInput` runs each monitor command on one worker thread
(libvirt calls block); messages are applied in order, and pointer motion that
queues up behind a slow monitor is coalesced to the newest position.

Typed text is sent one character per command, :data:`TYPE_INTERVAL` apart:
QEMU's PS/2 keyboard keeps the 16-byte queue of the real device and drops
scancodes beyond it, so a whole line in one ``input-send-event`` loses keys
(observed with the tiny guest).
"""

from __future__ import annotations

import asyncio
import json
import string
from collections.abc import Iterable
from typing import Any

from hypervisor.errors import LibvirtError, ProtocolError

__all__ = [
    "AXIS_MAX",
    "KEY_CODES",
    "MAX_MESSAGE",
    "MAX_TEXT",
    "InputRefused",
    "QmpInput",
    "input_send_event",
    "parse_input_message",
    "text_key_events",
]

AXIS_MAX = 0x7FFF
TYPE_INTERVAL = 0.015
MAX_MESSAGE = 64 * 1024
MAX_TEXT = 4096
BUTTONS = {0: "left", 1: "middle", 2: "right", 3: "side", 4: "extra"}


class InputRefused(ProtocolError):
    """The message is well-formed but not allowed (role, unknown key, bad text)."""


def _code_table() -> dict[str, str]:
    table = {f"Key{c}": c.lower() for c in string.ascii_uppercase}
    table |= {f"Digit{d}": d for d in string.digits}
    table |= {f"F{n}": f"f{n}" for n in range(1, 13)}
    table |= {f"Numpad{d}": f"kp_{d}" for d in string.digits}
    table |= {
        "Enter": "ret", "Space": "spc", "Backspace": "backspace", "Tab": "tab",
        "Escape": "esc", "Minus": "minus", "Equal": "equal", "BracketLeft": "bracket_left",
        "BracketRight": "bracket_right", "Backslash": "backslash", "Semicolon": "semicolon",
        "Quote": "apostrophe", "Backquote": "grave_accent", "Comma": "comma", "Period": "dot",
        "Slash": "slash", "CapsLock": "caps_lock", "ShiftLeft": "shift", "ShiftRight": "shift_r",
        "ControlLeft": "ctrl", "ControlRight": "ctrl_r", "AltLeft": "alt", "AltRight": "alt_r",
        "MetaLeft": "meta_l", "MetaRight": "meta_r", "ContextMenu": "menu",
        "ArrowUp": "up", "ArrowDown": "down", "ArrowLeft": "left", "ArrowRight": "right",
        "Insert": "insert", "Delete": "delete", "Home": "home", "End": "end",
        "PageUp": "pgup", "PageDown": "pgdn", "NumLock": "num_lock", "ScrollLock": "scroll_lock",
        "PrintScreen": "print", "Pause": "pause", "IntlBackslash": "less",
        "NumpadAdd": "kp_add", "NumpadSubtract": "kp_subtract",
        "NumpadMultiply": "kp_multiply", "NumpadDivide": "kp_divide",
        "NumpadEnter": "kp_enter", "NumpadDecimal": "kp_decimal",
    }
    return table


#: Browser ``KeyboardEvent.code`` → QEMU qcode.
KEY_CODES: dict[str, str] = _code_table()


def _char_table() -> dict[str, tuple[str, bool]]:
    """Printable ASCII → (qcode, needs shift) on a US keymap."""
    table: dict[str, tuple[str, bool]] = {}
    for c in string.ascii_lowercase:
        table[c] = (c, False)
        table[c.upper()] = (c, True)
    for d in string.digits:
        table[d] = (d, False)
    for plain, shifted, code in [
        ("`", "~", "grave_accent"), ("-", "_", "minus"), ("=", "+", "equal"),
        ("[", "{", "bracket_left"), ("]", "}", "bracket_right"), ("\\", "|", "backslash"),
        (";", ":", "semicolon"), ("'", '"', "apostrophe"), (",", "<", "comma"),
        (".", ">", "dot"), ("/", "?", "slash"),
    ]:
        table[plain] = (code, False)
        table[shifted] = (code, True)
    for shifted, digit in zip(")!@#$%^&*(", string.digits, strict=True):
        table[shifted] = (digit, True)
    table[" "] = ("spc", False)
    table["\n"] = ("ret", False)
    table["\t"] = ("tab", False)
    return table


CHARS: dict[str, tuple[str, bool]] = _char_table()


def _key(qcode: str, down: bool) -> dict[str, Any]:
    return {"type": "key", "data": {"down": down, "key": {"type": "qcode", "data": qcode}}}


def _button(button: str, down: bool) -> dict[str, Any]:
    return {"type": "btn", "data": {"down": down, "button": button}}


def _abs(x: float, y: float) -> list[dict[str, Any]]:
    return [{"type": "abs", "data": {"axis": "x", "value": round(x * AXIS_MAX)}},
            {"type": "abs", "data": {"axis": "y", "value": round(y * AXIS_MAX)}}]


def text_key_events(text: str) -> list[dict[str, Any]]:
    """Key presses that type ``text`` on a US keymap.

    Args:
        text: printable ASCII, newline and tab; ``\\r\\n`` counts as one newline.

    Returns:
        QMP input events (press and release per character, Shift around shifted ones).

    Raises:
        InputRefused: text too long, or characters that cannot be typed.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if len(text) > MAX_TEXT:
        raise InputRefused(f"text of {len(text)} characters; at most {MAX_TEXT} are typed")
    bad = sorted({c for c in text if c not in CHARS})
    if bad:
        raise InputRefused(f"cannot type {''.join(bad)!r} into the guest (US keymap, "
                           "printable ASCII only)")
    events: list[dict[str, Any]] = []
    for char in text:
        qcode, shift = CHARS[char]
        if shift:
            events.append(_key("shift", True))
        events += [_key(qcode, True), _key(qcode, False)]
        if shift:
            events.append(_key("shift", False))
    return events


def _number(message: dict[str, Any], name: str, low: float, high: float) -> float:
    value = message.get(name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ProtocolError(f"input {message.get('t')!r}: {name} must be a number in "
                            f"[{low}, {high}]")
    return float(value)


def _flag(message: dict[str, Any], name: str) -> bool:
    value = message.get(name)
    if not isinstance(value, bool):
        raise ProtocolError(f"input {message.get('t')!r}: {name} must be true or false")
    return value


def parse_input_message(raw: str | bytes) -> tuple[str, list[dict[str, Any]]]:
    """Validate one page message and translate it to QMP input events.

    Args:
        raw: the data-channel message (JSON text).

    Returns:
        (kind, events): kind is the message's ``t``; events may be empty.

    Raises:
        ProtocolError: not JSON, not an object, unknown kind or bad fields.
        InputRefused: a key or character Omega cannot send.
    """
    if len(raw) > MAX_MESSAGE:
        raise ProtocolError(f"input message of {len(raw)} bytes (limit {MAX_MESSAGE})")
    try:
        message = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"input message is not JSON: {exc}") from None
    if not isinstance(message, dict) or not isinstance(message.get("t"), str):
        raise ProtocolError("input message must be an object with a string field 't'")
    kind = message["t"]
    if kind == "move":
        return kind, _abs(_number(message, "x", 0, 1), _number(message, "y", 0, 1))
    if kind == "button":
        index = int(_number(message, "button", 0, 4))
        events = []
        if "x" in message or "y" in message:
            events += _abs(_number(message, "x", 0, 1), _number(message, "y", 0, 1))
        return kind, events + [_button(BUTTONS[index], _flag(message, "down"))]
    if kind == "wheel":
        steps = int(_number(message, "dy", -20, 20))
        button = "wheel-down" if steps > 0 else "wheel-up"
        events = []
        for _ in range(abs(steps)):
            events += [_button(button, True), _button(button, False)]
        return kind, events
    if kind == "key":
        code = message.get("code")
        if not isinstance(code, str) or code not in KEY_CODES:
            raise InputRefused(f"unknown key code {code!r}")
        return kind, [_key(KEY_CODES[code], _flag(message, "down"))]
    if kind in ("char", "text"):
        text = message.get("text")
        if not isinstance(text, str) or (kind == "char" and len(text) != 1):
            raise ProtocolError(f"input {kind!r}: text must be a string"
                                + (" of one character" if kind == "char" else ""))
        return kind, text_key_events(text)
    raise ProtocolError(f"unknown input message kind {kind!r}")


def input_send_event(events: Iterable[dict[str, Any]]) -> str:
    """The QMP command (JSON text) that injects ``events``.

    Args:
        events: QMP InputEvent objects.

    Returns:
        ``{"execute": "input-send-event", "arguments": {"events": [...]}}`` as JSON.
    """
    return json.dumps({"execute": "input-send-event", "arguments": {"events": list(events)}})


class QmpInput:
    """Inject input into one running libvirt domain.

    Args:
        uri: libvirt connection URI.
        domain_name: the domain.
    """

    def __init__(self, uri: str, domain_name: str) -> None:
        self.uri = uri
        self.domain_name = domain_name
        self.commands_sent = 0
        self._conn: Any = None
        self._domain: Any = None
        # (events, paced) in order; None ends the sender task.
        self._queue: asyncio.Queue[tuple[list[dict[str, Any]], bool] | None] = asyncio.Queue()
        self._pending_motion: list[dict[str, Any]] | None = None
        self._task: asyncio.Task[None] | None = None
        self._pressed_keys: set[str] = set()
        self._pressed_buttons: set[str] = set()
        self.last_error: str | None = None

    def _connect(self) -> None:
        import libvirt

        try:
            self._conn = libvirt.open(self.uri)
            self._domain = self._conn.lookupByName(self.domain_name)
        except libvirt.libvirtError as exc:
            raise LibvirtError(f"cannot reach domain {self.domain_name}: "
                               f"{exc.get_error_message()}") from exc

    async def start(self) -> None:
        """Open the libvirt connection and start the sender task.

        Raises:
            LibvirtError: libvirtd or the domain is unreachable.
        """
        await asyncio.to_thread(self._connect)
        self._task = asyncio.create_task(self._run(), name="qmp-input")

    async def close(self) -> None:
        """Release held keys/buttons, stop, close the connection."""
        if self._task is not None:
            self.release_all()
            await self._queue.put(None)
            await self._task
            self._task = None
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await asyncio.to_thread(conn.close)

    def submit(self, kind: str, events: list[dict[str, Any]]) -> None:
        """Queue events for the guest (motion is coalesced to the newest).

        Args:
            kind: the message kind (``move`` is coalesced).
            events: QMP input events.
        """
        for event in events:
            data = event["data"]
            if event["type"] == "key":
                (self._pressed_keys.add if data["down"] else self._pressed_keys.discard)(
                    data["key"]["data"])
            elif event["type"] == "btn" and not data["button"].startswith("wheel"):
                (self._pressed_buttons.add if data["down"] else self._pressed_buttons.discard)(
                    data["button"])
        if kind == "move":
            fresh = self._pending_motion is None
            self._pending_motion = events
            if fresh:
                self._queue.put_nowait(([], False))  # a wake-up; the sender reads _pending_motion
            return
        if kind in ("text", "char"):
            for group in _per_character(events):
                self._queue.put_nowait((group, True))
            return
        if events:
            self._queue.put_nowait((events, False))

    def release_all(self) -> None:
        """Release every key and button an operator left pressed (on disconnect)."""
        events = [_key(k, False) for k in sorted(self._pressed_keys)]
        events += [_button(b, False) for b in sorted(self._pressed_buttons)]
        self._pressed_keys.clear()
        self._pressed_buttons.clear()
        if events:
            self._queue.put_nowait((events, False))

    def _send(self, events: list[dict[str, Any]]) -> None:
        import libvirt
        import libvirt_qemu

        try:
            reply = libvirt_qemu.qemuMonitorCommand(self._domain, input_send_event(events), 0)
        except libvirt.libvirtError as exc:
            raise LibvirtError(f"input to {self.domain_name} failed: "
                               f"{exc.get_error_message()}") from exc
        if '"error"' in reply:
            raise LibvirtError(f"QEMU refused input for {self.domain_name}: {reply}")
        self.commands_sent += 1

    async def _run(self) -> None:
        while True:
            item = await self._queue.get()
            if item is None:
                return
            events, paced = item
            if not events:
                events, self._pending_motion = self._pending_motion or [], None
                if not events:
                    continue
            try:
                await asyncio.to_thread(self._send, events)
            except LibvirtError as exc:  # keep serving; the page is told via last_error
                self.last_error = str(exc)
            if paced:
                await asyncio.sleep(TYPE_INTERVAL)


def _per_character(events: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Split typed-text key events into one group per character (see TYPE_INTERVAL)."""
    groups: list[list[dict[str, Any]]] = []
    current: list[dict[str, Any]] = []
    for i, event in enumerate(events):
        current.append(event)
        following = events[i + 1]["data"] if i + 1 < len(events) else None
        shift_up_follows = (following is not None and not following["down"]
                            and following["key"]["data"] == "shift")
        if not event["data"]["down"] and not shift_up_follows:
            groups.append(current)
            current = []
    if current:
        groups.append(current)
    return groups
