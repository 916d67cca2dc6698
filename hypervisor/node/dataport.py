"""The data port: a node's page and chunk data opcodes served by C threads.

Page faults are latency-bound, and the replicated disk needs tens of
thousands of chunk writes per second per peer: a request that goes through
the daemon's event loop and interpreter costs more than everything else on
the path. The data port (native/peer/peer_server.c) is a second mutual-TLS
listener of the same daemon that answers PING, GET, BATCH_GET, PUT,
BATCH_PUT and DELETE on page and chunk namespaces straight from the C page
store and C chunk store the Python daemon also uses, so both ports see the
same blobs, owners and capacity. Its address is announced in STAT (the field
is called ``page_port`` for wire compatibility: it is the node's data port,
for pages and chunks alike); clients that know it (the DSM handler's native
fetch path, native chunk clients) use it, everything else keeps using the
main port.
"""

from __future__ import annotations

from typing import Any

from hypervisor.errors import OmegaError
from hypervisor.node.stores import ChunkStore, PageStore

#: Counter names, in the order of ``enum peer_counter`` (native/peer/peer.h).
#: The unprefixed op and byte counters count page namespaces; ``chunk_*`` the
#: chunk ones.
COUNTERS = ("connections", "open", "PING", "GET", "BATCH_GET", "PUT", "BATCH_PUT", "DELETE",
            "bytes_out", "bytes_in", "bad_request", "forbidden", "handshake_failed",
            "chunk_GET", "chunk_BATCH_GET", "chunk_PUT", "chunk_BATCH_PUT", "chunk_DELETE",
            "chunk_bytes_out", "chunk_bytes_in", "store_errors")


class DataPort:
    """A running data port over a :class:`PageStore` and a :class:`ChunkStore`.

    Attributes:
        port: the TCP port it listens on.
    """

    def __init__(self, pages: PageStore, chunks: ChunkStore, host: str, port: int, *, ca: str,
                 cert: str, keyfile: str, busy_poll_us: int = 0) -> None:
        """Start listening (threads start at once).

        Args:
            pages: the page store it serves (shared with the daemon).
            chunks: the chunk store it serves (shared with the daemon); it must
                stay open until :meth:`stop` has returned.
            host: address to listen on.
            port: port (0: any free port).
            ca, cert, keyfile: PEM paths: the cluster CA (the only trust root)
                and this node's identity.
            busy_poll_us: how long a connection's thread waits awake for the
                next request after answering one before it sleeps (0: never).

        Raises:
            OmegaError: the address cannot be bound or the identity loaded.
        """
        self._stores = (pages, chunks)  # kept alive while C threads use them
        ffi, lib = pages._ffi, pages._lib
        self._ffi, self._lib = ffi, lib
        bound = ffi.new("int *")
        err = ffi.new("char[]", 512)
        handle = lib.peer_server_start(pages.handle, chunks.handle, host.encode(), port,
                                       str(ca).encode(), str(cert).encode(),
                                       str(keyfile).encode(), bound, err, 512)
        if handle == ffi.NULL:
            raise OmegaError(f"data port: {ffi.string(err).decode(errors='replace')}")
        self._handle: Any = handle
        self.port = int(bound[0])
        lib.peer_server_set_spin(handle, max(0, busy_poll_us) * 1000)
        self._counts = ffi.new("uint64_t[]", lib.PEER_C_COUNT)
        self._final: dict[str, int] = {}

    def counters(self) -> dict[str, int]:
        """The port's counters (see :data:`COUNTERS`); their last values once stopped."""
        if self._handle is None:
            return dict(self._final)
        self._lib.peer_server_counters(self._handle, self._counts)
        return {name: int(self._counts[i]) for i, name in enumerate(COUNTERS)}

    def stop(self) -> None:
        """Stop accepting, let each connection finish its burst, join the threads."""
        if self._handle is not None:
            handle, self._handle = self._handle, None
            self._lib.peer_server_stop(handle, self._counts)
            self._final = {name: int(self._counts[i]) for i, name in enumerate(COUNTERS)}
