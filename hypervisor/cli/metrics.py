"""`omega metrics` commands: serve Prometheus metrics over HTTP."""

from __future__ import annotations

from typing import Annotated

import typer

from hypervisor.config import Config
from hypervisor.errors import UsageError

app = typer.Typer(help="Prometheus metrics (omega_* names).", no_args_is_help=True)


def parse_listen(text: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` (``[v6]:PORT`` for IPv6).

    Args:
        text: the listen address.

    Returns:
        (host, port).

    Raises:
        UsageError: not HOST:PORT with a port in 1..65535.
    """
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"--listen: {text!r} is not HOST:PORT (e.g. 127.0.0.1:9177)")
    return host.strip("[]"), int(port)


@app.command("serve")
def serve(
    listen: Annotated[str, typer.Option("--listen", help="HOST:PORT to serve /metrics on.")]
    = "127.0.0.1:9177",
) -> None:
    """Serve VM metrics at http://HOST:PORT/metrics until interrupted."""
    import threading

    from prometheus_client import CollectorRegistry, start_http_server

    from hypervisor.vm.lifecycle import VMController
    from hypervisor.vm.metrics import VMMetricsCollector

    host, port = parse_listen(listen)
    config = Config.from_env()
    registry = CollectorRegistry()
    controller = VMController(config, hooks=[])
    controller.list()  # fail now, with one line, if libvirt is unreachable
    registry.register(VMMetricsCollector(controller))
    from hypervisor.dsm.metrics import DsmMetricsCollector

    registry.register(DsmMetricsCollector(config))
    try:
        server, _thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise UsageError(f"--listen {listen}: {exc.strerror or exc}") from exc
    typer.echo(f"serving metrics on http://{listen}/metrics", err=True)
    try:
        threading.Event().wait()
    finally:
        server.shutdown()
