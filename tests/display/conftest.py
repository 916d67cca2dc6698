"""Fixtures for the display tests: a real tiny guest with a VNC display booted
through libvirt, served by the real display server, watched by Debian's
chromium through Playwright (never a downloaded browser).

Domains are named ``omega-test-r-*``; TCP ports come from 19500-19599.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from hypervisor.config import Config
from hypervisor.errors import NotFoundError

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
DISPLAY_PORT = 19501


@dataclass
class DisplayGuest:
    """The running guest whose screen is served."""

    name: str
    serial_log: Path


@pytest.fixture(scope="session")
def display_guest(config: Config, tiny_image: Any) -> Iterator[DisplayGuest]:
    """A tiny guest with graphics=vnc, booted until its ready marker."""
    from hypervisor.vm.lifecycle import VMController
    from hypervisor.vm.spec import VMSpec

    name = "omega-test-r-display"
    controller = VMController(config)

    def remove() -> None:
        try:
            controller.delete(name, force=True)
        except NotFoundError:
            pass
        shutil.rmtree(controller.runtime_dir(name).path, ignore_errors=True)

    remove()
    controller.create(VMSpec(name=name, image=tiny_image.digest, memory=256 << 20,
                             graphics="vnc"))
    try:
        controller.start(name)
        controller.wait_for_serial(name, r"OMEGA-GUEST-READY", timeout=240)
        yield DisplayGuest(name, controller.runtime_dir(name).serial_log)
    finally:
        remove()
        controller.close()


@pytest.fixture(scope="session")
def served_display(config: Config, display_guest: DisplayGuest) -> Iterator[Any]:
    """``serve_in_background`` on the guest (H.264, 127.0.0.1:19501)."""
    from hypervisor.remote_display import serve_in_background
    from hypervisor.remote_display.service import DisplayOptions

    handle = serve_in_background(
        config, display_guest.name,
        options=DisplayOptions(listen=f"127.0.0.1:{DISPLAY_PORT}", codec="h264"))
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Debian's chromium, headless, through Playwright.

    Module-scoped: Playwright's sync API keeps an event loop running on this
    thread while it is alive, which the asyncio tests of other modules cannot share.

    ``launch`` gives the browser a fresh temporary profile; every test opens its
    own context (own cookies), like separate users.
    """
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                              args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()
