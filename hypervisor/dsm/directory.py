"""The page directory: for each page ever evicted, its version and holders.

Kept in SQLite in the VM's runtime directory so a restarted handler knows
which pages live on peers. A batch of evictions is committed here before
the pages are punched out of the memory file, so a crash between the two
leaves pages present locally (which wins) rather than lost. Versions only
grow: every store of a page takes the next one, so an older copy left on a
peer never authenticates as the current one.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
from pathlib import Path


class PageDirectory:
    """page → (version, holders), mirrored in memory.

    Args:
        path: the SQLite file (created).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        # WAL without fsync: survives the handler's crash (the case that
        # matters: the memory file dies with the host anyway).
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=OFF")
        self._db.execute("CREATE TABLE IF NOT EXISTS pages (page INTEGER PRIMARY KEY, "
                         "version INTEGER NOT NULL, holders TEXT NOT NULL)")
        self.entries: dict[int, tuple[int, tuple[str, ...]]] = {}
        for page, version, holders in self._db.execute("SELECT page, version, holders FROM pages"):
            self.entries[page] = (version, tuple(h for h in holders.split(",") if h))

    def next_version(self, page: int) -> int:
        """The version the next store of ``page`` must carry."""
        held = self.entries.get(page)
        return 1 if held is None else held[0] + 1

    def record(self, updates: Iterable[tuple[int, int, Sequence[str]]]) -> None:
        """Durably record (page, version, holders) for a batch, in one transaction."""
        rows = [(p, v, ",".join(h)) for p, v, h in updates]
        self._db.execute("BEGIN")
        self._db.executemany("INSERT OR REPLACE INTO pages VALUES (?, ?, ?)", rows)
        self._db.execute("COMMIT")
        for p, v, h in rows:
            self.entries[p] = (v, tuple(x for x in h.split(",") if x))

    def holders_count(self) -> dict[str, int]:
        """Pages recorded per holder."""
        out: dict[str, int] = {}
        for _, holders in self.entries.values():
            for h in holders:
                out[h] = out.get(h, 0) + 1
        return out

    def on_holders(self, names: set[str]) -> list[tuple[int, int, tuple[str, ...]]]:
        """Entries with a holder in ``names``."""
        return [(p, v, h) for p, (v, h) in self.entries.items() if names.intersection(h)]

    def clear(self) -> None:
        """Forget everything (the VM stopped; its pages were freed)."""
        self._db.execute("DELETE FROM pages")
        self.entries.clear()

    def close(self) -> None:
        """Close the database."""
        self._db.close()
