"""From a live framebuffer to encoded video for every viewer.

:class:`DisplayStream` owns one :class:`~hypervisor.remote_display.encoder.VideoEncoder`
for a screen and encodes only when the screen changed (damage), at most
``max_fps`` times a second, always from the *newest* framebuffer: damage that
arrives while a frame is being encoded is folded into the next frame, so stale
frames are never queued. It also encodes a keyframe when asked (a viewer joined,
or sent a PLI/FIR), even on a static screen, and re-sends an unchanged screen
as an (almost empty) delta frame every :data:`IDLE_REFRESH` seconds.

Each viewer gets a :class:`DisplayTrack`, an aiortc ``MediaStreamTrack`` whose
``recv()`` returns already-encoded ``av.Packet`` objects. aiortc's sender then
only packetizes (its built-in encoders, with their 30 fps / 3 Mbps caps and
rebuild-on-bitrate-change, never run); see :mod:`hypervisor.remote_display.rtc`
for how PLI and REMB reach the stream. All viewers share the encoder: the
bitrate is the lowest of their receiver estimates, clamped to the configured
range. A viewer that falls behind by more than :data:`MAX_QUEUED` frames drops
its queue and waits for the next keyframe; the others are not disturbed.

Thread model: everything runs on the event loop except the encoder call, which
runs on one dedicated worker thread (x264/libvpx add their own threads).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import functools
import time
from dataclasses import dataclass, field
from typing import Protocol

import av
import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from hypervisor.remote_display._tasks import cancel_task
from hypervisor.remote_display.encoder import CLOCK_RATE, EncodedFrame, VideoEncoder
from hypervisor.remote_display.watermark import CELL, CELLS, stamp_watermark

__all__ = ["DisplayStream", "DisplayTrack", "FrameSource", "StreamStats"]

MAX_QUEUED = 8
BURST = 2.0
# Forced keyframes at most this often: under overload, "viewer fell behind ->
# keyframe -> bigger frame -> further behind" must not become a keyframe storm.
KEYFRAME_MIN_INTERVAL = 0.5
# On a static screen, re-send the unchanged picture as a (tiny) delta frame this
# often: Chrome asks for a full keyframe when no frame came for ~3 s, which costs
# far more bits and CPU than an empty delta.
IDLE_REFRESH = 1.0
KEYFRAME_POLL = 0.05


class FrameSource(Protocol):
    """What :class:`DisplayStream` reads: a framebuffer that signals damage."""

    framebuffer: np.ndarray
    damage_seq: int
    damage_time: float

    async def wait_damage(self, after_seq: int, *, timeout: float | None = None) -> int:
        """Wait for damage after ``after_seq``; return the current sequence number."""


@dataclass(slots=True)
class StreamStats:
    """Counters of a :class:`DisplayStream` (monotonic; readers take differences)."""

    frames: int = 0
    keyframes: int = 0
    bytes: int = 0
    encode_seconds: float = 0.0
    last_frame_time: float = 0.0
    # damage-to-encoded milliseconds of recent frames (server side of the latency)
    capture_to_encoded_ms: collections.deque[float] = field(
        default_factory=lambda: collections.deque(maxlen=4096))
    sizes: tuple[int, int] = (0, 0)
    per_viewer_drops: dict[str, int] = field(default_factory=dict)


class DisplayTrack(MediaStreamTrack):
    """One viewer's video: encoded packets, newest-first policy on overflow.

    Args:
        stream: the stream it belongs to.
        viewer_id: a name for logs and stats.
    """

    kind = "video"

    def __init__(self, stream: DisplayStream, viewer_id: str) -> None:
        super().__init__()
        self.stream = stream
        self.viewer_id = viewer_id
        self.bitrate_estimate: int | None = None
        self.dropped = 0
        self._queue: collections.deque[EncodedFrame] = collections.deque()
        self._ready = asyncio.Event()
        self._need_keyframe = True

    def offer(self, frame: EncodedFrame) -> None:
        """Queue an encoded frame for this viewer (called by the stream).

        Args:
            frame: the frame every viewer gets.
        """
        if frame.keyframe:
            self.dropped += len(self._queue)
            self._queue.clear()
            self._need_keyframe = False
        elif self._need_keyframe:
            self.dropped += 1
            return
        elif len(self._queue) >= MAX_QUEUED:
            # Too far behind: deltas are useless without what was dropped.
            self.dropped += len(self._queue) + 1
            self._queue.clear()
            self._need_keyframe = True
            self.stream.request_keyframe()
            return
        self._queue.append(frame)
        self._ready.set()

    def keyframe_requested(self) -> None:
        """The receiver lost a picture (PLI/FIR): ask the stream for a keyframe."""
        self.stream.request_keyframe()

    def receiver_estimate(self, bitrate: int) -> None:
        """The receiver's bandwidth estimate (REMB) in bits per second.

        Args:
            bitrate: the estimate.
        """
        self.bitrate_estimate = bitrate
        self.stream.update_bitrate()

    async def recv(self) -> av.Packet:
        """Return the next encoded frame for this viewer.

        Returns:
            An ``av.Packet`` with pts in 1/90000 s.

        Raises:
            MediaStreamError: the track was stopped.
        """
        while not self._queue:
            if self.readyState != "live":
                raise MediaStreamError
            self._ready.clear()
            await self._ready.wait()
        return self._queue.popleft().packet

    def stop(self) -> None:
        """Leave the stream; other viewers are unaffected."""
        if self.readyState == "live":
            self.stream.unsubscribe(self)
        super().stop()
        self._ready.set()


class DisplayStream:
    """Encode a framebuffer on damage and fan the frames out to viewers.

    Args:
        source: the framebuffer (normally a FramebufferCapture).
        encoder: the encoder, owned by the stream from now on.
        max_fps: frame-rate cap.
        watermark: draw the capture time into each frame (latency benchmark).
        default_bitrate: bitrate while no viewer has sent an estimate.
        idle_refresh: seconds between re-sends of an unchanged screen (None: never).
    """

    def __init__(self, source: FrameSource, encoder: VideoEncoder, *, max_fps: float = 30,
                 watermark: bool = False, default_bitrate: int | None = None,
                 idle_refresh: float | None = IDLE_REFRESH) -> None:
        self.source = source
        self.encoder = encoder
        self.watermark = watermark
        self.default_bitrate = default_bitrate or encoder.bitrate
        self.stats = StreamStats()
        self._max_fps = max_fps
        self.encoder.frame_rate = max_fps
        self._tracks: list[DisplayTrack] = []
        self._keyframe_pending = False
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="encode")
        self._epoch = time.monotonic()
        self._last_pts = -1
        self._last_encode = 0.0
        self.idle_refresh = idle_refresh
        self._viewer_count = 0

    @property
    def max_fps(self) -> float:
        """The frame-rate cap; settable at runtime (no encoder rebuild)."""
        return self._max_fps

    @max_fps.setter
    def max_fps(self, value: float) -> None:
        self.encoder.frame_rate = value
        self._max_fps = value

    @property
    def viewers(self) -> list[DisplayTrack]:
        """The tracks currently subscribed."""
        return list(self._tracks)

    def start(self) -> None:
        """Start the encode loop (idempotent)."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="display-stream")

    async def close(self) -> None:
        """Stop encoding and end every track."""
        await cancel_task(self._task)
        self._task = None
        for track in list(self._tracks):
            track.stop()
        self._executor.shutdown(wait=True)

    def subscribe(self, viewer_id: str | None = None) -> DisplayTrack:
        """Add a viewer; its first frame will be a keyframe.

        Args:
            viewer_id: a name for stats (default: a counter).

        Returns:
            The viewer's track, to add to its RTCPeerConnection.
        """
        self._viewer_count += 1
        track = DisplayTrack(self, viewer_id or f"viewer-{self._viewer_count}")
        self._tracks.append(track)
        self.request_keyframe()
        return track

    def unsubscribe(self, track: DisplayTrack) -> None:
        """Remove a viewer (idempotent).

        Args:
            track: the track :meth:`subscribe` returned.
        """
        if track in self._tracks:
            self._tracks.remove(track)
            self.stats.per_viewer_drops[track.viewer_id] = track.dropped
            self.update_bitrate()

    def request_keyframe(self) -> None:
        """Make the next frame a keyframe and produce it even without damage."""
        self._keyframe_pending = True
        self._changed.set()

    def update_bitrate(self) -> None:
        """Set the encoder to the lowest receiver estimate (or the default)."""
        estimates = [t.bitrate_estimate for t in self._tracks if t.bitrate_estimate]
        self.encoder.bitrate = min(estimates) if estimates else self.default_bitrate

    async def _wait_for_work(self, seq: int) -> int:
        """Return the damage sequence once there is damage, a keyframe or a refresh is due."""
        while True:
            if self._tracks and (self._keyframe_pending or self.source.damage_seq != seq
                                 or (self.idle_refresh is not None and
                                     time.monotonic() - self._last_encode >= self.idle_refresh)):
                return self.source.damage_seq
            if not self._tracks:
                self._changed.clear()
                await self._changed.wait()
                continue
            self._changed.clear()
            await self.source.wait_damage(seq, timeout=KEYFRAME_POLL)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        seq = -1
        # Frame-rate cap as a token bucket (refilled at max_fps, holding up to
        # BURST frames): a source at the cap's own rate is never phase-locked into
        # waiting most of a period, yet the long-run rate stays <= max_fps.
        tokens, refilled = BURST, time.monotonic()
        last_keyframe = -KEYFRAME_MIN_INTERVAL
        while True:
            new_seq = await self._wait_for_work(seq)
            damaged, seq = new_seq != seq, new_seq
            now = time.monotonic()
            keyframe_wait = last_keyframe + KEYFRAME_MIN_INTERVAL - now
            if self._keyframe_pending and keyframe_wait > 0 and not damaged:
                await asyncio.sleep(keyframe_wait)  # only a keyframe is due, and not yet
                continue
            tokens = min(BURST, tokens + (now - refilled) * self._max_fps)
            refilled = now
            if tokens < 1:  # damage meanwhile is folded into this frame
                await asyncio.sleep((1 - tokens) / self._max_fps)
                seq = self.source.damage_seq
                now = time.monotonic()
                tokens, refilled = 1.0, now
            tokens -= 1
            started = now
            self._last_encode = started
            damage_time = self.source.damage_time
            image = self._frame_image()
            if image is None:
                continue
            keyframe = self._keyframe_pending and started - last_keyframe >= KEYFRAME_MIN_INTERVAL
            if keyframe:
                self._keyframe_pending = False
                last_keyframe = started
            pts = max(int((started - self._epoch) * CLOCK_RATE), self._last_pts + 1)
            self._last_pts = pts
            encoded = await loop.run_in_executor(
                self._executor, functools.partial(self.encoder.encode, image, pts=pts,
                                                  keyframe=keyframe))
            if encoded is None:
                continue
            self._account(encoded, image)
            if damage_time:
                self.stats.capture_to_encoded_ms.append((time.time() - damage_time) * 1000)
            for track in list(self._tracks):
                track.offer(encoded)

    def _frame_image(self) -> av.VideoFrame | None:
        """Copy the newest framebuffer (even-sized) into a frame, stamped if asked.

        The copy into the AVFrame is the only one per encoded frame, and it is
        taken on the event loop thread, so it is consistent with the capture.
        """
        fb = self.source.framebuffer
        height, width = fb.shape[0] & ~1, fb.shape[1] & ~1
        if width == 0 or height == 0:
            return None
        frame = av.VideoFrame.from_ndarray(fb[:height, :width], format="bgra")
        if self.watermark and height >= CELL and width >= CELLS * CELL:
            plane = frame.planes[0]
            rows = np.frombuffer(plane, dtype=np.uint8).reshape(height, plane.line_size)
            stamp_watermark(rows[:, :width * 4].reshape(height, width, 4),
                            int(self.source.damage_time * 1000))
        return frame

    def _account(self, encoded: EncodedFrame, image: av.VideoFrame) -> None:
        self.stats.frames += 1
        self.stats.keyframes += int(encoded.keyframe)
        self.stats.bytes += encoded.packet.size
        self.stats.encode_seconds += encoded.encode_seconds
        self.stats.last_frame_time = time.time()
        self.stats.sizes = (image.width, image.height)
