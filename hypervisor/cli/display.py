"""`omega display` commands: serve a running VM's screen to browsers."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(help="Stream a VM's screen to a browser (WebRTC) with keyboard and mouse.",
                  no_args_is_help=True)


def _read_password() -> tuple[bytes, bytes]:
    from hypervisor.errors import UsageError
    from hypervisor.remote_display.server import hash_password

    password = os.environ.get("OMEGA_DISPLAY_PASSWORD")
    if password is None:
        password = typer.prompt("Display password", hide_input=True,
                                confirmation_prompt=True, err=True)
    if len(password) < 8:
        raise UsageError("the display password needs at least 8 characters")
    return hash_password(password)


@app.command("serve")
def serve(
    vm: Annotated[str, typer.Argument(help="A running VM with graphics = \"vnc\".")],
    listen: Annotated[str, typer.Option("--listen", help="HOST:PORT to serve on.")]
    = "127.0.0.1:8443",
    tls_cert: Annotated[Path | None, typer.Option("--tls-cert", help="PEM certificate (HTTPS).")]
    = None,
    tls_key: Annotated[Path | None, typer.Option("--tls-key", help="PEM private key.")] = None,
    token: Annotated[str | None, typer.Option(
        "--token", help="Operator token (default: $OMEGA_DISPLAY_TOKEN, else random; printed).")]
    = None,
    viewer_token: Annotated[str | None, typer.Option(
        "--viewer-token", help="Viewer (watch-only) token (default: "
        "$OMEGA_DISPLAY_VIEWER_TOKEN, else random; printed).")] = None,
    password: Annotated[bool, typer.Option(
        "--password", help="Also allow operator login by password "
        "(from $OMEGA_DISPLAY_PASSWORD or a prompt).")] = False,
    codec: Annotated[str, typer.Option(
        "--codec", help="auto (NVENC if an NVIDIA GPU, else h264), h264, vp8, h264_nvenc.")]
    = "auto",
    fps: Annotated[float, typer.Option("--fps", help="Frame-rate cap.")] = 30,
    bitrate: Annotated[str, typer.Option("--bitrate", help="Starting bitrate, e.g. 4M.")] = "4M",
    max_bitrate: Annotated[str, typer.Option(
        "--max-bitrate", help="Ceiling for congestion feedback, e.g. 20M.")] = "20M",
    watermark: Annotated[bool, typer.Option(
        "--watermark", help="Draw capture timestamps into frames (latency measurement).")]
    = False,
) -> None:
    """Serve VM's screen until interrupted; print the URL and the tokens."""
    import asyncio

    from hypervisor.config import Config
    from hypervisor.errors import UsageError
    from hypervisor.remote_display.server import Credentials
    from hypervisor.remote_display.service import DisplayOptions, open_display

    def rate(text: str) -> int:
        value = text.strip().upper()
        scale = {"K": 1_000, "M": 1_000_000, "G": 1_000_000_000}.get(value[-1:], 1)
        number = value[:-1] if value[-1:] in "KMG" else value
        try:
            result = int(float(number) * scale)
        except ValueError:
            raise UsageError(f"bitrate {text!r}: expected e.g. 4M or 800K") from None
        if result <= 0:
            raise UsageError(f"bitrate {text!r} must be positive")
        return result

    credentials = Credentials()
    # Tokens may come from the environment, which (unlike argv) other users cannot read.
    token = token if token is not None else os.environ.get("OMEGA_DISPLAY_TOKEN")
    viewer_token = (viewer_token if viewer_token is not None
                    else os.environ.get("OMEGA_DISPLAY_VIEWER_TOKEN"))
    if token is not None:
        if len(token) < 16:
            raise UsageError("--token needs at least 16 characters")
        credentials.operator_token = token
    if viewer_token is not None:
        if len(viewer_token) < 16:
            raise UsageError("--viewer-token needs at least 16 characters")
        credentials.viewer_token = viewer_token
    if credentials.viewer_token == credentials.operator_token:
        raise UsageError("operator and viewer tokens must differ")
    if password:
        credentials.password = _read_password()
    options = DisplayOptions(listen=listen, codec=codec, max_fps=fps, bitrate=rate(bitrate),
                             max_bitrate=rate(max_bitrate), watermark=watermark,
                             tls_cert=tls_cert, tls_key=tls_key)
    config = Config.from_env()
    import libvirt

    # libvirt prints every error to stderr by default; Omega reports them itself.
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)

    async def main() -> None:
        try:
            display = await open_display(config, vm, options=options, credentials=credentials)
        except OSError as exc:
            raise UsageError(f"cannot listen on {listen}: {exc.strerror or exc}") from exc
        typer.echo(f"serving {vm} ({display.stream.encoder.codec}) at {display.base_url}")
        typer.echo(f"operator: {display.url}")
        typer.echo(f"viewer:   {display.base_url}#token={credentials.viewer_token}")
        typer.echo(f"operator token: {credentials.operator_token}")
        typer.echo(f"viewer token:   {credentials.viewer_token}", err=False)
        try:
            await asyncio.Event().wait()
        finally:
            await display.close()

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        typer.echo("stopped", err=True)
