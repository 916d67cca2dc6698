"""VM lifecycle through libvirt: define, start, stop, destroy, delete, inspect.

:class:`VMController` is the only place Omega changes libvirt domains. libvirt is
the source of truth: a VM is a defined domain carrying Omega metadata (the spec
as JSON), so ``virsh`` sees and manages the same thing, and Omega recovers the
spec from libvirt alone.

Failure handling: :meth:`VMController.create` undoes everything it did when any
step fails (hook preparations, the definition, the runtime directory), so a
failed create leaves nothing in libvirt and no files. Stop asks the guest
(ACPI power button), waits for libvirt's lifecycle event with a timeout, then
destroys.

Hooks (:class:`VMHook`) let dsm and netblock attach to a VM's life without the
VM layer knowing them: they may edit the spec before the domain is defined and
start or stop their services around the guest.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import pwd
import re
import shutil
import time
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from hypervisor.config import Config
from hypervisor.errors import (
    AlreadyExistsError,
    LibvirtError,
    NotFoundError,
    OmegaError,
    SpecError,
)
from hypervisor.vm.events import LibvirtEventLoop, LifecycleEvents
from hypervisor.vm.runtime import VMRuntimeDir
from hypervisor.vm.spec import HostLimits, VMSpec, validate_name
from hypervisor.vm.xml import domain_xml

if TYPE_CHECKING:
    from images.store import Image

T = TypeVar("T")

#: libvirt domain states (virDomainState) by number.
STATE_NAMES = {0: "nostate", 1: "running", 2: "blocked", 3: "paused", 4: "shutting-down",
               5: "shut-off", 6: "crashed", 7: "pmsuspended"}

#: Hooks every controller loads when none are passed: "module:Class", constructed
#: with the Config. A module that does not exist yet is skipped.
DEFAULT_HOOK_PATHS: tuple[str, ...] = (
    "hypervisor.netblock.vmhook:NetblockVMHook",
    "hypervisor.dsm.vmhook:DsmVMHook",
)

#: Image recipes whose guests run no ACPI daemon: stop also types ``poweroff``
#: on their serial console (the tiny guest's shell reads it).
RECIPES_WITHOUT_ACPI = frozenset({"tiny"})

#: Longest unix socket path (sun_path holds 108 bytes with the NUL).
UNIX_PATH_MAX = 107

#: The user libvirt runs QEMU as (Debian's default); it must create sockets in
#: the runtime dir.
QEMU_USER = "libvirt-qemu"


class VMStateError(OmegaError):
    """The VM is in the wrong state for the request (e.g. delete while running)."""


class SerialTimeout(OmegaError):
    """The expected text did not appear on the serial console in time."""


class VMHook:
    """Something that attaches to every VM's life (dsm, netblock).

    Subclass and override what you need; every method defaults to doing
    nothing. A hook must act only on specs that ask for it (e.g. dsm only when
    ``spec.uses_dsm``). An exception from :meth:`prepare` or
    :meth:`before_start` aborts the operation, and the controller undoes it.
    """

    def prepare(self, spec: VMSpec, vmdir: Path) -> None:
        """Before the domain is defined: may edit ``spec`` (qemu_env, disks...).

        Args:
            spec: the spec about to be defined (mutable).
            vmdir: the VM's runtime directory (exists, empty but for the scratch disk).
        """

    def before_start(self, spec: VMSpec, vmdir: Path) -> None:
        """Right before QEMU starts (start services the guest needs)."""

    def after_stop(self, spec: VMSpec, vmdir: Path) -> None:
        """After QEMU has gone (stop services started in :meth:`before_start`)."""

    def on_delete(self, spec: VMSpec, vmdir: Path) -> None:
        """When the VM is deleted, or its creation is undone (free what prepare made).

        Also called after this hook's own :meth:`prepare` raised, so it must
        tolerate a half-done or never-done preparation.
        """


def load_default_hooks(config: Config) -> list[VMHook]:
    """Instantiate the hooks named in :data:`DEFAULT_HOOK_PATHS` that exist.

    Args:
        config: passed to each hook's constructor.

    Returns:
        The hooks, in order.
    """
    hooks: list[VMHook] = []
    for path in DEFAULT_HOOK_PATHS:
        module_name, _, cls_name = path.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:
                continue
            raise
        hooks.append(getattr(module, cls_name)(config))
    return hooks


@contextmanager
def _libvirt_errors(what: str, *, name: str | None = None) -> Iterator[None]:
    """Turn libvirt exceptions into one-line Omega errors."""
    import libvirt

    try:
        yield
    except libvirt.libvirtError as exc:
        msg = (exc.get_error_message() or str(exc)).splitlines()[0]
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            raise NotFoundError(f"no VM named {name!r}") from exc
        raise LibvirtError(f"{what}: {msg}") from exc


def _qemu_ids() -> tuple[int, int] | None:
    try:
        entry = pwd.getpwnam(QEMU_USER)
    except KeyError:
        return None
    return entry.pw_uid, entry.pw_gid


class VMController:
    """Creates, runs and removes Omega VMs in libvirt.

    Args:
        config: Omega's configuration (state dirs, libvirt URI, accelerator).
        hooks: hooks to run around each VM's life; None loads
            :data:`DEFAULT_HOOK_PATHS`.

    Attributes:
        hooks: the hooks, in the order they run (reverse order on teardown).
    """

    def __init__(self, config: Config, *, hooks: list[VMHook] | None = None) -> None:
        self.config = config
        self.hooks: list[VMHook] = load_default_hooks(config) if hooks is None else hooks
        self._events_loop = LibvirtEventLoop.get()
        self._conn: Any = None
        self._events: LifecycleEvents | None = None

    # ------------------------------------------------------------ plumbing

    def _connection(self) -> Any:
        """Open the connection on first use (on the event loop thread)."""
        if self._conn is not None and not self._conn.isAlive():
            # libvirtd went away (restart): drop the dead connection, reconnect.
            if self._events is not None:
                self._events.close()
                self._events = None
            self._conn = None
        if self._conn is None:
            import libvirt

            try:
                conn = libvirt.open(self.config.libvirt_uri)
            except libvirt.libvirtError as exc:
                msg = (exc.get_error_message() or str(exc)).splitlines()[0]
                raise LibvirtError(f"cannot reach libvirt at {self.config.libvirt_uri}: "
                                   f"{msg}") from exc
            self._conn = conn
            self._events = LifecycleEvents(conn)
        return self._conn

    def _domain(self, name: str) -> Any:
        validate_name(name)
        conn = self._connection()
        with _libvirt_errors(f"looking up VM {name!r}", name=name):
            return conn.lookupByName(name)

    def _omega_domain(self, name: str) -> tuple[Any, VMSpec]:
        dom = self._domain(name)
        with _libvirt_errors(f"reading VM {name!r}", name=name):
            xml = dom.XMLDesc(0)
        try:
            spec = VMSpec.from_domain_xml(xml)
        except SpecError as exc:
            raise NotFoundError(f"domain {name!r} is not an Omega VM ({exc})") from exc
        return dom, spec

    def close(self) -> None:
        """Close the libvirt connection."""
        def _close() -> None:
            if self._events is not None:
                self._events.close()
                self._events = None
            if self._conn is not None:
                try:
                    self._conn.close()
                finally:
                    self._conn = None
        self._events_loop.call(_close)

    def __enter__(self) -> VMController:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def run_with_domain(self, name: str,
                        fn: Callable[[Any, Any], Coroutine[Any, Any, T]]) -> T:
        """Run ``fn(conn, dom)`` on the libvirt event loop thread and wait for it.

        For code that needs libvirt events on a domain (console streams).

        Args:
            name: the VM.
            fn: a coroutine function taking the connection and the domain.

        Returns:
            What the coroutine returned.

        Raises:
            NotFoundError: no such VM.
        """
        async def _run() -> T:
            dom, _spec = self._omega_domain(name)
            return await fn(self._conn, dom)
        return self._events_loop.run(_run())

    def runtime_dir(self, name: str) -> VMRuntimeDir:
        """Return the runtime directory of VM ``name``."""
        return VMRuntimeDir.of(self.config, name)

    def resolve_accel(self, spec: VMSpec) -> str:
        """The accelerator a VM will use: the spec's, else the host probe's.

        Args:
            spec: the VM's spec.

        Returns:
            ``kvm`` or ``tcg``.
        """
        if spec.accel:
            return spec.accel
        try:
            from hypervisor.vm import accel as accel_probe
        except ImportError:
            return self.config.accel or "tcg"
        return accel_probe.probe(self.config).accel

    # ------------------------------------------------------------ commands

    def create(self, spec: VMSpec) -> VMSpec:
        """Define a VM in libvirt (it is not started).

        Args:
            spec: the VM to create; hooks may add to it.

        Returns:
            The spec as defined (after hooks).

        Raises:
            SpecError: the spec is invalid or does not fit the host.
            NotFoundError: the image is unknown.
            ImageError: the image is corrupt.
            AlreadyExistsError: a domain or runtime dir with that name exists.
            LibvirtError: libvirt is unreachable or refused the definition.
        """
        from images.store import ImageStore

        image = spec.validate(HostLimits.probe(), images=ImageStore(self.config))
        assert image is not None
        # The probe may boot a guest (bounded, once per host): not on the event thread.
        accel = self.resolve_accel(spec)
        return self._events_loop.call(self._create, spec, image, accel)

    def _create(self, spec: VMSpec, image: Image, accel: str) -> VMSpec:
        import libvirt

        conn = self._connection()
        try:
            conn.lookupByName(spec.name)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                raise LibvirtError(f"looking up VM {spec.name!r}: "
                                   f"{exc.get_error_message()}") from exc
        else:
            raise AlreadyExistsError(f"VM {spec.name!r} already exists")
        runtime = self.runtime_dir(spec.name)
        if spec.graphics == "vnc" and len(os.fsencode(runtime.vnc_socket)) > UNIX_PATH_MAX:
            raise SpecError(f"name: the VNC socket path {runtime.vnc_socket} is longer than "
                            f"{UNIX_PATH_MAX} bytes; use a shorter name or OMEGA_HOME")
        if runtime.path.exists():
            raise AlreadyExistsError(f"runtime dir {runtime.path} exists but no domain "
                                     f"{spec.name!r} does; remove it or choose another name")

        self.config.vms_dir.mkdir(parents=True, exist_ok=True)
        runtime.path.mkdir(mode=0o755)
        prepared: list[VMHook] = []
        dom = None
        try:
            os.chmod(runtime.path, 0o755)
            ids = _qemu_ids()
            if ids is not None and not spec.run_as_root and os.geteuid() == 0:
                # QEMU (as libvirt-qemu) creates its sockets here (VNC).
                os.chown(runtime.path, *ids)
            if spec.disk_size:
                with open(runtime.scratch_disk, "xb") as f:
                    f.truncate(spec.disk_size)
                os.chmod(runtime.scratch_disk, 0o600)
            for hook in self.hooks:
                # A hook whose prepare fails half-way gets on_delete too.
                prepared.append(hook)
                self._events_loop.run_off_loop(hook.prepare, spec, runtime.path)
            spec.validate()  # hooks may have edited it
            xml = domain_xml(spec, image, accel=spec.accel or accel, runtime=runtime,
                             nbd_socket=self.config.run_dir / "netblock.sock")
            with _libvirt_errors(f"defining VM {spec.name!r}"):
                dom = conn.defineXMLFlags(xml, libvirt.VIR_DOMAIN_DEFINE_VALIDATE)
        except BaseException:
            if dom is not None:
                try:
                    dom.undefine()
                except libvirt.libvirtError:
                    pass
            for hook in reversed(prepared):
                try:
                    self._events_loop.run_off_loop(hook.on_delete, spec, runtime.path)
                except Exception:  # noqa: BLE001 - undo is best effort; the first error wins
                    pass
            shutil.rmtree(runtime.path, ignore_errors=True)
            raise
        return spec

    def start(self, name: str) -> None:
        """Start a defined VM; returns once QEMU runs the guest.

        Args:
            name: the VM.

        Raises:
            NotFoundError: no such VM.
            VMStateError: it is already running.
            LibvirtError: libvirt could not start it.
        """
        self._events_loop.call(self._start, name)

    def _start(self, name: str) -> None:
        dom, spec = self._omega_domain(name)
        if dom.isActive():
            raise VMStateError(f"VM {name!r} is already running")
        runtime = self.runtime_dir(name)
        started: list[VMHook] = []
        try:
            for hook in self.hooks:
                self._events_loop.run_off_loop(hook.before_start, spec, runtime.path)
                started.append(hook)
            with _libvirt_errors(f"starting VM {name!r}", name=name):
                dom.create()
        except BaseException:
            for hook in reversed(started):
                try:
                    self._events_loop.run_off_loop(hook.after_stop, spec, runtime.path)
                except Exception:  # noqa: BLE001 - undo is best effort
                    pass
            raise

    def stop(self, name: str, *, timeout: float = 30) -> str:
        """Ask the guest to power off (ACPI); destroy it if it has not after ``timeout``.

        Guests of :data:`RECIPES_WITHOUT_ACPI` also get ``poweroff`` typed on
        their serial console, unless someone is attached to it.

        Args:
            name: the VM.
            timeout: seconds to wait for the guest to power off.

        Returns:
            ``"shutdown"`` (the guest powered off), ``"destroyed"`` (it did not in
            time) or ``"not-running"``.

        Raises:
            NotFoundError: no such VM.
            LibvirtError: libvirt failed.
        """
        return self._events_loop.run(self._stop(name, timeout))

    async def _stop(self, name: str, timeout: float) -> str:
        import libvirt

        dom, spec = self._omega_domain(name)
        if not dom.isActive():
            return "not-running"
        assert self._events is not None
        stopped = self._events.expect(name, {libvirt.VIR_DOMAIN_EVENT_STOPPED})
        outcome = "shutdown"
        try:
            with _libvirt_errors(f"shutting down VM {name!r}", name=name):
                dom.shutdownFlags(libvirt.VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN)
        except LibvirtError:
            if dom.isActive():
                raise
        console = None
        if dom.isActive() and self._ignores_acpi(spec):
            console = _type_on_console(dom, b"\rpoweroff\r")
        try:
            if dom.isActive() and await self._events.wait(stopped, timeout) is None:
                outcome = "destroyed"
                self._destroy_active(dom, name)
        finally:
            if console is not None:
                _close_stream(console)
        self._after_stop(spec, name)
        return outcome

    def suspend(self, name: str) -> bool:
        """Pause a running VM's vCPUs (its memory, disks and QEMU stay).

        Returns:
            True if it was running, False if it was already paused.

        Raises:
            NotFoundError: no such VM.
            VMStateError: it is not running.
            LibvirtError: libvirt failed.
        """
        return self._events_loop.call(self._pause, name, True)

    def resume(self, name: str) -> bool:
        """Let a paused VM run again.

        Returns:
            True if it was paused, False if it was already running.

        Raises:
            NotFoundError: no such VM.
            VMStateError: it is not running.
            LibvirtError: libvirt failed.
        """
        return self._events_loop.call(self._pause, name, False)

    def _pause(self, name: str, pause: bool) -> bool:
        import libvirt

        dom, _spec = self._omega_domain(name)
        if not dom.isActive():
            raise VMStateError(f"VM {name!r} is not running")
        paused = dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED
        if paused == pause:
            return False
        with _libvirt_errors(f"{'pausing' if pause else 'resuming'} VM {name!r}", name=name):
            dom.suspend() if pause else dom.resume()
        return True

    def reboot(self, name: str, *, hard: bool = False) -> int:
        """Reboot a running VM: ask the guest (ACPI), or with ``hard`` reset it
        at once (like the reset button). QEMU keeps running either way, so
        its disks, peers' RAM and display stay attached.

        Guests of :data:`RECIPES_WITHOUT_ACPI` also get ``reboot`` typed on
        their serial console, unless someone is attached to it.

        Returns:
            The serial log's size before the reboot: the next boot's output
            starts after it (see :meth:`wait_for_serial`).

        Raises:
            NotFoundError: no such VM.
            VMStateError: it is not running.
            LibvirtError: libvirt failed.
        """
        return self._events_loop.run(self._reboot(name, hard))

    async def _reboot(self, name: str, hard: bool) -> int:
        import libvirt

        dom, spec = self._omega_domain(name)
        if not dom.isActive():
            raise VMStateError(f"VM {name!r} is not running")
        try:
            offset = self.runtime_dir(name).serial_log.stat().st_size
        except FileNotFoundError:
            offset = 0
        if hard:
            with _libvirt_errors(f"resetting VM {name!r}", name=name):
                dom.reset(0)
            return offset
        with _libvirt_errors(f"rebooting VM {name!r}", name=name):
            dom.reboot(libvirt.VIR_DOMAIN_REBOOT_ACPI_POWER_BTN)
        if self._ignores_acpi(spec):
            await self._type_reboot(dom, self.runtime_dir(name).serial_log, offset)
        return offset

    async def _type_reboot(self, dom: Any, log: Path, offset: int) -> None:
        """Type ``reboot`` on the console until the guest shows it took it.

        A shell that has just started can swallow keystrokes (busybox's ash
        asks the terminal for its cursor position first), so the command is
        typed again every 3 s, eight times at most, until the log past
        ``offset`` shows the reboot under way (busybox's "going down", or the
        kernel's "Restarting system"): never once it is, since keystrokes
        still queued at the reset would reach the next boot's shell. Nothing
        is typed while someone else holds the console.
        """
        def under_way() -> bool:
            try:
                with open(log, "rb") as f:
                    f.seek(offset)
                    text = f.read()
            except FileNotFoundError:
                return False
            return b"going down" in text or b"reboot: Restarting system" in text

        for _attempt in range(8):
            console = _type_on_console(dom, b"\rreboot\r")
            if console is None:
                return
            try:
                for _tick in range(15):
                    await asyncio.sleep(0.2)
                    if under_way():
                        return
            finally:
                _close_stream(console)

    def _ignores_acpi(self, spec: VMSpec) -> bool:
        """True for guests known to ignore the ACPI power button (no acpid)."""
        from images.store import ImageStore

        try:
            return ImageStore(self.config).get(spec.image).recipe in RECIPES_WITHOUT_ACPI
        except OmegaError:
            return False

    def destroy(self, name: str) -> bool:
        """Power a VM off at once (like pulling the plug).

        Args:
            name: the VM.

        Returns:
            True if it was running.

        Raises:
            NotFoundError: no such VM.
            LibvirtError: libvirt failed.
        """
        return self._events_loop.call(self._destroy, name)

    def _destroy(self, name: str) -> bool:
        dom, spec = self._omega_domain(name)
        if not dom.isActive():
            return False
        self._destroy_active(dom, name)
        self._after_stop(spec, name)
        return True

    def _destroy_active(self, dom: Any, name: str) -> None:
        import libvirt

        try:
            dom.destroy()
        except libvirt.libvirtError as exc:
            if dom.isActive():
                raise LibvirtError(f"destroying VM {name!r}: "
                                   f"{exc.get_error_message()}") from exc

    def _after_stop(self, spec: VMSpec, name: str) -> None:
        runtime = self.runtime_dir(name)
        errors: list[Exception] = []
        for hook in reversed(self.hooks):
            try:
                self._events_loop.run_off_loop(hook.after_stop, spec, runtime.path)
            except Exception as exc:  # noqa: BLE001 - run every hook, report the first
                errors.append(exc)
        if errors:
            raise errors[0]

    def delete(self, name: str, *, force: bool = False) -> None:
        """Remove a VM: undefine it and delete its runtime directory.

        Args:
            name: the VM.
            force: destroy it first if it is running.

        Raises:
            NotFoundError: no such VM (or not an Omega VM).
            VMStateError: it is running and ``force`` is False.
            LibvirtError: libvirt failed.
        """
        self._events_loop.call(self._delete, name, force)

    def _delete(self, name: str, force: bool) -> None:
        dom, spec = self._omega_domain(name)
        if dom.isActive():
            if not force:
                raise VMStateError(f"VM {name!r} is running; stop it first or use --force")
            self._destroy_active(dom, name)
            self._after_stop(spec, name)
        runtime = self.runtime_dir(name)
        for hook in reversed(self.hooks):
            self._events_loop.run_off_loop(hook.on_delete, spec, runtime.path)
        with _libvirt_errors(f"undefining VM {name!r}", name=name):
            dom.undefine()
        shutil.rmtree(runtime.path, ignore_errors=True)

    def list(self) -> list[dict[str, Any]]:
        """List Omega VMs (domains with Omega metadata), running or not.

        Returns:
            One dict per VM: name, state, vcpus, memory (bytes), image, accel.

        Raises:
            LibvirtError: libvirt is unreachable.
        """
        return self._events_loop.call(self._list)

    def _list(self) -> list[dict[str, Any]]:
        import libvirt

        conn = self._connection()
        out = []
        with _libvirt_errors("listing domains"):
            domains = conn.listAllDomains(0)
        for dom in domains:
            try:
                xml = dom.XMLDesc(0)
                spec = VMSpec.from_domain_xml(xml)
                state = dom.state()[0]
            except (libvirt.libvirtError, SpecError):
                continue  # not ours, or vanished meanwhile
            out.append({"name": spec.name, "state": STATE_NAMES.get(state, str(state)),
                        "vcpus": spec.vcpus, "memory": spec.memory, "image": spec.image,
                        "accel": accel_of_xml(xml)})
        return sorted(out, key=lambda row: row["name"])

    def show(self, name: str) -> dict[str, Any]:
        """Describe one VM.

        Args:
            name: the VM.

        Returns:
            name, uuid, state, vcpus, memory, image, accel, cmdline, disks,
            runtime_dir, serial_log, vnc_socket, cpu_seconds and the spec.

        Raises:
            NotFoundError: no such VM.
        """
        return self._events_loop.call(self._show, name)

    def _show(self, name: str) -> dict[str, Any]:
        import xml.etree.ElementTree as ET

        dom, spec = self._omega_domain(name)
        with _libvirt_errors(f"reading VM {name!r}", name=name):
            xml = dom.XMLDesc(0)
            state, _max_mem, _mem, _ncpu, cpu_ns = dom.info()
            uuid = dom.UUIDString()
        root = ET.fromstring(xml)
        runtime = self.runtime_dir(name)
        disks = []
        for disk in root.iterfind("devices/disk"):
            source = disk.find("source")
            target = disk.find("target")
            src = ""
            if source is not None:
                src = source.get("file") or f"nbd:{source.get('name', '')}"
            disks.append({"target": target.get("dev") if target is not None else "",
                          "source": src, "readonly": disk.find("readonly") is not None})
        return {
            "name": name, "uuid": uuid, "state": STATE_NAMES.get(state, str(state)),
            "vcpus": spec.vcpus, "memory": spec.memory, "image": spec.image,
            "accel": accel_of_xml(xml), "cmdline": root.findtext("os/cmdline", ""),
            "kernel": root.findtext("os/kernel", ""), "disks": disks,
            "runtime_dir": str(runtime.path), "serial_log": str(runtime.serial_log),
            "vnc_socket": str(runtime.vnc_socket) if spec.graphics == "vnc" else None,
            "cpu_seconds": round(cpu_ns / 1e9, 3), "spec": spec.to_dict(),
        }

    def domain_stats(self) -> list[dict[str, Any]]:
        """Stats of every Omega VM in one libvirt call (for metrics).

        Returns:
            Rows as :func:`hypervisor.vm.metrics.domain_stats_rows` returns them.

        Raises:
            LibvirtError: libvirt is unreachable or failed.
        """
        from hypervisor.vm.metrics import domain_stats_rows

        def _stats() -> list[dict[str, Any]]:
            conn = self._connection()
            with _libvirt_errors("reading domain stats"):
                return domain_stats_rows(conn)
        return self._events_loop.call(_stats)

    def is_active(self, name: str) -> bool:
        """True when the VM's QEMU is running."""
        def _active() -> bool:
            dom = self._domain(name)
            with _libvirt_errors(f"reading VM {name!r}", name=name):
                return bool(dom.isActive())
        return self._events_loop.call(_active)

    def wait_for_serial(self, name: str, regex: str, *, timeout: float,
                        after: int = 0) -> str:
        """Wait until a line of the VM's serial output matches ``regex``.

        Reads the serial log libvirt writes for the VM (fresh on every start;
        a reboot inside the same QEMU appends to it).

        Args:
            name: the VM.
            regex: a Python regular expression, searched line by line.
            timeout: seconds to wait.
            after: only look at output past this byte offset of the log
                (what :meth:`reboot` returns).

        Returns:
            The first matching line (without its line ending).

        Raises:
            SpecError: the regex is invalid.
            SerialTimeout: no match within ``timeout``.
            VMStateError: the VM stopped before a match.
        """
        try:
            pattern = re.compile(regex)
        except re.error as exc:
            raise SpecError(f"bad regular expression {regex!r}: {exc}") from exc
        log = self.runtime_dir(name).serial_log
        deadline = time.monotonic() + timeout
        for line in follow_serial_log(log, deadline=deadline, offset=after,
                                      is_running=lambda: self.is_active(name)):
            if pattern.search(line):
                return line.rstrip("\r\n")
        if time.monotonic() >= deadline:
            raise SerialTimeout(f"VM {name!r}: no serial line matched {regex!r} "
                                f"within {timeout:g}s")
        raise VMStateError(f"VM {name!r} stopped before a serial line matched {regex!r}")


def _type_on_console(dom: Any, data: bytes) -> Any:
    """Send keystrokes to a domain's serial console (best effort).

    The stream is returned open: closing it at once can drop the bytes before
    libvirtd has written them to the pty. Close it with :func:`_close_stream`.

    Args:
        dom: the running domain.
        data: the bytes to type.

    Returns:
        The open stream, or None if the console is busy (someone is attached) or gone.
    """
    import libvirt

    stream = dom.connect().newStream(0)
    try:
        dom.openConsole(None, stream, 0)
        stream.send(data)
        return stream
    except libvirt.libvirtError:
        _close_stream(stream)
        return None


def _close_stream(stream: Any) -> None:
    import libvirt

    try:
        stream.abort()
    except libvirt.libvirtError:
        pass


def follow_serial_log(log: Path, *, deadline: float | None,
                      is_running: Any, interval: float = 0.05,
                      offset: int = 0) -> Iterator[str]:
    """Yield lines of a serial log as the guest writes them.

    Stops at ``deadline`` (monotonic seconds) or once the VM no longer runs and
    the whole log has been read.

    Args:
        log: the serial log file (may not exist yet).
        deadline: ``time.monotonic()`` value to stop at, or None for no limit.
        is_running: callable returning whether the VM still runs.
        interval: seconds between reads when there is nothing new.
        offset: byte offset to start at (0: the whole log).

    Yields:
        Complete lines (with their endings); a last partial line at the end.
    """
    pending = b""
    last_state_check = 0.0
    running = True
    while True:
        chunk = b""
        try:
            with open(log, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size < offset:  # truncated: a new boot
                    offset, pending = 0, b""
                f.seek(offset)
                chunk = f.read()
        except FileNotFoundError:
            pass
        if chunk:
            offset += len(chunk)
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                yield line.decode("utf-8", "replace") + "\n"
            continue
        if not running:
            if pending:
                yield pending.decode("utf-8", "replace")
            return
        now = time.monotonic()
        if deadline is not None and now >= deadline:
            return
        if now - last_state_check > 0.5:
            last_state_check = now
            # Read once more after the VM stopped: the last output may be unread.
            running = bool(is_running())
            continue
        time.sleep(interval)


def accel_of_xml(xml: str) -> str:
    """Return ``kvm`` or ``tcg`` from a domain XML's type attribute."""
    m = re.search(r"<domain[^>]*\btype=['\"](\w+)['\"]", xml)
    if not m:
        return "unknown"
    return {"kvm": "kvm", "qemu": "tcg"}.get(m.group(1), m.group(1))
