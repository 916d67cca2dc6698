"""Done-when: a real browser drives a real guest's screen through the display server.

Headless Debian chromium (Playwright, executable_path) logs in, receives video
(getStats framesDecoded rising), types a command on the guest's VGA console
through the page and the guest runs it (its output lands in the serial log);
a viewer cannot inject input; a wrong token is refused; a second viewer joining
and leaving does not stall the first.
"""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
from typing import Any

import pytest

pytestmark = [pytest.mark.libvirt, pytest.mark.slow]

CONNECT_TIMEOUT_MS = 90_000


def open_page(browser: Any, url: str) -> Any:
    # bypass_csp: Playwright evaluates its wait predicates as strings, which the
    # page's CSP (no eval) would otherwise refuse.
    page = browser.new_context(bypass_csp=True).new_page()
    page.goto(url)
    page.wait_for_function("window.omega && window.omega.state === 'connected'",
                           timeout=CONNECT_TIMEOUT_MS)
    return page


def frames_decoded(page: Any) -> int:
    return int(page.evaluate("window.omega.stats.framesDecoded"))


def wait_frames_above(page: Any, count: int) -> None:
    page.wait_for_function(f"window.omega.stats.framesDecoded > {count}",
                           timeout=CONNECT_TIMEOUT_MS)


def wait_serial(path: Any, pattern: str, *, timeout: float = 120) -> str:
    """Wait (bounded, not timed) for the guest's serial log to show ``pattern``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = path.read_text(errors="replace")
        match = re.search(pattern, text)
        if match:
            return match.group(0)
        time.sleep(0.5)
    raise AssertionError(f"{pattern!r} never appeared in {path}:\n{text[-1500:]}")


def test_wrong_token_is_refused(browser: Any, served_display: Any) -> None:
    page = browser.new_context(bypass_csp=True).new_page()
    page.goto(served_display.base_url + "#token=not-the-token")
    page.wait_for_function("document.getElementById('login-error').textContent !== ''",
                           timeout=CONNECT_TIMEOUT_MS)
    assert "wrong token or password" in page.text_content("#login-error")
    assert page.evaluate("window.omega.state") == "signed out"
    # The API itself: no session, no offer; bad login is a plain 401.
    for path, body in [("api/offer", {"type": "offer", "sdp": "v=0"}),
                       ("api/login", {"token": "guess"}), ("api/login", {"password": "guess"})]:
        request = urllib.request.Request(served_display.base_url + path,
                                         data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=30)
        assert refused.value.code == 401
    page.context.close()


def test_operator_sees_video_and_types_a_command_the_guest_runs(
        browser: Any, served_display: Any, display_guest: Any) -> None:
    page = open_page(browser, served_display.url)
    assert page.evaluate("window.omega.role") == "operator"
    wait_frames_above(page, 0)
    first = frames_decoded(page)
    page.click("#screen")
    # Typed on tty1 (VGA) through QMP key events; the guest's shell runs it and
    # writes the result to its serial port. "$((6*7))" only becomes 42 if run.
    page.keyboard.type("echo omega-typed-$((6*7)) > /dev/ttyS0")
    page.keyboard.press("Enter")
    assert wait_serial(display_guest.serial_log, r"omega-typed-42") == "omega-typed-42"
    wait_frames_above(page, first)  # the echoed keystrokes arrived as new frames
    # Text "clipboard": typed as keys, shifted characters included.
    page.fill("#paste", 'echo "clip:{A|b}" > /dev/ttyS0\n')
    page.click("#send-text")
    wait_serial(display_guest.serial_log, r"clip:\{A\|b\}")
    # Mouse: absolute motion (usb-tablet), a click and the wheel reach QEMU without error.
    sink = served_display.display.input_sink
    before = sink.commands_sent
    box = page.locator("#video").bounding_box()
    page.mouse.move(box["x"] + box["width"] / 3, box["y"] + box["height"] / 3)
    page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.mouse.wheel(0, 200)
    deadline = time.monotonic() + 60
    while sink.commands_sent < before + 4 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert sink.commands_sent >= before + 4 and sink.last_error is None
    assert not [m for m in page.evaluate("window.omega.messages") if m["t"] == "error"]
    # The page shows live stats.
    page.wait_for_function("document.getElementById('stats').textContent.includes('fps')",
                           timeout=CONNECT_TIMEOUT_MS)
    page.context.close()


def test_viewer_cannot_inject_input(browser: Any, served_display: Any,
                                    display_guest: Any) -> None:
    viewer_url = served_display.base_url + "#token=" + served_display.viewer_token
    page = open_page(browser, viewer_url)
    assert page.evaluate("window.omega.role") == "viewer"
    wait_frames_above(page, 0)
    sink = served_display.display.input_sink
    before = sink.commands_sent
    sent = page.evaluate("""window.omega.send({t: 'text', text: 'echo viewer-injected > /dev/ttyS0\\n'})
                            && window.omega.send({t: 'key', code: 'Enter', down: true})""")
    assert sent  # the channel was open: the refusal is the server's
    page.wait_for_function("window.omega.messages.some(m => m.t === 'refused')",
                           timeout=CONNECT_TIMEOUT_MS)
    assert sink.commands_sent == before
    assert "viewer-injected" not in display_guest.serial_log.read_text(errors="replace")
    page.context.close()


def test_second_viewer_joining_and_leaving_does_not_stall_the_first(
        browser: Any, served_display: Any) -> None:
    first_page = open_page(browser, served_display.url)
    wait_frames_above(first_page, 0)
    second = open_page(browser, served_display.base_url + "#token=" + served_display.viewer_token)
    wait_frames_above(second, 0)
    viewers_with_both = served_display.display.server.viewer_count
    assert viewers_with_both >= 2
    second.evaluate("window.omega.pc.close()")
    second.context.close()
    # The server notices the departure and keeps serving the first viewer.
    deadline = time.monotonic() + 120
    while served_display.display.server.viewer_count >= viewers_with_both:
        assert time.monotonic() < deadline, "the server never noticed the viewer leaving"
        time.sleep(0.5)
    after_leave = frames_decoded(first_page)
    first_page.click("#screen")
    first_page.keyboard.type("true")  # on-screen change -> damage -> frames
    wait_frames_above(first_page, after_leave)
    assert first_page.evaluate("window.omega.state") == "connected"
    first_page.keyboard.press("Control+U")  # clear the shell line again
    first_page.context.close()
