"""What a VM is: :class:`VMSpec`, its disks, and their validation.

A spec is plain data. It comes from the CLI, from a TOML file
(:meth:`VMSpec.from_toml`) or back from a defined domain's Omega metadata
(:meth:`VMSpec.from_domain_xml`), and turns into domain XML in
:mod:`hypervisor.vm.xml`. Every failed check raises :class:`SpecError` (exit 2)
with one line saying which field is wrong and why.
"""

from __future__ import annotations

import json
import re
import tomllib
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hypervisor.errors import SpecError, UsageError
from hypervisor.units import format_size, parse_size

if TYPE_CHECKING:
    from images.store import Image, ImageStore

#: XML namespace of the Omega metadata element inside ``<metadata>``.
OMEGA_XMLNS = "https://omega.invalid/xmlns/vm/1"

#: libvirt accepts more, but a name is also a directory and a socket path prefix.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
NAME_MAX = 64

DEFAULT_MEMORY = 256 << 20
MIN_MEMORY = 16 << 20

DISK_KINDS = ("file", "netblock")
MEMORY_BACKINGS = ("default", "memfd-shared")
GRAPHICS_KINDS = ("none", "vnc")
ACCELS = ("kvm", "tcg")


@dataclass(frozen=True)
class HostLimits:
    """What this host can give one VM.

    Attributes:
        memory: total RAM in bytes.
        cpus: logical CPUs.
    """

    memory: int
    cpus: int

    @classmethod
    def probe(cls) -> HostLimits:
        """Read the host's RAM and CPU count (psutil)."""
        import psutil

        return cls(memory=psutil.virtual_memory().total,
                   cpus=psutil.cpu_count(logical=True) or 1)


@dataclass
class DiskSpec:
    """An extra disk beyond the scratch disk.

    Attributes:
        kind: ``"file"`` (a raw image at ``path``) or ``"netblock"`` (an Omega
            NBD export reached over the unix socket ``socket``).
        path: the raw image file (kind ``file``).
        export: the NBD export name (kind ``netblock``).
        socket: the NBD server's unix socket (kind ``netblock``; None means the
            netblock hook fills in the default).
        readonly: attach read-only.
    """

    kind: str
    path: Path | None = None
    export: str | None = None
    socket: Path | None = None
    readonly: bool = False

    def validate(self, *, index: int) -> None:
        """Check the disk's fields.

        Args:
            index: position in the spec's disk list, for the message.

        Raises:
            SpecError: a field is missing or has the wrong value.
        """
        where = f"disks[{index}]"
        if self.kind not in DISK_KINDS:
            raise SpecError(f"{where}.kind: {self.kind!r} is not one of {', '.join(DISK_KINDS)}")
        if self.kind == "file":
            if self.path is None:
                raise SpecError(f"{where}: a file disk needs 'path'")
            if not Path(self.path).is_absolute():
                raise SpecError(f"{where}.path: {str(self.path)!r} must be an absolute path")
            _check_text(str(self.path), f"{where}.path")
        else:
            if not self.export:
                raise SpecError(f"{where}: a netblock disk needs 'export'")
            _check_text(self.export, f"{where}.export")
            if self.socket is not None and not Path(self.socket).is_absolute():
                raise SpecError(f"{where}.socket: {str(self.socket)!r} must be an absolute path")
            if self.socket is not None:
                _check_text(str(self.socket), f"{where}.socket")

    def to_dict(self) -> dict[str, Any]:
        """Return the disk as JSON/TOML-friendly data."""
        out: dict[str, Any] = {"kind": self.kind, "readonly": self.readonly}
        if self.path is not None:
            out["path"] = str(self.path)
        if self.export is not None:
            out["export"] = self.export
        if self.socket is not None:
            out["socket"] = str(self.socket)
        return out

    @classmethod
    def from_dict(cls, data: Any, *, index: int = 0) -> DiskSpec:
        """Build a disk from data read from TOML or JSON.

        Args:
            data: a mapping with the disk's fields.
            index: position in the disk list, for messages.

        Returns:
            The disk (not yet validated).

        Raises:
            SpecError: not a mapping, unknown keys or wrongly typed values.
        """
        where = f"disks[{index}]"
        if not isinstance(data, dict):
            raise SpecError(f"{where}: expected a table, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SpecError(f"{where}: unknown key(s) {', '.join(unknown)}; "
                            f"known: {', '.join(sorted(known))}")
        if "kind" not in data:
            raise SpecError(f"{where}: 'kind' is required (file or netblock)")
        kind = _typed(data["kind"], str, f"{where}.kind")
        path = data.get("path")
        socket = data.get("socket")
        export = data.get("export")
        return cls(
            kind=kind,
            path=Path(_typed(path, str, f"{where}.path")) if path is not None else None,
            export=_typed(export, str, f"{where}.export") if export is not None else None,
            socket=Path(_typed(socket, str, f"{where}.socket")) if socket is not None else None,
            readonly=_typed(data.get("readonly", False), bool, f"{where}.readonly"),
        )


@dataclass
class VMSpec:
    """A VM as Omega defines it in libvirt.

    Attributes:
        name: domain name (letters, digits, ``_.+-``; at most 64 characters).
        image: image reference (name such as ``tiny`` or digest prefix).
        vcpus: virtual CPUs.
        memory: guest RAM in bytes.
        disk_size: size of a local raw scratch disk (``vda``) in bytes, or None.
        cmdline_extra: appended to the image's kernel command line.
        accel: ``kvm``, ``tcg``, or None to use the host's probed accelerator.
        disks: extra disks (files or netblock exports).
        local_memory: guest RAM kept local when peers lend the rest (dsm);
            None or equal to ``memory`` means no dsm.
        memory_backing: ``default`` or ``memfd-shared`` (dsm needs the latter).
        qemu_env: environment for the QEMU process.
        qemu_args: extra QEMU command-line arguments.
        graphics: ``none`` or ``vnc`` (VNC on a unix socket in the VM's runtime dir).
        run_as_root: run QEMU as root instead of libvirt's unprivileged user.
    """

    name: str
    image: str
    vcpus: int = 1
    memory: int = DEFAULT_MEMORY
    disk_size: int | None = None
    cmdline_extra: str = ""
    accel: str | None = None
    disks: list[DiskSpec] = field(default_factory=list)
    local_memory: int | None = None
    memory_backing: str = "default"
    qemu_env: dict[str, str] = field(default_factory=dict)
    qemu_args: list[str] = field(default_factory=list)
    graphics: str = "none"
    run_as_root: bool = False

    # ---------------------------------------------------------------- checks

    def validate(self, host: HostLimits | None = None, *,
                 images: ImageStore | None = None) -> Image | None:
        """Check every field; optionally against the host and the image store.

        Args:
            host: the host's limits; None skips the host checks.
            images: the image store; when given the image must exist and verify.

        Returns:
            The resolved image when ``images`` is given, else None.

        Raises:
            SpecError: a field is invalid (exit 2).
            NotFoundError: the image is unknown.
            ImageError: the image is corrupt.
        """
        validate_name(self.name)
        if not isinstance(self.image, str) or not self.image.strip():
            raise SpecError("image: required (e.g. --image tiny)")
        if not isinstance(self.vcpus, int) or isinstance(self.vcpus, bool) or self.vcpus < 1:
            raise SpecError(f"vcpus: {self.vcpus!r} must be an integer of at least 1")
        if not isinstance(self.memory, int) or self.memory <= 0:
            raise SpecError(f"memory: {self.memory!r} must be larger than 0")
        if self.memory < MIN_MEMORY:
            raise SpecError(f"memory: {format_size(self.memory)} is below the minimum "
                            f"{format_size(MIN_MEMORY)}")
        if self.disk_size is not None and (not isinstance(self.disk_size, int)
                                           or self.disk_size <= 0):
            raise SpecError(f"disk_size: {self.disk_size!r} must be larger than 0")
        if self.disk_size is not None and self.disk_size % 512:
            raise SpecError(f"disk_size: {self.disk_size} is not a multiple of 512 bytes")
        if not isinstance(self.cmdline_extra, str) or any(c in self.cmdline_extra for c in "\n\0"):
            raise SpecError("cmdline_extra: must be one line of text")
        _check_text(self.cmdline_extra, "cmdline_extra")
        if self.accel is not None and self.accel not in ACCELS:
            raise SpecError(f"accel: {self.accel!r} is not one of {', '.join(ACCELS)}")
        if self.local_memory is not None:
            if not isinstance(self.local_memory, int) or self.local_memory <= 0:
                raise SpecError(f"local_memory: {self.local_memory!r} must be larger than 0")
            if self.local_memory > self.memory:
                raise SpecError(f"local_memory: {format_size(self.local_memory)} is larger than "
                                f"memory {format_size(self.memory)}")
        if self.memory_backing not in MEMORY_BACKINGS:
            raise SpecError(f"memory_backing: {self.memory_backing!r} is not one of "
                            f"{', '.join(MEMORY_BACKINGS)}")
        if self.graphics not in GRAPHICS_KINDS:
            raise SpecError(f"graphics: {self.graphics!r} is not one of "
                            f"{', '.join(GRAPHICS_KINDS)}")
        for key, value in self.qemu_env.items():
            if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", key) or not isinstance(value, str):
                raise SpecError(f"qemu_env: {key!r} is not a valid environment variable")
            _check_text(value, f"qemu_env.{key}")
        if not all(isinstance(a, str) for a in self.qemu_args):
            raise SpecError("qemu_args: every argument must be a string")
        for arg in self.qemu_args:
            _check_text(arg, "qemu_args")
        for i, disk in enumerate(self.disks):
            disk.validate(index=i)
        if len(self.disks) + (1 if self.disk_size else 0) > 20:
            raise SpecError("disks: at most 20 disks")
        if host is not None:
            if self.memory > host.memory:
                raise SpecError(f"memory: {format_size(self.memory)} is more than the host has "
                                f"({format_size(host.memory)})")
            if self.vcpus > host.cpus:
                raise SpecError(f"vcpus: {self.vcpus} is more than the host's {host.cpus} CPUs")
        if images is not None:
            return images.get(self.image)
        return None

    @property
    def uses_dsm(self) -> bool:
        """True when part of the guest's RAM is meant to live on peers."""
        return self.local_memory is not None and self.local_memory < self.memory

    # ---------------------------------------------------------- conversions

    def to_dict(self) -> dict[str, Any]:
        """Return the spec as JSON/TOML-friendly data (sizes in bytes)."""
        out: dict[str, Any] = {
            "name": self.name, "image": self.image, "vcpus": self.vcpus,
            "memory": self.memory, "cmdline_extra": self.cmdline_extra,
            "disks": [d.to_dict() for d in self.disks],
            "memory_backing": self.memory_backing, "qemu_env": dict(self.qemu_env),
            "qemu_args": list(self.qemu_args), "graphics": self.graphics,
            "run_as_root": self.run_as_root,
        }
        for key in ("disk_size", "accel", "local_memory"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "spec") -> VMSpec:
        """Build a spec from data (TOML, JSON, metadata). Sizes may be ``"512M"``.

        Args:
            data: a mapping with the spec's fields.
            source: where the data came from, for messages.

        Returns:
            The spec (call :meth:`validate` before use).

        Raises:
            SpecError: not a mapping, unknown keys, missing or mistyped values.
        """
        if not isinstance(data, dict):
            raise SpecError(f"{source}: expected a table of VM fields")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SpecError(f"{source}: unknown key(s) {', '.join(unknown)}; "
                            f"known: {', '.join(sorted(known))}")
        for key in ("name", "image"):
            if key not in data:
                raise SpecError(f"{source}: '{key}' is required")
        disks_raw = data.get("disks", [])
        if not isinstance(disks_raw, list):
            raise SpecError(f"{source}: disks must be a list of tables ([[disks]])")
        env = data.get("qemu_env", {})
        if not isinstance(env, dict) or not all(isinstance(v, str) for v in env.values()):
            raise SpecError(f"{source}: qemu_env must be a table of strings")
        args = data.get("qemu_args", [])
        if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
            raise SpecError(f"{source}: qemu_args must be a list of strings")
        return cls(
            name=_typed(data["name"], str, "name"),
            image=_typed(data["image"], str, "image"),
            vcpus=_typed(data.get("vcpus", 1), int, "vcpus"),
            memory=_size(data.get("memory", DEFAULT_MEMORY), "memory"),
            disk_size=_opt_size(data.get("disk_size"), "disk_size"),
            cmdline_extra=_typed(data.get("cmdline_extra", ""), str, "cmdline_extra"),
            accel=_typed(data["accel"], str, "accel") if data.get("accel") is not None else None,
            disks=[DiskSpec.from_dict(d, index=i) for i, d in enumerate(disks_raw)],
            local_memory=_opt_size(data.get("local_memory"), "local_memory"),
            memory_backing=_typed(data.get("memory_backing", "default"), str, "memory_backing"),
            qemu_env=dict(env),
            qemu_args=list(args),
            graphics=_typed(data.get("graphics", "none"), str, "graphics"),
            run_as_root=_typed(data.get("run_as_root", False), bool, "run_as_root"),
        )

    @classmethod
    def from_toml(cls, path: Path | str) -> VMSpec:
        """Read a spec from a TOML file (top-level keys are the spec's fields).

        Example::

            name = "web"
            image = "tiny"
            vcpus = 2
            memory = "512M"
            disk_size = "1G"

        Args:
            path: the TOML file.

        Returns:
            The spec (not yet validated).

        Raises:
            SpecError: unreadable file, bad TOML, unknown keys or wrong types.
        """
        path = Path(path)
        try:
            text = path.read_bytes()
        except OSError as exc:
            raise SpecError(f"spec file {path}: {exc.strerror or exc}") from exc
        try:
            data = tomllib.loads(text.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise SpecError(f"spec file {path}: not UTF-8 text") from exc
        except tomllib.TOMLDecodeError as exc:
            raise SpecError(f"spec file {path}: bad TOML: {exc}") from exc
        return cls.from_dict(data, source=f"spec file {path}")

    def to_json(self) -> str:
        """Return the spec as compact JSON (what the domain metadata holds)."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_domain_xml(cls, xml: str) -> VMSpec:
        """Recover the spec from a domain's XML (its Omega metadata element).

        Args:
            xml: the domain XML, as ``virsh dumpxml`` prints it.

        Returns:
            The spec that defined the domain.

        Raises:
            SpecError: the XML is malformed or carries no Omega metadata.
        """
        try:
            root = ET.fromstring(xml)
        except ET.ParseError as exc:
            raise SpecError(f"domain XML: {exc}") from exc
        meta = root.find(f"metadata/{{{OMEGA_XMLNS}}}vm")
        if meta is None or not (meta.text or "").strip():
            raise SpecError("domain XML: no Omega metadata (not an Omega VM)")
        try:
            data = json.loads(meta.text or "")
        except json.JSONDecodeError as exc:
            raise SpecError(f"domain XML: Omega metadata is not JSON: {exc}") from exc
        return cls.from_dict(data, source="domain metadata")


def validate_name(name: Any) -> str:
    """Check a VM name.

    Args:
        name: the candidate name.

    Returns:
        The name.

    Raises:
        SpecError: empty, too long, or characters libvirt or a path cannot take.
    """
    if not isinstance(name, str) or not name:
        raise SpecError("name: required")
    if len(name) > NAME_MAX:
        raise SpecError(f"name: {len(name)} characters, at most {NAME_MAX} allowed")
    if not _NAME_RE.match(name):
        raise SpecError(f"name: {name!r} may only hold letters, digits and _.+- "
                        f"and must start with a letter or digit")
    return name


#: Characters XML 1.0 cannot carry (libvirt would refuse the domain).
_NOT_XML_RE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def _check_text(value: str, what: str) -> None:
    if _NOT_XML_RE.search(value):
        raise SpecError(f"{what}: contains control characters")


def _typed(value: Any, kind: type, what: str) -> Any:
    # bool is an int subclass: reject True where an int is expected.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise SpecError(f"{what}: expected {kind.__name__}, got {value!r}")
    return value


def _size(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise SpecError(f"{what}: expected a size such as 512M, got {value!r}")
    try:
        return parse_size(value, what=what)
    except UsageError as exc:
        raise SpecError(str(exc)) from exc


def _opt_size(value: Any, what: str) -> int | None:
    return None if value is None else _size(value, what)
