"""Encoders: runtime bitrate change without reopening, keyframes on request, decodable output."""

from __future__ import annotations

import av
import numpy as np
import pytest

from hypervisor.errors import UsageError
from hypervisor.remote_display.encoder import (
    CLOCK_RATE,
    VideoEncoder,
    nvidia_gpu_present,
    pick_codec,
)

WIDTH, HEIGHT = 640, 360


def moving_images(count: int, *, seed: int = 1) -> list[np.ndarray]:
    """Noisy images that scroll, so every frame costs bits."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (HEIGHT, WIDTH * 2, 4), dtype=np.uint8)
    return [np.ascontiguousarray(base[:, i * 5:i * 5 + WIDTH]) for i in range(count)]


def encode_rate(encoder: VideoEncoder, images: list[np.ndarray], start: int) -> float:
    """Encode at 30 fps timestamps; return the measured bits per second."""
    total = 0
    for i, image in enumerate(images):
        frame = encoder.encode(image, pts=(start + i) * CLOCK_RATE // 30)
        total += frame.packet.size if frame else 0
    return total * 8 * 30 / len(images)


def decode_all(codec: str, frames: list) -> int:
    decoder = av.CodecContext.create("h264" if codec.startswith("h264") else "vp8", "r")
    decoded = 0
    for frame in frames:
        decoded += len(decoder.decode(av.Packet(bytes(frame.packet))))
    return decoded


def test_x264_bitrate_changes_at_runtime_without_reopening() -> None:
    encoder = VideoEncoder("h264", bitrate=4_000_000)
    images = moving_images(90)
    high = encode_rate(encoder, images[:45], 0)
    encoder.bitrate = 500_000
    encode_rate(encoder, images[45:55], 45)  # let rate control settle
    low = encode_rate(encoder, images[55:], 55)
    assert encoder.reopens == 0
    assert high > 3 * low, (high, low)
    encoder.bitrate = 3_000_000  # and back up, still without reopening
    encode_rate(encoder, images[:10], 90)
    again = encode_rate(encoder, images[10:45], 100)
    assert encoder.reopens == 0 and again > 3 * low, (again, low)


def test_frame_rate_cap_rescales_the_x264_budget() -> None:
    encoder = VideoEncoder("h264", bitrate=2_000_000, fps_hint=30)
    encoder.encode(moving_images(1)[0], pts=0)
    assert encoder._context.bit_rate == 2_000_000
    encoder.frame_rate = 60
    encoder.encode(moving_images(1)[0], pts=3000)
    assert encoder._context.bit_rate == 1_000_000 and encoder.reopens == 0
    with pytest.raises(UsageError):
        encoder.frame_rate = 0


@pytest.mark.parametrize("codec", ["h264", "vp8"])
def test_keyframe_on_request_and_stream_decodes(codec: str) -> None:
    encoder = VideoEncoder(codec, bitrate=2_000_000)
    frames = [encoder.encode(image, pts=i * 3000, keyframe=(i == 5))
              for i, image in enumerate(moving_images(8))]
    assert all(frame is not None for frame in frames)
    assert [f.keyframe for f in frames] == [True, False, False, False, False, True, False, False]
    assert decode_all(codec, frames) == 8


def test_resolution_change_reopens_with_a_keyframe() -> None:
    encoder = VideoEncoder("h264")
    encoder.encode(moving_images(1)[0], pts=0)
    small = np.zeros((200, 320, 4), dtype=np.uint8)
    frame = encoder.encode(small, pts=3000)
    assert frame is not None and frame.keyframe and encoder.reopens == 1


def test_bad_input_is_refused() -> None:
    with pytest.raises(UsageError, match="unknown codec"):
        pick_codec("mpeg2")
    with pytest.raises(UsageError, match="even"):
        VideoEncoder("h264").encode(np.zeros((11, 10, 4), dtype=np.uint8), pts=0)
    encoder = VideoEncoder("h264", min_bitrate=300_000, max_bitrate=1_000_000)
    encoder.bitrate = 10
    assert encoder.bitrate == 300_000


@pytest.mark.gpu
def test_nvenc_bitrate_changes_at_runtime() -> None:
    if not nvidia_gpu_present():
        pytest.skip("no NVIDIA GPU on this machine")
    encoder = VideoEncoder(pick_codec("auto"), bitrate=8_000_000)
    assert encoder.codec == "h264_nvenc"
    images = moving_images(90)
    high = encode_rate(encoder, images[:45], 0)
    encoder.bitrate = 1_000_000
    encode_rate(encoder, images[45:55], 45)
    low = encode_rate(encoder, images[55:], 55)
    assert encoder.reopens == 0
    assert high > 3 * low, (high, low)
