"""Page and chunk stores: bounds, versions, owners; the chunk store on disk.

The chunk store's crash recovery, old-layout conversion and space reclaim
are in test_chunk_store_disk.py; both stores against a model in
test_page_store_model.py and test_chunk_store_model.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from hypervisor.node.stores import ChunkStore, NotOwnerError, PageStore, StoreError
from hypervisor.node.wire import Item, Status

A = "node-a"
B = "node-b"
SLOT_HEAD = 40  # bytes of a slot's header (native/peer/chunk_store.h)


@pytest.fixture(params=["page", "chunk", "chunk-fsync"])
def store(request, tmp_path: Path):
    if request.param == "page":
        yield PageStore(10_000)
        return
    with ChunkStore(tmp_path / "chunks", 10_000, fsync=request.param == "chunk-fsync") as s:
        yield s


def test_put_get_delete_list_drop(store) -> None:
    assert store.put("a", Item(5, 1, b"x" * 100), owner=A) is Status.OK
    assert store.put("a", Item(2, 3, b"y" * 50), owner=A) is Status.OK
    assert store.put("b", Item(5, 1, b"z"), owner=A) is Status.OK
    assert store.get("a", 5, owner=A) == (1, b"x" * 100)
    assert store.get("a", 6, owner=A) is None and store.get("nope", 5, owner=A) is None
    assert store.list("a", owner=A) == ([(2, 3), (5, 1)], False)
    assert store.list("a", limit=1, owner=A) == ([(2, 3)], True)
    assert store.list("a", after=2, first=False, owner=A) == ([(5, 1)], False)
    assert store.used == 151 and store.count == 3
    assert store.delete("a", [5, 99], owner=A) == 1
    assert store.used == 51
    assert sorted(store.namespaces(owner=A)) == [("a", 1, 50), ("b", 1, 1)]
    assert store.drop("a", owner=A) == 1 and store.drop("a", owner=A) == 0
    assert store.used == 1 and store.get("a", 2, owner=A) is None


def test_full_changes_nothing(store) -> None:
    assert store.put("a", Item(1, 1, b"x" * 9_000), owner=A) is Status.OK
    assert store.put("a", Item(2, 1, b"x" * 1_001), owner=A) is Status.FULL
    assert store.get("a", 2, owner=A) is None and store.used == 9_000
    # Replacing a blob only needs room for the difference.
    assert store.put("a", Item(1, 2, b"y" * 10_000), owner=A) is Status.OK
    assert store.used == 10_000
    status, per_item = store.put_many("a", [Item(3, 1, b"a"), Item(4, 1, b"b")], owner=A)
    assert status is Status.FULL and per_item == []
    assert store.get("a", 3, owner=A) is None


def test_older_versions_are_stale(store) -> None:
    assert store.put("a", Item(1, 5, b"new"), owner=A) is Status.OK
    assert store.put("a", Item(1, 4, b"old"), owner=A) is Status.STALE
    assert store.put("a", Item(1, 5, b"new"), owner=A) is Status.OK   # an idempotent retry
    assert store.get("a", 1, owner=A) == (5, b"new")
    status, per_item = store.put_many("a", [Item(1, 3, b"old"), Item(2, 1, b"ok")], owner=A)
    assert status is Status.OK and per_item == [Status.STALE, Status.OK]


def test_chunks_survive_a_restart_and_stray_files_are_ignored(tmp_path: Path) -> None:
    root = tmp_path / "chunks"
    with ChunkStore(root, 1 << 20) as store:
        for k in range(5):
            assert store.put("exp", Item(k, k + 1, bytes([k]) * 1000), owner=A) is Status.OK
    (root / "exp" / ".0000000000000009.77").write_bytes(b"half a write")
    (root / "exp" / "000000000000000a").write_bytes(b"garbage")
    (root / "exp" / "notes.txt").write_bytes(b"not ours")
    with ChunkStore(root, 1 << 20) as again:
        assert again.used == 5000 and again.count == 5
        assert again.get("exp", 3, owner=A) == (4, bytes([3]) * 1000)
        assert again.get("exp", 10, owner=A) is None
    assert not (root / "exp" / ".0000000000000009.77").exists()
    assert (root / "exp" / "notes.txt").read_bytes() == b"not ours"


def test_corrupt_slot_is_an_error_not_data(tmp_path: Path) -> None:
    """A slot changed on disk under a running store fails its check on GET."""
    with ChunkStore(tmp_path / "c", 1 << 20, fsync=False) as store:
        store.put("exp", Item(1, 1, b"x" * 100), owner=A)
        slots = tmp_path / "c" / "exp" / "slots-100"
        raw = bytearray(slots.read_bytes())
        raw[SLOT_HEAD + 50] ^= 0x01
        slots.write_bytes(raw)
        with pytest.raises(StoreError, match="check"):
            store.get("exp", 1, owner=A)
    # Reopened, the slot is free: the key is absent, never garbage.
    with ChunkStore(tmp_path / "c", 1 << 20, fsync=False) as store:
        assert store.get("exp", 1, owner=A) is None and store.count == 0


def test_corrupt_slot_after_a_read_is_still_caught(tmp_path: Path) -> None:
    """Reads copy slots out of a mapping of the file: a byte changed on disk
    after the mapping was made (by a read) still fails the check."""
    with ChunkStore(tmp_path / "c", 1 << 20, fsync=False) as store:
        store.put("exp", Item(1, 1, b"x" * 100), owner=A)
        store.put("exp", Item(2, 1, b"y" * 100), owner=A)
        assert store.get("exp", 1, owner=A) == (1, b"x" * 100)
        slots = tmp_path / "c" / "exp" / "slots-100"
        with open(slots, "r+b") as f:  # in place: the file keeps its size
            f.seek(SLOT_HEAD + 50)
            byte = f.read(1)[0]
            f.seek(SLOT_HEAD + 50)
            f.write(bytes([byte ^ 0x01]))
        with pytest.raises(StoreError, match="check"):
            store.get("exp", 1, owner=A)
        assert store.get("exp", 2, owner=A) == (1, b"y" * 100)


def test_reads_follow_a_growing_slot_file(tmp_path: Path) -> None:
    """Puts that grow the slot file many times over what a read mapped,
    with reads of the first and the newest slot after each: every read
    returns its blob (the mapping is replaced as the file outgrows it)."""
    def blob(k: int) -> bytes:
        return k.to_bytes(4, "big") * 1024

    with ChunkStore(tmp_path / "c", 1 << 30, fsync=False) as store:
        for k in range(600):
            assert store.put("exp", Item(k, 1, blob(k)), owner=A) is Status.OK
            assert store.get("exp", k, owner=A) == (1, blob(k))
            assert store.get("exp", 0, owner=A) == (1, blob(0))
        assert all(store.get("exp", k, owner=A) == (1, blob(k)) for k in range(600))


def test_one_store_per_directory(tmp_path: Path) -> None:
    with ChunkStore(tmp_path / "c", 100):
        with pytest.raises(StoreError, match="in use"):
            ChunkStore(tmp_path / "c", 100)
    ChunkStore(tmp_path / "c", 100).close()


def test_closed_store_refuses_calls(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path / "c", 100)
    store.close()
    store.close()
    with pytest.raises(StoreError, match="closed"):
        store.get("a", 1, owner=A)


def test_unusable_data_directory(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError):
        ChunkStore(tmp_path / "file" / "sub", 100)


def test_a_namespace_belongs_to_its_creator(store) -> None:
    assert store.put("a", Item(1, 1, b"x" * 10), owner=A) is Status.OK
    assert store.put("b", Item(1, 1, b"y"), owner=B) is Status.OK
    for call in (lambda: store.put("a", Item(2, 1, b"z"), owner=B),
                 lambda: store.put_many("a", [Item(3, 1, b"z")], owner=B),
                 lambda: store.get("a", 1, owner=B),
                 lambda: store.list("a", owner=B),
                 lambda: store.delete("a", [1], owner=B),
                 lambda: store.drop("a", owner=B)):
        with pytest.raises(NotOwnerError):
            call()
    # Nothing changed, and the owner still has it all.
    assert store.used == 11 and store.get("a", 1, owner=A) == (1, b"x" * 10)
    assert store.list("a", owner=A) == ([(1, 1)], False)
    assert store.namespaces(owner=A) == [("a", 1, 10)]
    assert store.namespaces(owner=B) == [("b", 1, 1)]
    # Once empty, a namespace (and its ownership) is gone: anyone may create it anew.
    assert store.delete("a", [1], owner=A) == 1
    assert store.put("a", Item(1, 1, b"w"), owner=B) is Status.OK
    with pytest.raises(NotOwnerError):
        store.get("a", 1, owner=A)
    assert store.drop("a", owner=B) == 1 and store.get("a", 1, owner=A) is None


def test_chunk_owners_survive_a_restart(tmp_path: Path) -> None:
    root = tmp_path / "chunks"
    with ChunkStore(root, 1 << 20, fsync=False) as store:
        store.put("exp", Item(1, 1, b"x"), owner=A)
    again = ChunkStore(root, 1 << 20, fsync=False)
    with pytest.raises(NotOwnerError):
        again.get("exp", 1, owner=B)
    with pytest.raises(NotOwnerError):
        again.drop("exp", owner=B)
    assert again.get("exp", 1, owner=A) == (1, b"x")
    assert again.namespaces(owner=A) == [("exp", 1, 1)] and again.namespaces(owner=B) == []


def test_chunk_namespace_without_a_recorded_owner_is_adopted(tmp_path: Path) -> None:
    root = tmp_path / "chunks"
    with ChunkStore(root, 1 << 20, fsync=False) as store:
        store.put("old", Item(1, 1, b"x"), owner=A)
    (root / "old" / "owner").unlink()  # as written before owners were recorded
    with ChunkStore(root, 1 << 20, fsync=False) as store:
        assert store.list("old", owner=B) == ([(1, 1)], False)
        with pytest.raises(NotOwnerError):
            store.get("old", 1, owner=A)
    with ChunkStore(root, 1 << 20, fsync=False) as store:
        assert store.namespaces(owner=B) == [("old", 1, 1)]
