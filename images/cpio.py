"""A pure encoder for the "newc" cpio format the Linux kernel unpacks as initramfs.

Written here rather than calling the ``cpio`` tool because an initramfs needs a
``/dev/console`` character device, which only root may ``mknod`` on disk, and
because the archive must be byte-for-byte reproducible (fixed inode numbers,
owners and mtimes) so the image's sha256 is stable across builds.

Format (``Documentation/driver-api/early-userspace/buffer-format.rst``): each
member is a 110-byte ASCII header ``070701`` followed by thirteen 8-digit hex
fields, the NUL-terminated name padded to a multiple of 4, then the data padded
to a multiple of 4; the archive ends with a member named ``TRAILER!!!``.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass
from pathlib import PurePosixPath

from hypervisor.errors import UsageError

MAGIC = b"070701"
TRAILER = "TRAILER!!!"
_MAX_FIELD = 0xFFFFFFFF


@dataclass(frozen=True)
class CpioEntry:
    """One archive member.

    Attributes:
        path: relative POSIX path inside the archive (no leading slash).
        mode: full st_mode (file type bits and permissions).
        data: file content, or the target for a symlink; empty otherwise.
        rdev: (major, minor) for device nodes.
    """

    path: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


def _pad4(n: int) -> bytes:
    return b"\0" * ((4 - n % 4) % 4)


def encode_member(entry: CpioEntry, *, ino: int) -> bytes:
    """Encode one member (header, name, data) in newc format.

    Args:
        entry: the member.
        ino: inode number to record (unique per archive; no hard links here).

    Returns:
        The encoded bytes, padded to a multiple of 4.

    Raises:
        UsageError: a field does not fit in 32 bits, or the name is empty.
    """
    name = entry.path.encode() + b"\0"
    if len(name) < 2:
        raise UsageError("cpio member needs a name")
    nlink = 2 if stat.S_ISDIR(entry.mode) else 1
    fields = (ino, entry.mode, 0, 0, nlink, 0, len(entry.data), 0, 0,
              entry.rdev[0], entry.rdev[1], len(name), 0)
    if any(f < 0 or f > _MAX_FIELD for f in fields):
        raise UsageError(f"cpio member {entry.path!r} has a field out of range")
    header = MAGIC + b"".join(b"%08X" % f for f in fields)
    out = header + name + _pad4(len(header) + len(name))
    return out + entry.data + _pad4(len(entry.data))


class InitramfsTree:
    """An in-memory file tree that encodes to a newc archive.

    Parent directories are created implicitly (mode 0755), and members are
    emitted sorted by path so every directory precedes its contents and the
    output does not depend on insertion order.
    """

    def __init__(self) -> None:
        self._entries: dict[str, CpioEntry] = {}

    @staticmethod
    def _norm(path: str) -> str:
        p = PurePosixPath("/" + path.lstrip("/"))
        parts = [x for x in p.parts[1:] if x not in ("", ".")]
        if not parts or ".." in parts:
            raise UsageError(f"bad initramfs path {path!r}")
        return "/".join(parts)

    def _add(self, entry: CpioEntry) -> None:
        # Validate the whole path first so a refused entry leaves the tree unchanged.
        existing = self._entries.get(entry.path)
        if existing is not None and stat.S_ISDIR(existing.mode) != stat.S_ISDIR(entry.mode):
            raise UsageError(f"initramfs path {entry.path!r} already exists as another type")
        missing = []
        parent = PurePosixPath(entry.path).parent
        while str(parent) != ".":
            key = str(parent)
            found = self._entries.get(key)
            if found is None:
                missing.append(key)
            elif not stat.S_ISDIR(found.mode):
                raise UsageError(f"initramfs path {key!r} is not a directory")
            parent = parent.parent
        for key in missing:
            self._entries[key] = CpioEntry(key, stat.S_IFDIR | 0o755)
        self._entries[entry.path] = entry

    def add_dir(self, path: str, *, perm: int = 0o755) -> None:
        """Add a directory."""
        self._add(CpioEntry(self._norm(path), stat.S_IFDIR | perm))

    def add_file(self, path: str, data: bytes, *, perm: int = 0o644) -> None:
        """Add a regular file with the given content and permissions."""
        self._add(CpioEntry(self._norm(path), stat.S_IFREG | perm, data))

    def add_symlink(self, path: str, target: str) -> None:
        """Add a symbolic link pointing at ``target``."""
        self._add(CpioEntry(self._norm(path), stat.S_IFLNK | 0o777, target.encode()))

    def add_chardev(self, path: str, major: int, minor: int, *, perm: int = 0o600) -> None:
        """Add a character device node."""
        self._add(CpioEntry(self._norm(path), stat.S_IFCHR | perm, rdev=(major, minor)))

    def __contains__(self, path: str) -> bool:
        return self._norm(path) in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def encode(self) -> bytes:
        """Return the whole archive, trailer included."""
        parts = [encode_member(e, ino=i) for i, e in
                 enumerate((self._entries[k] for k in sorted(self._entries)), start=1)]
        parts.append(encode_member(CpioEntry(TRAILER, 0), ino=0))
        return b"".join(parts)
