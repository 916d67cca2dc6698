"""`omega demo`: the main job on the local default.

The demo is one function, :func:`demo`, running small steps in order; each step
takes the shared :class:`DemoRun` and does one visible thing. Later features
(peers, a netblock disk, dsm, the display URL) add steps to the list.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any

import typer

from hypervisor.config import Config

if TYPE_CHECKING:
    from images.store import Image
    from hypervisor.vm.lifecycle import VMController
    from hypervisor.vm.spec import VMSpec

#: The demo VM's name; a new demo replaces it.
DEMO_VM = "omega-demo"
READY_REGEX = r"OMEGA-GUEST-READY"
#: MiB the demo guest's memory test covers when part of its RAM is lent
DSM_EXERCISE_MIB = 150


@dataclass
class DemoRun:
    """State shared by the demo's steps.

    Attributes:
        config: Omega's configuration.
        controller: the VM controller.
        timeout: seconds to wait for the guest's marker.
        name: the demo VM's name.
        image: the built image (after the build step).
        spec: the demo VM's spec (after the spec step).
        marker: the guest's marker line (after the console step).
        notes: lines printed at the end (how to attach, URLs).
    """

    config: Config
    controller: VMController
    timeout: float
    name: str = DEMO_VM
    image: Image | None = None
    spec: VMSpec | None = None
    marker: str | None = None
    notes: list[str] = field(default_factory=list)
    disks: list[Any] = field(default_factory=list)
    peers: int = 2
    display: bool = True
    listen: str = "127.0.0.1:8443"


def _say(text: str) -> None:
    typer.secho(f"==> {text}", bold=True, err=True)


def step_build_image(run: DemoRun) -> None:
    """Build (or reuse, content-addressed) the tiny guest image, with a progress bar."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from images.store import ImageStore

    _say("building the tiny guest image")
    with Progress(TextColumn("{task.description:<28}"), BarColumn(), TimeElapsedColumn(),
                  console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task("tiny", total=1.0)

        def report(step: str, fraction: float) -> None:
            progress.update(task, completed=fraction, description=step)

        run.image = ImageStore(run.config).build("tiny", progress=report)
    typer.echo(f"image tiny {run.image.digest[:12]} ({run.image.size >> 20} MiB)", err=True)


def step_remove_previous(run: DemoRun) -> None:
    """Remove the VM of an earlier demo, if any."""
    from hypervisor.errors import NotFoundError

    try:
        run.controller.delete(run.name, force=True)
    except NotFoundError:
        return
    _say(f"removed the previous {run.name}")


#: Marker that the local cluster was started by the demo (so --down stops it).
_CLUSTER_MARK = "demo-cluster"


def step_cluster_up(run: DemoRun) -> None:
    """Start the local cluster (peers in their own netns) unless one is already up."""
    from hypervisor.localcluster import LocalCluster

    if run.peers <= 0:
        return
    cluster = LocalCluster(run.config)
    peers = cluster.peers()
    if peers:
        _say(f"using the local cluster that is up ({len(peers)} peers)")
        return
    _say(f"starting {run.peers} peers (omega node serve, each in its own network namespace)")
    peers = cluster.up(run.peers, memory_lend=512 << 20, disk_lend=1 << 30)
    (run.config.run_dir / _CLUSTER_MARK).write_text("\n".join(p.name for p in peers) + "\n")
    for p in peers:
        where = f"netns {p.netns}" if p.netns else "loopback"
        typer.echo(f"peer {p.name} at {p.address} ({where})", err=True)


def step_probe_accel(run: DemoRun) -> None:
    """Decide KVM or TCG (a bounded boot under KVM, once per host; then cached)."""
    from hypervisor.vm import accel

    _say("choosing the accelerator")
    result = accel.probe(run.config)
    how = "cached" if result.cached else "measured"
    typer.echo(f"accelerator {result.accel} ({how}: {result.reason})", err=True)


def step_define_vm(run: DemoRun) -> None:
    """Define the demo VM in libvirt."""
    from hypervisor.dsm.demo import demo_local_memory
    from hypervisor.vm.spec import VMSpec

    assert run.image is not None
    memory = 256 << 20
    local = demo_local_memory(run.config, memory)
    extra = ""
    if local and local < memory:
        # Right after its marker the guest writes and verifies a pattern over
        # more RAM than is kept local, so part of it really lives on peers.
        script = f"memtest {DSM_EXERCISE_MIB}"
        extra = "omega.run=" + base64.b64encode(script.encode()).decode()
    run.spec = run.controller.create(VMSpec(name=run.name, image=run.image.digest,
                                            vcpus=1, memory=memory, disk_size=64 << 20,
                                            disks=list(run.disks),
                                            graphics="vnc" if run.display else "none",
                                            local_memory=local, cmdline_extra=extra))
    info = run.controller.show(run.name)
    local = run.spec.local_memory
    ram = (f"{local >> 20} of {memory >> 20} MiB RAM local, the rest lent by peers"
           if local and local < memory else f"{memory >> 20} MiB RAM, all local")
    _say(f"defined {run.name} (accelerator {info['accel']}; {ram})")


def step_netblock_disk(run: DemoRun) -> None:
    """Give the demo VM a netblock disk (replicated on peers when a cluster is up)."""
    from hypervisor.netblock.demo import ensure_demo_export
    from hypervisor.vm.spec import DiskSpec

    record = ensure_demo_export(run.config, f"{run.name}-disk")
    run.disks.append(DiskSpec(kind="netblock", export=record.name))
    how = f"{record.replicas} replicas on peers" if record.kind == "replicated" else "local"
    _say(f"netblock disk {record.name} ({record.size >> 20} MiB, {how}) attached as vdb")


def step_start_vm(run: DemoRun) -> None:
    """Start the demo VM."""
    run.controller.start(run.name)
    _say(f"started {run.name}; its serial console follows")


def step_stream_console(run: DemoRun) -> None:
    """Stream the guest's serial console until its marker line, then print the marker."""
    from hypervisor.vm import console

    run.marker = console.follow(run.controller, run.name, until=READY_REGEX,
                                timeout=run.timeout)
    _say(f"guest is up: {run.marker}")


def step_dsm_exercise(run: DemoRun) -> None:
    """Follow the guest's memory test and show where its RAM now lives."""
    from hypervisor.dsm.control import control_request
    from hypervisor.dsm.settings import DsmPaths
    from hypervisor.errors import OmegaError
    from hypervisor.vm import console

    if "omega.run=" not in run.spec.cmdline_extra:
        return
    _say(f"the guest writes and verifies {DSM_EXERCISE_MIB} MiB (more than its local RAM)")
    line = console.follow(run.controller, run.name, until=r"OMEGA-MEMTEST ok=|OMEGA-RUN-END",
                          timeout=run.timeout)
    if line is None or "OMEGA-MEMTEST ok=1" not in line:
        raise OmegaError(f"the guest's memory test failed ({line or 'the guest stopped'}); "
                         f"its serial log: {run.config.vms_dir / run.name / 'serial.log'}")
    try:
        st = control_request(DsmPaths(run.config.vms_dir / run.name).control_socket,
                             {"op": "stats"})["stats"]
    except OmegaError as exc:
        _say(f"could not read the DSM stats: {exc}")
        return
    peers = ", ".join(sorted(st.get("pages_per_peer", {})))
    _say(f"guest RAM: {st['resident_bytes'] >> 20} MiB resident here, "
         f"{st['remote_bytes'] >> 20} MiB on peers (R={st['replicas']}: {peers or 'none'}); "
         f"{st['evicted_pages']} pages evicted, {st['faults_remote']} remote faults, "
         f"p50 {st['remote_fault_p50_us']:.0f} µs")
    run.notes.append(f"Where its RAM lives: omega dsm stats {run.name} --watch")


def step_display(run: DemoRun) -> None:
    """Serve the guest's screen to a browser (WebRTC) and note the URL and tokens."""
    from hypervisor.remote_display import spawn_display

    if not run.display:
        return
    shown = spawn_display(run.config, run.name, listen=run.listen)
    _say(f"desktop streaming at {shown.base_url}")
    run.notes += [
        f"Desktop of {run.name} in a browser (operator: keyboard and mouse):",
        f"  {shown.url}",
        f"  operator token {shown.operator_token}",
        f"  viewer token   {shown.viewer_token}   (watch only)",
    ]


def step_attach_notes(run: DemoRun) -> None:
    """Say how to reach the running guest."""
    run.notes += [
        f"{run.name} keeps running. Attach to its console with:",
        f"  omega vm console {run.name}        (Ctrl-] to leave)",
        f"  virsh console {run.name}           (Ctrl-] to leave)",
        "Remove it with: omega demo --down" + (f" --name {run.name}" if run.name != DEMO_VM
                                                else ""),
    ]


def step_teardown(run: DemoRun) -> None:
    """Undo the demo: display server, VM, its disk export, and the cluster it started."""
    from hypervisor.errors import NotFoundError, OmegaError
    from hypervisor.localcluster import LocalCluster
    from hypervisor.netblock.service import delete_export
    from hypervisor.remote_display import stop_display

    if stop_display(run.config, run.name):
        _say(f"stopped the display server of {run.name}")
    step_remove_previous(run)
    mark = run.config.run_dir / _CLUSTER_MARK
    if mark.exists():
        disk = f"{run.name}-disk"
        try:
            delete_export(run.config, disk)
            _say(f"deleted the export {disk} and its chunks on peers")
        except NotFoundError:
            pass
        except OmegaError as exc:  # the cluster goes down anyway, taking the chunks with it
            _say(f"could not delete the export {disk}: {exc}")
        stopped = LocalCluster(run.config).down()
        mark.unlink(missing_ok=True)
        _say(f"stopped the local cluster ({', '.join(stopped) or 'no peers'})")


def demo(
    down: Annotated[bool, typer.Option("--down", help="Remove the demo VM and exit.")] = False,
    name: Annotated[str, typer.Option("--name", help="Name of the demo VM.")] = DEMO_VM,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds to wait for the guest.")]
    = 180,
    peers: Annotated[int, typer.Option("--peers", min=0, max=16,
                                       help="Local peers lending RAM and disk (0: none).")] = 2,
    display: Annotated[bool, typer.Option("--display/--no-display",
                                          help="Stream the desktop to a browser.")] = True,
    listen: Annotated[str, typer.Option("--listen", help="HOST:PORT of the desktop page.")]
    = "127.0.0.1:8443",
) -> None:
    """Build the tiny image, boot it through libvirt and stream its console."""
    from hypervisor.vm.lifecycle import VMController

    config = Config.from_env()
    config.ensure()
    run = DemoRun(config=config, controller=VMController(config), timeout=timeout, name=name,
                  peers=peers, display=display, listen=listen)
    if down:
        steps: list[Any] = [step_teardown]
    else:
        steps = [
            step_build_image,
            step_remove_previous,
            step_probe_accel,
            step_cluster_up,
            step_netblock_disk,
            step_define_vm,
            step_start_vm,
            step_stream_console,
            step_dsm_exercise,
            step_display,
            step_attach_notes,
        ]
    for step in steps:
        step(run)
    for line in run.notes:
        typer.echo(line)
    if down:
        typer.echo(f"{name} removed (or was not there)")
