"""The chunk store on disk: crashes, the old layout, space, threads.

The format (native/peer/chunk_store.h): per namespace, ``slots-<len>`` files
of fixed-size slots (a 40-byte header with magic, crc32c, key, version and
write sequence number, then the blob, padded to 8 bytes). A crash can leave
any mix of a put's steps on disk; these tests build those states byte by
byte from files the store wrote, reopen, and check that what is served is a
version that was acknowledged, or nothing, never garbage.
"""

from __future__ import annotations

import os
import random
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from hypervisor.node import wire
from hypervisor.node.stores import ChunkStore, NotOwnerError, StoreError
from hypervisor.node.wire import Item, Status

A = "node-a"
B = "node-b"
HEAD = 40
OLD_HEAD = struct.Struct(">4sQI")  # the one-file-per-chunk layout's header


def stride(length: int) -> int:
    """Bytes per slot for blobs of ``length`` bytes."""
    return (HEAD + length + 7) & ~7


def slots_file(root: Path, ns: str, length: int) -> Path:
    return root / ns / f"slots-{length}"


def snapshot(root: Path, ns: str, length: int) -> bytes:
    return slots_file(root, ns, length).read_bytes()


def slot(data: bytes, i: int, length: int) -> bytes:
    return data[i * stride(length):(i + 1) * stride(length)]


def two_versions(root: Path, first: bytes, second: bytes, *, v1: int = 1,
                 v2: int = 2) -> tuple[bytes, bytes]:
    """Put key 7 twice (closing the store after each); the slot file after each put.

    The first put lands in slot 0; the second in slot 1, after which slot 0
    is freed (its header zeroed).
    """
    n = len(first)
    with ChunkStore(root, 1 << 20, fsync=False) as s:
        assert s.put("ns", Item(7, v1, first), owner=A) is Status.OK
    after_first = snapshot(root, "ns", n)
    with ChunkStore(root, 1 << 20, fsync=False) as s:
        assert s.put("ns", Item(7, v2, second), owner=A) is Status.OK
    after_second = snapshot(root, "ns", n)
    assert len(after_second) == 2 * stride(n)
    assert slot(after_second, 0, n)[:8] == bytes(8), "the superseded slot is freed"
    return after_first, after_second


def reopen_get(root: Path, key: int = 7) -> tuple[int, bytes] | None:
    with ChunkStore(root, 1 << 20, fsync=False) as s:
        return s.get("ns", key, owner=A)


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), bit by bit: the reference the store's checksum must match."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 & -(crc & 1))
    return crc ^ 0xFFFFFFFF


def test_slot_format_is_the_documented_one(tmp_path: Path) -> None:
    """native/peer/chunk_store.h: u32 magic "OMCS", u32 crc32c of the header
    (crc field zero) and the blob, u64 key, version, seq, u32 length, u32 zero,
    then the blob, padded to 8 bytes; little-endian."""
    assert crc32c(b"123456789") == 0xE3069283
    root = tmp_path / "c"
    with ChunkStore(root, 1 << 20, fsync=False) as s:
        s.put("ns", Item(0x0102030405060708, 9, b"hello"), owner=A)
        s.put("ns", Item(3, 1, b"world"), owner=A)
    data = snapshot(root, "ns", 5)
    assert len(data) == 2 * stride(5) == 2 * 48
    seqs = []
    for i, (key, version, blob) in enumerate([(0x0102030405060708, 9, b"hello"),
                                              (3, 1, b"world")]):
        raw = slot(data, i, 5)
        magic, crc, k, v, seq, length, zero = struct.unpack_from("<4sIQQQII", raw)
        assert (magic, k, v, length, zero) == (b"OMCS", key, version, 5, 0)
        assert raw[HEAD:HEAD + 5] == blob and raw[HEAD + 5:] == bytes(3)
        assert crc == crc32c(raw[:4] + bytes(4) + raw[8:HEAD] + blob)
        seqs.append(seq)
    assert seqs[0] < seqs[1]
    assert (root / "ns" / "owner").read_text() == A


@pytest.mark.parametrize("length", [700, 767, 768, 1001, 4125, 65565])
def test_slot_crc_matches_the_reference_at_every_length(tmp_path: Path, length: int) -> None:
    """Blobs of 768 bytes or more are checksummed as three interleaved
    streams joined afterwards (native/peer/crc32c.c): the crc on disk is
    still the plain CRC-32C of header and blob, and the store reads it back."""
    root = tmp_path / "c"
    blob = random.Random(length).randbytes(length)
    with ChunkStore(root, 1 << 20, fsync=False) as s:
        s.put("ns", Item(11, 2, blob), owner=A)
        assert s.get("ns", 11, owner=A) == (2, blob)
    raw = slot(snapshot(root, "ns", length), 0, length)
    (crc,) = struct.unpack_from("<I", raw, 4)
    assert crc == crc32c(raw[:4] + bytes(4) + raw[8:HEAD] + blob)


# Crashes ------------------------------------------------------------------------------


@pytest.mark.parametrize("tear", ["blob-byte", "header-byte", "truncated", "header-only",
                                  "blob-only", "zeros"])
def test_torn_new_slot_leaves_the_previous_version(tmp_path: Path, tear: str) -> None:
    """A crash while the new slot was written: the old version is served."""
    root = tmp_path / "c"
    old, new = two_versions(root, b"A" * 1000, b"B" * 1000)
    n = 1000
    torn = bytearray(slot(new, 1, n))
    if tear == "blob-byte":
        torn[HEAD + 500] ^= 0x40
    elif tear == "header-byte":
        torn[20] ^= 0x01  # the version
    elif tear == "truncated":
        torn = torn[:HEAD + 300]  # the file ends inside the slot
    elif tear == "header-only":
        torn[HEAD:] = bytes(len(torn) - HEAD)
    elif tear == "blob-only":
        torn[:HEAD] = bytes(HEAD)
    else:
        torn[:] = bytes(len(torn))
    slots_file(root, "ns", n).write_bytes(slot(old, 0, n) + bytes(torn))
    assert reopen_get(root) == (1, b"A" * 1000)
    # The torn slot is free and gets reused; the old version stays until replaced.
    with ChunkStore(root, 1 << 20, fsync=False) as s:
        assert s.put("ns", Item(7, 3, b"C" * 1000), owner=A) is Status.OK
    assert reopen_get(root) == (3, b"C" * 1000)


def test_crash_before_the_old_slot_was_freed(tmp_path: Path) -> None:
    """Both slots valid: the higher version wins, and the loser never comes back."""
    root = tmp_path / "c"
    old, new = two_versions(root, b"A" * 64, b"B" * 64)
    slots_file(root, "ns", 64).write_bytes(slot(old, 0, 64) + slot(new, 1, 64))
    assert reopen_get(root) == (2, b"B" * 64)
    # Position does not matter, (version, seq) does.
    slots_file(root, "ns", 64).write_bytes(slot(new, 1, 64) + slot(old, 0, 64))
    assert reopen_get(root) == (2, b"B" * 64)
    with ChunkStore(root, 1 << 20) as s:
        assert s.count == 1 and s.used == 64
        assert s.delete("ns", [7], owner=A) == 1
    assert reopen_get(root) is None


def test_same_version_rewrite_is_decided_by_the_write_sequence(tmp_path: Path) -> None:
    """An idempotent retry with other bytes (same version): the later write wins."""
    root = tmp_path / "c"
    old, new = two_versions(root, b"first!", b"again!", v1=5, v2=5)
    slots_file(root, "ns", 6).write_bytes(slot(new, 1, 6) + slot(old, 0, 6))
    assert reopen_get(root) == (5, b"again!")


def test_deleted_chunk_does_not_come_back(tmp_path: Path) -> None:
    """Neither its live slot nor an older freed one is read back after a delete."""
    root = tmp_path / "c"
    with ChunkStore(root, 1 << 20) as s:
        for v in range(1, 5):
            assert s.put("ns", Item(1, v, bytes([v]) * 4096), owner=A) is Status.OK
        # A length change puts the next version in another file.
        assert s.put("ns", Item(1, 9, b"short"), owner=A) is Status.OK
        assert s.put("ns", Item(2, 1, b"keep"), owner=A) is Status.OK
        assert s.delete("ns", [1], owner=A) == 1
    with ChunkStore(root, 1 << 20) as s:
        assert s.get("ns", 1, owner=A) is None
        assert s.list("ns", owner=A) == ([(2, 1)], False) and s.used == 4


def test_killed_writer_leaves_acknowledged_chunks(tmp_path: Path) -> None:
    """A process killed (SIGKILL) in the middle of puts: everything it was told
    OK is there after a reopen, each key at its last acknowledged version or
    the one after (the put in flight), with the right bytes."""
    root = tmp_path / "c"
    log = tmp_path / "acked"
    code = f"""
import os, sys
from pathlib import Path
from hypervisor.node.stores import ChunkStore
from hypervisor.node.wire import Item
s = ChunkStore(Path({str(root)!r}), 1 << 30, fsync=False)
out = os.open({str(log)!r}, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
v = 0
while True:
    v += 1
    for k in range(16):
        s.put("ns", Item(k, v, bytes([v % 251]) * (4096 + k % 3)), owner="node-a")
    os.write(out, b"%d\\n" % v)
"""
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=Path(__file__).parents[2])
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (not log.exists() or len(
                log.read_bytes().splitlines()) < 30):
            assert proc.poll() is None, "the writer died"
            time.sleep(0.05)
        proc.kill()
    finally:
        proc.wait()
    acked = int(log.read_bytes().splitlines()[-1])
    with ChunkStore(root, 1 << 30) as s:
        for k in range(16):
            got = s.get("ns", k, owner=A)
            assert got is not None
            version, blob = got
            assert version in (acked, acked + 1)
            assert blob == bytes([version % 251]) * (4096 + k % 3)


# The old layout ----------------------------------------------------------------------


def write_old_chunk(root: Path, ns: str, key: int, version: int, blob: bytes) -> Path:
    path = root / ns / f"{key:016x}"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(OLD_HEAD.pack(b"OMCH", version, len(blob)) + blob)
    return path


def test_old_layout_is_converted_at_open(tmp_path: Path) -> None:
    """One file per chunk becomes slots; the files go, owners stay, strays stay unserved."""
    root = tmp_path / "c"
    chunks = {k: (k % 4 + 1, os.urandom(k * 97 % 5000)) for k in range(40)}
    for k, (v, blob) in chunks.items():
        write_old_chunk(root, "vm", k, v, blob)
    (root / "vm" / "owner").write_text(A)
    write_old_chunk(root, "legacy", 2**64 - 1, 2**64 - 1, b"no owner recorded")
    (root / "vm" / ".000000000000002a.17").write_bytes(b"interrupted")
    (root / "vm" / "00000000000000ff").write_bytes(b"OMCH short")  # not a chunk file
    with ChunkStore(root, 1 << 30) as s:
        assert s.count == 41
        assert s.used == sum(len(b) for _, b in chunks.values()) + len(b"no owner recorded")
        for k, want in chunks.items():
            assert s.get("vm", k, owner=A) == want
        with pytest.raises(NotOwnerError):
            s.get("vm", 1, owner=B)
        assert s.get("legacy", 2**64 - 1, owner=B) == (2**64 - 1, b"no owner recorded")
        assert s.get("vm", 0xFF, owner=A) is None
    left = sorted(p.name for p in (root / "vm").iterdir())
    assert not [n for n in left if len(n) == 16 and n != "00000000000000ff"]
    assert "00000000000000ff" in left and ".000000000000002a.17" not in left
    assert (root / "legacy" / "owner").read_text() == B  # adopted by its first user
    with ChunkStore(root, 1 << 30) as s:  # and again, from the slots alone
        assert s.count == 41
        assert s.list("vm", owner=A)[0] == [(k, v) for k, (v, _) in sorted(chunks.items())]


def test_conversion_interrupted_after_the_slots_were_written(tmp_path: Path) -> None:
    """Old files still there beside their slots (a crash before the unlinks):
    nothing is doubled, an older file does not win."""
    root = tmp_path / "c"
    write_old_chunk(root, "vm", 1, 3, b"three")
    write_old_chunk(root, "vm", 2, 1, b"one")
    ChunkStore(root, 1 << 20).close()
    write_old_chunk(root, "vm", 1, 3, b"three")  # as if never deleted
    write_old_chunk(root, "vm", 2, 0, b"older")
    write_old_chunk(root, "vm", 3, 1, b"new key")
    with ChunkStore(root, 1 << 20) as s:
        assert s.count == 3 and s.used == 5 + 3 + 7
        assert [s.get("vm", k, owner=A) for k in (1, 2, 3)] == [
            (3, b"three"), (1, b"one"), (1, b"new key")]
    assert sorted(p.name for p in (root / "vm").iterdir() if len(p.name) == 16) == []


# Space -------------------------------------------------------------------------------


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


@pytest.mark.parametrize("length", [65536 + 29, 4096 + 29], ids=["64k", "4k"])
def test_deletes_give_the_disk_space_back(tmp_path: Path, length: int) -> None:
    root = tmp_path / "c"
    with ChunkStore(root, 1 << 30) as s:
        s.put_many("ns", [Item(k, 1, os.urandom(length)) for k in range(64)], owner=A)
        path = slots_file(root, "ns", length)
        os.sync()
        full = allocated(path)
        assert full >= 64 * length
        s.delete("ns", range(1, 63), owner=A)
        assert allocated(path) < full // 8
        assert s.get("ns", 0, owner=A)[1] is not None and s.get("ns", 63, owner=A) is not None
        # Freed slots are reused before the file grows.
        size = path.stat().st_size
        s.put_many("ns", [Item(k, 1, os.urandom(length)) for k in range(100, 150)], owner=A)
        assert path.stat().st_size == size
        s.delete("ns", [0, 63, *range(100, 150)], owner=A)
        # Empty: the namespace, its directory and its files are gone.
        assert s.namespaces() == [] and not (root / "ns").exists()


def test_overwrites_reuse_slots(tmp_path: Path) -> None:
    """Writing the same keys again and again does not grow the file."""
    root = tmp_path / "c"
    with ChunkStore(root, 1 << 30, fsync=False) as s:
        for v in range(1, 50):
            status, _ = s.put_many("ns", [Item(k, v, bytes([v]) * 4096) for k in range(8)],
                                   owner=A)
            assert status is Status.OK
        assert slots_file(root, "ns", 4096).stat().st_size <= 16 * stride(4096)


FULL_DISK_SCRIPT = r"""
import os, sys
from pathlib import Path
from hypervisor.node.stores import ChunkStore, StoreError
from hypervisor.node.wire import Item, Status

root, filler = Path(sys.argv[1]), Path(sys.argv[2])
n = 64
blob = lambda k, v: bytes([k % 251, v]) * 2048
with ChunkStore(root, 1 << 30, fsync=False) as s:
    # two rounds: the second writes freed (filled) slots through the mapping
    for v in (1, 2):
        assert s.put_many("ns", [Item(k, v, blob(k, v)) for k in range(n)], owner="a")[0] is Status.OK
    s.delete("ns", range(8, n), owner="a")           # holes punched over their slots
    with open(filler, "wb") as f:                     # nothing left on the filesystem
        try:
            while True:
                f.write(bytes(65536)); f.flush()
        except OSError:
            pass
    # the next puts land in punched slots: with no space they fail, cleanly
    try:
        status, _ = s.put_many("ns", [Item(k, 3, blob(k, 3)) for k in range(8, n)], owner="a")
        print("put", status.name)
    except StoreError as e:
        print("put error", e)
    for k in range(8):                                # what was stored is still there
        assert s.get("ns", k, owner="a") == (2, blob(k, 2)), k
    os.unlink(filler)
    status, _ = s.put_many("ns", [Item(k, 4, blob(k, 4)) for k in range(n)], owner="a")
    assert status is Status.OK
with ChunkStore(root, 1 << 30, fsync=False) as s:
    assert all(s.get("ns", k, owner="a") == (4, blob(k, 4)) for k in range(n))
print("ok")
"""


def test_puts_into_punched_slots_on_a_full_filesystem_fail_cleanly(tmp_path: Path) -> None:
    """Slots are written through a shared mapping only where the file holds
    their bytes: a write into a punched hole with no space left must be an
    error from the store, not SIGBUS in the process."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)],
                             capture_output=True, text=True)
    assert mounted.returncode == 0, mounted.stderr
    try:
        run = subprocess.run([sys.executable, "-c", FULL_DISK_SCRIPT, str(mnt / "c"),
                              str(mnt / "filler")], capture_output=True, text=True,
                             timeout=120, cwd=Path(__file__).resolve().parents[2])
        assert run.returncode == 0, (run.returncode, run.stdout, run.stderr)
        lines = run.stdout.split("\n")
        assert lines[0].startswith("put error") or lines[0] == "put FULL", run.stdout
        assert lines[1] == "ok", run.stdout
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


# Limits and errors --------------------------------------------------------------------


def test_largest_blob_and_one_byte_more(tmp_path: Path) -> None:
    with ChunkStore(tmp_path / "c", 64 << 20, fsync=False) as s:
        big = os.urandom(1 << 16) * (wire.MAX_BLOB >> 16)
        assert s.put("ns", Item(1, 1, big), owner=A) is Status.OK
        assert s.get("ns", 1, owner=A) == (1, big)
        with pytest.raises(StoreError, match="size limit"):
            s.put("ns", Item(2, 1, big + b"x"), owner=A)
    with ChunkStore(tmp_path / "c", 64 << 20, fsync=False) as s:
        assert s.get("ns", 1, owner=A) == (1, big) and s.count == 1


@pytest.mark.parametrize("name", ["", ".hidden", "a/b", "x" * 256])
def test_bad_namespace_names_are_refused(tmp_path: Path, name: str) -> None:
    with ChunkStore(tmp_path / "c", 1 << 20, fsync=False) as s:
        with pytest.raises(StoreError):
            s.put(name, Item(1, 1, b"x"), owner=A)
        assert s.count == 0 and list((tmp_path / "c").iterdir()) == []


def test_capacity_is_kept_across_a_restart(tmp_path: Path) -> None:
    with ChunkStore(tmp_path / "c", 10_000, fsync=False) as s:
        assert s.put("ns", Item(1, 1, b"x" * 9_000), owner=A) is Status.OK
    with ChunkStore(tmp_path / "c", 10_000, fsync=False) as s:
        assert s.put("other", Item(1, 1, b"y" * 1_001), owner=B) is Status.FULL
        assert s.namespaces() == [("ns", 1, 9_000)]
        assert not (tmp_path / "c" / "other").exists()
        assert s.put("other", Item(1, 1, b"y" * 1_000), owner=B) is Status.OK


# Threads ------------------------------------------------------------------------------


def blob_of(key: int, version: int) -> bytes:
    """The bytes every writer stores for (key, version): a reader can check any it sees."""
    head = struct.pack(">QQ", key, version)
    return head * (1 + (key + version) % 300)


@pytest.mark.parametrize("where", ["tmp", "tmpfs"])
def test_threads_never_see_a_mix(tmp_path: Path, where: str) -> None:
    """Writers, deleters and readers on one namespace at once (plus drops of
    another): every blob read is the one of its (key, version), and after a
    reopen the disk says what memory said. Also on tmpfs (/dev/shm), where
    slots are written through the file's mapping whatever holds /tmp."""
    if where == "tmpfs":
        shm = Path(tempfile.mkdtemp(prefix="chunk-threads-", dir="/dev/shm"))
        try:
            _threads_never_see_a_mix(shm / "c")
        finally:
            shutil.rmtree(shm, ignore_errors=True)
    else:
        _threads_never_see_a_mix(tmp_path / "c")


def _threads_never_see_a_mix(root: Path) -> None:
    s = ChunkStore(root, 1 << 30, fsync=False)
    stop = threading.Event()
    errors: list[BaseException] = []

    def guard(fn):
        def run() -> None:
            try:
                fn()
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)
                stop.set()
        return run

    def writer(base: int) -> None:
        rng = random.Random(base)
        version = 0
        while not stop.is_set() and version < 300:
            version += 1
            keys = rng.sample(range(base, base + 40), 6)
            status, per_item = s.put_many("ns", [Item(k, version, blob_of(k, version))
                                                 for k in keys], owner=A)
            assert status is Status.OK and set(per_item) == {Status.OK}
            if version % 7 == 0:
                s.delete("ns", rng.sample(range(base, base + 40), 3), owner=A)

    def reader() -> None:
        while not stop.is_set():
            for k in range(0, 160, 3):
                got = s.get("ns", k, owner=A)
                if got is not None:
                    assert got[1] == blob_of(k, got[0])

    def dropper() -> None:
        while not stop.is_set():
            s.put("scratch", Item(1, 1, b"s" * 100), owner=B)
            s.drop("scratch", owner=B)

    threads = [threading.Thread(target=guard(lambda b=b: writer(b))) for b in (0, 40, 80, 120)]
    extra = [threading.Thread(target=guard(reader)), threading.Thread(target=guard(dropper))]
    for t in threads + extra:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    for t in extra:
        t.join()
    assert not errors, errors
    listed, _ = s.list("ns", owner=A)
    held = {k: s.get("ns", k, owner=A) for k, _ in listed}
    used, count = s.used, s.count
    assert s.namespaces() == [("ns", len(listed), used)] and count == len(listed)
    s.close()
    with ChunkStore(root, 1 << 30) as again:
        assert again.list("ns", owner=A) == (listed, False)
        assert {k: again.get("ns", k, owner=A) for k, _ in listed} == held
        assert (again.used, again.count) == (used, count)
        assert all(blob == blob_of(k, v) for k, (v, blob) in held.items())
