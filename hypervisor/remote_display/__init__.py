"""remote_display: a running guest's screen in a browser over WebRTC, input back over QMP.

Pieces (one job each): ``rfb`` (pure RFB 3.8 client protocol), ``capture``
(VNC unix socket → numpy framebuffer, damage-driven), ``encoder`` (x264 / VP8 /
NVENC with runtime rate changes), ``track`` (damage-driven shared stream,
per-viewer aiortc tracks of encoded packets), ``rtc`` (the aiortc hook for PLI
and REMB), ``input`` (page messages → QMP input-send-event through libvirt),
``server`` (aiohttp: login, roles, signaling, the page in ``web/``),
``service`` (assembles them for one VM), ``watermark`` (timestamps drawn into
frames for latency measurement) and ``pattern`` (a synthetic screen for
benchmarks).

Heavy imports (aiortc, av, libvirt) happen when the submodules are imported,
so ``import hypervisor.remote_display`` alone stays cheap;
:func:`serve_in_background` imports on first use. :func:`spawn_display` /
:func:`stop_display` run ``omega display serve`` as a background process that
outlives its caller (for ``omega demo``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from hypervisor.remote_display.detached import spawn_display, stop_display

if TYPE_CHECKING:
    from hypervisor.config import Config
    from hypervisor.remote_display.service import BackgroundDisplay, DisplayOptions

__all__ = ["serve_in_background", "spawn_display", "stop_display"]


def serve_in_background(config: Config, vm: str, *, options: DisplayOptions | None = None,
                        **kwargs: Any) -> BackgroundDisplay:
    """Serve ``vm``'s screen from a daemon thread (see :mod:`.service`).

    Args:
        config: Omega's configuration.
        vm: a running domain with a VNC unix socket (``VMSpec(graphics="vnc")``).
        options: listen address, codec, fps, bitrate, TLS.
        **kwargs: ``credentials``, ``timeout``.

    Returns:
        A handle: ``.url`` (with the operator token), ``.operator_token``,
        ``.viewer_token``, ``.stop()``.
    """
    from hypervisor.remote_display.service import serve_in_background as serve

    return serve(config, vm, options=options, **kwargs)
