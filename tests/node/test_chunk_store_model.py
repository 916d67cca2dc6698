"""The C chunk store against the pure-Python model of the store contract.

:class:`ChunkStore` (native/peer/chunk_store.c behind cffi) must answer
exactly like :class:`PageStoreModel` (a dict per namespace, an owner per
namespace, capacity in blob bytes), and keep all of it across a close and
reopen of its directory. The rules of test_page_store_model.py's state
machine (random puts, batch puts, range puts, gets, deletes, lists, drops,
namespace listings, by two members, every answer compared) run here on a
chunk store, with reopens between any two steps (the index rebuilt from the
slot files, with or without fsync). Blob lengths vary (one slot file per
length) and keys repeat (slots freed and reused).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import initialize, invariant, rule

from hypervisor.node.stores import ChunkStore

from .test_page_store_model import PageStoreModel, StoreMachine


class ChunkStoreMachine(StoreMachine):
    """The contract's rules on a :class:`ChunkStore`, with reopens between them."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="chunk-model-"))
        self.capacity = 0

    @initialize(capacity=st.sampled_from([0, 40, 600, 5_000, 1 << 20]))
    def create(self, capacity: int) -> None:
        self.capacity = capacity
        self.store = ChunkStore(self.dir / "chunks", capacity, fsync=False)
        self.model = PageStoreModel(capacity)

    def teardown(self) -> None:
        if self.store is not None:
            self.store.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    @rule(fsync=st.booleans())
    def reopen(self, fsync: bool) -> None:
        """Close and open the directory again: the index comes back from the slot files."""
        self.store.close()
        self.store = ChunkStore(self.dir / "chunks", self.capacity, fsync=fsync)

    @invariant()
    def a_directory_per_namespace(self) -> None:
        """A namespace has a directory exactly while it holds chunks."""
        if self.store is None:
            return
        on_disk = sorted(p.name for p in (self.dir / "chunks").iterdir())
        assert on_disk == sorted(self.model.ns)


TestChunkStoreMachine = ChunkStoreMachine.TestCase
TestChunkStoreMachine.settings = settings(max_examples=200, stateful_step_count=40,
                                          deadline=None)
