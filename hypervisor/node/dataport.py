"""The page data port: a node's page opcodes served by C threads.

Page faults are latency-bound: a GET that goes through the daemon's event
loop and interpreter costs more than everything else on the path. The data
port (native/peer/peer_server.c) is a second mutual-TLS listener of the same
daemon that answers PING, GET, BATCH_GET, PUT, BATCH_PUT and DELETE on page
namespaces straight from the C page store the Python daemon also uses, so
both ports see the same pages, owners and capacity. Its address is announced
in STAT (``page_port``); clients that know it (the DSM handler's native fetch
path) use it, everything else keeps using the main port.
"""

from __future__ import annotations

from typing import Any

from hypervisor.errors import OmegaError
from hypervisor.node.stores import PageStore

#: Counter names, in the order of ``enum peer_counter`` (native/peer/peer.h).
COUNTERS = ("connections", "open", "PING", "GET", "BATCH_GET", "PUT", "BATCH_PUT", "DELETE",
            "bytes_out", "bytes_in", "bad_request", "forbidden", "handshake_failed")


class PageDataPort:
    """A running data port over a :class:`PageStore`.

    Attributes:
        port: the TCP port it listens on.
    """

    def __init__(self, store: PageStore, host: str, port: int, *, ca: str, cert: str,
                 keyfile: str, busy_poll_us: int = 0) -> None:
        """Start listening (threads start at once).

        Args:
            store: the page store it serves (shared with the daemon).
            host: address to listen on.
            port: port (0: any free port).
            ca, cert, keyfile: PEM paths: the cluster CA (the only trust root)
                and this node's identity.
            busy_poll_us: how long a connection's thread waits awake for the
                next request after answering one before it sleeps (0: never).

        Raises:
            OmegaError: the address cannot be bound or the identity loaded.
        """
        self._store = store
        ffi, lib = store._ffi, store._lib
        self._ffi, self._lib = ffi, lib
        bound = ffi.new("int *")
        err = ffi.new("char[]", 512)
        handle = lib.peer_server_start(store.handle, host.encode(), port, str(ca).encode(),
                                       str(cert).encode(), str(keyfile).encode(), bound, err,
                                       512)
        if handle == ffi.NULL:
            raise OmegaError(f"page data port: {ffi.string(err).decode(errors='replace')}")
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
