"""The C page store against a small pure-Python model of its contract.

:class:`PageStore` (native/peer/peer_store.c behind cffi) must behave exactly
like a dict per namespace of ``key -> (version, blob)`` with an owner per
namespace and capacity accounted in blob bytes. A hypothesis state machine
drives both with random puts, batch puts, gets, deletes, lists, drops and
namespace listings, by two members, and compares every answer. Keys come from
a small range (many hits, many deletes) and from multiples of large powers of
two (which all land on the same home slot of the open-addressing table), and
range puts of a hundred keys or more make the table grow: lookups past long
collision chains and backward-shift deletion inside them are exercised.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from hypervisor.node.stores import NotOwnerError, PageStore
from hypervisor.node.wire import Item, Status

OWNERS = ("node-a", "node-b")
NAMES = ("vm-0", "vm-1", "vm-2")
U64_MAX = 2**64 - 1

owners = st.sampled_from(OWNERS)
names = st.sampled_from(NAMES)
# A small range (collisions of live keys, repeated deletes) and multiples of 2^40
# and 2^47 (the same home slot for every table size the test reaches), plus the
# extremes of u64.
keys = st.one_of(
    st.integers(0, 40),
    st.integers(1, 12).map(lambda m: m << 40),
    st.integers(1, 4).map(lambda m: m << 47),
    st.sampled_from([U64_MAX, U64_MAX - 1, 1 << 63]),
)
versions = st.one_of(st.integers(0, 6), st.just(U64_MAX))
blobs = st.binary(max_size=24)
strides = st.sampled_from([1, 3, 1 << 20, 1 << 40])


@dataclass
class ModelNs:
    """One namespace of the model: its owner and ``key -> (version, blob)``."""

    owner: str
    entries: dict[int, tuple[int, bytes]] = field(default_factory=dict)


class PageStoreModel:
    """The page store's contract in plain Python (no hashing, no C)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.ns: dict[str, ModelNs] = {}

    @property
    def used(self) -> int:
        return sum(len(b) for t in self.ns.values() for _, b in t.entries.values())

    @property
    def count(self) -> int:
        return sum(len(t.entries) for t in self.ns.values())

    def _authorize(self, name: str, owner: str) -> ModelNs | None:
        t = self.ns.get(name)
        if t is not None and t.owner != owner:
            raise NotOwnerError(name)
        return t

    def put_many(self, name: str, items: list[Item], owner: str) -> tuple[Status, list[Status]]:
        t = self._authorize(name, owner)
        entries = t.entries if t is not None else {}
        # Growth of the whole batch, replayed in order: an item older than its
        # key's current version (stored, or set by an earlier item) is STALE
        # and adds nothing; otherwise it replaces the current size.
        growth = 0
        current: dict[int, tuple[int, int]] = {
            k: (v, len(b)) for k, (v, b) in entries.items()}
        for it in items:
            cur = current.get(it.key)
            if cur is not None and cur[0] > it.version:
                continue
            growth += len(it.blob) - (cur[1] if cur is not None else 0)
            current[it.key] = (it.version, len(it.blob))
        if growth > 0 and self.used + growth > self.capacity:
            return Status.FULL, []
        if not items:
            return Status.OK, []
        if t is None:
            t = self.ns[name] = ModelNs(owner)
        statuses = []
        for it in items:
            old = t.entries.get(it.key)
            if old is not None and old[0] > it.version:
                statuses.append(Status.STALE)
                continue
            t.entries[it.key] = (it.version, bytes(it.blob))
            statuses.append(Status.OK)
        return Status.OK, statuses

    def put(self, name: str, item: Item, owner: str) -> Status:
        status, per_item = self.put_many(name, [item], owner)
        return per_item[0] if status is Status.OK else status

    def get(self, name: str, key: int, owner: str) -> tuple[int, bytes] | None:
        t = self._authorize(name, owner)
        return t.entries.get(key) if t is not None else None

    def delete(self, name: str, ks: list[int], owner: str) -> int:
        t = self._authorize(name, owner)
        if t is None:
            return 0
        n = 0
        for k in ks:
            if t.entries.pop(k, None) is not None:
                n += 1
        if not t.entries:
            del self.ns[name]
        return n

    def list(self, name: str, owner: str, after: int, limit: int,
             first: bool) -> tuple[list[tuple[int, int]], bool]:
        t = self._authorize(name, owner)
        if t is None:
            return [], False
        ks = sorted(k for k in t.entries if first or k > after)
        return [(k, t.entries[k][0]) for k in ks[:limit]], len(ks) > limit

    def drop(self, name: str, owner: str) -> int:
        t = self._authorize(name, owner)
        if t is None:
            return 0
        del self.ns[name]
        return len(t.entries)

    def namespaces(self, owner: str | None) -> list[tuple[str, int, int]]:
        return sorted((name, len(t.entries), sum(len(b) for _, b in t.entries.values()))
                      for name, t in self.ns.items() if owner is None or t.owner == owner)


def _same(real, model) -> None:
    """Call both sides; they must return equal values or both refuse the owner."""
    try:
        want = model()
    except NotOwnerError:
        with pytest.raises(NotOwnerError):
            real()
        return
    assert real() == want


class StoreMachine(RuleBasedStateMachine):
    """Random operations on a store and on :class:`PageStoreModel`, compared.

    The rules of the store contract, for any store with the API of
    :class:`PageStore`; a subclass creates ``store`` and ``model`` in an
    ``@initialize`` rule (test_chunk_store_model.py adds reopens).
    """

    def __init__(self) -> None:
        super().__init__()
        self.store: Any = None
        self.model: PageStoreModel | None = None

    @rule(owner=owners, name=names, key=keys, version=versions, blob=blobs)
    def put(self, owner: str, name: str, key: int, version: int, blob: bytes) -> None:
        item = Item(key, version, blob)
        _same(lambda: self.store.put(name, item, owner=owner),
              lambda: self.model.put(name, item, owner))

    @rule(owner=owners, name=names,
          items=st.lists(st.builds(Item, keys, versions, blobs), max_size=12))
    def put_many(self, owner: str, name: str, items: list[Item]) -> None:
        _same(lambda: self.store.put_many(name, items, owner=owner),
              lambda: self.model.put_many(name, items, owner))

    @rule(owner=owners, name=names, start=st.integers(0, 1 << 50), stride=strides,
          count=st.integers(40, 200), version=versions, size=st.integers(0, 6))
    def put_range(self, owner: str, name: str, start: int, stride: int, count: int,
                  version: int, size: int) -> None:
        """Many keys at once: the table grows (64 slots hold at most 44 keys)."""
        items = [Item(start + i * stride, version, bytes([i % 256]) * size)
                 for i in range(count)]
        _same(lambda: self.store.put_many(name, items, owner=owner),
              lambda: self.model.put_many(name, items, owner))

    @rule(owner=owners, name=names, key=keys)
    def get(self, owner: str, name: str, key: int) -> None:
        _same(lambda: self.store.get(name, key, owner=owner),
              lambda: self.model.get(name, key, owner))

    @rule(owner=owners, name=names, ks=st.lists(keys, max_size=10))
    def delete(self, owner: str, name: str, ks: list[int]) -> None:
        _same(lambda: self.store.delete(name, ks, owner=owner),
              lambda: self.model.delete(name, ks, owner))

    @precondition(lambda self: self.model is not None and self.model.ns)
    @rule(data=st.data(), fraction=st.sampled_from([2, 3, 1]))
    def delete_some_live(self, data, fraction: int) -> None:
        """Delete live keys (every ``fraction``-th, in table-hostile order) of a namespace."""
        name = data.draw(st.sampled_from(sorted(self.model.ns)))
        owner = self.model.ns[name].owner
        live = sorted(self.model.ns[name].entries)
        victims = live[::fraction]
        victims.reverse()
        _same(lambda: self.store.delete(name, victims, owner=owner),
              lambda: self.model.delete(name, victims, owner))

    @rule(owner=owners, name=names, after=keys, limit=st.integers(0, 70), first=st.booleans())
    def list_keys(self, owner: str, name: str, after: int, limit: int, first: bool) -> None:
        _same(lambda: self.store.list(name, owner=owner, after=after, limit=limit, first=first),
              lambda: self.model.list(name, owner, after, limit, first))

    @precondition(lambda self: self.model is not None and self.model.ns)
    @rule(data=st.data(), limit=st.integers(1, 30))
    def page_through(self, data, limit: int) -> None:
        """Paging with ``after`` = the last key of the previous page visits every key once."""
        name = data.draw(st.sampled_from(sorted(self.model.ns)))
        owner = self.model.ns[name].owner
        seen: list[tuple[int, int]] = []
        page, more = self.store.list(name, owner=owner, limit=limit, first=True)
        seen += page
        while more:
            page, more = self.store.list(name, owner=owner, after=seen[-1][0], limit=limit,
                                         first=False)
            assert page, "more was set but the next page is empty"
            seen += page
        t = self.model.ns[name]
        assert seen == [(k, t.entries[k][0]) for k in sorted(t.entries)]

    @rule(owner=owners, name=names)
    def drop(self, owner: str, name: str) -> None:
        _same(lambda: self.store.drop(name, owner=owner), lambda: self.model.drop(name, owner))

    @rule(owner=st.one_of(st.none(), owners))
    def namespaces(self, owner: str | None) -> None:
        assert sorted(self.store.namespaces(owner=owner)) == self.model.namespaces(owner)

    @rule()
    def every_blob_reads_back(self) -> None:
        for name, t in self.model.ns.items():
            for k, entry in t.entries.items():
                assert self.store.get(name, k, owner=t.owner) == entry

    @invariant()
    def usage_matches(self) -> None:
        if self.store is None:
            return
        assert self.store.used == self.model.used
        assert self.store.count == self.model.count
        assert self.store.used <= self.store.capacity
        # A namespace exists exactly while it holds pages, with its owner.
        assert sorted(self.store.namespaces()) == self.model.namespaces(None)


class PageStoreMachine(StoreMachine):
    """The contract's rules on a :class:`PageStore`."""

    @initialize(capacity=st.sampled_from([0, 40, 600, 5_000, 1 << 20]))
    def create(self, capacity: int) -> None:
        self.store = PageStore(capacity)
        self.model = PageStoreModel(capacity)
        assert self.store.capacity == capacity


TestPageStoreMachine = PageStoreMachine.TestCase
TestPageStoreMachine.settings = settings(max_examples=150, stateful_step_count=40)


@pytest.mark.parametrize("stride", [1, 4096], ids=["dense", "page-addresses"])
def test_fifty_thousand_keys_then_every_other_deleted(stride: int) -> None:
    """One namespace of 50k keys (many table growths), then half deleted out of order."""
    n = 50_000
    store = PageStore(1 << 30)
    ks = [i * stride for i in range(n)]
    for i in range(0, n, 4096):
        status, per_item = store.put_many(
            "big", [Item(k, k % 7, k.to_bytes(8, "little")) for k in ks[i:i + 4096]],
            owner="node-a")
        assert status is Status.OK and set(per_item) == {Status.OK}
    assert store.count == n and store.used == 8 * n
    gone = ks[1::2]
    assert store.delete("big", reversed(gone), owner="node-a") == len(gone)
    assert store.count == n - len(gone) and store.used == 8 * (n - len(gone))
    for k in ks[0::2]:
        assert store.get("big", k, owner="node-a") == (k % 7, k.to_bytes(8, "little"))
    for k in gone:
        assert store.get("big", k, owner="node-a") is None
    listed, more = store.list("big", owner="node-a")
    assert not more and listed == [(k, k % 7) for k in ks[0::2]]
    assert store.namespaces() == [("big", n - len(gone), 8 * (n - len(gone)))]
    # Deleting the rest removes the namespace (and its owner).
    assert store.delete("big", ks[0::2], owner="node-a") == n - len(gone)
    assert store.namespaces() == [] and store.used == 0 and store.count == 0
    assert store.put("big", Item(1, 1, b"x"), owner="node-b") is Status.OK


def test_colliding_keys_survive_deletes_in_any_order() -> None:
    """Keys that share one home slot (multiples of 2^40), interleaved with small keys."""
    store = PageStore(1 << 20)
    chain = [m << 40 for m in range(1, 301)] + list(range(0, 300, 3))
    status, _ = store.put_many("c", [Item(k, 1, k.to_bytes(8, "big")) for k in chain],
                               owner="node-a")
    assert status is Status.OK
    live = set(chain)
    for victims in (chain[::5], chain[1::7], chain[-1:-60:-2], chain[2::3]):
        store.delete("c", victims, owner="node-a")
        live -= set(victims)
        for k in chain:
            want = (1, k.to_bytes(8, "big")) if k in live else None
            assert store.get("c", k, owner="node-a") == want
    assert store.list("c", owner="node-a") == ([(k, 1) for k in sorted(live)], False)


def test_batch_repeating_a_key_with_a_lower_version_cannot_overcommit() -> None:
    """A batch ``(k, v5, big), (k, v3, empty)`` must not store ``big`` past the capacity."""
    store = PageStore(1_000)
    status, per_item = store.put_many("a", [Item(1, 5, b"x" * 100_000), Item(1, 3, b"")],
                                      owner="node-a")
    assert store.used <= store.capacity, (status, per_item, store.used)
