"""`omega netblock` commands: create, import, export, copy, serve, list, show, resize,
delete, repair."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from hypervisor.cli._output import JSON_OPTION, emit, emit_json, emit_table
from hypervisor.config import Config
from hypervisor.errors import UsageError
from hypervisor.units import format_size, parse_size

app = typer.Typer(help="Network block devices: NBD exports stored on peers.",
                  no_args_is_help=True)

_COLUMNS = ("name", "kind", "size", "replicas", "chunk_size", "block_size", "in_use_by", "id")


def _row(record: Any, holder: int | None) -> dict[str, Any]:
    return {"name": record.name, "kind": record.kind, "size": format_size(record.size),
            "replicas": record.replicas if record.kind == "replicated" else "-",
            "chunk_size": format_size(record.chunk_size),
            "block_size": format_size(record.block_size) if record.kind == "replicated" else "-",
            "in_use_by": f"pid {holder}" if holder else "-", "id": record.id[:12]}


def _store() -> Any:
    from hypervisor.netblock.exports import ExportStore

    config = Config.from_env()
    config.ensure()
    return ExportStore(config)


def _parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise UsageError(f"--listen wants HOST:PORT, not {text!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def _parse_peer(text: str) -> tuple[str, str]:
    name, sep, address = text.partition("=")
    if not sep or not name:
        raise UsageError(f"--peer wants NAME=HOST:PORT, not {text!r}")
    _parse_listen(address)
    return name, address


@app.command("create")
def create(
    name: str = typer.Argument(..., help="Export name."),
    size: str = typer.Argument(..., help="Size, e.g. 10G."),
    replicas: int = typer.Option(2, "--replicas", "-r", help="Copies of each chunk on peers."),
    chunk_size: str = typer.Option("64K", "--chunk-size", help="Chunk size (power of two): "
                                   "the unit placed on peers."),
    block_size: Optional[str] = typer.Option(None, "--block-size", help="Block size (power "
                                             "of two, at most the chunk size; default 4K): the "
                                             "unit a write seals and stores; equal to the "
                                             "chunk size for the Python backend."),
    write_quorum: int = typer.Option(0, "--write-quorum",
                                     help="Replicas that must acknowledge a write "
                                          "(0 = every live replica)."),
    local: bool = typer.Option(False, "--local", help="Keep the data in a sparse file here."),
    description: str = typer.Option("", "--description", help="Free text."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Create an empty (sparse) export."""
    from hypervisor.netblock.exports import DEFAULT_BLOCK_SIZE

    store = _store()
    record = store.create(name, parse_size(size), replicas=replicas,
                          chunk_size=parse_size(chunk_size, what="chunk size"),
                          block_size=(None if local else
                                      parse_size(block_size, what="block size") if block_size
                                      else min(DEFAULT_BLOCK_SIZE,
                                               parse_size(chunk_size, what="chunk size"))),
                          write_quorum=write_quorum, local=local, description=description)
    if as_json:
        emit_json(record.as_dict())
    else:
        typer.echo(f"created {record.kind} export {record.name} ({format_size(record.size)})")


@app.command("list")
def list_exports(as_json: bool = JSON_OPTION) -> None:
    """List exports, with the pid of the process serving each (if any)."""
    store = _store()
    records = [(r, store.holder(r)) for r in store.list()]
    emit([{**r.as_dict(), "in_use_by": h} for r, h in records], as_json,
         lambda _: emit_table([_row(r, h) for r, h in records], _COLUMNS))


@app.command("show")
def show(name: str = typer.Argument(..., help="Export name."), as_json: bool = JSON_OPTION) -> None:
    """Show one export, with chunk and replica health for replicated exports."""
    from hypervisor.netblock.health import export_health

    store = _store()
    record = store.get(name)
    data = record.as_dict()
    data["in_use_by"] = store.holder(record)
    data.update(export_health(store, record))
    emit(data, as_json, lambda d: [typer.echo(f"{k}: {v}") for k, v in sorted(d.items())])


_PEER_OPTION = typer.Option([], "--peer", help="Peer NAME=HOST:PORT (default: the cluster "
                            "state's peers).")
_NODE_OPTION = typer.Option(None, "--node", help="This host's node name (mutual TLS with "
                            "peers; default: OMEGA_NODE or the hostname).")


def _pool(peer: list[str], node: str | None) -> Any:
    from hypervisor.netblock.service import make_peer_pool

    return make_peer_pool(Config.from_env(), peers=[_parse_peer(p) for p in peer], node=node)


@app.command("resize", context_settings={"ignore_unknown_options": True})
def resize_cmd(
    name: str = typer.Argument(..., help="Export name."),
    size: str = typer.Argument(..., help="New size (e.g. 20G), or a change (+5G, -1G)."),
    shrink: bool = typer.Option(False, "--shrink", help="Allow a smaller size: the data past "
                                "it is lost (zeroed and freed on the peers)."),
    peer: list[str] = _PEER_OPTION,
    node: str = _NODE_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Grow or shrink an export (not while it is served: stop its VM or server first)."""
    from hypervisor.netblock.service import resize_export

    text = size.strip()
    change = text[:1] in "+-"
    if change:
        new = parse_size(text[1:], what="size change") * (-1 if text[0] == "-" else 1)
    else:
        new = parse_size(text)
    old, record = resize_export(Config.from_env(), name, new, change=change, shrink=shrink,
                                peers=[_parse_peer(p) for p in peer], node=node)
    if as_json:
        emit_json({"name": name, "old_size": old.size, "size": record.size})
    elif old.size == record.size:
        typer.echo(f"export {name} is already {format_size(record.size)}")
    else:
        typer.echo(f"resized export {name}: {format_size(old.size)} -> "
                   f"{format_size(record.size)}")


@app.command("delete")
def delete(name: str = typer.Argument(..., help="Export name."),
           peer: list[str] = _PEER_OPTION, node: str = _NODE_OPTION) -> None:
    """Delete an export, its chunks on peers, its key and its metadata."""
    from hypervisor.netblock.service import delete_export

    delete_export(Config.from_env(), name, peers=[_parse_peer(p) for p in peer], node=node)
    typer.echo(f"deleted export {name}")


@app.command("serve")
def serve_cmd(
    names: list[str] = typer.Argument(None, help="Exports to serve (default: all)."),
    socket_path: Path = typer.Option(None, "--socket", help="Unix socket path "
                                     "(default: $OMEGA_HOME/run/netblock.sock)."),
    listen: list[str] = typer.Option([], "--listen", help="Also listen on TCP HOST:PORT."),
    stdin: bool = typer.Option(False, "-s", "--single", help="Serve the socket on stdin "
                               "(like nbdkit -s) and exit when the client leaves."),
    memory: list[str] = typer.Option([], "--memory", help="Add an in-RAM export NAME:SIZE."),
    tls_dir: Path = typer.Option(None, "--tls-creds", help="QEMU-style x509 directory "
                                 "(ca-cert.pem, server-cert.pem, server-key.pem)."),
    tls_node: str = typer.Option(None, "--tls-node", help="Use this cluster node's "
                                 "certificate (cluster CA)."),
    tls_required: bool = typer.Option(False, "--tls-required", help="Refuse clients without "
                                      "STARTTLS (always on for TCP off loopback)."),
    no_tls_required: bool = typer.Option(False, "--no-tls-required", help="Allow plaintext "
                                         "TCP off loopback."),
    read_only: bool = typer.Option(False, "--read-only", help="Serve read-only."),
    metrics: str = typer.Option(None, "--metrics", help="Expose Prometheus metrics on "
                                "HOST:PORT."),
    repair: bool = typer.Option(True, "--repair/--no-repair", help="Re-replicate stale "
                                "chunks in the background."),
    peer: list[str] = _PEER_OPTION,
    node: str = _NODE_OPTION,
    cache: str = typer.Option("64M", "--cache", help="Plaintext cache of blocks read and "
                              "written, per replicated export (0: none)."),
    busy_poll_us: int = typer.Option(100, "--busy-poll-us", min=0, max=100000,
                                     help="Microseconds a connection waits awake for its next "
                                     "request before sleeping (0: never). Cuts QD1 latency on "
                                     "VMs whose idle vCPUs halt; stops at once on a busy CPU."),
    run: str = typer.Option(None, "--run", help="Captive mode (as nbdkit --run): once "
                            "listening, run this shell command with $uri, $unixsocket, "
                            "$exportname and $exports set, then drain and exit with its "
                            "status. Serves a private socket unless --socket is given."),
    pidfile: Path = typer.Option(None, "--pidfile", "-P", help="Write the server's pid here "
                                 "once it listens (removed at exit)."),
    exit_with_parent: bool = typer.Option(False, "--exit-with-parent", help="Drain and exit "
                                          "when the process that started this one exits (as "
                                          "nbdkit --exit-with-parent)."),
) -> None:
    """Serve exports over NBD until SIGTERM/SIGINT (connections drain first).

    With --run the server is captive: e.g. `omega netblock serve data
    --run 'nbdcopy "$uri" - | sha256sum'`.
    """
    import asyncio
    import logging
    import shutil
    import tempfile

    from hypervisor.netblock.service import ServeOptions, default_socket, serve

    logging.basicConfig(level=logging.WARNING, format="netblock: %(message)s")
    config = Config.from_env()
    config.ensure()
    mem: list[tuple[str, int]] = []
    for item in memory:
        mname, sep, msize = item.partition(":")
        if not sep:
            raise UsageError(f"--memory wants NAME:SIZE, not {item!r}")
        mem.append((mname, parse_size(msize)))
    if exit_with_parent:
        from hypervisor.netblock.service import exit_with_parent as _exit_with_parent

        _exit_with_parent()
    private = None
    if run is not None and socket_path is None:  # as nbdkit -U -: nobody else can connect
        private = Path(tempfile.mkdtemp(prefix="omega-nbd-"))
        socket_path = private / "nbd.sock"
    options = ServeOptions(
        names=names or (), memory=mem,
        socket=None if stdin else (socket_path or default_socket(config)),
        listen=[_parse_listen(x) for x in listen], stdin=stdin, tls_dir=tls_dir,
        tls_node=tls_node, tls_required=tls_required, no_tls_required=no_tls_required,
        read_only=read_only, metrics=_parse_listen(metrics) if metrics else None,
        repair=repair, peers=[_parse_peer(p) for p in peer], node=node,
        replicated_options={"cache_bytes": parse_size(cache, what="--cache")},
        busy_poll_us=busy_poll_us, run=run, announce=run is None,
        pidfile=pidfile.absolute() if pidfile is not None else None)
    from hypervisor.memtune import keep_large_buffers

    keep_large_buffers()
    try:
        import uvloop  # a faster event loop when installed; asyncio's otherwise
    except ImportError:
        runner = asyncio.run
    else:
        runner = uvloop.run
    try:
        status = runner(serve(config, options))
    finally:
        if private is not None:
            shutil.rmtree(private, ignore_errors=True)
    if status is not None:
        raise typer.Exit(status)


@app.command("import")
def import_cmd(
    name: str = typer.Argument(..., help="Export name (created if missing)."),
    file: Path = typer.Argument(..., help="Raw or qcow2 image to copy in."),
    replicas: int = typer.Option(2, "--replicas", "-r", help="Replicas if created."),
    local: bool = typer.Option(False, "--local", help="Create as a local export if missing."),
    peer: list[str] = _PEER_OPTION,
    node: str = _NODE_OPTION,
) -> None:
    """Copy an image into an export (qemu-img convert into the NBD server)."""
    from hypervisor.netblock.transfer import import_image

    import_image(Config.from_env(), name, file, replicas=replicas, local=local,
                 peers=[_parse_peer(p) for p in peer], node=node)
    typer.echo(f"imported {file} into {name}")


@app.command("export")
def export_cmd(
    name: str = typer.Argument(..., help="Export name."),
    file: Path = typer.Argument(..., help="Image file to write."),
    fmt: str = typer.Option("raw", "--format", "-O", help="raw or qcow2."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing file."),
    peer: list[str] = _PEER_OPTION,
    node: str = _NODE_OPTION,
) -> None:
    """Copy an export out into an image file (qemu-img convert from the NBD server)."""
    from hypervisor.netblock.transfer import export_image

    export_image(Config.from_env(), name, file, fmt=fmt, force=force,
                 peers=[_parse_peer(p) for p in peer], node=node)
    typer.echo(f"exported {name} to {file} ({fmt})")


@app.command("copy")
def copy_cmd(
    source: str = typer.Argument(..., help="Export to copy."),
    target: str = typer.Argument(..., help="Name of the new export."),
    replicas: Optional[int] = typer.Option(None, "--replicas", "-r", help="Replicas of the "
                                           "copy (default: the source's)."),
    local: Optional[bool] = typer.Option(None, "--local/--replicated", help="Make the copy "
                                         "local or replicated (default: as the source)."),
    peer: list[str] = _PEER_OPTION,
    node: str = _NODE_OPTION,
) -> None:
    """Copy an export into a new one (holes stay holes), e.g. a template disk per VM."""
    from hypervisor.netblock.transfer import copy_export

    record = copy_export(Config.from_env(), source, target, replicas=replicas, local=local,
                         peers=[_parse_peer(p) for p in peer], node=node)
    typer.echo(f"copied {source} to {target} ({record.kind}, {format_size(record.size)})")


@app.command("repair")
def repair_cmd(
    name: str = typer.Argument(..., help="Export name."),
    peer: list[str] = _PEER_OPTION,
    node: str = _NODE_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Bring every chunk of a replicated export back to its replica count."""
    import asyncio

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from hypervisor.netblock.replicated import repair_export

    config = Config.from_env()
    store = _store()
    if store.get(name).kind != "replicated":  # fail before any progress bar appears
        raise UsageError(f"export {name!r} is local: it has no replicas to repair")
    with Progress(TextColumn("[bold]re-replicating"), BarColumn(), MofNCompleteColumn(),
                  console=Console(stderr=True), transient=as_json) as progress:
        task = progress.add_task("repair", total=None)

        def report(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        async def run() -> dict[str, int]:
            return await repair_export(config, store, name, progress=report,
                                       pool=_pool(peer, node), node=node)

        result = asyncio.run(run())
    if as_json:
        emit_json(result)
    else:
        typer.echo(f"repaired {result['repaired']} chunks; {result['stale']} still under-replicated")
