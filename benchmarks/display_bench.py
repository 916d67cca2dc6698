"""Display pipeline benchmark: Omega's stream vs aiortc as shipped, into real chromium.

For each resolution (720p, 1080p) a synthetic screen (hypervisor.remote_display.
pattern.MovingPattern: a scrolling window over a static desktop, changing 30
times a second) is served by the real DisplayServer to Debian's headless
chromium (the real web page, via Playwright), in two configurations run in
the same process, back to back:

- omega:  DisplayStream + VideoEncoder (x264 ultrafast/zerolatency, CBR with
          runtime reconfiguration), encoded packets handed to aiortc;
- aiortc: the anchor, aiortc's stock path: a track returning av.VideoFrames,
          encoded by aiortc's own H264Encoder (its defaults and caps).

Measured per run: frames decoded per second in the browser (getStats),
capture-to-decoded latency p50/p95 from the timestamp watermark the page reads
back out of each decoded frame, received bitrate, and the server process's CPU
(% of one core; chromium and the Playwright driver are other processes).
Encode CPU per frame is measured separately, offline, for both encoders on
identical frames. Static screen: the stream with a connected viewer and no
damage, and optionally (--guest) the real tiny guest's idle VGA console
through VNC capture.

Usage: .venv/bin/python benchmarks/display_bench.py [--seconds 15] [--guest]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fractions
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import av
import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from hypervisor.remote_display.encoder import VideoEncoder  # noqa: E402
from hypervisor.remote_display.pattern import MovingPattern  # noqa: E402
from hypervisor.remote_display.server import Credentials, DisplayServer  # noqa: E402
from hypervisor.remote_display.track import DisplayStream  # noqa: E402
from hypervisor.remote_display.watermark import stamp_watermark  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
PORT = 19550
RESOLUTIONS = {"720p": (1280, 720), "1080p": (1920, 1080)}


def cpu_seconds() -> float:
    """CPU time of this process, all threads (x264 threads included)."""
    times = os.times()
    return times.user + times.system


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


# ---------------------------------------------------------------- the anchor

class StockTrack:
    """aiortc's shipped path: a MediaStreamTrack returning raw av.VideoFrames."""

    def __new__(cls, source: MovingPattern, fps: float) -> Any:
        from aiortc.mediastreams import MediaStreamTrack

        class _Track(MediaStreamTrack):
            kind = "video"

            def __init__(self) -> None:
                super().__init__()
                self.seq = -1
                self.start = time.monotonic()

            async def recv(self) -> av.VideoFrame:
                self.seq = await source.wait_damage(self.seq)
                image = source.framebuffer.copy()
                stamp_watermark(image, int(source.damage_time * 1000))
                frame = av.VideoFrame.from_ndarray(image, format="bgra")
                frame.pts = int((time.monotonic() - self.start) * 90000)
                frame.time_base = fractions.Fraction(1, 90000)
                return frame

        return _Track()


class StockServer(DisplayServer):
    """The same server and page, but each viewer gets a StockTrack (aiortc encodes)."""

    def __init__(self, source: MovingPattern, fps: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.source = source
        self.fps = fps

    async def _offer(self, request: Any) -> Any:
        from aiohttp import web
        from aiortc import RTCPeerConnection, RTCRtpSender, RTCSessionDescription

        self._session(request)
        body = await self._json_body(request)
        pc = RTCPeerConnection()
        self._stock_pcs = getattr(self, "_stock_pcs", []) + [pc]
        transceiver = pc.addTransceiver(StockTrack(self.source, self.fps), direction="sendonly")
        transceiver.setCodecPreferences([c for c in RTCRtpSender.getCapabilities("video").codecs
                                         if c.mimeType in ("video/H264", "video/rtx")])
        await pc.setRemoteDescription(RTCSessionDescription(body["sdp"], "offer"))
        await pc.setLocalDescription(await pc.createAnswer())
        return web.json_response({"type": "answer", "sdp": pc.localDescription.sdp})

    async def close(self) -> None:
        for pc in getattr(self, "_stock_pcs", []):
            await pc.close()
        await super().close()


# ------------------------------------------------------------ browser session

async def watch(browser: Any, url: str, seconds: float, warmup: float) -> dict[str, Any]:
    """Open the page, wait for video, measure for ``seconds``; return browser numbers."""
    context = await browser.new_context(bypass_csp=True)
    page = await context.new_page()
    await page.goto(url)
    await page.wait_for_function("window.omega && window.omega.state === 'connected'",
                                 timeout=60_000)
    await page.wait_for_function("window.omega.stats.framesDecoded > 5", timeout=60_000)
    await asyncio.sleep(warmup)
    probe = """async () => { const r = await window.omega.pc.getStats(); let s = null;
        r.forEach(x => { if (x.type === 'inbound-rtp' && x.kind === 'video') s = x; });
        return {frames: s.framesDecoded, bytes: s.bytesReceived, dropped: s.framesDropped || 0,
                latencies: window.omega.latencies.length, w: s.frameWidth, h: s.frameHeight}; }"""
    before = await page.evaluate(probe)
    cpu0, t0 = cpu_seconds(), time.monotonic()
    await asyncio.sleep(seconds)
    cpu1, t1 = cpu_seconds(), time.monotonic()
    after = await page.evaluate(probe)
    latencies = await page.evaluate(f"window.omega.latencies.slice({before['latencies']})")
    presented = await page.evaluate(
        f"window.omega.presentedLatencies.slice({before['latencies']})")
    await context.close()
    wall = t1 - t0
    return {
        "fps": (after["frames"] - before["frames"]) / wall,
        "mbps": (after["bytes"] - before["bytes"]) * 8 / wall / 1e6,
        "latency_p50_ms": percentile(latencies, 0.5),
        "latency_p95_ms": percentile(latencies, 0.95),
        "latency_samples": len(latencies),
        "presented_p50_ms": percentile(presented, 0.5),
        "presented_p95_ms": percentile(presented, 0.95),
        "server_cpu_pct": 100 * (cpu1 - cpu0) / wall,
        "frames": after["frames"] - before["frames"],
        "size": f"{after['w']}x{after['h']}",
    }


async def streamed(browser: Any, mode: str, width: int, height: int, fps: float,
                   seconds: float) -> dict[str, Any]:
    source = MovingPattern(width, height, fps=fps)
    credentials = Credentials()
    stream = None
    if mode == "omega":
        stream = DisplayStream(source, VideoEncoder("h264", bitrate=4_000_000,
                                                    max_bitrate=20_000_000, fps_hint=int(fps)),
                               max_fps=fps, watermark=True)
        stream.start()
        server = DisplayServer(stream, input_sink=None, credentials=credentials)
    else:
        dummy = DisplayStream(source, VideoEncoder("h264"), max_fps=fps)  # for /api/status only
        server = StockServer(source, fps, stream=dummy, input_sink=None, credentials=credentials)
        stream = dummy
    await server.start("127.0.0.1", PORT)
    source.start()
    try:
        result = await watch(browser, f"http://127.0.0.1:{PORT}/#token={credentials.operator_token}",
                             seconds, warmup=3)
        result["loadavg_1min"] = os.getloadavg()[0]
        result["frames_encoded_total"] = stream.stats.frames if mode == "omega" else None
        if mode == "omega":
            server_side = list(stream.stats.capture_to_encoded_ms)
            result["server_capture_to_encoded_p50_ms"] = percentile(server_side, 0.5)
            result["server_capture_to_encoded_p95_ms"] = percentile(server_side, 0.95)
            result["encode_wall_ms_mean"] = (stream.stats.encode_seconds * 1000
                                             / max(stream.stats.frames, 1))
        if mode == "omega":
            result["server_cpu_ms_per_frame"] = (result["server_cpu_pct"] / 100 * 1000
                                                 / max(result["fps"], 1e-9))
        return result
    finally:
        await source.close()
        await server.close()
        await stream.close()


async def static_screen(browser: Any, seconds: float) -> dict[str, Any]:
    source = MovingPattern(1280, 720, fps=0)
    await source.damage()
    stream = DisplayStream(source, VideoEncoder("h264"), max_fps=30)
    stream.start()
    credentials = Credentials()
    server = DisplayServer(stream, input_sink=None, credentials=credentials)
    await server.start("127.0.0.1", PORT)
    try:
        result = await watch(browser, f"http://127.0.0.1:{PORT}/#token={credentials.operator_token}",
                             seconds, warmup=2)
        result["frames_encoded"] = stream.stats.frames
        return result
    finally:
        await server.close()
        await stream.close()


async def guest_static(browser: Any, seconds: float) -> dict[str, Any]:
    """The real tiny guest's idle console (VNC capture + stream), one viewer."""
    from hypervisor.config import Config
    from hypervisor.errors import NotFoundError
    from hypervisor.remote_display.service import DisplayOptions, open_display
    from hypervisor.vm.lifecycle import VMController
    from hypervisor.vm.spec import VMSpec
    from images.store import ImageStore

    config = Config.from_env()
    config.ensure()
    image = await asyncio.to_thread(ImageStore(config).build, "tiny")
    controller = VMController(config)
    name = "omega-test-r-bench"
    with contextlib.suppress(NotFoundError):
        controller.delete(name, force=True)
    controller.create(VMSpec(name=name, image=image.digest, graphics="vnc"))
    try:
        controller.start(name)
        await asyncio.to_thread(controller.wait_for_serial, name, "OMEGA-GUEST-READY",
                                timeout=240)
        await asyncio.sleep(3)  # let the console settle
        display = await open_display(config, name, options=DisplayOptions(
            listen=f"127.0.0.1:{PORT}", codec="h264"))
        try:
            result = await watch(browser, display.url, seconds, warmup=2)
            result["vnc_updates"] = display.capture.updates
            result["frames_encoded"] = display.stream.stats.frames
            result["screen"] = "%dx%d" % display.capture.size
            return result
        finally:
            await display.close()
    finally:
        with contextlib.suppress(Exception):
            controller.delete(name, force=True)
        controller.close()


# ---------------------------------------------------------- offline encoding

def encode_cpu(width: int, height: int, frames: int = 90) -> dict[str, float]:
    """CPU ms per frame: Omega's VideoEncoder vs aiortc's H264Encoder, same frames."""
    from aiortc.codecs.h264 import H264Encoder

    async def make() -> list[np.ndarray]:
        source = MovingPattern(width, height, fps=0)
        images = []
        for _ in range(frames):
            await source.damage()
            images.append(source.framebuffer.copy())
        return images

    images = asyncio.run(make())
    results = {}
    ours = VideoEncoder("h264", bitrate=4_000_000, max_bitrate=20_000_000)
    ours.encode(images[0], pts=0)
    start = cpu_seconds()
    for i, image in enumerate(images):
        ours.encode(image, pts=(i + 1) * 3000)
    results["omega_ms"] = (cpu_seconds() - start) * 1000 / frames
    stock = H264Encoder()
    start_frame = av.VideoFrame.from_ndarray(images[0], format="bgra")
    start_frame.pts, start_frame.time_base = 0, fractions.Fraction(1, 90000)
    stock.encode(start_frame)
    start = cpu_seconds()
    for i, image in enumerate(images):
        frame = av.VideoFrame.from_ndarray(image, format="bgra")
        frame.pts, frame.time_base = (i + 1) * 3000, fractions.Fraction(1, 90000)
        stock.encode(frame)
    results["aiortc_ms"] = (cpu_seconds() - start) * 1000 / frames
    vp8 = VideoEncoder("vp8", bitrate=4_000_000)
    vp8.encode(images[0], pts=0)
    start = cpu_seconds()
    for i, image in enumerate(images[:30]):
        vp8.encode(image, pts=(i + 1) * 3000)
    results["omega_vp8_ms"] = (cpu_seconds() - start) * 1000 / 30
    return results


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    from playwright.async_api import async_playwright

    report: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                              "seconds": args.seconds, "streams": {},
                              # the box is shared: say how busy it was
                              "loadavg_start": os.getloadavg()}
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                                   args=CHROMIUM_ARGS)
        try:
            for label in args.resolutions if not args.no_streams else []:
                width, height = RESOLUTIONS[label]
                for mode in args.modes:
                    result = await streamed(browser, mode, width, height, 30, args.seconds)
                    report["streams"][f"{label}/{mode}"] = result
                    print(f"{label} {mode}: {json.dumps(result)}", file=sys.stderr)
            report["static_synthetic"] = await static_screen(browser, args.seconds)
            print(f"static: {report['static_synthetic']}", file=sys.stderr)
            if args.guest:
                report["static_guest"] = await guest_static(browser, args.seconds)
                print(f"guest: {report['static_guest']}", file=sys.stderr)
        finally:
            await browser.close()
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--resolutions", nargs="+", default=list(RESOLUTIONS),
                        choices=list(RESOLUTIONS))
    parser.add_argument("--modes", nargs="+", default=["omega", "aiortc"],
                        choices=["omega", "aiortc"])
    parser.add_argument("--no-streams", action="store_true",
                        help="skip the moving-picture runs (static and guest only)")
    parser.add_argument("--guest", action="store_true",
                        help="also measure the real tiny guest's idle console (boots a VM)")
    parser.add_argument("--json", type=Path, help="write the report here as JSON")
    args = parser.parse_args()
    encode = {label: encode_cpu(*RESOLUTIONS[label])
              for label in (args.resolutions if not args.no_streams else [])}
    for label, numbers in encode.items():
        print(f"encode {label}: {numbers}", file=sys.stderr)
    report = asyncio.run(main_async(args))
    report["encode_cpu_ms_per_frame"] = encode
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)
    s = report["streams"]
    for label in args.resolutions if len(args.modes) == 2 and not args.no_streams else []:
        ours, anchor = s[f"{label}/omega"], s[f"{label}/aiortc"]
        print(f"{label}: fps {ours['fps']:.1f} vs {anchor['fps']:.1f} (x{ours['fps'] / max(anchor['fps'], 1e-9):.2f}); "
              f"p50 {ours['latency_p50_ms']:.0f} ms vs {anchor['latency_p50_ms']:.0f} ms; "
              f"cpu {ours['server_cpu_pct']:.0f}% vs {anchor['server_cpu_pct']:.0f}%; "
              f"{ours['mbps']:.2f} vs {anchor['mbps']:.2f} Mbps", file=sys.stderr)


if __name__ == "__main__":
    main()
