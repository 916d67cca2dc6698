"""AES-GCM frames after the TLS handshake (native/peerclient/pc_frames.c).

The C clients ask a node's data port to switch a connection from TLS
records to frames keyed from the TLS exporter. These tests put a TCP proxy
between the DSM fetch path and a real node and read the bytes that cross
it: the connection is TLS records up to the switch and frames after it (and
TLS records all the way with OMEGA_PEER_FRAMES=0); one bit changed in a
frame, in either direction, ends the connection and never yields data: the
fault goes to the Python side.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading

import pytest

from hypervisor.dsm.core import FETCHING
from tests.dsm.conftest import Cluster, start_peers, stop_peers
from tests.dsm.guest_region import region_with_core, touch_read
from tests.dsm.test_native_fetch import (
    PS,
    _spec,
    drain,
    evict,
    make_store,
    read_in_thread,
)

TLS_TYPES = {20, 21, 22, 23}


@pytest.fixture
def region():
    with region_with_core(64) as made:
        yield made


@pytest.fixture
def cluster(cluster_ca):
    """One live peer is all these tests need."""
    peers = start_peers(cluster_ca, 1)
    try:
        yield Cluster(cluster_ca, peers)
    finally:
        stop_peers(peers)


class Stream:
    """One direction of a proxied connection: the bytes, parsed as TLS
    records and then as frames, with one bit flipped in the first frame
    when asked."""

    def __init__(self, flip: bool, where: str = "ciphertext") -> None:
        self.data = bytearray()
        self.flip = flip
        self.where = where
        self.flipped = False
        self.parsed = 0          # bytes parsed into whole records / frames
        self.records = 0
        self.frames = 0
        self.frames_at: int | None = None   # where the frames begin
        self.bad = False         # bytes that are neither

    def feed(self, chunk: bytes) -> bytes:
        start = len(self.data)
        self.data += chunk
        d = self.data
        while not self.bad:
            p = self.parsed
            if self.frames_at is None:
                if len(d) - p < 5:
                    break
                if d[p] in TLS_TYPES and d[p + 1] == 3 and d[p + 2] in (1, 3):
                    n = 5 + struct.unpack_from(">H", d, p + 3)[0]
                    if len(d) - p < n:
                        break
                    self.parsed += n
                    self.records += 1
                    continue
                self.frames_at = p
            if len(d) - p < 4:
                break
            n = struct.unpack_from(">I", d, p)[0]
            if n > 64 << 10:
                self.bad = True
                break
            if self.flip and not self.flipped and self.frames == 0:
                # a ciphertext byte of the first frame, or its length's top bit
                at, bit = (p + 4 + min(n, 8), 0x01) if self.where == "ciphertext" else (p, 0x80)
                if at < len(d):
                    d[at] ^= bit
                    self.flipped = True
            if len(d) - p < 4 + n + 16:
                break
            self.parsed += 4 + n + 16
            self.frames += 1
        return bytes(d[start:])


class Proxy:
    """A TCP relay in front of a node's data port; ``flip`` is "up" (the
    client's frames), "down" (the node's) or None."""

    def __init__(self, port: int, flip: str | None = None, where: str = "ciphertext") -> None:
        self.target = port
        self.flip = flip
        self.where = where
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.streams: list[tuple[Stream, Stream]] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target))
            up = Stream(self.flip == "up", self.where)
            down = Stream(self.flip == "down", self.where)
            self.streams.append((up, down))
            for src, dst, s in ((client, server, up), (server, client, down)):
                threading.Thread(target=self._pump, args=(src, dst, s), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, s: Stream) -> None:
        try:
            while chunk := src.recv(65536):
                dst.sendall(s.feed(chunk))
        except OSError:
            pass
        for sock in (src, dst):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self.listener.close()


def serve_through_proxy(cluster, reg, core, pages, flip=None, where="ciphertext"):
    """R = 1 on the first peer, the core's native path going through a proxy."""
    peer = cluster.peers[:1]
    spec = asyncio.run(_spec(make_store(cluster.config, peer, 1)))
    name, host, port = spec.peers[0]
    proxy = Proxy(port, flip, where)
    core.setup_remote(key=spec.key, aad_prefix=spec.aad_prefix, ns=spec.ns, ca=spec.ca,
                      cert=spec.cert, keyfile=spec.keyfile, peers=[(name, host, proxy.port)],
                      workers=1)
    core.start(threads=2)
    data = evict(reg, core, lambda: make_store(cluster.config, peer, 1), {name: 1}, pages)
    return proxy, data


def test_connections_switch_to_frames_after_the_handshake(cluster, region, monkeypatch):
    monkeypatch.delenv("OMEGA_PEER_FRAMES", raising=False)
    reg, core = region
    proxy, data = serve_through_proxy(cluster, reg, core, list(range(20, 30)))
    try:
        for p, d in data.items():
            assert read_in_thread(reg.addr + p * PS, PS) == d
        assert core.stats().counters["native_fetches"] == 10
        used = [(up, down) for up, down in proxy.streams if down.data]
        assert used
        for up, down in used:
            for s in (up, down):
                # TLS records (handshake, FRAMES and its OK), then frames only
                assert not s.bad and s.records >= 2 and s.frames_at is not None
            assert up.frames >= 1 and down.frames >= 1
        # ten page answers crossed in frames, none in TLS records after the switch
        assert sum(down.frames for _, down in used) >= 10
        assert all(down.parsed == len(down.data) for _, down in used)
    finally:
        proxy.close()


def test_frames_can_be_turned_off(cluster, region, monkeypatch):
    monkeypatch.setenv("OMEGA_PEER_FRAMES", "0")
    reg, core = region
    proxy, data = serve_through_proxy(cluster, reg, core, list(range(40, 45)))
    try:
        for p, d in data.items():
            assert read_in_thread(reg.addr + p * PS, PS) == d
        used = [(up, down) for up, down in proxy.streams if down.data]
        assert used and all(s.frames_at is None and not s.bad and s.parsed == len(s.data)
                            for pair in used for s in pair)
    finally:
        proxy.close()


@pytest.mark.parametrize("where", ["ciphertext", "length"])
@pytest.mark.parametrize("direction", ["down", "up"])
def test_a_changed_frame_ends_the_connection_and_serves_nothing(cluster, region, monkeypatch,
                                                                direction, where):
    """One bit of the first frame changed on the wire (the node's answer, or
    the client's request; in its ciphertext, or the top bit of its length,
    which makes it far too long): the connection ends, the page is handed to
    the Python side still FETCHING, and the guest thread waits for it."""
    monkeypatch.delenv("OMEGA_PEER_FRAMES", raising=False)
    reg, core = region
    proxy, data = serve_through_proxy(cluster, reg, core, [7], flip=direction, where=where)
    try:
        t = threading.Thread(target=touch_read, args=(reg.addr + 7 * PS, 8), daemon=True)
        t.start()
        queued = drain(core)
        assert queued == [7] and core.state[7] == FETCHING and t.is_alive()
        assert any(s.flipped for pair in proxy.streams for s in pair)
        counters = core.stats().counters
        assert counters["native_fallbacks"] == 1 and counters["native_fetches"] == 0
        assert core.reserve(1)
        core.install(7, data[7])
        t.join(10)
        assert not t.is_alive()
        assert touch_read(reg.addr + 7 * PS, PS) == data[7]
    finally:
        proxy.close()
