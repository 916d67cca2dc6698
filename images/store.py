"""The content-addressed guest image store.

An image is a kernel, an initramfs and a default kernel command line. It lives
under ``config.images_dir/<digest>/`` where ``digest`` is the sha256 of a
canonical JSON record of the kernel's and initramfs's sha256 and the command
line, so the same recipe output is stored once. ``manifest.json`` next to the
files lists every file with its sha256; :meth:`ImageStore.get` checks them all
before handing an image out, so a corrupted file is caught before QEMU boots it.

Directories are 0755 and files 0644: QEMU runs as ``libvirt-qemu`` and reads
the kernel and initramfs straight from the store.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from hypervisor.config import Config
from hypervisor.errors import ImageError, NotFoundError, UsageError

#: Called during a build with a step description and the fraction done (0..1).
ProgressCallback = Callable[[str, float], None]

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
_HASH_CHUNK = 1 << 20


@dataclass(frozen=True)
class Image:
    """One stored guest image.

    Attributes:
        name: the recipe's image name (``tiny``).
        digest: sha256 hex of the image record; also its directory name.
        kernel: path of the kernel (bzImage) in the store.
        initrd: path of the initramfs (gzip'd newc cpio) in the store.
        cmdline: the image's default kernel arguments.
        created: when it was stored (ISO 8601, UTC).
        size: bytes of kernel plus initrd.
        recipe: the recipe that built it.
    """

    name: str
    digest: str
    kernel: Path
    initrd: Path
    cmdline: str
    created: str
    size: int
    recipe: str

    @property
    def short_digest(self) -> str:
        """The first 12 hex digits of the digest, as shown in listings."""
        return self.digest[:12]

    def to_dict(self) -> dict[str, Any]:
        """Return the image as a JSON-ready dict (paths as strings)."""
        return {
            "name": self.name,
            "digest": self.digest,
            "kernel": str(self.kernel),
            "initrd": str(self.initrd),
            "cmdline": self.cmdline,
            "created": self.created,
            "size": self.size,
            "recipe": self.recipe,
        }


@dataclass(frozen=True)
class BuiltArtifacts:
    """What a recipe hands to the store: files in a staging directory.

    Attributes:
        name: image name.
        recipe: recipe name.
        kernel: the kernel file (will be moved into the store).
        initrd: the initramfs file (will be moved into the store).
        cmdline: default kernel arguments.
        source: free-form provenance recorded in the manifest (kernel version...).
    """

    name: str
    recipe: str
    kernel: Path
    initrd: Path
    cmdline: str
    source: dict[str, Any]


def sha256_file(path: Path) -> str:
    """Return the sha256 hex digest of a file's content.

    Args:
        path: the file to hash.

    Returns:
        The lowercase hex digest.
    """
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def image_digest(*, kernel_sha256: str, initrd_sha256: str, cmdline: str) -> str:
    """Return the content address of an image.

    Args:
        kernel_sha256: sha256 hex of the kernel.
        initrd_sha256: sha256 hex of the initramfs.
        cmdline: the default kernel arguments.

    Returns:
        sha256 hex over a canonical JSON record of the three.
    """
    record = json.dumps({"cmdline": cmdline, "initrd": initrd_sha256, "kernel": kernel_sha256},
                        sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(record.encode()).hexdigest()


class ImageStore:
    """Builds, lists, verifies and deletes images under ``config.images_dir``.

    Args:
        config: the Omega configuration (only ``images_dir`` is used).
    """

    def __init__(self, config: Config) -> None:
        self.config = config
        self.root = config.images_dir

    # -- building -------------------------------------------------------------

    def build(self, recipe: str = "tiny", *, progress: ProgressCallback | None = None) -> Image:
        """Build an image from a recipe and store it (idempotent per content).

        Args:
            recipe: recipe name; only ``tiny`` exists.
            progress: optional callback receiving (step, fraction done).

        Returns:
            The stored image, verified.

        Raises:
            UsageError: unknown recipe.
            ImageError: the recipe failed (its message names the missing piece).
        """
        report = progress or (lambda step, frac: None)
        builder = _recipe(recipe)
        self._ensure_root()
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=self.root))
        try:
            artifacts = builder(staging, progress=lambda s, f: report(s, 0.9 * f))
            report("hashing", 0.92)
            image = self._commit(artifacts, staging)
            report("verifying", 0.97)
            self._verify(self.root / image.digest)
            report("done", 1.0)
            return image
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def add(self, artifacts: BuiltArtifacts) -> Image:
        """Store files built elsewhere (they are moved into the store).

        Args:
            artifacts: the kernel, initramfs and metadata of an image.

        Returns:
            The stored image (the existing one when the content is already stored).

        Raises:
            ImageError: the files cannot be read or moved.
        """
        self._ensure_root()
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=self.root))
        try:
            return self._commit(artifacts, staging)
        except OSError as exc:
            raise ImageError(f"cannot store image {artifacts.name}: {exc}") from exc
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _commit(self, art: BuiltArtifacts, staging: Path) -> Image:
        kernel_sha = sha256_file(art.kernel)
        initrd_sha = sha256_file(art.initrd)
        digest = image_digest(kernel_sha256=kernel_sha, initrd_sha256=initrd_sha,
                              cmdline=art.cmdline)
        with self._lock():
            final = self.root / digest
            if final.is_dir():
                try:
                    self._verify(final)
                    return self._load(final)
                except (ImageError, NotFoundError):
                    # A broken copy of the same content: replace it.
                    shutil.rmtree(final)
            tmp = staging / "image"
            tmp.mkdir(mode=0o755)
            files = {}
            for role, src, fname, sha in (("kernel", art.kernel, "vmlinuz", kernel_sha),
                                          ("initrd", art.initrd, "initrd.img", initrd_sha)):
                dst = tmp / fname
                shutil.move(src, dst)
                dst.chmod(0o644)
                files[role] = {"path": fname, "sha256": sha, "size": dst.stat().st_size}
            manifest = {
                "format": MANIFEST_FORMAT,
                "name": art.name,
                "recipe": art.recipe,
                "digest": digest,
                "cmdline": art.cmdline,
                "created": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
                "files": files,
                "source": art.source,
            }
            mpath = tmp / MANIFEST
            mpath.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
            mpath.chmod(0o644)
            tmp.chmod(0o755)
            os.rename(tmp, final)
            return self._load(final)

    # -- lookup ---------------------------------------------------------------

    def list(self) -> list[Image]:
        """Return every stored image, newest first (manifests only, no hashing).

        Returns:
            The images whose manifest is readable.
        """
        images = []
        for d in self._image_dirs():
            try:
                images.append(self._load(d))
            except ImageError:
                continue
        images.sort(key=lambda im: (im.created, im.digest), reverse=True)
        return images

    def get(self, ref: str) -> Image:
        """Resolve a reference and verify the image's files before returning it.

        Args:
            ref: an image name (the newest with that name wins) or a digest prefix.

        Returns:
            The verified image.

        Raises:
            NotFoundError: no image matches.
            UsageError: a digest prefix matches several images.
            ImageError: a file is missing or its sha256 does not match the manifest.
        """
        d = self._resolve(ref)
        self._verify(d)
        return self._load(d)

    def delete(self, ref: str) -> Image:
        """Remove an image's directory (works on corrupt images too).

        Args:
            ref: an image name or digest prefix.

        Returns:
            The image that was removed.

        Raises:
            NotFoundError: no image matches.
        """
        d = self._resolve(ref)
        try:
            image = self._load(d)
        except ImageError:
            image = Image(name="?", digest=d.name, kernel=d / "vmlinuz", initrd=d / "initrd.img",
                          cmdline="", created="", size=0, recipe="?")
        with self._lock():
            shutil.rmtree(d)
        return image

    # -- internals ------------------------------------------------------------

    def _ensure_root(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)

    @contextmanager
    def _lock(self) -> Iterator[None]:
        self._ensure_root()
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _image_dirs(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return [d for d in self.root.iterdir()
                if d.is_dir() and len(d.name) == 64 and not d.name.startswith(".")]

    def _resolve(self, ref: str) -> Path:
        ref = ref.strip()
        if not ref:
            raise UsageError("image reference is empty")
        dirs = self._image_dirs()
        by_name = []
        for d in dirs:
            try:
                im = self._load(d)
            except ImageError:
                continue
            if im.name == ref:
                by_name.append(im)
        if by_name:
            newest = max(by_name, key=lambda im: (im.created, im.digest))
            return self.root / newest.digest
        ref_l = ref.lower()
        if all(c in "0123456789abcdef" for c in ref_l):
            matches = [d for d in dirs if d.name.startswith(ref_l)]
            if len(matches) == 1:
                return matches[0]
            if len(matches) > 1:
                raise UsageError(f"image reference {ref!r} is ambiguous "
                                 f"({len(matches)} images match); give more digits")
        raise NotFoundError(f"image {ref!r} not found (see `omega images list`)")

    def _manifest(self, d: Path) -> dict[str, Any]:
        try:
            data = json.loads((d / MANIFEST).read_text())
        except (OSError, ValueError) as exc:
            raise ImageError(f"image {d.name[:12]} is corrupt: unreadable {MANIFEST} ({exc})") \
                from exc
        if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
            raise ImageError(f"image {d.name[:12]} is corrupt: malformed {MANIFEST}")
        return data

    def _load(self, d: Path) -> Image:
        m = self._manifest(d)
        try:
            files = m["files"]
            return Image(
                name=str(m["name"]),
                digest=d.name,
                kernel=d / files["kernel"]["path"],
                initrd=d / files["initrd"]["path"],
                cmdline=str(m["cmdline"]),
                created=str(m["created"]),
                size=int(files["kernel"]["size"]) + int(files["initrd"]["size"]),
                recipe=str(m["recipe"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ImageError(f"image {d.name[:12]} is corrupt: malformed {MANIFEST} "
                             f"(missing {exc})") from exc

    def _verify(self, d: Path) -> None:
        m = self._manifest(d)
        label = f"{m.get('name', '?')}@{d.name[:12]}"
        if set(m["files"]) != {"kernel", "initrd"}:
            raise ImageError(f"image {label} is corrupt: {MANIFEST} must list kernel and initrd")
        for role, entry in m["files"].items():
            fname = entry.get("path") if isinstance(entry, dict) else None
            expected = entry.get("sha256") if isinstance(entry, dict) else None
            if not isinstance(fname, str) or not isinstance(expected, str) or not fname:
                raise ImageError(f"image {label} is corrupt: bad manifest entry {role!r}")
            path = d / fname
            if "/" in fname or fname.startswith(".") or not path.is_file():
                raise ImageError(f"image {label} is corrupt: {fname} is missing")
            if sha256_file(path) != expected:
                raise ImageError(f"image {label} is corrupt: {fname} sha256 mismatch")
        files = m["files"]
        try:
            digest = image_digest(kernel_sha256=files["kernel"]["sha256"],
                                  initrd_sha256=files["initrd"]["sha256"],
                                  cmdline=m["cmdline"])
        except (KeyError, TypeError) as exc:
            raise ImageError(f"image {label} is corrupt: malformed {MANIFEST}") from exc
        if digest != d.name:
            raise ImageError(f"image {label} is corrupt: {MANIFEST} does not match its digest")


def _recipe(name: str) -> Callable[..., BuiltArtifacts]:
    if name == "tiny":
        from images.tiny import build_tiny

        return build_tiny
    raise UsageError(f"unknown image recipe {name!r} (known: tiny)")
