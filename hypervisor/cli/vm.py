"""`omega vm` commands: create, start, stop, destroy, delete, list, show, console."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from hypervisor.cli._output import JSON_OPTION, emit, emit_table
from hypervisor.config import Config
from hypervisor.errors import UsageError
from hypervisor.units import format_size, parse_size

if TYPE_CHECKING:
    from hypervisor.vm.lifecycle import VMController
    from hypervisor.vm.spec import VMSpec

app = typer.Typer(help="Create and run VMs (ordinary libvirt domains).", no_args_is_help=True)

#: The tiny guest's marker line (images/tiny.py); `--wait-ready` waits for it.
READY_REGEX = r"OMEGA-GUEST-READY"


def controller() -> VMController:
    """A controller for this process's configuration."""
    from hypervisor.vm.lifecycle import VMController

    config = Config.from_env()
    config.ensure()
    return VMController(config)


def build_spec(name: str | None, *, image: str | None, vcpus: int | None, memory: str | None,
               disk: str | None, cmdline_extra: str | None, spec_file: Path | None,
               graphics: str | None = None, accel: str | None = None,
               local_memory: str | None = None) -> VMSpec:
    """Turn `omega vm create` arguments into a spec (options override the spec file).

    Args:
        name: the VM name (overrides the spec file's).
        image: image reference.
        vcpus: vCPU count.
        memory: memory size text (``512M``).
        disk: scratch disk size text.
        cmdline_extra: extra kernel arguments.
        spec_file: a TOML spec file.
        graphics: ``none`` or ``vnc``.
        accel: ``kvm`` or ``tcg``.
        local_memory: RAM kept on this host (``128M``); the rest is lent by
            peers (dsm). Equal to the memory (or unset): no dsm.

    Returns:
        The spec (not yet validated against the host).

    Raises:
        UsageError: a required value is missing or a size is malformed.
        SpecError: the spec file is bad.
    """
    from hypervisor.vm.spec import VMSpec

    if spec_file is not None:
        spec = VMSpec.from_toml(spec_file)
        if name:
            spec.name = name
        if image:
            spec.image = image
    else:
        if not name:
            raise UsageError("a VM name is required (omega vm create NAME --image IMG)")
        if not image:
            raise UsageError("--image is required (e.g. --image tiny) unless --spec is given")
        spec = VMSpec(name=name, image=image)
    if vcpus is not None:
        spec.vcpus = vcpus
    if memory is not None:
        spec.memory = parse_size(memory, what="--memory")
    if local_memory is not None:
        spec.local_memory = parse_size(local_memory, what="--local-memory")
    if disk is not None and disk.startswith("netblock:"):
        from hypervisor.vm.spec import DiskSpec

        spec.disks.append(DiskSpec(kind="netblock", export=disk.removeprefix("netblock:")))
    elif disk is not None:
        spec.disk_size = parse_size(disk, what="--disk")
    if cmdline_extra is not None:
        spec.cmdline_extra = cmdline_extra
    if graphics is not None:
        spec.graphics = graphics
    if accel is not None:
        spec.accel = accel
    return spec


@app.command("create")
def create(
    name: Annotated[Optional[str], typer.Argument(
        help="VM name (default: the spec file's).")] = None,
    image: Annotated[Optional[str], typer.Option(
        "--image", "-i", help="Image name or digest.")] = None,
    vcpus: Annotated[Optional[int], typer.Option(
        "--vcpus", help="Virtual CPUs (default 1).")] = None,
    memory: Annotated[Optional[str], typer.Option(
        "--memory", "-m", help="RAM, e.g. 512M (default 256M).")] = None,
    local_memory: Annotated[Optional[str], typer.Option(
        "--local-memory", help="RAM kept on this host; peers lend the rest (default: all of "
        "--memory).")] = None,
    disk: Annotated[Optional[str], typer.Option(
        "--disk", help="Local scratch disk size, e.g. 1G, or netblock:EXPORT to attach a "
        "netblock export.")] = None,
    cmdline_extra: Annotated[Optional[str], typer.Option(
        "--cmdline-extra", help="Appended to the kernel command line.")] = None,
    spec_file: Annotated[Optional[Path], typer.Option("--spec", help="TOML spec file.")] = None,
    graphics: Annotated[Optional[str], typer.Option("--graphics", help="none or vnc.")] = None,
    accel: Annotated[Optional[str], typer.Option(
        "--accel", help="kvm or tcg (default: probed).")] = None,
    start: Annotated[bool, typer.Option("--start", help="Start it after defining it.")] = False,
    wait_ready: Annotated[bool, typer.Option(
        "--wait-ready", help="With --start: wait for the guest's marker line.")] = False,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds --wait-ready waits.")] = 120,
) -> None:
    """Define a VM in libvirt (nothing is left behind if it fails)."""
    spec = build_spec(name, image=image, vcpus=vcpus, memory=memory, disk=disk,
                      cmdline_extra=cmdline_extra, spec_file=spec_file, graphics=graphics,
                      accel=accel, local_memory=local_memory)
    ctl = controller()
    spec = ctl.create(spec)
    typer.echo(f"created {spec.name} ({spec.vcpus} vCPU, {format_size(spec.memory)}, "
               f"image {spec.image})")
    if start:
        _start(ctl, spec.name, wait_ready=wait_ready, timeout=timeout)


def _start(ctl: VMController, name: str, *, wait_ready: bool, timeout: float) -> None:
    ctl.start(name)
    typer.echo(f"started {name}")
    if wait_ready:
        typer.echo(ctl.wait_for_serial(name, READY_REGEX, timeout=timeout))


@app.command("start")
def start(
    name: Annotated[str, typer.Argument(help="VM name.")],
    wait_ready: Annotated[bool, typer.Option(
        "--wait-ready", help="Wait for the guest's marker line and print it.")] = False,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds --wait-ready waits.")] = 120,
) -> None:
    """Start a VM; returns once it runs (or, with --wait-ready, once the guest is up)."""
    _start(controller(), name, wait_ready=wait_ready, timeout=timeout)


@app.command("stop")
def stop(
    name: Annotated[str, typer.Argument(help="VM name.")],
    timeout: Annotated[float, typer.Option(
        "--timeout", help="Seconds to wait for the guest before destroying it.")] = 30,
) -> None:
    """Shut a VM down (ACPI power button), destroying it after --timeout."""
    outcome = controller().stop(name, timeout=timeout)
    typer.echo({"shutdown": f"{name} shut down",
                "destroyed": f"{name} did not power off within {timeout:g}s; destroyed",
                "not-running": f"{name} was not running"}[outcome])


@app.command("reboot")
def reboot(
    name: Annotated[str, typer.Argument(help="VM name.")],
    hard: Annotated[bool, typer.Option(
        "--hard", help="Reset at once (the reset button) instead of asking the guest.")] = False,
    wait_ready: Annotated[bool, typer.Option(
        "--wait-ready", help="Wait for the rebooted guest's marker line and print it.")] = False,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds --wait-ready waits.")] = 120,
) -> None:
    """Reboot a running VM (ACPI, or --hard: reset); QEMU, disks and lent RAM stay."""
    ctl = controller()
    offset = ctl.reboot(name, hard=hard)
    typer.echo(f"{'reset' if hard else 'asked to reboot'} {name}")
    if wait_ready:
        typer.echo(ctl.wait_for_serial(name, READY_REGEX, timeout=timeout, after=offset))


@app.command("suspend")
def suspend(name: Annotated[str, typer.Argument(help="VM name.")]) -> None:
    """Pause a running VM's vCPUs (memory, disks and QEMU stay)."""
    paused = controller().suspend(name)
    typer.echo(f"suspended {name}" if paused else f"{name} was already paused")


@app.command("resume")
def resume(name: Annotated[str, typer.Argument(help="VM name.")]) -> None:
    """Let a suspended VM run again."""
    resumed = controller().resume(name)
    typer.echo(f"resumed {name}" if resumed else f"{name} was not paused")


@app.command("destroy")
def destroy(name: Annotated[str, typer.Argument(help="VM name.")]) -> None:
    """Power a VM off at once."""
    was_running = controller().destroy(name)
    typer.echo(f"destroyed {name}" if was_running else f"{name} was not running")


@app.command("delete")
def delete(
    name: Annotated[str, typer.Argument(help="VM name.")],
    force: Annotated[bool, typer.Option(
        "--force", "-f", help="Destroy it first if it runs.")] = False,
) -> None:
    """Undefine a VM and remove its runtime directory."""
    controller().delete(name, force=force)
    typer.echo(f"deleted {name}")


@app.command("list")
def list_(as_json: bool = JSON_OPTION) -> None:
    """List Omega VMs."""
    rows = controller().list()

    def render(data: list[dict[str, Any]]) -> None:
        if not data:
            typer.echo("no VMs")
            return
        emit_table([{**r, "memory": format_size(r["memory"])} for r in data],
                   ["name", "state", "vcpus", "memory", "image", "accel"])

    emit(rows, as_json, render)


@app.command("show")
def show(name: Annotated[str, typer.Argument(help="VM name.")],
         as_json: bool = JSON_OPTION) -> None:
    """Show a VM: state, vCPUs, memory, disks, accelerator, runtime dir."""
    info = controller().show(name)
    if info["spec"].get("local_memory") is not None:
        from hypervisor.dsm.vmhook import handler_stats

        info["dsm"] = handler_stats(Path(info["runtime_dir"]))

    def render(data: dict[str, Any]) -> None:
        for key in ("name", "uuid", "state", "vcpus", "memory", "image", "accel",
                    "cpu_seconds", "runtime_dir", "serial_log", "vnc_socket", "cmdline"):
            value = data.get(key)
            if value is None:
                continue
            if key == "memory":
                value = format_size(value)
            typer.echo(f"{key + ':':<13} {value}")
        for disk in data["disks"]:
            ro = " (read-only)" if disk["readonly"] else ""
            typer.echo(f"{'disk:':<13} {disk['target']} {disk['source']}{ro}")
        for key, value in data.get("extra", {}).items():
            typer.echo(f"{key + ':':<13} {value}")
        if "dsm" in data:
            d = data["dsm"]
            typer.echo(f"{'dsm:':<13} " + ("handler not running" if not d else
                       f"resident {format_size(d.get('resident_bytes', 0))} of target "
                       f"{format_size(d['target_bytes'])}, remote "
                       f"{format_size(d.get('remote_bytes', 0))}, faults {d.get('faults', 0)}, "
                       f"remote p50 {d.get('remote_fault_p50_us', 0):.0f} µs"))

    emit(info, as_json, render)


@app.command("console")
def console(
    name: Annotated[str, typer.Argument(help="VM name.")],
    follow: Annotated[bool, typer.Option(
        "--follow", help="Print the serial output until the VM stops.")] = False,
    until: Annotated[Optional[str], typer.Option(
        "--until", help="Print until a line matches this regex; exit 0 then, 1 on "
        "timeout.")] = None,
    timeout: Annotated[Optional[float], typer.Option(
        "--timeout", help="Seconds --follow/--until wait (default: no limit).")] = None,
) -> None:
    """Attach to the serial console (Ctrl-] leaves), or follow it for scripts."""
    from hypervisor.vm import console as vm_console

    ctl = controller()
    if follow or until is not None:
        vm_console.follow(ctl, name, until=until, timeout=timeout)
        return
    if timeout is not None:
        raise UsageError("--timeout only applies to --follow or --until")
    vm_console.interactive(ctl, name)
