"""Cluster state: which peers exist, where they listen, what they lend.

Single host: an embedded SQLite database at ``config.home/cluster.db`` (WAL
mode, so the CLI, the netblock server and DSM handlers can read it while the
local cluster writes it). Several hosts sharing peers would put an existing
distributed store (etcd) behind this same interface.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

from hypervisor.config import Config
from hypervisor.errors import NotFoundError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS peers (
    name TEXT PRIMARY KEY,
    address TEXT NOT NULL,
    cert TEXT NOT NULL DEFAULT '',
    memory_lend INTEGER NOT NULL DEFAULT 0,
    disk_lend INTEGER NOT NULL DEFAULT 0,
    state TEXT NOT NULL DEFAULT 'unknown',
    pid INTEGER,
    netns TEXT,
    host_veth TEXT,
    data_dir TEXT,
    log_path TEXT,
    local INTEGER NOT NULL DEFAULT 0,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""


@dataclass
class PeerInfo:
    """One peer of the cluster.

    Attributes:
        name: node name (its certificate's DNS SAN).
        address: ``host:port`` it serves on.
        cert: path of its certificate.
        memory_lend: bytes of RAM it lends.
        disk_lend: bytes of disk it lends.
        state: ``running``, ``stopped``, ``dead`` (killed) or ``unknown``.
        pid: its process id when it runs on this machine (local cluster).
        netns: its network namespace (local cluster), or None on loopback.
        host_veth: host side of its veth pair (local cluster in a netns).
        data_dir: its chunk directory (local cluster).
        log_path: its log file (local cluster).
        local: whether it belongs to this machine's local cluster.
        updated: when the row last changed (epoch seconds).
    """

    name: str
    address: str
    cert: str = ""
    memory_lend: int = 0
    disk_lend: int = 0
    state: str = "unknown"
    pid: int | None = None
    netns: str | None = None
    host_veth: str | None = None
    data_dir: str | None = None
    log_path: str | None = None
    local: bool = False
    updated: float = field(default_factory=time.time)

    @property
    def host(self) -> str:
        """The host part of :attr:`address`."""
        return self.address.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        """The port part of :attr:`address`."""
        return int(self.address.rpartition(":")[2])

    def to_dict(self) -> dict[str, object]:
        """A JSON-friendly dict."""
        return asdict(self)


_COLUMNS = [f for f in PeerInfo.__dataclass_fields__]


class ClusterState:
    """The peers table and a few settings, in SQLite under ``config.home``."""

    def __init__(self, config: Config) -> None:
        """Open (creating if needed) the state database of ``config``."""
        self.path = config.home / "cluster.db"
        config.home.mkdir(parents=True, exist_ok=True)
        with self._db() as db:
            db.executescript(_SCHEMA)

    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA busy_timeout=30000")
            yield db
        finally:
            db.close()

    def peers(self, *, local: bool | None = None) -> list[PeerInfo]:
        """Every peer, by name.

        Args:
            local: only local-cluster peers (True), only others (False), or all (None).
        """
        with self._db() as db:
            rows = db.execute(f"SELECT {', '.join(_COLUMNS)} FROM peers ORDER BY name").fetchall()
        out = [self._row(r) for r in rows]
        return out if local is None else [p for p in out if p.local == local]

    def get(self, name: str) -> PeerInfo:
        """The peer named ``name``.

        Raises:
            NotFoundError: no such peer.
        """
        with self._db() as db:
            row = db.execute(f"SELECT {', '.join(_COLUMNS)} FROM peers WHERE name = ?",
                             (name,)).fetchone()
        if row is None:
            raise NotFoundError(f"no peer named {name!r} in the cluster")
        return self._row(row)

    def put(self, peer: PeerInfo) -> None:
        """Insert or replace a peer."""
        peer.updated = time.time()
        values = [getattr(peer, c) for c in _COLUMNS]
        values[_COLUMNS.index("local")] = int(peer.local)
        with self._db() as db:
            db.execute(f"INSERT OR REPLACE INTO peers ({', '.join(_COLUMNS)}) VALUES "
                       f"({', '.join('?' * len(_COLUMNS))})", values)

    def update(self, name: str, **fields: object) -> PeerInfo:
        """Change some fields of a peer; return the new row.

        Raises:
            NotFoundError: no such peer.
        """
        peer = self.get(name)
        for k, v in fields.items():
            if k not in _COLUMNS:
                raise KeyError(k)
            setattr(peer, k, v)
        self.put(peer)
        return peer

    def remove(self, name: str) -> None:
        """Forget a peer (no error when it is unknown)."""
        with self._db() as db:
            db.execute("DELETE FROM peers WHERE name = ?", (name,))

    def get_meta(self, key: str, default: str | None = None) -> str | None:
        """A setting, or ``default``."""
        with self._db() as db:
            row = db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else default

    def set_meta(self, key: str, value: str) -> None:
        """Store a setting."""
        with self._db() as db:
            db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    @staticmethod
    def _row(row: tuple) -> PeerInfo:
        d = dict(zip(_COLUMNS, row))
        d["local"] = bool(d["local"])
        return PeerInfo(**d)


def local_node_name(config: Config) -> str | None:
    """This machine's node name as recorded by ``omega cluster init`` (or the local cluster)."""
    return ClusterState(config).get_meta("local_node")
