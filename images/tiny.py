"""The ``tiny`` recipe: Debian's kernel plus a busybox initramfs.

The guest contract (read by tests and by the accelerator probe):

* ``OMEGA-GUEST-READY mem_kb=<MemTotal kB> cpus=<n>`` is printed once on ttyS0
  after /proc, /sys, /dev, /dev/pts are mounted and the virtio modules loaded.
* ``omega.run=<base64 shell command>`` on the kernel command line is run with
  ``sh`` after the marker; its output (stdout and stderr) is framed on ttyS0 by
  ``OMEGA-RUN-BEGIN`` and ``OMEGA-RUN-END rc=<N>`` (the end marker always starts
  a line). The x86 kernel command line holds at most 2047 bytes, so keep the
  command short (ship bigger tools as ``images/guest/*.c``).
* ``omega.poweroff=1`` powers the guest off after the command; otherwise busybox
  init keeps a login shell (job control, prompt ``~ # ``) on ttyS0 and tty1.

The kernel comes from Debian's ``linux-image-amd64`` package (not the host's
running kernel, which may be a custom build without the modules we need).
Every ``images/guest/*.c`` is compiled ``gcc -static -O2`` into ``/usr/bin``.
The archive is reproducible, so rebuilding yields the same digest.
"""

from __future__ import annotations

import gzip
import lzma
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

from hypervisor.errors import ImageError
from images.cpio import InitramfsTree
from images.store import BuiltArtifacts

NAME = "tiny"
#: Default kernel arguments. The last ``console=`` becomes /dev/console, so init's
#: own messages land on the serial port; the kernel logs to both.
CMDLINE = "console=tty0 console=ttyS0 quiet"
MODULES = ("virtio_pci", "virtio_blk", "virtio_net", "virtio_console")
GUEST_SRC = Path(__file__).resolve().parent / "guest"
BUSYBOX = Path("/bin/busybox")
KERNEL_PACKAGE = "linux-image-amd64"

Progress = Callable[[str, float], None]

INIT_SCRIPT = r"""#!/bin/sh
# Omega tiny guest /init (contract: images/tiny.py). Runs as PID 1.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm /tmp /run
mount -t devpts -o gid=5,mode=620 devpts /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
out=/dev/ttyS0
while read -r mod; do
    insmod "/lib/modules/$mod" || echo "omega-init: insmod $mod failed" >"$out"
done </etc/omega/modules
ip link set lo up 2>/dev/null
hostname omega-tiny
mem_kb=$(awk '/^MemTotal:/ { print $2 }' /proc/meminfo)
cpus=$(grep -c '^processor' /proc/cpuinfo)
echo "OMEGA-GUEST-READY mem_kb=$mem_kb cpus=$cpus" >"$out"
run=
poweroff=
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        omega.run=*) run="${arg#omega.run=}" ;;
        omega.poweroff=1) poweroff=1 ;;
    esac
done
if [ -n "$run" ]; then
    echo OMEGA-RUN-BEGIN >"$out"
    if printf '%s' "$run" | base64 -d >/tmp/omega-run.sh 2>/dev/null; then
        { sh /tmp/omega-run.sh </dev/null 2>&1; echo $? >/tmp/omega-run.rc; } \
            | tee /tmp/omega-run.out >"$out"
        rc=$(cat /tmp/omega-run.rc)
    else
        echo "omega-init: omega.run is not valid base64" >"$out"
        rc=127
    fi
    # Start the end marker on its own line even if the output lacked a newline.
    if [ -n "$(tail -c 1 /tmp/omega-run.out 2>/dev/null)" ]; then
        echo >"$out"
    fi
    echo "OMEGA-RUN-END rc=$rc" >"$out"
fi
if [ -n "$poweroff" ]; then
    sync
    poweroff -f
fi
exec /sbin/init
"""

INITTAB = """\
# busybox init: a respawning login shell on the serial port and the first VT.
ttyS0::respawn:-/bin/sh
tty1::respawn:-/bin/sh
::ctrlaltdel:/sbin/reboot
::shutdown:/bin/sync
"""

PROFILE = """\
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
export PS1='\\w \\$ '
"""


def _version_key(version: str) -> list[int | str]:
    return [int(p) if p.isdigit() else p for p in re.split(r"[.\-+~]", version)]


def find_kernel(*, boot: Path = Path("/boot"),
                modules_root: Path = Path("/lib/modules")) -> tuple[Path, str]:
    """Find Debian's newest amd64 kernel that has its modules installed.

    Args:
        boot: where kernels live.
        modules_root: where module trees live.

    Returns:
        (kernel path, kernel release).

    Raises:
        ImageError: no such kernel (names the apt package to install).
    """
    found = []
    for k in boot.glob("vmlinuz-*-amd64"):
        release = k.name.removeprefix("vmlinuz-")
        if (modules_root / release / "modules.dep").is_file():
            found.append((release, k))
    if not found:
        raise ImageError(f"no Debian guest kernel: need {boot}/vmlinuz-*-amd64 with "
                         f"{modules_root}/<version>; install the {KERNEL_PACKAGE} package "
                         f"(apt-get install {KERNEL_PACKAGE})")
    release, kernel = max(found, key=lambda rk: _version_key(rk[0]))
    return kernel, release


def _module_name(relpath: str) -> str:
    base = relpath.rsplit("/", 1)[-1]
    base = re.sub(r"\.ko(\.(xz|gz|zst))?$", "", base)
    return base.replace("-", "_")


def parse_modules_dep(text: str) -> dict[str, tuple[str, list[str]]]:
    """Parse ``modules.dep``.

    Args:
        text: the file's content.

    Returns:
        module name (``-`` folded to ``_``) → (relative path, relative paths of deps).
    """
    table: dict[str, tuple[str, list[str]]] = {}
    for line in text.splitlines():
        if ":" not in line:
            continue
        path, _, deps = line.partition(":")
        path = path.strip()
        table[_module_name(path)] = (path, deps.split())
    return table


def resolve_modules(wanted: tuple[str, ...] | list[str],
                    table: dict[str, tuple[str, list[str]]]) -> list[str]:
    """Order modules so that every dependency is loaded before its users.

    Args:
        wanted: module names to load.
        table: the parsed ``modules.dep``.

    Returns:
        Relative module paths in load order, each once.

    Raises:
        ImageError: a wanted module or a dependency is not in the table.
    """
    order: list[str] = []
    seen: set[str] = set()
    by_path = {path: name for name, (path, _) in table.items()}

    def visit(name: str, stack: tuple[str, ...]) -> None:
        if name in seen:
            return
        if name not in table:
            raise ImageError(f"kernel module {name} not found in modules.dep"
                             + (f" (needed by {stack[-1]})" if stack else ""))
        if name in stack:
            raise ImageError(f"kernel module dependency cycle: {' -> '.join(stack + (name,))}")
        path, deps = table[name]
        for dep in deps:
            visit(by_path.get(dep, _module_name(dep)), stack + (name,))
        seen.add(name)
        order.append(path)

    for name in wanted:
        visit(name.replace("-", "_"), ())
    return order


def _read_module(path: Path) -> bytes:
    """Return a module's ELF bytes, decompressing .ko.xz / .ko.gz / .ko.zst."""
    data = path.read_bytes()
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(data)
    if path.name.endswith(".ko.gz"):
        return gzip.decompress(data)
    if path.name.endswith(".ko.zst"):
        zstd = shutil.which("zstd")
        if zstd is None:
            raise ImageError(f"{path} is zstd-compressed; install the zstd package")
        return subprocess.run([zstd, "-dc", str(path)], check=True, capture_output=True).stdout
    return data


def compile_guest_tools(dest: Path, *, sources: Path = GUEST_SRC,
                        progress: Progress | None = None) -> dict[str, Path]:
    """Compile every ``sources/*.c`` statically.

    Args:
        dest: directory for the binaries.
        sources: directory holding the C files.
        progress: optional (step, fraction) callback, fraction within this step.

    Returns:
        tool name (file stem) → compiled binary.

    Raises:
        ImageError: gcc is missing or a compile failed (with gcc's message).
    """
    srcs = sorted(sources.glob("*.c")) if sources.is_dir() else []
    if not srcs:
        return {}
    gcc = shutil.which("gcc")
    if gcc is None:
        raise ImageError("gcc not found: install the gcc and libc6-dev packages "
                         "to build the guest tools")
    dest.mkdir(parents=True, exist_ok=True)
    tools = {}
    for i, src in enumerate(srcs):
        if progress:
            progress(f"compiling {src.name}", i / len(srcs))
        out = dest / src.stem
        proc = subprocess.run([gcc, "-static", "-O2", "-Wall", "-o", str(out), str(src)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            msg = " ".join(proc.stderr.strip().splitlines()[-3:])
            raise ImageError(f"compiling guest tool {src.name} failed: {msg}")
        tools[src.stem] = out
    return tools


def _busybox_applets(busybox: Path) -> list[str]:
    proc = subprocess.run([str(busybox), "--list-full"], capture_output=True, text=True)
    if proc.returncode != 0 or not proc.stdout.strip():
        raise ImageError(f"{busybox} --list-full failed; install the busybox-static package")
    return [line.strip() for line in proc.stdout.splitlines() if line.strip()]


def build_tiny(staging: Path, *, progress: Progress | None = None,
               boot: Path = Path("/boot"), modules_root: Path = Path("/lib/modules"),
               busybox: Path = BUSYBOX, guest_src: Path = GUEST_SRC) -> BuiltArtifacts:
    """Build the tiny image's kernel and initramfs into ``staging``.

    Args:
        staging: an empty scratch directory the store will move files out of.
        progress: optional (step, fraction done) callback.
        boot: where to look for the Debian kernel.
        modules_root: where its modules live.
        busybox: a statically linked busybox.
        guest_src: folder of guest C tools.

    Returns:
        The built files and their provenance.

    Raises:
        ImageError: a needed host package is missing or a step failed.
    """
    report = progress or (lambda step, frac: None)
    report("locating kernel", 0.0)
    kernel_src, release = find_kernel(boot=boot, modules_root=modules_root)
    kernel = staging / "vmlinuz"
    shutil.copyfile(kernel_src, kernel)

    if not busybox.is_file():
        raise ImageError(f"{busybox} not found; install the busybox-static package")
    tree = InitramfsTree()
    for d in ("proc", "sys", "dev", "tmp", "run", "root", "etc", "mnt", "usr/bin", "usr/sbin",
              "bin", "sbin"):
        tree.add_dir(d)
    tree.add_chardev("dev/console", 5, 1)
    tree.add_chardev("dev/null", 1, 3, perm=0o666)

    report("compiling guest tools", 0.1)
    tools = compile_guest_tools(staging / "tools", sources=guest_src,
                                progress=lambda s, f: report(s, 0.1 + 0.4 * f))
    for stem, binary in sorted(tools.items()):
        tree.add_file(f"usr/bin/{stem}", binary.read_bytes(), perm=0o755)

    report("collecting busybox", 0.5)
    tree.add_file("bin/busybox", busybox.read_bytes(), perm=0o755)
    for applet in _busybox_applets(busybox):
        if applet in ("bin/busybox",) or applet in tree:
            continue
        tree.add_symlink(applet, "/bin/busybox")

    report("resolving kernel modules", 0.6)
    mod_dir = modules_root / release
    table = parse_modules_dep((mod_dir / "modules.dep").read_text())
    order = resolve_modules(MODULES, table)
    loaded = []
    for rel in order:
        data = _read_module(mod_dir / rel)
        plain = re.sub(r"\.(xz|gz|zst)$", "", rel)
        tree.add_file(f"lib/modules/{release}/{plain}", data)
        loaded.append(f"{release}/{plain}")
    tree.add_file("etc/omega/modules", ("\n".join(loaded) + "\n").encode())

    tree.add_file("init", INIT_SCRIPT.encode(), perm=0o755)
    tree.add_file("etc/inittab", INITTAB.encode())
    tree.add_file("etc/profile", PROFILE.encode())
    tree.add_file("etc/passwd", b"root:x:0:0:root:/:/bin/sh\n")
    tree.add_file("etc/group", b"root:x:0:\ntty:x:5:\n")
    tree.add_file("etc/hostname", b"omega-tiny\n")

    report("writing initramfs", 0.7)
    archive = tree.encode()
    report("compressing initramfs", 0.75)
    initrd = staging / "initrd.img"
    with initrd.open("wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0,
                                                 compresslevel=6, filename="") as gz:
        gz.write(archive)
    report("initramfs written", 1.0)
    bb_version = subprocess.run([str(busybox)], capture_output=True, text=True).stdout
    return BuiltArtifacts(
        name=NAME,
        recipe="tiny",
        kernel=kernel,
        initrd=initrd,
        cmdline=CMDLINE,
        source={
            "kernel": str(kernel_src),
            "kernel_release": release,
            "modules": [_module_name(p) for p in order],
            "busybox": bb_version.splitlines()[0] if bb_version else str(busybox),
            "guest_tools": sorted(tools),
        },
    )
