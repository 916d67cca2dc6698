"""Chunk puts and gets: the C slot-file store against the old one-file-per-chunk layout.

Ours: :class:`hypervisor.node.stores.ChunkStore` (native/peer/chunk_store.c):
puts of new keys (slots appended), overwrites of every key with a new version
(a free slot written, the old one freed), the same as batch puts of 64 chunks,
and gets in random order.

Anchor, in the same run, on the same filesystem: the old layout written the
old way, one file per chunk (``<ns>/<key:016x>``, a 16-byte header then the
blob): each put opens a temporary name O_EXCL, writes, (fsyncs,) closes and
renames it over the chunk's file; each get opens, reads and closes. Only the
system calls are kept (no index, no lock), so the anchor is the old store's
lower bound. Both sides are driven from Python, one call per chunk.

Prints one JSON line: microseconds per operation for both, the filesystem,
and old/new ratios.

Usage::

    .venv/bin/python benchmarks/chunk_store_bench.py [--dir DIR] [--count 5000]
        [--size 4125] [--fsync]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import struct
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from hypervisor.node.stores import ChunkStore  # noqa: E402
from hypervisor.node.wire import Item  # noqa: E402

OLD_HEAD = struct.Struct(">4sQI")  # the old layout's header: magic, version, length
OWNER = "bench"


def filesystem_of(path: Path) -> str:
    """The type of the filesystem ``path`` lives on (from /proc/mounts)."""
    best, kind = "", "?"
    real = str(path.resolve())
    with open("/proc/mounts") as fh:
        for line in fh:
            _, mount, fstype, *_ = line.split()
            if (real == mount or real.startswith(mount.rstrip("/") + "/")) and \
                    len(mount) > len(best):
                best, kind = mount, fstype
    return kind


def per_op_us(n: int, fn: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    fn()
    return round((time.perf_counter() - t0) / n * 1e6, 2)


class OldLayout:
    """The old store's system calls: one file per chunk, written to a temporary name."""

    def __init__(self, root: Path, *, fsync: bool) -> None:
        self.dir = root / "ns"
        self.dir.mkdir(parents=True)
        self.fsync = fsync
        self.seq = 0

    def put(self, key: int, version: int, blob: bytes) -> None:
        self.seq += 1
        path = self.dir / f"{key:016x}"
        tmp = self.dir / f".{key:016x}.{self.seq}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, OLD_HEAD.pack(b"OMCH", version, len(blob)) + blob)
            if self.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)

    def get(self, key: int) -> bytes:
        fd = os.open(self.dir / f"{key:016x}", os.O_RDONLY)
        try:
            return os.read(fd, 1 << 24)
        finally:
            os.close(fd)


def bench_new(root: Path, keys: list[int], order: list[int], blobs: list[bytes],
              fsync: bool) -> dict[str, float]:
    n = len(keys)
    with ChunkStore(root, 1 << 40, fsync=fsync) as s:
        def puts(version: int) -> Callable[[], None]:
            def run() -> None:
                for k in keys:
                    s.put("ns", Item(k, version, blobs[k % len(blobs)]), owner=OWNER)
            return run

        def batches() -> None:
            for i in range(0, n, 64):
                s.put_many("ns", [Item(k, 3, blobs[k % len(blobs)]) for k in keys[i:i + 64]],
                           owner=OWNER)

        def gets() -> None:
            for k in order:
                s.get("ns", k, owner=OWNER)

        out = {"put_us": per_op_us(n, puts(1)), "overwrite_us": per_op_us(n, puts(2)),
               "put_batch64_us": per_op_us(n, batches), "get_us": per_op_us(n, gets)}
        assert s.count == n
    return out


def bench_old(root: Path, keys: list[int], order: list[int], blobs: list[bytes],
              fsync: bool) -> dict[str, float]:
    n = len(keys)
    old = OldLayout(root, fsync=fsync)

    def puts(version: int) -> Callable[[], None]:
        def run() -> None:
            for k in keys:
                old.put(k, version, blobs[k % len(blobs)])
        return run

    def gets() -> None:
        for k in order:
            old.get(k)

    return {"put_us": per_op_us(n, puts(1)), "overwrite_us": per_op_us(n, puts(2)),
            "get_us": per_op_us(n, gets)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=None,
                    help="where both stores are written (default: a temporary directory "
                    "under the system's temporary directory)")
    ap.add_argument("--count", type=int, default=5000, help="chunks per phase")
    ap.add_argument("--size", type=int, default=4096 + 29,
                    help="blob bytes (default: a sealed 4 KiB chunk)")
    ap.add_argument("--fsync", action="store_true", help="make every put durable")
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="chunk-bench-", dir=args.dir))
    try:
        rng = random.Random(1)
        keys = list(range(args.count))
        order = keys[:]
        rng.shuffle(order)
        blobs = [rng.randbytes(args.size) for _ in range(16)]
        # Alternate: old, new, then the same again; keep the better round of each.
        rounds: dict[str, list[dict[str, float]]] = {"old": [], "new": []}
        for i in range(2):
            for side in ("old", "new"):
                where = base / f"{side}-{i}"
                fn = bench_old if side == "old" else bench_new
                rounds[side].append(fn(where, keys, order, blobs, args.fsync))
                shutil.rmtree(where)
        best = {side: {k: min(r[k] for r in rs) for k in rs[0]} for side, rs in rounds.items()}
        result = {
            "bench": "chunk_store", "fs": filesystem_of(base), "dir": str(base.parent),
            "size": args.size, "count": args.count, "fsync": args.fsync,
            "new": best["new"], "old": best["old"],
            "ratio_put": round(best["old"]["put_us"] / best["new"]["put_us"], 2),
            "ratio_overwrite": round(best["old"]["overwrite_us"] / best["new"]["overwrite_us"], 2),
            "ratio_put_batch64": round(best["old"]["put_us"] / best["new"]["put_batch64_us"], 2),
            "ratio_get": round(best["old"]["get_us"] / best["new"]["get_us"], 2),
        }
        print(json.dumps(result))
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
