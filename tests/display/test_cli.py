"""`omega display serve`: bad input is one clear error; a real serve answers logins."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
import urllib.error
import urllib.request
from typing import Any

import pytest

from tests.conftest import REPO


@pytest.mark.parametrize("args, status, message", [
    (["--listen", "nowhere"], 2, "expected HOST:PORT"),
    (["--listen", "127.0.0.1:99999"], 2, "expected HOST:PORT"),
    (["--token", "short"], 2, "at least 16"),
    (["--tls-cert", "/nonexistent.pem"], 2, "go together"),
    (["--codec", "mpeg2"], 2, "unknown codec"),
    (["--fps", "0"], 2, "1..240"),
    (["--bitrate", "lots"], 2, "expected e.g. 4M"),
])
def test_bad_options_are_refused_before_anything_starts(omega: Any, args: list[str], status: int,
                                                        message: str) -> None:
    result = omega("display", "serve", "omega-test-r-absent", *args)
    assert result.returncode == status, result.stderr
    assert message in result.stderr and result.stderr.startswith("omega: error:")


@pytest.mark.libvirt
def test_unknown_vm_is_not_found(omega: Any) -> None:
    result = omega("display", "serve", "omega-test-r-absent", "--listen", "127.0.0.1:19503")
    assert result.returncode == 1
    assert "no VM named 'omega-test-r-absent'" in result.stderr


@pytest.mark.libvirt
@pytest.mark.slow
def test_serve_prints_url_and_answers_logins(display_guest: Any) -> None:
    operator, viewer = "operator-token-0123456789", "viewer-token-0123456789"
    proc = subprocess.Popen(
        [sys.executable, "-m", "hypervisor.cli", "display", "serve", display_guest.name,
         "--listen", "127.0.0.1:19504", "--token", operator, "--viewer-token", viewer,
         "--codec", "vp8"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=dict(os.environ))
    try:
        first = proc.stdout.readline()
        assert first.startswith(f"serving {display_guest.name} (vp8) at http://127.0.0.1:19504/"), \
            first + proc.stderr.read() if proc.poll() is not None else first
        assert proc.stdout.readline().strip() == f"operator: http://127.0.0.1:19504/#token={operator}"

        def login(body: dict) -> Any:
            request = urllib.request.Request("http://127.0.0.1:19504/api/login",
                                             data=json.dumps(body).encode(),
                                             headers={"Content-Type": "application/json"})
            return urllib.request.urlopen(request, timeout=30)

        assert json.load(login({"token": operator}))["role"] == "operator"
        assert json.load(login({"token": viewer}))["role"] == "viewer"
        with pytest.raises(urllib.error.HTTPError) as refused:
            login({"token": operator + "x"})
        assert refused.value.code == 401
        page = urllib.request.urlopen("http://127.0.0.1:19504/", timeout=30).read().decode()
        assert "<video" in page and "/static/app.js" in page
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)


@pytest.mark.libvirt
@pytest.mark.slow
def test_spawned_server_outlives_its_caller_and_stops(config: Any, display_guest: Any) -> None:
    from hypervisor.remote_display import spawn_display, stop_display
    from hypervisor.remote_display.detached import DisplayStartError

    display = spawn_display(config, display_guest.name, listen="127.0.0.1:19506", codec="h264")
    try:
        assert display.url == f"http://127.0.0.1:19506/#token={display.operator_token}"
        request = urllib.request.Request(
            "http://127.0.0.1:19506/api/login",
            data=json.dumps({"token": display.viewer_token}).encode(),
            headers={"Content-Type": "application/json"})
        assert json.load(urllib.request.urlopen(request, timeout=30))["role"] == "viewer"
        # The tokens travel in the environment, never on the command line.
        argv = Path(f"/proc/{display.pid}/cmdline").read_bytes()
        assert display.operator_token.encode() not in argv
        # A server that cannot start is one clear error quoting its log.
        with pytest.raises(DisplayStartError, match="no VM named 'omega-test-r-absent'"):
            spawn_display(config, "omega-test-r-absent", listen="127.0.0.1:19507")
    finally:
        assert stop_display(config, display_guest.name)
    assert not stop_display(config, display_guest.name)  # nothing left to stop
