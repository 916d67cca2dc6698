"""Export metadata: what exports exist, their keys, and per-chunk versions.

Layout under ``config.netblock_dir``:

* ``exports.db`` — SQLite (WAL): table ``exports`` (one row per export) and
  table ``chunks`` (export id, chunk index, version, replica peers, and for
  exports whose blocks are smaller than their chunks the version of each
  block) for replicated exports. The chunk table is the authority on which
  version of a chunk (or block) is current; a replica holding an older
  version is stale.
* ``keys/<export id>.key`` — the export's 256-bit sealing key, mode 0600,
  never sent anywhere.
* ``data/<export id>.img`` — the sparse file of a local export.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import struct
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from hypervisor.config import Config
from hypervisor.errors import AlreadyExistsError, NotFoundError, SecurityError, UsageError
from hypervisor.sealing import Sealer

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
DEFAULT_CHUNK_SIZE = 64 * 1024
DEFAULT_BLOCK_SIZE = 4096
MIN_BLOCK = 512
TRIMMED = 1 << 63
"""Flag of a block version: the block was trimmed (it reads as zeroes)."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS exports (
    name TEXT PRIMARY KEY,
    id TEXT UNIQUE NOT NULL,
    size INTEGER NOT NULL,
    chunk_size INTEGER NOT NULL,
    replicas INTEGER NOT NULL,
    write_quorum INTEGER NOT NULL,
    kind TEXT NOT NULL,
    description TEXT NOT NULL,
    created REAL NOT NULL,
    block_size INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS chunks (
    export_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    version INTEGER NOT NULL,
    peers TEXT NOT NULL,
    blocks BLOB,
    PRIMARY KEY (export_id, idx)
);
"""

# Columns added after the first release: (table, column, declaration).
_MIGRATIONS = (("exports", "block_size", "INTEGER NOT NULL DEFAULT 0"),
               ("chunks", "blocks", "BLOB"))


@dataclass(frozen=True)
class ExportRecord:
    """One export's metadata.

    Attributes:
        name: the NBD export name.
        id: a random id (hex), used in sealing associated data and peer keys.
        size: bytes.
        chunk_size: bytes per chunk (replicated exports).
        replicas: copies of each chunk (replicated exports).
        write_quorum: replicas that must acknowledge a write; 0 = every live one.
        kind: ``"local"`` (sparse file on this host) or ``"replicated"``.
        description: free text.
        created: creation time (UNIX seconds).
        block_size: bytes per block, the unit of sealing and versions
            within a chunk (replicated exports; equal to ``chunk_size`` for
            exports made before blocks existed, and when stored as 0).
    """

    name: str
    id: str
    size: int
    chunk_size: int
    replicas: int
    write_quorum: int
    kind: str
    description: str
    created: float
    block_size: int = 0

    def __post_init__(self) -> None:
        if not self.block_size:
            object.__setattr__(self, "block_size", self.chunk_size)

    @property
    def blocks_per_chunk(self) -> int:
        """Blocks in one chunk (1: the whole chunk is sealed as one)."""
        return self.chunk_size // self.block_size

    def as_dict(self) -> dict[str, object]:
        """JSON-ready form."""
        return asdict(self)


@dataclass(frozen=True)
class ChunkState:
    """Where the current version of one chunk lives.

    Attributes:
        version: monotonically increasing per chunk; 0 never exists (for
            chunks of several blocks: the newest block version).
        peers: names of peers holding this version (every block of it).
        blocks: per block of the chunk, its version (0: never written;
            :data:`TRIMMED` set: trimmed); empty when a block is the chunk.
    """

    version: int
    peers: tuple[str, ...]
    blocks: tuple[int, ...] = ()


def validate_name(name: str) -> str:
    """Check an export name.

    Raises:
        UsageError: not 1-63 characters of letters, digits, '.', '_', '-'.
    """
    if not _NAME.match(name):
        raise UsageError(f"bad export name {name!r}: use 1-63 letters, digits, '.', '_' or '-'")
    return name


def validate_size(size: int) -> int:
    """Check an export size.

    Raises:
        UsageError: not a positive multiple of 512 bytes.
    """
    if size <= 0 or size % MIN_BLOCK:
        raise UsageError(f"export size must be a positive multiple of {MIN_BLOCK} bytes")
    return size


class ExportStore:
    """Export metadata and keys under ``config.netblock_dir``.

    Args:
        config: the Omega configuration.
    """

    def __init__(self, config: Config) -> None:
        self.config = config
        self.root = config.netblock_dir
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "keys").mkdir(mode=0o700, exist_ok=True)
        (self.root / "data").mkdir(exist_ok=True)
        self._db = sqlite3.connect(self.root / "exports.db", timeout=30, isolation_level=None,
                                   check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        for table, column, decl in _MIGRATIONS:
            have = {row[1] for row in self._db.execute(f"PRAGMA table_info({table})")}
            if column not in have:
                self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")

    def close(self) -> None:
        """Close the database."""
        self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # --- exports ------------------------------------------------------------------

    def create(self, name: str, size: int, *, replicas: int = 2,
               chunk_size: int = DEFAULT_CHUNK_SIZE, block_size: int | None = None,
               write_quorum: int = 0, local: bool = False,
               description: str = "") -> ExportRecord:
        """Create an export (metadata, key, and for a local export its sparse file).

        Args:
            name: export name.
            size: bytes; a positive multiple of 512.
            replicas: copies per chunk (replicated).
            chunk_size: power of two from 4 KiB to 64 MiB (replicated).
            block_size: power of two from 4 KiB to ``chunk_size``: the unit a
                write seals and stores (replicated; default: the chunk size,
                the layout the Python backend serves).
            write_quorum: acknowledgements needed per write (0 = all live replicas).
            local: keep the data in a sparse file on this host instead of on peers.
            description: free text.

        Returns:
            The new record.

        Raises:
            UsageError: invalid parameters.
            AlreadyExistsError: the name is taken.
        """
        validate_name(name)
        validate_size(size)
        if chunk_size < 4096 or chunk_size > 64 << 20 or chunk_size & (chunk_size - 1):
            raise UsageError("chunk size must be a power of two from 4K to 64M")
        block_size = chunk_size if block_size is None else block_size
        if block_size < 4096 or block_size > chunk_size or block_size & (block_size - 1):
            raise UsageError("block size must be a power of two from 4K to the chunk size")
        if not local and not 1 <= replicas <= 16:
            raise UsageError("replicas must be between 1 and 16")
        if not 0 <= write_quorum <= replicas:
            raise UsageError("write quorum must be between 0 (all live replicas) and replicas")
        record = ExportRecord(name=name, id=uuid.uuid4().hex, size=size, chunk_size=chunk_size,
                              replicas=1 if local else replicas, write_quorum=write_quorum,
                              kind="local" if local else "replicated", description=description,
                              created=time.time(), block_size=block_size)
        key_path = self._key_path(record.id)
        made: list[Path] = []
        try:
            with self._tx() as db:
                if db.execute("SELECT 1 FROM exports WHERE name=?", (name,)).fetchone():
                    raise AlreadyExistsError(f"export {name!r} already exists")
                db.execute("INSERT INTO exports VALUES (?,?,?,?,?,?,?,?,?,?)",
                           (record.name, record.id, record.size, record.chunk_size,
                            record.replicas, record.write_quorum, record.kind,
                            record.description, record.created, record.block_size))
                fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                made.append(key_path)
                try:
                    os.write(fd, Sealer.generate_key())
                finally:
                    os.close(fd)
                if local:
                    made.append(self.data_path(record))
                    with open(self.data_path(record), "xb") as f:
                        f.truncate(size)
        except BaseException:
            for path in made:  # the transaction rolled back; undo the files too
                path.unlink(missing_ok=True)
            raise
        return record

    def get(self, name: str) -> ExportRecord:
        """Look an export up by name.

        Raises:
            NotFoundError: no such export.
        """
        row = self._db.execute("SELECT * FROM exports WHERE name=?", (name,)).fetchone()
        if row is None:
            raise NotFoundError(f"no export named {name!r}")
        return ExportRecord(*row)

    def list(self) -> list[ExportRecord]:
        """Every export, by name."""
        return [ExportRecord(*row) for row in
                self._db.execute("SELECT * FROM exports ORDER BY name")]

    def delete(self, name: str) -> ExportRecord:
        """Forget an export: metadata, chunk table, key and local data.

        Chunks on peers must be dropped by the caller first (they are
        unreadable without the key anyway).

        Returns:
            The deleted record.

        Raises:
            NotFoundError: no such export.
        """
        record = self.get(name)
        with self._tx() as db:
            db.execute("DELETE FROM exports WHERE name=?", (name,))
            db.execute("DELETE FROM chunks WHERE export_id=?", (record.id,))
        self._key_path(record.id).unlink(missing_ok=True)
        self.data_path(record).unlink(missing_ok=True)
        (self.root / "locks" / f"{record.id}.lock").unlink(missing_ok=True)
        return record

    def lock(self, record: ExportRecord) -> int:
        """Take the export's owner lock: one process at a time holds an export
        (``serve``, ``repair``, ``resize`` and ``delete`` all take it), so a
        replicated export's chunk table and a local export's size have one owner.

        Returns:
            The lock's file descriptor (closing it releases the lock).

        Raises:
            AlreadyExistsError: another process holds it (the export is being served).
        """
        import fcntl

        locks = self.root / "locks"
        locks.mkdir(exist_ok=True)
        fd = os.open(locks / f"{record.id}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise AlreadyExistsError(f"export {record.name!r} is in use by process {holder} "
                                     "(stop that server first)") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return fd

    @contextmanager
    def locked(self, record: ExportRecord) -> Iterator[None]:
        """Hold the export's owner lock (:meth:`lock`) for a ``with`` block."""
        fd = self.lock(record)
        try:
            yield
        finally:
            os.close(fd)

    def holder(self, record: ExportRecord) -> int | None:
        """The pid of the process holding the export's owner lock (a server,
        repair, resize or delete), or None when no process holds it."""
        import fcntl

        try:
            fd = os.open(self.root / "locks" / f"{record.id}.lock", os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                text = os.pread(fd, 32, 0).decode(errors="replace").strip()
                return int(text) if text.isdigit() else -1
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)

    def set_size(self, record: ExportRecord, size: int) -> ExportRecord:
        """Record a new size (the caller holds the owner lock and has already
        made the data match: a local file truncated, a shrunken replicated
        export's tail zeroed).

        Returns:
            The updated record.

        Raises:
            UsageError: not a positive multiple of 512 bytes.
        """
        validate_size(size)
        with self._tx() as db:
            db.execute("UPDATE exports SET size=? WHERE id=?", (size, record.id))
        return replace(record, size=size)

    def _key_path(self, export_id: str) -> Path:
        return self.root / "keys" / f"{export_id}.key"

    def key(self, record: ExportRecord) -> bytes:
        """The export's sealing key.

        Raises:
            SecurityError: the key file is missing, unreadable, or not private.
        """
        path = self._key_path(record.id)
        try:
            st = path.stat()
            data = path.read_bytes()
        except OSError as exc:
            raise SecurityError(f"key of export {record.name!r}: {exc.strerror}") from exc
        if st.st_mode & 0o077:
            raise SecurityError(f"key file {path} is readable by others (mode {st.st_mode:o})")
        if len(data) != 32:
            raise SecurityError(f"key file {path} is corrupt")
        return data

    def data_path(self, record: ExportRecord) -> Path:
        """Sparse data file of a local export."""
        return self.root / "data" / f"{record.id}.img"

    # --- chunk versions ------------------------------------------------------------

    def chunk_states(self, record: ExportRecord) -> dict[int, ChunkState]:
        """Every written chunk's current version, holders and block versions."""
        return {idx: ChunkState(version, tuple(json.loads(peers)),
                                struct.unpack(f"<{len(blocks) // 8}Q", blocks) if blocks else ())
                for idx, version, peers, blocks in self._db.execute(
                    "SELECT idx, version, peers, blocks FROM chunks WHERE export_id=?",
                    (record.id,))}

    def set_chunks(self, record: ExportRecord, states: dict[int, ChunkState | None]) -> None:
        """Record new chunk states in one transaction (None deletes the row).

        Args:
            record: the export.
            states: chunk index -> new state, or None for a chunk that is a hole again.
        """
        with self._tx() as db:
            for idx, state in states.items():
                if state is None:
                    db.execute("DELETE FROM chunks WHERE export_id=? AND idx=?", (record.id, idx))
                else:
                    blocks = (struct.pack(f"<{len(state.blocks)}Q", *state.blocks)
                              if state.blocks else None)
                    db.execute("INSERT OR REPLACE INTO chunks VALUES (?,?,?,?,?)",
                               (record.id, idx, state.version, json.dumps(list(state.peers)),
                                blocks))

