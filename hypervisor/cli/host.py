"""`omega host` commands: what this host can do, and its accelerator."""

from __future__ import annotations

from typing import Any

import typer

from hypervisor.cli._output import JSON_OPTION, emit
from hypervisor.config import Config

app = typer.Typer(help="This host's capabilities and accelerator.", no_args_is_help=True)


@app.command("check")
def check(
    as_json: bool = JSON_OPTION,
    reprobe: bool = typer.Option(False, "--reprobe",
                                 help="Re-run the accelerator boot probe (ignore its cache)."),
) -> None:
    """Check the accelerator, libvirt, userfaultfd, memfd, netns, DAMON, KSM, hugepages,
    IOMMU groups and GPUs. Exit 0 when libvirt and an accelerator are usable, else 1."""
    from hypervisor.hostcheck import check_host, essentials_ok

    config = Config.from_env()
    config.ensure()
    checks = check_host(config, reprobe=reprobe)
    ok = essentials_ok(checks)
    data = {"ok": ok, "checks": [c.to_dict() for c in checks]}

    def render(_: Any) -> None:
        from rich.console import Console
        from rich.markup import escape
        from rich.table import Table

        table = Table(box=None, header_style="bold")
        for col in ("CHECK", "OK", "DETAIL"):
            table.add_column(col)
        for c in checks:
            mark = "[green]yes[/]" if c.ok else ("[red]NO[/]" if c.essential else "[yellow]no[/]")
            table.add_row(c.name + (" *" if c.essential else ""), mark, escape(c.detail))
        console = Console()
        console.print(table)
        console.print("* essential" + ("" if ok else " — [red]this host cannot run VMs[/]"))

    emit(data, as_json, render)
    if not ok:
        raise typer.Exit(1)


@app.command("accel")
def accel(
    as_json: bool = JSON_OPTION,
    force: bool = typer.Option(False, "--force", help="Probe again, ignoring the cache."),
) -> None:
    """Show the accelerator VMs will use (KVM or TCG) and why."""
    from hypervisor.vm.accel import probe

    config = Config.from_env()
    config.ensure()
    result = probe(config, force=force)
    emit(result.to_dict(), as_json,
         lambda r: typer.echo(f"{r['accel']}: {r['reason']}"
                              + (" (cached)" if r["cached"] else "")))
