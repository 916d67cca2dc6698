"""Low-latency video encoders over PyAV whose rate changes at runtime.

:class:`VideoEncoder` wraps one libavcodec encoder (libx264, libvpx VP8 or
h264_nvenc) opened once and kept open: a new target bitrate is written to the
open codec context, which libavcodec's libx264 and nvenc wrappers pass on to
the encoder before the next frame (``x264_encoder_reconfig`` /
``nvEncReconfigureEncoder``).

Measured, not assumed (tests/display/test_encoder.py checks it): x264 honours
a new bitrate only in CBR mode (VBV max rate == bitrate at open); opened as ABR
with a looser VBV it keeps its old long-term budget, and in CBR mode it never
rises above the max rate it was opened with. So x264 is opened in CBR at
``max_bitrate`` and immediately lowered to the target; every later change, up
or down within the ceiling, is a reconfigure.

Frame rate: the zerolatency tune makes x264 rate control constant-frame-rate
(``force-cfr=0`` would restore timestamp-driven rate control but adds one
frame of delay, measured), so per-frame budget is bitrate / ``fps_hint``. A new
frame-rate cap therefore scales the bitrate written to the encoder by
``fps_hint / frame_rate``, again a reconfigure. A damage-driven stream sending
fewer frames than the cap simply spends fewer bits. Only a new resolution
reopens the encoder.

libavcodec's libvpx wrapper reads the bitrate only when it opens, so for VP8 a
bitrate change reopens the encoder, at most once every
:data:`VP8_REOPEN_INTERVAL` seconds and only for a change of 20 % or more (the
reopened stream starts with a keyframe). :attr:`VideoEncoder.reopens` counts
these.
"""

from __future__ import annotations

import fractions
import functools
import threading
import time
from dataclasses import dataclass

import av
import numpy as np

from hypervisor.errors import UsageError

__all__ = [
    "CODECS",
    "CLOCK_RATE",
    "EncodedFrame",
    "VideoEncoder",
    "nvidia_gpu_present",
    "pick_codec",
]

CLOCK_RATE = 90000  # RTP video clock; frame timestamps are in these units
TIME_BASE = fractions.Fraction(1, CLOCK_RATE)
VP8_REOPEN_INTERVAL = 2.0
KEYFRAME_INTERVAL_FRAMES = 3000  # PLI and joins ask for keyframes; this is a safety net

# codec name -> (libavcodec encoder, RTP mime type, input pixel format)
CODECS: dict[str, tuple[str, str, str]] = {
    "h264": ("libx264", "video/H264", "yuv420p"),
    "vp8": ("libvpx", "video/VP8", "yuv420p"),
    "h264_nvenc": ("h264_nvenc", "video/H264", "yuv420p"),
}


@dataclass(frozen=True, slots=True)
class EncodedFrame:
    """One encoded picture.

    Attributes:
        packet: the compressed data (Annex-B for H.264), pts in 1/90000 s.
        keyframe: the picture can be decoded on its own.
        encode_seconds: CPU-side wall time spent in the encoder for it.
    """

    packet: av.Packet
    keyframe: bool
    encode_seconds: float


@functools.cache
def nvidia_gpu_present() -> bool:
    """Return True if an NVIDIA GPU with a working driver is visible (via NVML).

    Returns:
        Whether h264_nvenc can be tried.
    """
    try:
        import pynvml
    except ImportError:
        return False
    try:
        pynvml.nvmlInit()
    except Exception:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
        return False
    try:
        return pynvml.nvmlDeviceGetCount() > 0
    finally:
        pynvml.nvmlShutdown()


def pick_codec(requested: str) -> str:
    """Resolve a codec request to a codec Omega can open here.

    Args:
        requested: "auto" (h264_nvenc when an NVIDIA GPU exists, else h264),
            "h264", "vp8" or "h264_nvenc".

    Returns:
        A key of :data:`CODECS`.

    Raises:
        UsageError: unknown codec, or h264_nvenc without an NVIDIA GPU.
    """
    if requested == "auto":
        return "h264_nvenc" if nvidia_gpu_present() else "h264"
    if requested not in CODECS:
        raise UsageError(f"unknown codec {requested!r}; choose auto, {', '.join(CODECS)}")
    if requested == "h264_nvenc" and not nvidia_gpu_present():
        raise UsageError("codec h264_nvenc needs an NVIDIA GPU; none is visible on this machine")
    return requested


class VideoEncoder:
    """A low-latency encoder for one stream of BGRX screen images.

    Thread model: :meth:`encode` runs on one worker thread at a time; the rate
    setters may be called from the event loop thread and take effect on the
    next frame (a lock orders them against :meth:`encode`).

    Args:
        codec: a key of :data:`CODECS`.
        bitrate: initial target in bits per second.
        max_bitrate: ceiling for :attr:`bitrate` (and the VBV rate of x264).
        min_bitrate: floor for :attr:`bitrate`.
        fps_hint: the expected frame rate (rate control starts from it).
    """

    def __init__(self, codec: str, *, bitrate: int = 4_000_000, max_bitrate: int = 20_000_000,
                 min_bitrate: int = 200_000, fps_hint: int = 30) -> None:
        if codec not in CODECS:
            raise UsageError(f"unknown codec {codec!r}")
        if not 0 < min_bitrate <= max_bitrate:
            raise UsageError("need 0 < min_bitrate <= max_bitrate")
        self.codec = codec
        self.encoder_name, self.mime_type, self._pix_fmt = CODECS[codec]
        self.min_bitrate = min_bitrate
        self.max_bitrate = max_bitrate
        self.fps_hint = fps_hint
        self._bitrate = self._clamp(bitrate)
        self._frame_rate = float(fps_hint)
        self._context: av.VideoCodecContext | None = None
        self._opened_bitrate = 0
        self._applied_bitrate = 0
        self._opened_at = 0.0
        self._lock = threading.Lock()
        self.reopens = 0
        self.frames = 0

    def _clamp(self, bitrate: int) -> int:
        return max(self.min_bitrate, min(int(bitrate), self.max_bitrate))

    @property
    def bitrate(self) -> int:
        """The target bitrate in bits per second."""
        return self._bitrate

    @bitrate.setter
    def bitrate(self, value: int) -> None:
        with self._lock:
            self._bitrate = self._clamp(value)

    @property
    def frame_rate(self) -> float:
        """The frame-rate cap the stream runs at (frames per second)."""
        return self._frame_rate

    @frame_rate.setter
    def frame_rate(self, value: float) -> None:
        if not 0 < value <= 240:
            raise UsageError(f"frame rate {value} out of range (0, 240]")
        with self._lock:
            self._frame_rate = float(value)

    def _effective_bitrate(self) -> int:
        """The bitrate to write to a CFR encoder so the stream meets :attr:`bitrate`."""
        if self.codec == "vp8":  # libvpx rate control follows the timestamps
            return self._bitrate
        return int(self._bitrate * self.fps_hint / self._frame_rate)

    def _options(self) -> dict[str, str]:
        if self.codec == "h264":
            return {"preset": "ultrafast", "tune": "zerolatency", "profile": "baseline",
                    "forced-idr": "1", "maxrate": str(self.max_bitrate),
                    "bufsize": str(self.max_bitrate // 4),
                    "x264-params": "repeat-headers=1:aud=0"}
        if self.codec == "vp8":
            return {"deadline": "realtime", "cpu-used": "8", "lag-in-frames": "0",
                    "error-resilient": "1", "auto-alt-ref": "0", "end-usage": "cbr",
                    "undershoot-pct": "95", "buf-initial": "400", "buf-optimal": "500",
                    "buf-sz": "1000", "max-intra-rate": "300"}
        return {"preset": "p1", "tune": "ull", "zerolatency": "1", "delay": "0", "bf": "0",
                "rc": "cbr", "forced-idr": "1", "profile": "baseline"}

    def _open(self, width: int, height: int) -> av.VideoCodecContext:
        context = av.CodecContext.create(self.encoder_name, "w")
        context.width = width
        context.height = height
        context.pix_fmt = self._pix_fmt
        context.time_base = TIME_BASE
        context.framerate = fractions.Fraction(self.fps_hint, 1)
        # x264 and nvenc: open in CBR at the ceiling, then lower (see module doc).
        context.bit_rate = self._bitrate if self.codec == "vp8" else self.max_bitrate
        context.gop_size = KEYFRAME_INTERVAL_FRAMES
        context.max_b_frames = 0
        # libavcodec's default qmax (31) would stop rate control from meeting a low
        # bitrate on busy content; let the encoder use its whole quantiser range.
        if self.codec != "h264_nvenc":
            context.qmax = 63 if self.codec == "vp8" else 51
        context.options = self._options()
        try:
            context.open()
        except av.FFmpegError as exc:
            raise UsageError(f"cannot open encoder {self.encoder_name} at {width}x{height}: "
                             f"{exc}") from exc
        if self._context is not None:
            self.reopens += 1
        self._context = context
        self._opened_bitrate = self._applied_bitrate = context.bit_rate
        self._opened_at = time.monotonic()
        if self.codec != "vp8":
            context.bit_rate = self._applied_bitrate = self._effective_bitrate()
        return context

    def _context_for(self, width: int, height: int) -> tuple[av.VideoCodecContext, bool]:
        """The open context for this size, reopened if needed; True if reopened."""
        context = self._context
        if context is None or (context.width, context.height) != (width, height):
            return self._open(width, height), True
        wanted = self._effective_bitrate()
        if wanted != self._applied_bitrate:
            if self.codec == "vp8":
                change = abs(wanted - self._opened_bitrate) / self._opened_bitrate
                if change >= 0.2 and time.monotonic() - self._opened_at >= VP8_REOPEN_INTERVAL:
                    return self._open(width, height), True
            else:
                # Runtime reconfiguration: the wrapper compares and reconfigures.
                context.bit_rate = self._applied_bitrate = min(wanted, self.max_bitrate)
        return context, False

    def encode(self, image: np.ndarray | av.VideoFrame, *, pts: int,
               keyframe: bool = False) -> EncodedFrame | None:
        """Encode one BGRX image.

        Args:
            image: (height, width, 4) uint8 B G R X, or an ``av.VideoFrame`` in
                ``bgra`` (saves a copy); width and height are even.
            pts: presentation time in 1/90000 s, strictly increasing.
            keyframe: force an IDR / key picture.

        Returns:
            The encoded picture, or None if the encoder produced nothing for it.

        Raises:
            UsageError: odd dimensions, or the encoder cannot be opened.
        """
        if isinstance(image, av.VideoFrame):
            width, height = image.width, image.height
        else:
            height, width = image.shape[:2]
        if width % 2 or height % 2 or width == 0 or height == 0:
            raise UsageError(f"cannot encode a {width}x{height} image (need even, non-zero)")
        started = time.perf_counter()
        with self._lock:
            context, reopened = self._context_for(width, height)
            if not isinstance(image, av.VideoFrame):
                image = av.VideoFrame.from_ndarray(image, format="bgra")
            frame = image.reformat(format=self._pix_fmt)
            frame.pts = pts
            frame.time_base = TIME_BASE
            if keyframe or reopened:
                frame.pict_type = av.video.frame.PictureType.I
            packets = context.encode(frame)
        self.frames += 1
        if not packets:
            return None
        packet = packets[0]
        if len(packets) > 1:  # not expected with zero lookahead; keep them together
            packet = av.Packet(b"".join(bytes(p) for p in packets))
            packet.pts = packets[0].pts
            packet.is_keyframe = packets[0].is_keyframe
        packet.time_base = TIME_BASE
        return EncodedFrame(packet, bool(packet.is_keyframe), time.perf_counter() - started)
