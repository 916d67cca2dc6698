"""Copying images in and out of exports with ``qemu-img convert``.

The export is served on a private unix socket by an in-process NBD server,
and ``qemu-img`` (which understands raw, qcow2 and the rest) is the other end.
Progress comes from ``qemu-img -p`` and is shown with rich.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
from collections.abc import Sequence
from pathlib import Path

from hypervisor.config import Config
from hypervisor.errors import AlreadyExistsError, ImageError, NotFoundError, UsageError
from hypervisor.netblock.exports import DEFAULT_BLOCK_SIZE, MIN_BLOCK, ExportRecord, ExportStore
from hypervisor.netblock.service import ServeOptions, nbd_unix_uri, serve

_PROGRESS = re.compile(rb"\((\d+(?:\.\d+)?)/100%\)")


def image_info(path: Path) -> dict[str, object]:
    """``qemu-img info`` of a file.

    Raises:
        NotFoundError: the file does not exist.
        ImageError: qemu-img cannot read it.
    """
    if not path.exists():
        raise NotFoundError(f"{path} does not exist")
    proc = subprocess.run(["qemu-img", "info", "--output=json", str(path)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise ImageError(f"qemu-img cannot read {path}: {proc.stderr.strip()}")
    return json.loads(proc.stdout)


async def _run_qemu_img(args: list[str], what: str) -> None:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    proc = await asyncio.create_subprocess_exec(
        "qemu-img", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    with Progress(TextColumn(f"[bold]{what}"), BarColumn(),
                  TextColumn("{task.percentage:>5.1f}%"), TimeElapsedColumn(),
                  console=Console(stderr=True)) as progress:
        task = progress.add_task(what, total=100.0)
        buf = b""
        while chunk := await proc.stdout.read(256):
            buf = (buf + chunk)[-512:]
            found = _PROGRESS.findall(buf)
            if found:
                progress.update(task, completed=float(found[-1]))
        err = await proc.stderr.read()
        rc = await proc.wait()
    if rc != 0:
        raise ImageError(f"qemu-img convert failed: {err.decode(errors='replace').strip()}")


async def _with_private_server(config: Config, name: str | Sequence[str],
                               qemu_args_for: object, *,
                               peers: Sequence[tuple[str, str]] = (),
                               node: str | None = None) -> None:
    """Serve the export(s) on a private socket while ``qemu_args_for(uri, ...)``
    runs: it gets one NBD URI per export, in the order given."""
    names = (name,) if isinstance(name, str) else tuple(name)
    sock = config.run_dir / f"netblock-xfer-{os.getpid()}.sock"
    options = ServeOptions(names=names, socket=sock, peers=peers, node=node, repair=False,
                           announce=False)
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[object] = loop.create_future()
    stop = asyncio.Event()
    server_task = asyncio.ensure_future(serve(config, options, ready=ready, stop=stop))
    try:
        await asyncio.wait({ready, server_task}, return_when=asyncio.FIRST_COMPLETED)
        if server_task.done():
            server_task.result()
        uris = [nbd_unix_uri(sock, n) for n in names]
        await qemu_args_for(*uris)  # type: ignore[operator]
    finally:
        stop.set()
        await server_task


def import_image(config: Config, name: str, file: Path, *, replicas: int = 2,
                 local: bool = False, peers: Sequence[tuple[str, str]] = (),
                 node: str | None = None) -> None:
    """Copy an image file (raw, qcow2, ...) into an export, creating it if missing.

    Args:
        config: configuration.
        name: export name.
        file: source image.
        replicas: replica count when the export is created here.
        local: create a local export when missing.
        peers: explicit peers (default: the cluster state's).
        node: this host's node name.

    Raises:
        UsageError: the image is larger than the export.
        ImageError: qemu-img failed (a newly created export is removed again).
    """
    info = image_info(file)
    virtual = int(info["virtual-size"])  # type: ignore[call-overload]
    fmt = str(info["format"])
    store = ExportStore(config)
    created = False
    try:
        try:
            record = store.get(name)
        except NotFoundError:
            size = -(-virtual // MIN_BLOCK) * MIN_BLOCK
            record = store.create(name, size, replicas=replicas, local=local,
                                  block_size=None if local else DEFAULT_BLOCK_SIZE)
            created = True
        if virtual > record.size:
            raise UsageError(f"{file} is {virtual} bytes; export {name} holds {record.size}")
    finally:
        store.close()
    extra = ["--target-is-zero"] if created else []

    async def convert(uri: str) -> None:
        await _run_qemu_img(["convert", "-p", "-n", "-f", fmt, "-O", "raw", *extra, str(file),
                             uri], f"importing {file.name}")

    try:
        asyncio.run(_with_private_server(config, name, convert, peers=peers, node=node))
    except BaseException:
        if created:
            _discard(config, name, peers=peers, node=node)
        raise


def export_image(config: Config, name: str, file: Path, *, fmt: str = "raw",
                 force: bool = False, peers: Sequence[tuple[str, str]] = (),
                 node: str | None = None) -> None:
    """Copy an export out into an image file.

    Args:
        config: configuration.
        name: export name.
        file: destination.
        fmt: ``raw`` or ``qcow2``.
        force: overwrite an existing file.
        peers: explicit peers (default: the cluster state's).
        node: this host's node name.

    Raises:
        UsageError: bad format.
        AlreadyExistsError: the file exists and ``force`` is not set.
        ImageError: qemu-img failed (the partial file is removed).
    """
    if fmt not in ("raw", "qcow2"):
        raise UsageError(f"format must be raw or qcow2, not {fmt!r}")
    if file.exists() and not force:
        raise AlreadyExistsError(f"{file} exists (use --force to overwrite)")

    async def convert(uri: str) -> None:
        await _run_qemu_img(["convert", "-p", "-f", "raw", "-O", fmt, uri, str(file)],
                            f"exporting {name}")

    try:
        asyncio.run(_with_private_server(config, name, convert, peers=peers, node=node))
    except BaseException:
        file.unlink(missing_ok=True)
        raise


def copy_export(config: Config, source: str, target: str, *, replicas: int | None = None,
                local: bool | None = None, peers: Sequence[tuple[str, str]] = (),
                node: str | None = None) -> ExportRecord:
    """Copy an export into a new one (as ``rbd cp``): same size and layout
    unless told otherwise; holes stay holes (``qemu-img convert`` reads the
    source's block status and the new export starts as all zeroes).

    Args:
        config: configuration.
        source: the export to copy.
        target: the new export's name (must not exist).
        replicas: replica count of the copy (default: the source's).
        local: make the copy local (True) or replicated (False); default: as
            the source.
        peers: explicit peers (default: the cluster state's).
        node: this host's node name.

    Returns:
        The new export's record.

    Raises:
        NotFoundError: no such source.
        AlreadyExistsError: the target exists.
        ImageError: the copy failed (the new export is removed again).
    """
    store = ExportStore(config)
    try:
        src = store.get(source)
        make_local = src.kind == "local" if local is None else local
        record = store.create(target, src.size, replicas=replicas or src.replicas,
                              chunk_size=src.chunk_size, local=make_local,
                              block_size=None if make_local else src.block_size,
                              write_quorum=0 if make_local else src.write_quorum,
                              description=src.description)
    finally:
        store.close()

    async def convert(src_uri: str, dst_uri: str) -> None:
        await _run_qemu_img(["convert", "-p", "-n", "--target-is-zero", "-f", "raw", "-O", "raw",
                             src_uri, dst_uri], f"copying {source} to {target}")

    try:
        asyncio.run(_with_private_server(config, (source, target), convert, peers=peers,
                                         node=node))
    except BaseException:
        _discard(config, target, peers=peers, node=node)
        raise
    return record


def _discard(config: Config, name: str, *, peers: Sequence[tuple[str, str]],
             node: str | None) -> None:
    """Remove an export this module created for a copy that failed: its chunks
    on the peers where they can be reached, and in any case its metadata."""
    from hypervisor.netblock.service import delete_export

    try:
        delete_export(config, name, peers=peers, node=node)
    except Exception:  # noqa: BLE001 - the copy's error is the one to report
        store = ExportStore(config)
        try:
            store.delete(name)
        except NotFoundError:
            pass
        finally:
            store.close()
