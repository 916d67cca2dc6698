"""Omega's encoder inside aiortc: two real peer connections in one process.

The receiving side is aiortc's own RTCPeerConnection and decoder, so packets,
keyframe requests and the encoded-packet path of aiortc's sender are all real.
"""

from __future__ import annotations

import asyncio

import pytest
from aiortc import RTCPeerConnection

from hypervisor.remote_display.encoder import VideoEncoder
from hypervisor.remote_display.pattern import MovingPattern
from hypervisor.remote_display.rtc import FeedbackRtpSender, add_display_track
from hypervisor.remote_display.track import DisplayStream
from hypervisor.remote_display.watermark import read_watermark


async def connect(stream: DisplayStream, mime: str) -> tuple[RTCPeerConnection, RTCPeerConnection,
                                                              asyncio.Queue]:
    receiver, sender = RTCPeerConnection(), RTCPeerConnection()
    frames: asyncio.Queue = asyncio.Queue()

    @receiver.on("track")
    def on_track(track) -> None:
        async def pump() -> None:
            while True:
                try:
                    frames.put_nowait(await track.recv())
                except Exception:
                    return
        asyncio.ensure_future(pump())

    receiver.addTransceiver("video", direction="recvonly")
    await receiver.setLocalDescription(await receiver.createOffer())
    rtp_sender = add_display_track(sender, stream.subscribe(), mime_type=mime)
    assert isinstance(rtp_sender, FeedbackRtpSender)
    await sender.setRemoteDescription(receiver.localDescription)
    await sender.setLocalDescription(await sender.createAnswer())
    await receiver.setRemoteDescription(sender.localDescription)
    return receiver, sender, frames


@pytest.mark.parametrize("codec, mime", [("h264", "video/H264"), ("vp8", "video/VP8")])
async def test_encoded_frames_reach_an_aiortc_receiver(codec: str, mime: str) -> None:
    source = MovingPattern(640, 360, fps=20)
    stream = DisplayStream(source, VideoEncoder(codec), max_fps=20, watermark=True)
    stream.start()
    source.start()
    receiver, sender, frames = await connect(stream, mime)
    try:
        got = [await asyncio.wait_for(frames.get(), 60) for _ in range(10)]
        assert {(f.width, f.height) for f in got} == {(640, 360)}
        stamp = read_watermark(got[-1].to_ndarray(format="bgra"))
        assert stamp is not None and abs(stamp - int(source.damage_time * 1000) % 2**32) < 60_000
        assert stream.stats.keyframes >= 1
        # aiortc's own encoder never ran: only ours did, once per frame (the
        # stream counts a frame once its encode returned: one may be in flight).
        assert stream.stats.frames <= stream.encoder.frames <= stream.stats.frames + 1
    finally:
        await source.close()
        await stream.close()
        await receiver.close()
        await sender.close()


async def test_static_screen_encodes_nothing_but_keyframes_on_request() -> None:
    source = MovingPattern(320, 240, fps=0)
    await source.damage()
    stream = DisplayStream(source, VideoEncoder("h264"), max_fps=30, idle_refresh=None)
    stream.start()
    track = stream.subscribe("a")
    first = await asyncio.wait_for(track.recv(), 30)
    assert stream.stats.frames == 1 and stream.stats.keyframes == 1
    await asyncio.sleep(0.5)
    assert stream.stats.frames == 1  # nothing changed, nothing encoded
    track.keyframe_requested()  # what a PLI does
    second = await asyncio.wait_for(track.recv(), 30)
    assert second.is_keyframe and second.pts > first.pts
    await source.damage()
    third = await asyncio.wait_for(track.recv(), 30)
    assert not third.is_keyframe
    track.stop()
    await stream.close()


async def test_a_viewer_leaving_or_lagging_does_not_disturb_another() -> None:
    source = MovingPattern(320, 240, fps=30)
    stream = DisplayStream(source, VideoEncoder("h264"), max_fps=30)
    stream.start()
    source.start()
    steady, lagging = stream.subscribe("steady"), stream.subscribe("lagging")
    try:
        for _ in range(30):  # "lagging" never reads
            await asyncio.wait_for(steady.recv(), 30)
        assert lagging.dropped > 0 and len(lagging._queue) <= 8
        lagging.stop()
        assert stream.viewers == [steady]
        for _ in range(10):
            await asyncio.wait_for(steady.recv(), 30)
        steady.receiver_estimate(1_000_000)
        assert stream.encoder.bitrate == 1_000_000
    finally:
        await source.close()
        await stream.close()


async def test_a_real_rtcp_pli_from_the_receiver_makes_a_keyframe() -> None:
    source = MovingPattern(320, 240, fps=0)
    await source.damage()
    stream = DisplayStream(source, VideoEncoder("h264"), max_fps=30)
    stream.start()
    receiver, sender, frames = await connect(stream, "video/H264")
    try:
        # (aiortc's receiver releases a frame only when the next one starts, so on
        # this static screen nothing is decoded until the PLI's keyframe follows.)
        for _ in range(600):  # until the receiver has seen the sender's SSRC
            sources = receiver.getReceivers()[0].getSynchronizationSources()
            if sources:
                break
            await asyncio.sleep(0.05)
        before = stream.stats.keyframes
        # aiortc's receiver sends a real RTCP PLI packet over the DTLS/SRTP transport.
        await receiver.getReceivers()[0]._send_rtcp_pli(sources[0].source)
        for _ in range(600):
            if stream.stats.keyframes > before:
                break
            await asyncio.sleep(0.05)
        assert stream.stats.keyframes >= before + 1
        first = await asyncio.wait_for(frames.get(), 60)
        assert (first.width, first.height) == (320, 240)
    finally:
        await stream.close()
        await receiver.close()
        await sender.close()


async def test_an_unchanged_screen_is_refreshed_with_tiny_delta_frames() -> None:
    source = MovingPattern(640, 360, fps=0)
    await source.damage()
    stream = DisplayStream(source, VideoEncoder("h264"), max_fps=30, idle_refresh=0.05)
    stream.start()
    track = stream.subscribe("a")
    try:
        first = await asyncio.wait_for(track.recv(), 30)
        refreshes = [await asyncio.wait_for(track.recv(), 30) for _ in range(12)]
        assert first.is_keyframe and not any(p.is_keyframe for p in refreshes)
        # x264 first spends spare bits refining the still picture; then refreshes are tiny.
        assert refreshes[-1].size * 20 < first.size
        assert source.damage_seq == 1
    finally:
        track.stop()
        await stream.close()
