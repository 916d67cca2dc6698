"""`omega dsm` commands: the per-VM handler, its supervisor, and stats."""

from __future__ import annotations

import json
import time

import typer

from hypervisor.cli._output import JSON_OPTION, emit_json

app = typer.Typer(help="Guest RAM lent by peers (distributed shared memory).",
                  no_args_is_help=True)


@app.command("handler")
def handler(
    vm: str = typer.Argument(..., help="The VM whose guest RAM to serve."),
    supervise: bool = typer.Option(False, "--supervise",
                                   help="Run the handler as a child and restart it if it dies."),
) -> None:
    """Serve a VM's guest RAM (started by `omega vm start`; not usually run by hand)."""
    import logging

    from hypervisor.config import Config
    from hypervisor.errors import NotFoundError

    config = Config.from_env()
    vmdir = config.vms_dir / vm
    if not (vmdir / "dsm.json").exists():
        raise NotFoundError(f"VM {vm!r} has no DSM settings ({vmdir / 'dsm.json'})")
    if supervise:
        from hypervisor.dsm.supervisor import supervise as run_supervisor

        raise typer.Exit(run_supervisor(vm, vmdir))
    from hypervisor.dsm.handler import run_handler

    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s omega-dsm[%(process)d] %(levelname)s %(message)s")
    run_handler(config, vmdir)


def _render(stats: dict) -> str:
    from hypervisor.units import format_size

    if not stats.get("serving"):
        return f"{stats['vm']}: handler up, no guest attached"
    lines = [
        f"VM {stats['vm']}: resident {format_size(stats['resident_bytes'])} "
        f"(target {format_size(stats['target_bytes'])} + slack {format_size(stats['slack_bytes'])}; "
        f"memory file {format_size(stats['file_resident_bytes'])}, "
        f"max {format_size(stats['max_file_resident_bytes'])})",
        f"  remote {format_size(stats['remote_bytes'])} on peers, R={stats['replicas']}: " +
        (", ".join(f"{k}={v} pages" for k, v in sorted(stats['pages_per_peer'].items())) or "-") +
        (f"; dead: {', '.join(stats['dead_peers'])}" if stats['dead_peers'] else ""),
        f"  faults {stats['faults']} ({stats['faults_per_s']:.0f}/s): zero {stats['faults_zero']}, "
        f"remote {stats['faults_remote']}, on in-flight prefetch {stats['faults_inflight']}, "
        f"write-protect {stats['faults_wp']}",
        f"  remote fault latency p50 {stats['remote_fault_p50_us']:.0f} µs, "
        f"p99 {stats['remote_fault_p99_us']:.0f} µs; prefetched {stats['prefetched_pages']} pages",
        f"  evicted {stats['evicted_pages']} pages (cancelled by writes {stats['evict_cancelled']}), "
        f"fetched {stats['fetched_pages']} ({stats.get('native_fetches', 0)} on demand and "
        f"{stats.get('native_prefetched', 0)} ahead by the native path, "
        f"{stats.get('native_fallbacks', 0)} handed to Python); "
        f"bytes out {format_size(stats['bytes_out'])}, "
        f"in {format_size(stats['bytes_in'])}; retries {stats['fetch_retries']}, "
        f"errors {stats['errors']}",
    ]
    return "\n".join(lines)


@app.command("stats")
def stats(
    vm: str = typer.Argument(..., help="The VM."),
    json_out: bool = JSON_OPTION,
    watch: bool = typer.Option(False, "--watch", help="Refresh every second until Ctrl-C."),
) -> None:
    """Resident and remote pages per peer, faults/s, fault latency, prefetch, bytes in/out."""
    from hypervisor.config import Config
    from hypervisor.dsm.control import control_request
    from hypervisor.dsm.settings import DsmPaths

    paths = DsmPaths(Config.from_env().vms_dir / vm)
    while True:
        data = control_request(paths.control_socket, {"op": "stats"})["stats"]
        if json_out:
            if watch:
                typer.echo(json.dumps(data))
            else:
                emit_json(data)
        else:
            typer.echo(_render(data))
        if not watch:
            return
        time.sleep(1.0)
