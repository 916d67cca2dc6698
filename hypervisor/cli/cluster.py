"""`omega cluster` commands: cluster identity and the local cluster."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Optional

import typer

from hypervisor.cli._output import JSON_OPTION, emit, emit_json, emit_table

app = typer.Typer(help="Cluster identity (CA, node certificates) and the local cluster.",
                  no_args_is_help=True)


def _default_node_name() -> str:
    name = socket.gethostname().split(".")[0] or "host"
    return name


@app.command("init")
def init(
    name: Optional[str] = typer.Option(None, "--name", help="This node's name (default: hostname)."),
    san: list[str] = typer.Option([], "--san", help="Extra SAN (IP or DNS) for this node; repeatable."),
    force: bool = typer.Option(False, "--force", help="Replace an existing CA (old certificates stop working)."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Create the cluster CA and this node's certificate."""
    from hypervisor.config import Config
    from hypervisor.security import ClusterCA, describe_cert, issue_node_cert, validate_node_name

    config = Config.from_env()
    node = validate_node_name(name or _default_node_name())
    sans = ["127.0.0.1", "::1", "localhost", *san]
    from hypervisor.security import parse_san
    for s in sans:
        parse_san(s)  # validate every SAN before anything is written
    ca = ClusterCA.init(config, name=node, force=force)
    paths = issue_node_cert(config, node, sans=sans)
    data = {"ca": str(ca.cert_path), "ca_key": str(ca.key_path), "node": node,
            "cert": str(paths.cert), "key": str(paths.key),
            "ca_sha256": describe_cert(ca.cert_path)["sha256"]}
    emit(data, as_json, lambda d: typer.echo(
        f"cluster CA {d['ca']} (sha256 {d['ca_sha256'][:16]}…); node {d['node']}: {d['cert']}"))


@app.command("join")
def join(
    name: str = typer.Argument(..., help="The peer's node name."),
    san: list[str] = typer.Option([], "--san", help="SAN (IP or DNS) of the peer; repeatable."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write ca.pem and nodes/NAME.* here "
                                       "(copy it to the peer's OMEGA_HOME/cluster)."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Issue a certificate for a peer, signed by the cluster CA."""
    from hypervisor.config import Config
    from hypervisor.security import describe_cert, issue_node_cert

    config = Config.from_env()
    paths = issue_node_cert(config, name, sans=san, out_dir=out)
    info = describe_cert(paths.cert)
    data = {"node": name, "cert": str(paths.cert), "key": str(paths.key), "ca": str(paths.ca),
            "sans": info["sans"], "not_after": info["not_after"]}
    emit(data, as_json, lambda d: typer.echo(
        f"node {d['node']}: {d['cert']} (SANs {', '.join(d['sans'])}; until {d['not_after']})"))
