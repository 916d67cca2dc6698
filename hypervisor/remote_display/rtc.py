"""Where Omega's encoder plugs into aiortc.

aiortc's ``RTCRtpSender`` has two paths for what a track's ``recv()`` returns:
an ``av.VideoFrame`` goes through aiortc's own encoder (capped at 30 fps-era
defaults and ~3 Mbps, rebuilt on every large bitrate change), while an
``av.Packet`` is only packetized (``Encoder.pack``: H.264 FU-A/STAP-A, VP8
payload descriptor). :class:`~hypervisor.remote_display.track.DisplayTrack`
returns packets, so the encoding is entirely Omega's
(:class:`~hypervisor.remote_display.encoder.VideoEncoder`).

Two pieces of receiver feedback must still reach Omega's encoder, and aiortc
delivers them only to its own encoder: picture loss (PLI/FIR, which aiortc turns
into ``RTCRtpSender._send_keyframe()``) and the receiver's bandwidth estimate
(REMB, handled in ``RTCRtpSender._handle_rtcp_packet``). :func:`attach_feedback`
makes one sender an instance of :class:`FeedbackRtpSender`, a subclass that
forwards both to the track and then runs aiortc's own handling. These two
methods are aiortc internals, which is why pyproject pins
``aiortc>=1.9,<1.17`` (checked against 1.16; ``tests/display/test_rtc.py``
fails loudly if the hooks move).
"""

from __future__ import annotations

from aiortc import RTCPeerConnection, RTCRtpSender
from aiortc.rtp import RTCP_PSFB_APP, RtcpPsfbPacket, unpack_remb_fci

from hypervisor.remote_display.track import DisplayTrack

__all__ = ["FeedbackRtpSender", "add_display_track", "attach_feedback"]


class FeedbackRtpSender(RTCRtpSender):
    """An ``RTCRtpSender`` that also tells its DisplayTrack about PLI and REMB."""

    _display_track: DisplayTrack

    def _send_keyframe(self) -> None:
        super()._send_keyframe()
        self._display_track.keyframe_requested()

    async def _handle_rtcp_packet(self, packet: object) -> None:
        if isinstance(packet, RtcpPsfbPacket) and packet.fmt == RTCP_PSFB_APP:
            try:
                bitrate, ssrcs = unpack_remb_fci(packet.fci)
            except ValueError:
                pass
            else:
                if self._ssrc in ssrcs:
                    self._display_track.receiver_estimate(bitrate)
        await super()._handle_rtcp_packet(packet)


def attach_feedback(sender: RTCRtpSender, track: DisplayTrack) -> FeedbackRtpSender:
    """Route ``sender``'s PLI/FIR and REMB to ``track``.

    Args:
        sender: the sender aiortc created for ``track``.
        track: the display track it sends.

    Returns:
        The same sender object, now a :class:`FeedbackRtpSender`.

    Raises:
        TypeError: aiortc's sender no longer has the hooks this relies on.
    """
    for hook in ("_send_keyframe", "_handle_rtcp_packet", "_ssrc"):
        if not hasattr(sender, hook):
            raise TypeError(f"aiortc RTCRtpSender has no {hook}; "
                            "check the aiortc version pin")
    sender.__class__ = FeedbackRtpSender
    sender._display_track = track  # type: ignore[attr-defined]
    return sender  # type: ignore[return-value]


def add_display_track(pc: RTCPeerConnection, track: DisplayTrack, *,
                      mime_type: str) -> FeedbackRtpSender:
    """Send ``track`` on ``pc``, offering only ``mime_type`` (plus RTX).

    Call *before* ``setRemoteDescription(offer)``: aiortc negotiates codecs
    when the offer is applied, matching the offer's video section to this
    not-yet-associated transceiver and honouring its codec preferences.

    Args:
        pc: the peer connection.
        track: the viewer's display track.
        mime_type: "video/H264" or "video/VP8" (what the stream's encoder makes).

    Returns:
        The sender.

    Raises:
        ValueError: aiortc cannot send that codec.
    """
    codecs = [c for c in RTCRtpSender.getCapabilities("video").codecs
              if c.mimeType in (mime_type, "video/rtx")]
    if not any(c.mimeType == mime_type for c in codecs):
        raise ValueError(f"aiortc cannot send {mime_type}")
    transceiver = pc.addTransceiver(track, direction="sendonly")
    transceiver.setCodecPreferences(codecs)
    return attach_feedback(transceiver.sender, track)
