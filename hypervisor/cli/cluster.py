"""`omega cluster` commands: cluster identity and the local cluster."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Optional

import typer

from hypervisor.cli._output import JSON_OPTION, emit, emit_table

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
    from hypervisor.clusterstate import ClusterState
    ClusterState(config).set_meta("local_node", node)
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


@app.command("up")
def up(
    peers: int = typer.Option(..., "--peers", help="How many peers to start (1-16)."),
    memory_lend: str = typer.Option("256M", "--memory-lend", help="RAM each peer lends."),
    disk_lend: str = typer.Option("1G", "--disk-lend", help="Disk each peer lends."),
    netns: Optional[bool] = typer.Option(None, "--netns/--loopback",
                                         help="One network namespace per peer (default: "
                                         "when allowed), or all on loopback."),
    base_port: Optional[int] = typer.Option(None, "--base-port",
                                            help="Loopback: first peer's port (default: any)."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Start a local cluster: N `omega node serve` peers on this machine."""
    from hypervisor.config import Config
    from hypervisor.localcluster import LocalCluster
    from hypervisor.units import parse_size

    config = Config.from_env()
    config.ensure()
    mem = parse_size(memory_lend, what="--memory-lend")
    disk = parse_size(disk_lend, what="--disk-lend")
    cluster = LocalCluster(config)
    started = cluster.up(peers, memory_lend=mem, disk_lend=disk, netns=netns,
                         base_port=base_port)
    _show_peers([p.to_dict() for p in started], as_json)


@app.command("down")
def down(as_json: bool = JSON_OPTION) -> None:
    """Stop the local cluster: every peer, namespace and veth it made."""
    from hypervisor.config import Config
    from hypervisor.localcluster import LocalCluster

    names = LocalCluster(Config.from_env()).down()
    emit({"stopped": names}, as_json, lambda d: typer.echo(
        f"stopped {len(d['stopped'])} peers" + (f": {', '.join(d['stopped'])}"
                                                 if d["stopped"] else "")))


@app.command("status")
def status(
    as_json: bool = JSON_OPTION,
    ping: bool = typer.Option(True, "--ping/--no-ping", help="Measure each peer's RTT."),
) -> None:
    """Show the cluster's peers: address, lends, state, round-trip time."""
    from hypervisor.clusterstate import ClusterState
    from hypervisor.config import Config
    from hypervisor.localcluster import LocalCluster

    config = Config.from_env()
    local = {p.name: p for p in LocalCluster(config).peers()}
    rows = [local.get(p.name, p).to_dict() for p in ClusterState(config).peers()]
    if ping and rows:
        rtts = _measure(config, rows)
        for row in rows:
            rtt = rtts.get(row["name"])
            row["rtt_us"] = None if rtt is None else round(rtt * 1e6, 1)
            row["reachable"] = rtt is not None
    _show_peers(rows, as_json)


def _measure(config, rows: list[dict]) -> dict[str, float | None]:  # noqa: ANN001
    import asyncio

    from hypervisor.clusterstate import local_node_name
    from hypervisor.errors import OmegaError
    from hypervisor.node.client import PeerPool
    from hypervisor.security import client_ssl_context

    node = local_node_name(config)
    if node is None:
        return {}
    try:
        ctx = client_ssl_context(config, node=node)
    except OmegaError:
        return {}

    async def run() -> dict[str, float | None]:
        pool = PeerPool(ctx, connect_timeout=3.0, request_timeout=3.0)
        for row in rows:
            pool.add(row["name"], row["address"])
        try:
            return await pool.measure(samples=3)
        finally:
            await pool.close()

    return asyncio.run(run())


def _show_peers(rows: list[dict], as_json: bool) -> None:
    from hypervisor.units import format_size

    def render(data: list[dict]) -> None:
        if not data:
            typer.echo("no peers")
            return
        table = [{**r, "memory": format_size(r["memory_lend"]),
                  "disk": format_size(r["disk_lend"]),
                  "netns": r.get("netns") or "-",
                  "rtt": f"{r['rtt_us']:.0f} µs" if r.get("rtt_us") is not None else "-"}
                 for r in data]
        emit_table(table, ["name", "address", "state", "memory", "disk", "netns", "rtt", "pid"])

    emit(rows, as_json, render)
