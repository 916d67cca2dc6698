"""Local backends against a plain bytearray model (hypothesis), and allocation honesty."""

from __future__ import annotations

from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from hypervisor.netblock import protocol as nbd
from hypervisor.netblock.backend import AllocationMap, MemoryBackend, SparseFileBackend

SIZE = 64 * 1024 + 512  # not a multiple of the page size: exercises the tail

ops = st.lists(st.tuples(
    st.sampled_from(["write", "trim", "zero", "zero_nohole"]),
    st.integers(0, SIZE - 1), st.integers(1, 20000), st.integers(1, 255)), max_size=25)


def apply(backend, model: bytearray, op: str, offset: int, length: int, byte: int) -> None:
    length = min(length, SIZE - offset)
    if op == "write":
        backend.write(offset, bytes([byte]) * length, fua=False)
        model[offset:offset + length] = bytes([byte]) * length
    elif op == "trim":
        backend.trim(offset, length, fua=False)
        model[offset:offset + length] = bytes(length)
    else:
        backend.write_zeroes(offset, length, fua=False, may_trim=op == "zero",
                             fast_only=False)
        model[offset:offset + length] = bytes(length)


def check(backend, model: bytearray) -> None:
    assert backend.read(0, SIZE) == bytes(model)
    pos = 0
    for length, flags in backend.block_status(0, SIZE):
        assert length > 0
        if flags & nbd.STATE_HOLE:
            assert flags & nbd.STATE_ZERO
            assert model[pos:pos + length] == bytes(length), "a hole must read as zeroes"
        pos += length
    assert pos == SIZE


@settings(max_examples=150, deadline=None)
@given(ops=ops)
def test_memory_backend_matches_model(ops: list[tuple[str, int, int, int]]) -> None:
    backend = MemoryBackend(SIZE)
    model = bytearray(SIZE)
    try:
        for op in ops:
            apply(backend, model, *op)
        check(backend, model)
    finally:
        backend.close()


@settings(max_examples=60, deadline=None)
@given(ops=ops)
def test_sparse_file_backend_matches_model(tmp_path_factory, ops) -> None:
    path = Path(tmp_path_factory.mktemp("sf")) / "disk.img"
    backend = SparseFileBackend(path, size=SIZE)
    model = bytearray(SIZE)
    try:
        for op in ops:
            apply(backend, model, *op)
        backend.flush()
        check(backend, model)
    finally:
        backend.close()


def test_memory_backend_allocation_is_honest() -> None:
    backend = MemoryBackend(1 << 20)
    assert backend.block_status(0, 1 << 20) == [(1 << 20, nbd.STATE_HOLE | nbd.STATE_ZERO)]
    backend.write(8192, b"x", fua=False)
    assert backend.block_status(0, 1 << 20) == [
        (8192, 3), (4096, 0), ((1 << 20) - 12288, 3)]
    backend.trim(0, 1 << 20, fua=False)
    assert backend.block_status(0, 1 << 20) == [(1 << 20, 3)]
    backend.write_zeroes(0, 4096, fua=False, may_trim=False, fast_only=True)
    assert backend.block_status(0, 8192) == [(4096, 0), (4096, 3)]
    backend.close()


def test_allocation_map_partial_blocks_stay_allocated() -> None:
    amap = AllocationMap(10000, block=4096)
    amap.mark(0, 10000)
    assert amap.clear(100, 5000)[1] == 0  # no whole block inside
    assert amap.clear(4096, 5904) == (4096, 5904)  # up to the (short) last block
    assert amap.extents(0, 10000) == [(4096, 0), (5904, 3)]
