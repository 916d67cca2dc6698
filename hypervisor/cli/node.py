"""`omega node` commands: run this PC's node daemon (page and chunk service)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(help="The node daemon: lend RAM (pages) and disk (chunks) to the cluster.",
                  no_args_is_help=True)


@app.command("serve")
def serve(
    name: str = typer.Option(..., "--name", help="This node's name (its certificate is used)."),
    listen: str = typer.Option(..., "--listen", help="HOST:PORT to listen on (mutual TLS)."),
    memory_lend: str = typer.Option("0", "--memory-lend", help="RAM lent for pages (e.g. 1G)."),
    disk_lend: str = typer.Option("0", "--disk-lend", help="Disk lent for chunks (e.g. 20G)."),
    data: Optional[Path] = typer.Option(None, "--data", help="Chunk directory "
                                        "(default: OMEGA_HOME/node/NAME/chunks)."),
    metrics: Optional[str] = typer.Option(None, "--metrics", help="HOST:PORT for Prometheus."),
    no_fsync: bool = typer.Option(False, "--no-fsync", help="Do not fsync chunks (faster, "
                                  "loses acknowledged chunks if this PC crashes)."),
    page_port: int = typer.Option(0, "--page-port", min=-1, max=65535,
                                  help="Port of the data port (C threads serving page and "
                                  "chunk requests, announced in STAT); 0: any free port, "
                                  "-1: off."),
    busy_poll_us: int = typer.Option(100, "--busy-poll-us", min=0, max=100000,
                                     help="Data-port threads wait awake this long (µs) for a "
                                     "connection's next request before sleeping; 0: never."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log requests' failures."),
) -> None:
    """Serve pages and chunks to cluster members until SIGTERM (drains, then closes)."""
    import logging

    from hypervisor.config import Config
    from hypervisor.node.serve import NodeOptions, parse_listen, run_node
    from hypervisor.security import validate_node_name
    from hypervisor.units import parse_size

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s omega-node %(levelname)s %(message)s")
    config = Config.from_env()
    validate_node_name(name)
    host, port = parse_listen(listen)
    opts = NodeOptions(
        name=name, host=host, port=port,
        memory_lend=parse_size(memory_lend, what="--memory-lend"),
        disk_lend=parse_size(disk_lend, what="--disk-lend"),
        data_dir=data or config.home / "node" / name / "chunks",
        metrics=parse_listen(metrics, what="--metrics") if metrics else None,
        fsync=not no_fsync,
        page_port=None if page_port < 0 else page_port,
        busy_poll_us=busy_poll_us,
    )
    run_node(config, opts)
