"""The data port of a real ``omega node serve``, over real mutual TLS.

The daemon serves PING and the data opcodes (GET, BATCH_GET, PUT, BATCH_PUT,
DELETE) on page and chunk namespaces a second time from C threads on its data
port (native/peer), straight from the C page store and C chunk store its main
port also uses; STAT announces the port (as ``page_port``). These tests talk
to that port with blocking :mod:`ssl` sockets and the pure codec of
:mod:`hypervisor.node.wire`, and check it against the main port
(:class:`PeerClient`): the same pages and chunks, owners and capacity, for
both kinds; pipelining; every kind of bad input answered BAD_REQUEST and
closed, without disturbing any other connection; fuzzed bytes; clients the
cluster CA did not sign; the ``--page-port`` flag; chunks kept across a
restart, with and without fsync; a chunk corrupted on disk answered
INTERNAL; SIGTERM with connections open; and the metrics.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import select
import signal
import socket
import ssl
import struct
import subprocess
import sys
import urllib.request
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from hypervisor.config import Config
from hypervisor.errors import ProtocolError
from hypervisor.node import wire
from hypervisor.node.client import PeerClient, PeerForbiddenError
from hypervisor.node.serve import READY_PREFIX, NodeOptions, NodeProcess
from hypervisor.node.wire import Item, Namespace, NsKind, Op, Status
from hypervisor.security import ClusterCA, client_ssl_context, issue_node_cert
from tests.waiting import wait_for

from .conftest import free_port

T = TypeVar("T")
PAGES = Namespace.page("dp-pages")
KINDS = pytest.mark.parametrize("kind", [NsKind.PAGE, NsKind.CHUNK], ids=["page", "chunk"])
IO_TIMEOUT = 60.0  # a guard against a hung server, not a measurement
DATA_OPS = frozenset({Op.PING, Op.GET, Op.BATCH_GET, Op.PUT, Op.BATCH_PUT, Op.DELETE})
_NS = struct.Struct(">BB")


# Helpers ---------------------------------------------------------------------------


class DataConn:
    """A blocking mutual-TLS connection to a node's data port.

    Answers are read either through a :class:`wire.FrameDecoder` (:meth:`recv`,
    :meth:`call`) or header by header (:meth:`recv_raw`, which also accepts the
    unknown opcodes a BAD_REQUEST echoes); one connection uses one of the two.
    """

    def __init__(self, node: NodeProcess, port: int, ctx: ssl.SSLContext) -> None:
        raw = socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT)
        try:
            self.sock = ctx.wrap_socket(raw, server_hostname=node.name)
        except BaseException:
            raw.close()
            raise
        self._decoder = wire.FrameDecoder(responses=True)
        self._ready: deque[wire.Frame] = deque()
        self._raw = bytearray()
        self._next_id = 1

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> DataConn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def rid(self) -> int:
        rid, self._next_id = self._next_id, self._next_id + 1
        return rid

    def recv(self) -> wire.Frame | None:
        """The next answer, or None at the end of the stream (between frames)."""
        while not self._ready:
            data = self.sock.recv(1 << 20)
            if not data:
                assert self._decoder.buffered == 0, "stream ended inside a frame"
                return None
            self._ready.extend(self._decoder.feed(data))
        return self._ready.popleft()

    def call(self, req: wire.Request) -> wire.Frame:
        """Send one request; return its answer (checked to be this request's)."""
        rid = self.rid()
        data = wire.encode_request(rid, req)
        self.send(data)
        answer = self.recv()
        assert answer is not None, f"connection closed instead of answering {req!r}"
        assert (answer.op, answer.request_id) == (data[4], rid)
        return answer

    def _read_raw(self, n: int) -> bytes | None:
        while len(self._raw) < n:
            data = self.sock.recv(1 << 20)
            if not data:
                return None
            self._raw += data
        out = bytes(self._raw[:n])
        del self._raw[:n]
        return out

    def recv_raw(self) -> tuple[int, int, int, bytes] | None:
        """The next answer as ``(op, status, request id, payload)``; None at the end."""
        head = self._read_raw(wire.HEADER_SIZE)
        if head is None:
            assert not self._raw, "stream ended inside a header"
            return None
        length, op, status, reserved, rid = wire.HEADER.unpack(head)
        assert reserved == 0 and wire.MIN_LENGTH <= length <= wire.MAX_FRAME
        payload = self._read_raw(length - wire.MIN_LENGTH)
        assert payload is not None, "stream ended inside a payload"
        return op, status, rid, payload

    def at_eof(self) -> bool:
        """Whether the server has closed (no further bytes come)."""
        return not self._raw and self.sock.recv(1 << 16) == b""


def frame(op: int, rid: int, payload: bytes = b"", *, status: int = 0, reserved: int = 0,
          length: int | None = None) -> bytes:
    """A request frame with any header, right or wrong."""
    n = wire.MIN_LENGTH + len(payload) if length is None else length
    return wire.HEADER.pack(n, op, status, reserved, rid) + payload


def ns_raw(name: bytes, kind: int = NsKind.PAGE) -> bytes:
    """A namespace as encoded on the wire, with any name bytes."""
    return _NS.pack(kind, len(name)) + name


def on_main_port(node: NodeProcess, ctx: ssl.SSLContext,
                 fn: Callable[[PeerClient], Awaitable[T]]) -> T:
    """Run ``fn`` with a :class:`PeerClient` of the node's main port."""

    async def go() -> T:
        c = PeerClient(node.address, ctx, server_name=node.name, connect_timeout=IO_TIMEOUT,
                       request_timeout=IO_TIMEOUT)
        try:
            return await fn(c)
        finally:
            await c.close()

    return asyncio.run(go())


def used_and_count(stat: wire.StatInfo, kind: NsKind) -> tuple[int, int]:
    """The bytes and blobs a STAT says the node holds of ``kind``."""
    if kind is NsKind.PAGE:
        return stat.memory_used, stat.pages
    return stat.disk_used, stat.chunks


def page_port_of(node: NodeProcess, ctx: ssl.SSLContext) -> int:
    """The data port the node announces in STAT."""
    return on_main_port(node, ctx, lambda c: c.stat()).page_port


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The samples of a Prometheus endpoint."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics",
                                  timeout=IO_TIMEOUT).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def refused(node: NodeProcess, port: int, ctx: ssl.SSLContext) -> bool:
    """Whether a connection with ``ctx`` fails instead of answering a PING.

    With TLS 1.3 the client's handshake ends before the server has checked the
    client's certificate: the refusal shows on the first read (an alert, a
    reset or the end of the stream).
    """
    try:
        with DataConn(node, port, ctx) as c:
            c.send(wire.encode_request(7, wire.Ping()))
            return c.recv_raw() is None
    except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
        return True


def self_signed_context(config: Config, directory: Path, name: str) -> ssl.SSLContext:
    """A client context with a self-signed certificate naming ``name`` (a member's name)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .sign(key, hashes.SHA256()))
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / "key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(cafile=str(config.cluster_dir / "ca.pem"))
    ctx.load_cert_chain(str(directory / "cert.pem"), str(directory / "key.pem"))
    return ctx


# Fixtures --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def node(config: Config, cluster_ca: ClusterCA, tmp_path_factory) -> Iterator[NodeProcess]:
    """One daemon (64 MiB of RAM and of disk lent) shared by the tests that do
    not stop or fill it."""
    issue_node_cert(config, "dp-node", sans=["127.0.0.1"])
    where = tmp_path_factory.mktemp("dataport")
    opts = NodeOptions(name="dp-node", host="127.0.0.1", port=free_port(),
                       memory_lend=64 << 20, disk_lend=64 << 20, data_dir=where / "data",
                       fsync=False)
    proc = NodeProcess.start(config, opts, log_path=where / "dp-node.log")
    yield proc
    proc.kill()


@pytest.fixture
def page_port(node: NodeProcess, client_ctx: ssl.SSLContext) -> int:
    """The shared daemon's data port."""
    return page_port_of(node, client_ctx)


@pytest.fixture
def dial(node: NodeProcess, page_port: int, client_ctx: ssl.SSLContext) -> Iterator[
        Callable[..., DataConn]]:
    """Open data-port connections to the shared daemon (as ``test-host`` by default)."""
    opened: list[DataConn] = []

    def open_conn(ctx: ssl.SSLContext | None = None) -> DataConn:
        c = DataConn(node, page_port, ctx or client_ctx)
        opened.append(c)
        return c

    yield open_conn
    for c in opened:
        c.close()


@pytest.fixture
def other_ctx(config: Config, cluster_ca: ClusterCA) -> ssl.SSLContext:
    """A client context of a second cluster member (``dp-other``)."""
    issue_node_cert(config, "dp-other", sans=["127.0.0.1"])
    return client_ssl_context(config, node="dp-other")


@pytest.fixture
def serve_with(config: Config, cluster_ca: ClusterCA, tmp_path: Path) -> Iterator[
        Callable[..., NodeProcess | subprocess.Popen[str]]]:
    """Run ``omega node serve`` with extra flags (``--page-port``).

    Returns the :class:`NodeProcess` once it is ready, or the exited process
    when it refused to start.
    """
    procs: list[subprocess.Popen[str]] = []

    def serve(name: str, *extra: str, memory_lend: int = 1 << 20,
              disk_lend: int = 1 << 20) -> NodeProcess | subprocess.Popen[str]:
        if not (config.cluster_dir / "nodes" / f"{name}.pem").exists():
            issue_node_cert(config, name, sans=["127.0.0.1"])
        log_path = tmp_path / f"{name}.log"
        argv = [sys.executable, "-m", "hypervisor.cli", "node", "serve", "--name", name,
                "--listen", f"127.0.0.1:{free_port()}", "--memory-lend", str(memory_lend),
                "--disk-lend", str(disk_lend), "--data", str(tmp_path / f"{name}-data"),
                "--no-fsync", *extra]
        env = dict(os.environ, OMEGA_HOME=str(config.home), PYTHONUNBUFFERED="1")
        with open(log_path, "ab") as log_file:
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log_file,
                                    stdin=subprocess.DEVNULL, text=True, env=env,
                                    start_new_session=True)
        procs.append(proc)
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], IO_TIMEOUT)
        assert ready, f"node {name} neither started nor exited"
        line = proc.stdout.readline()
        if not line.startswith(READY_PREFIX):
            proc.wait(IO_TIMEOUT)
            return proc
        host, _, port = line.split()[2].rpartition(":")
        return NodeProcess(proc, name, (host.strip("[]"), int(port)), log_path)

    yield serve
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


# The port and its requests -----------------------------------------------------------


def test_stat_announces_the_data_port(node: NodeProcess, client_ctx: ssl.SSLContext) -> None:
    """STAT on the main port names the data port (not the main port itself)."""
    stat = on_main_port(node, client_ctx, lambda c: c.stat())
    assert stat.page_port != 0 and stat.page_port != node.address[1]
    assert stat.memory_capacity == 64 << 20 and stat.disk_capacity == 64 << 20


@KINDS
def test_round_trips_and_both_ports_share_one_store(node: NodeProcess, dial,
                                                    client_ctx: ssl.SSLContext,
                                                    kind: NsKind) -> None:
    """Every data opcode round-trips, and both ports see one store, owner and usage."""
    c = dial()
    ns = Namespace(kind, "dp-rt")
    before = on_main_port(node, client_ctx, lambda p: p.stat())

    f = c.call(wire.Ping())
    assert f.status == Status.OK and wire.decode_u64(f.payload) > 0
    f = c.call(wire.Put(ns, Item(1, 3, b"one" * 1000)))
    assert (f.status, f.payload) == (Status.OK, b"")
    f = c.call(wire.Get(ns, 1))
    assert f.status == Status.OK and wire.decode_get(f.payload) == (3, b"one" * 1000)
    # Edge values: an empty blob, the largest key and version.
    top = 2**64 - 1
    assert c.call(wire.Put(ns, Item(top, top, b""))).status == Status.OK
    assert wire.decode_get(c.call(wire.Get(ns, top)).payload) == (top, b"")

    f = c.call(wire.BatchPut(ns, tuple(Item(k, 1, bytes([k]) * 100) for k in range(10, 20))))
    assert f.status == Status.OK and wire.decode_statuses(f.payload) == [Status.OK] * 10
    f = c.call(wire.BatchGet(ns, (10, 19, 99, 1)))
    assert f.status == Status.OK
    assert wire.decode_batch_get(f.payload) == [(1, b"\x0a" * 100), (1, b"\x13" * 100), None,
                                                (3, b"one" * 1000)]
    # Empty batches are answered, and create nothing.
    empty = Namespace(kind, "dp-rt-empty")
    f = c.call(wire.BatchPut(empty, ()))
    assert f.status == Status.OK and wire.decode_statuses(f.payload) == []
    assert wire.decode_batch_get(c.call(wire.BatchGet(empty, ())).payload) == []
    assert wire.decode_count(c.call(wire.Delete(empty, ())).payload) == 0

    # What the data port wrote, the main port reads (as the same member), and back.
    async def main_side(p: PeerClient) -> wire.StatInfo:
        assert await p.get(ns, 1) == (3, b"one" * 1000)
        assert await p.list(ns) == [(1, 3), *[(k, 1) for k in range(10, 20)], (top, top)]
        infos = {str(i.ns): (i.keys, i.bytes) for i in await p.list_ns()}
        assert infos[str(ns)] == (12, 3000 + 1000)
        assert str(empty) not in infos
        await p.put(ns, 2, 1, b"from the main port")
        await p.batch_put(ns, [(30, 2, b"m30"), (31, 2, b"m31")])
        return await p.stat()

    stat = on_main_port(node, client_ctx, main_side)
    used, count = used_and_count(stat, kind)
    used_before, count_before = used_and_count(before, kind)
    assert used - used_before == 4000 + len(b"from the main port") + 6
    assert count - count_before == 15
    assert wire.decode_get(c.call(wire.Get(ns, 2)).payload) == (1, b"from the main port")
    assert wire.decode_batch_get(c.call(wire.BatchGet(ns, (30, 31))).payload) == \
        [(2, b"m30"), (2, b"m31")]

    f = c.call(wire.Delete(ns, (1, 2, 30, 777, 1)))
    assert f.status == Status.OK and wire.decode_count(f.payload) == 3
    assert c.call(wire.Get(ns, 1)).status == Status.NOT_FOUND
    assert on_main_port(node, client_ctx, lambda p: p.get(ns, 30)) is None
    # Emptied from either side, the namespace is gone from both.
    assert on_main_port(node, client_ctx, lambda p: p.drop_ns(ns)) == 12
    assert c.call(wire.Get(ns, 10)).status == Status.NOT_FOUND
    after = on_main_port(node, client_ctx, lambda p: p.stat())
    assert used_and_count(after, kind) == used_and_count(before, kind)


@KINDS
def test_names_and_blobs_at_their_limits(node: NodeProcess, dial, client_ctx: ssl.SSLContext,
                                         kind: NsKind) -> None:
    """A 255-byte UTF-8 namespace name and a MAX_BLOB blob are served."""
    c = dial()
    ns = Namespace(kind, "é" * 127 + "x")  # 255 bytes of UTF-8
    assert len(ns.name.encode()) == 255
    big = os.urandom(1024) * (wire.MAX_BLOB // 1024)
    assert c.call(wire.Put(ns, Item(5, 1, big))).status == Status.OK
    f = c.call(wire.Get(ns, 5))
    assert f.status == Status.OK and wire.decode_get(f.payload) == (1, big)
    assert on_main_port(node, client_ctx, lambda p: p.get(ns, 5)) == (1, big)
    assert wire.decode_count(c.call(wire.Delete(ns, (5,))).payload) == 1


@KINDS
def test_pipelined_requests_are_all_answered_in_order(dial, kind: NsKind) -> None:
    """Requests sent in one write are all answered, in order, with their ids."""
    c = dial()
    ns = Namespace(kind, "dp-pipe")
    blob = {k: k.to_bytes(2, "big") * 32768 for k in range(50)}  # 64 KiB each
    f = c.call(wire.BatchPut(ns, tuple(Item(k, 1, b) for k, b in blob.items())))
    assert wire.decode_statuses(f.payload) == [Status.OK] * 50

    # 100 GETs in one write; their answers (over 6 MiB) leave in more than one write.
    keys = {1000 + i: i % 60 for i in range(100)}  # request id -> key; 50..59 are missing
    c.send(b"".join(wire.encode_request(rid, wire.Get(ns, k)) for rid, k in keys.items()))
    answers = [c.recv() for _ in keys]
    assert [a.request_id for a in answers] == list(keys)
    for a in answers:
        k = keys[a.request_id]
        if k in blob:
            assert a.status == Status.OK and wire.decode_get(a.payload) == (1, blob[k])
        else:
            assert a.status == Status.NOT_FOUND and a.payload == b""

    # A burst is served in order: each request sees what the ones before it did.
    burst = [wire.Put(ns, Item(500, 1, b"v1")), wire.Get(ns, 500),
             wire.Put(ns, Item(500, 2, b"v2")), wire.Get(ns, 500),
             wire.Put(ns, Item(500, 1, b"late")), wire.Delete(ns, (500,)), wire.Get(ns, 500),
             wire.Ping()]
    c.send(b"".join(wire.encode_request(900 + i, r) for i, r in enumerate(burst)))
    got = [c.recv() for _ in burst]
    assert [g.request_id for g in got] == [900 + i for i in range(len(burst))]
    assert [g.status for g in got] == [Status.OK, Status.OK, Status.OK, Status.OK,
                                       Status.STALE, Status.OK, Status.NOT_FOUND, Status.OK]
    assert wire.decode_get(got[1].payload) == (1, b"v1")
    assert wire.decode_get(got[3].payload) == (2, b"v2")
    assert wire.decode_count(got[5].payload) == 1


@KINDS
def test_full_stale_and_not_found(start_node, client_ctx: ssl.SSLContext, kind: NsKind) -> None:
    """Capacity (FULL, all or nothing), versions (STALE) and misses (NOT_FOUND)."""
    node = start_node(f"dp-full-{kind.name.lower()}", memory_lend=10_000, disk_lend=10_000)
    port = page_port_of(node, client_ctx)
    ns = Namespace(kind, "dp-full")
    with DataConn(node, port, client_ctx) as c:
        assert c.call(wire.Get(ns, 1)).status == Status.NOT_FOUND  # no such namespace
        assert c.call(wire.Put(ns, Item(1, 5, b"x" * 8_000))).status == Status.OK
        assert c.call(wire.Get(ns, 2)).status == Status.NOT_FOUND
        f = c.call(wire.Put(ns, Item(2, 1, b"y" * 2_001)))
        assert (f.status, f.payload) == (Status.FULL, b"")
        # A batch that does not fit stores nothing, not even its first items.
        f = c.call(wire.BatchPut(ns, (Item(3, 1, b"a" * 1_000), Item(4, 1, b"b" * 1_001))))
        assert (f.status, f.payload) == (Status.FULL, b"")
        got = wire.decode_batch_get(c.call(wire.BatchGet(ns, (2, 3, 4))).payload)
        assert got == [None, None, None]
        # A key written twice in a batch counts once, at its last size.
        f = c.call(wire.BatchPut(ns, (Item(3, 1, b"a" * 1_500), Item(3, 1, b"a" * 2_000))))
        assert wire.decode_statuses(f.payload) == [Status.OK, Status.OK]
        assert c.call(wire.Put(ns, Item(9, 1, b"z"))).status == Status.FULL  # exactly full
        # Replacing a blob needs room for the difference only.
        assert c.call(wire.Put(ns, Item(1, 5, b"w" * 7_000))).status == Status.OK
        assert c.call(wire.Put(ns, Item(9, 1, b"z" * 1_000))).status == Status.OK

        # Older versions are STALE, the same version overwrites.
        f = c.call(wire.Put(ns, Item(1, 4, b"old")))
        assert (f.status, f.payload) == (Status.STALE, b"")
        assert c.call(wire.Put(ns, Item(1, 5, b"same version"))).status == Status.OK
        f = c.call(wire.BatchPut(ns, (Item(1, 2, b"older"), Item(3, 7, b"newer"))))
        assert f.status == Status.OK
        assert wire.decode_statuses(f.payload) == [Status.STALE, Status.OK]
        got = wire.decode_batch_get(c.call(wire.BatchGet(ns, (1, 3))).payload)
        assert got == [(5, b"same version"), (7, b"newer")]
        assert wire.decode_count(c.call(wire.Delete(ns, (404, 405))).payload) == 0

    async def main_side(p: PeerClient) -> None:
        stat = await p.stat()
        used, count = used_and_count(stat, kind)
        assert used == len(b"same version") + len(b"newer") + 1_000
        assert used <= 10_000 and count == 3
        assert await p.get(ns, 1) == (5, b"same version")

    on_main_port(node, client_ctx, main_side)


@KINDS
def test_another_member_is_forbidden_and_keeps_its_connection(
        node: NodeProcess, dial, client_ctx: ssl.SSLContext, other_ctx: ssl.SSLContext,
        kind: NsKind) -> None:
    """Another member's namespace is FORBIDDEN; its connection stays usable."""
    ns = Namespace(kind, "dp-owned")
    mine = dial()
    assert mine.call(wire.BatchPut(ns, (Item(1, 1, b"a1"), Item(2, 1, b"a2")))).status == \
        Status.OK
    theirs = dial(other_ctx)
    for req in (wire.Get(ns, 1), wire.Put(ns, Item(1, 9, b"overwrite")),
                wire.Put(ns, Item(77, 1, b"new key")), wire.BatchGet(ns, (1, 2)),
                wire.BatchPut(ns, (Item(1, 9, b"x"), Item(3, 1, b"y"))),
                wire.Delete(ns, (1, 2)), wire.Delete(ns, ())):
        f = theirs.call(req)
        assert f.status == Status.FORBIDDEN, req
        assert b"another cluster member" in f.payload
    # Still open: the same connection goes on working for its own namespace.
    assert theirs.call(wire.Ping()).status == Status.OK
    own = Namespace(kind, "dp-owned-by-other")
    assert theirs.call(wire.Put(own, Item(1, 1, b"b1"))).status == Status.OK
    assert mine.call(wire.Get(own, 1)).status == Status.FORBIDDEN
    # The main port agrees on who owns what.
    with pytest.raises(PeerForbiddenError):
        on_main_port(node, other_ctx, lambda p: p.get(ns, 1))
    assert on_main_port(node, other_ctx, lambda p: p.get(own, 1)) == (1, b"b1")
    # Nothing of the owner's changed.
    got = wire.decode_batch_get(mine.call(wire.BatchGet(ns, (1, 2, 3, 77))).payload)
    assert got == [(1, b"a1"), (1, b"a2"), None, None]
    # Once empty, the name is free for anyone.
    assert wire.decode_count(mine.call(wire.Delete(ns, (1, 2))).payload) == 2
    assert theirs.call(wire.Put(ns, Item(5, 1, b"b5"))).status == Status.OK
    assert mine.call(wire.Get(ns, 5)).status == Status.FORBIDDEN
    assert wire.decode_count(theirs.call(wire.Delete(ns, (5,))).payload) == 1
    assert wire.decode_count(theirs.call(wire.Delete(own, (1,))).payload) == 1


# Bad input --------------------------------------------------------------------------


_BAD = {
    # Opcodes of the main port only.
    "stat": wire.encode_request(11, wire.Stat()),
    "list": wire.encode_request(12, wire.ListKeys(PAGES, 0, 10, True)),
    "list-chunks": wire.encode_request(15, wire.ListKeys(Namespace.chunk("dp-bad"), 0, 1, True)),
    "drop-ns": wire.encode_request(13, wire.DropNs(PAGES)),
    "drop-chunk-ns": wire.encode_request(16, wire.DropNs(Namespace.chunk("dp-bad"))),
    "list-ns": wire.encode_request(14, wire.ListNs()),
    "unknown-ns-kind": frame(Op.GET, 18, ns_raw(b"dp-bad", kind=2) + bytes(8)),
    # Headers.
    "unknown-opcode": frame(0x7F, 20),
    "opcode-zero": frame(0x00, 21),
    "length-below-header": frame(Op.PING, 22, length=wire.MIN_LENGTH - 1),
    "length-zero": frame(Op.PING, 23, length=0),
    "length-over-max-frame": frame(Op.GET, 24, length=wire.MAX_FRAME + 1),
    "length-max-u32": frame(Op.GET, 25, length=2**32 - 1),
    "nonzero-status": frame(Op.PING, 26, status=Status.NOT_FOUND),
    "nonzero-reserved": frame(Op.GET, 27, ns_raw(b"dp-bad") + bytes(8), reserved=1),
    # Payloads.
    "truncated-ns": frame(Op.GET, 30, b"\x00\x09dp-b"),
    "truncated-key": frame(Op.GET, 31, ns_raw(b"dp-bad") + bytes(7)),
    "truncated-put": frame(Op.PUT, 32, ns_raw(b"dp-bad") + struct.pack(">QQI", 1, 1, 10)
                           + b"short"),
    "truncated-batch-put": frame(Op.BATCH_PUT, 33, ns_raw(b"dp-bad") + struct.pack(">I", 2)
                                 + struct.pack(">QQI", 1, 1, 1) + b"x"),
    "truncated-delete": frame(Op.DELETE, 34, ns_raw(b"dp-bad") + struct.pack(">I", 3)
                              + bytes(16)),
    "trailing-ping": frame(Op.PING, 35, b"\x00"),
    "trailing-get": frame(Op.GET, 36, ns_raw(b"dp-bad") + bytes(8) + b"\x00"),
    "trailing-put": frame(Op.PUT, 37, ns_raw(b"dp-bad") + struct.pack(">QQI", 1, 1, 1)
                          + b"x" + b"\x00"),
    "trailing-batch-get": frame(Op.BATCH_GET, 38, ns_raw(b"dp-bad") + struct.pack(">I", 1)
                                + bytes(8) + b"\x00"),
    "trailing-batch-put": frame(Op.BATCH_PUT, 39, ns_raw(b"dp-bad") + struct.pack(">I", 1)
                                + struct.pack(">QQI", 1, 1, 0) + b"\x00"),
    # Limits.
    "batch-get-over-max": frame(Op.BATCH_GET, 40, ns_raw(b"dp-bad") + struct.pack(
        ">I", wire.MAX_BATCH + 1) + bytes(8 * (wire.MAX_BATCH + 1))),
    "delete-over-max": frame(Op.DELETE, 41, ns_raw(b"dp-bad") + struct.pack(
        ">I", wire.MAX_BATCH + 1) + bytes(8 * (wire.MAX_BATCH + 1))),
    "batch-put-over-max": frame(Op.BATCH_PUT, 42, ns_raw(b"dp-bad") + struct.pack(
        ">I", wire.MAX_BATCH + 1) + struct.pack(">QQI", 1, 1, 0) * (wire.MAX_BATCH + 1)),
    "put-blob-over-max": frame(Op.PUT, 43, ns_raw(b"dp-bad") + struct.pack(
        ">QQI", 1, 1, wire.MAX_BLOB + 1) + bytes(wire.MAX_BLOB + 1)),
    "batch-put-blob-over-max": frame(Op.BATCH_PUT, 44, ns_raw(b"dp-bad") + struct.pack(
        ">IQQI", 1, 1, 1, wire.MAX_BLOB + 1)),
    # Namespace names.
    "empty-name": frame(Op.GET, 50, ns_raw(b"") + bytes(8)),
    "dot-name": frame(Op.GET, 51, ns_raw(b".hidden") + bytes(8)),
    "slash-name": frame(Op.PUT, 52, ns_raw(b"a/b") + struct.pack(">QQI", 1, 1, 1) + b"x"),
    "nul-name": frame(Op.BATCH_GET, 53, ns_raw(b"a\0b") + struct.pack(">I", 0)),
    "utf8-invalid-byte": frame(Op.GET, 54, ns_raw(b"vm\xff") + bytes(8)),
    "utf8-surrogate": frame(Op.GET, 55, ns_raw(b"vm\xed\xa0\x80") + bytes(8)),
    "utf8-overlong": frame(Op.GET, 56, ns_raw(b"\xc0\xaf") + bytes(8)),
    "utf8-truncated": frame(Op.DELETE, 57, ns_raw(b"vm\xe2\x82") + struct.pack(">I", 0)),
    "utf8-past-max": frame(Op.GET, 58, ns_raw(b"\xf4\x90\x80\x80") + bytes(8)),
    # The same rules on chunk namespaces.
    "chunk-truncated-put": frame(Op.PUT, 60, ns_raw(b"dp-bad", NsKind.CHUNK)
                                 + struct.pack(">QQI", 1, 1, 10) + b"short"),
    "chunk-trailing-delete": frame(Op.DELETE, 61, ns_raw(b"dp-bad", NsKind.CHUNK)
                                   + struct.pack(">I", 1) + bytes(8) + b"\x00"),
    "chunk-batch-put-over-max": frame(Op.BATCH_PUT, 62, ns_raw(b"dp-bad", NsKind.CHUNK)
                                      + struct.pack(">I", wire.MAX_BATCH + 1)),
    "chunk-blob-over-max": frame(Op.BATCH_PUT, 63, ns_raw(b"dp-bad", NsKind.CHUNK)
                                 + struct.pack(">IQQI", 1, 1, 1, wire.MAX_BLOB + 1)),
    "chunk-dot-name": frame(Op.GET, 64, ns_raw(b"..", NsKind.CHUNK) + bytes(8)),
    "chunk-slash-name": frame(Op.BATCH_GET, 65, ns_raw(b"../etc", NsKind.CHUNK)
                              + struct.pack(">I", 0)),
}


@pytest.mark.parametrize("name", list(_BAD))
def test_bad_input_gets_bad_request_then_eof(name: str, node: NodeProcess, dial,
                                             client_ctx: ssl.SSLContext) -> None:
    """Each kind of bad input: one BAD_REQUEST (op and id echoed), then the end."""
    data = _BAD[name]
    _, op, _, _, rid = wire.HEADER.unpack_from(data)
    ns = Namespace.page("dp-bystander")
    bystander = dial()
    assert bystander.call(wire.Put(ns, Item(1, 1, name.encode()))).status == Status.OK

    bad = dial()
    bad.send(data)
    answer = bad.recv_raw()
    assert answer is not None, "closed without an answer"
    got_op, status, got_rid, payload = answer
    assert (got_op, status, got_rid) == (op, Status.BAD_REQUEST, rid)
    assert payload  # why, in words
    assert bad.at_eof()

    # Nothing else noticed: the open connection, a new one, the main port.
    f = bystander.call(wire.Get(ns, 1))
    assert f.status == Status.OK and wire.decode_get(f.payload) == (1, name.encode())
    assert dial().call(wire.Ping()).status == Status.OK
    assert on_main_port(node, client_ctx, lambda p: p.get(ns, 1)) == (1, name.encode())
    assert wire.decode_count(bystander.call(wire.Delete(ns, (1,))).payload) == 1
    assert node.alive()


def test_requests_before_a_bad_one_are_answered(dial) -> None:
    """In one burst, what precedes a bad frame is served; what follows it is not."""
    ns = Namespace.page("dp-before-bad")
    c = dial()
    c.send(wire.encode_request(1, wire.Put(ns, Item(1, 1, b"kept")))
           + wire.encode_request(2, wire.Get(ns, 1))
           + frame(Op.GET, 3, ns_raw(b"") + bytes(8))
           + wire.encode_request(4, wire.Put(ns, Item(2, 1, b"never"))))
    first, second, third = c.recv_raw(), c.recv_raw(), c.recv_raw()
    assert first is not None and first[:3] == (Op.PUT, Status.OK, 1)
    assert second is not None and second[:3] == (Op.GET, Status.OK, 2)
    assert wire.decode_get(second[3]) == (1, b"kept")
    assert third is not None and third[:3] == (Op.GET, Status.BAD_REQUEST, 3)
    try:
        assert c.recv_raw() is None  # the request after the bad one is not served
    except ConnectionResetError:
        pass  # its bytes were still unread when the server closed
    f = dial().call(wire.BatchGet(ns, (1, 2)))
    assert wire.decode_batch_get(f.payload) == [(1, b"kept"), None]
    dial().call(wire.Delete(ns, (1,)))


# Fuzzing ----------------------------------------------------------------------------

_FZ_NS = st.sampled_from([Namespace.page("dp-fz-a"), Namespace.page("dp-fz-b"),
                          Namespace.chunk("dp-fz-a"), Namespace.chunk("dp-fz-c")])
_FZ_KEYS = st.integers(0, 20)
_FZ_ITEMS = st.builds(Item, _FZ_KEYS, st.integers(0, 3), st.binary(max_size=48))
_FZ_REQUESTS = st.one_of(
    st.just(wire.Ping()),
    st.builds(wire.Get, _FZ_NS, _FZ_KEYS),
    st.builds(wire.Put, _FZ_NS, _FZ_ITEMS),
    st.builds(wire.BatchGet, _FZ_NS, st.lists(_FZ_KEYS, max_size=4).map(tuple)),
    st.builds(wire.BatchPut, _FZ_NS, st.lists(_FZ_ITEMS, max_size=3).map(tuple)),
    st.builds(wire.Delete, _FZ_NS, st.lists(_FZ_KEYS, max_size=4).map(tuple)),
    st.just(wire.Stat()), st.just(wire.ListNs()),
    st.builds(wire.ListKeys, _FZ_NS, _FZ_KEYS, st.integers(1, 10), st.booleans()),
    st.builds(wire.DropNs, _FZ_NS),
)


@st.composite
def _streams(draw) -> bytes:
    """Random bytes, or valid frames with a few random mutations."""
    if draw(st.integers(0, 3)) == 0:
        return draw(st.binary(max_size=300))
    reqs = draw(st.lists(st.tuples(st.integers(0, 2**64 - 1), _FZ_REQUESTS), min_size=1,
                         max_size=4))
    data = bytearray(b"".join(wire.encode_request(rid, r) for rid, r in reqs))
    for _ in range(draw(st.integers(0, 3))):
        if not data:
            break
        i = draw(st.integers(0, len(data) - 1))
        how = draw(st.sampled_from(["flip", "set", "truncate", "insert", "append", "length"]))
        if how == "flip":
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif how == "set":
            data[i] = draw(st.integers(0, 255))
        elif how == "truncate":
            del data[i:]
        elif how == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif how == "append":
            data += draw(st.binary(min_size=1, max_size=32))
        else:
            data[0:4] = struct.pack(">I", draw(st.one_of(
                st.integers(0, 64), st.integers(0, 2**32 - 1),
                st.just(wire.MAX_FRAME), st.just(wire.MAX_FRAME + 1))))
    return bytes(data)


def _served(op: int, payload: bytes) -> wire.Request | None:
    """The request the data port serves for a whole frame, None for BAD_REQUEST."""
    try:
        req = wire.decode_request(wire.Frame(op, 0, 0, payload))
    except ProtocolError:
        return None
    return req if op in DATA_OPS else None


def _expected(stream: bytes) -> tuple[list[tuple[int, int, wire.Request | None]], bool, bool]:
    """What the data port answers to ``stream``, read as its framing rules say.

    Returns:
        ``(answers, closes, leftover)``: per answer its op, request id and the
        request served (None: BAD_REQUEST); whether the server then closes; and
        whether an incomplete frame is left waiting for more bytes.
    """
    out: list[tuple[int, int, wire.Request | None]] = []
    pos = 0
    while len(stream) - pos >= wire.HEADER_SIZE:
        length, op, status, reserved, rid = wire.HEADER.unpack_from(stream, pos)
        if not wire.MIN_LENGTH <= length <= wire.MAX_FRAME or op not in set(Op) or reserved \
                or status:
            out.append((op, rid, None))
            return out, True, False
        end = pos + 4 + length
        if end > len(stream):
            return out, False, True
        req = _served(op, stream[pos + wire.HEADER_SIZE:end])
        out.append((op, rid, req))
        if req is None:
            return out, True, False
        pos = end
    return out, False, pos != len(stream)


def _check_answer(req: wire.Request, status: int, payload: bytes) -> None:
    """A served request's answer is one of those its opcode may give, well formed."""
    if status == Status.FORBIDDEN:
        assert not isinstance(req, wire.Ping)
        return
    if isinstance(req, wire.Ping):
        assert status == Status.OK and wire.decode_u64(payload) > 0
    elif isinstance(req, wire.Get):
        assert status in (Status.OK, Status.NOT_FOUND)
        if status == Status.OK:
            wire.decode_get(payload)
    elif isinstance(req, wire.Put):
        assert status in (Status.OK, Status.FULL, Status.STALE) and payload == b""
    elif isinstance(req, wire.BatchGet):
        assert status == Status.OK and len(wire.decode_batch_get(payload)) == len(req.keys)
    elif isinstance(req, wire.BatchPut):
        assert status in (Status.OK, Status.FULL)
        if status == Status.OK:
            assert len(wire.decode_statuses(payload)) == len(req.items)
    else:
        assert isinstance(req, wire.Delete) and status == Status.OK
        assert wire.decode_count(payload) <= len(req.keys)


def test_fuzzed_bytes_are_answered_or_closed_never_hung(node: NodeProcess, dial,
                                                        client_ctx: ssl.SSLContext) -> None:
    """Random and mutated bytes get exactly the answers the framing rules predict."""
    ns = Namespace.page("dp-fz-watch")
    watcher = dial()
    assert watcher.call(wire.Put(ns, Item(1, 1, b"steady"))).status == Status.OK

    @settings(max_examples=250)
    @given(stream=_streams())
    def one_stream(stream: bytes) -> None:
        answers, closes, leftover = _expected(stream)
        with dial() as c:
            c.send(stream)
            for i, (op, rid, req) in enumerate(answers):
                try:
                    got = c.recv_raw()
                except ConnectionResetError:
                    # Bytes after a bad frame were unread when the server closed.
                    assert closes and i == len(answers) - 1
                    return
                assert got is not None, f"closed before answer {i} of {answers}"
                got_op, status, got_rid, payload = got
                assert (got_op, got_rid) == (op, rid)
                if req is None:
                    assert status == Status.BAD_REQUEST
                else:
                    assert status != Status.BAD_REQUEST, payload
                    _check_answer(req, status, payload)
            if closes:
                try:
                    assert c.at_eof()
                except ConnectionResetError:
                    pass
            elif not leftover:
                # Nothing pending: the connection still serves.
                f = c.call(wire.Ping())
                assert f.status == Status.OK

    one_stream()
    f = watcher.call(wire.Get(ns, 1))
    assert wire.decode_get(f.payload) == (1, b"steady")
    assert dial().call(wire.Ping()).status == Status.OK
    assert on_main_port(node, client_ctx, lambda p: p.get(ns, 1)) == (1, b"steady")
    assert node.alive()


# Identity ---------------------------------------------------------------------------


@pytest.mark.parametrize("who", ["no-certificate", "self-signed", "foreign-ca"])
def test_client_the_cluster_ca_did_not_sign_is_refused(
        who: str, node: NodeProcess, page_port: int, dial, config: Config,
        tmp_path: Path) -> None:
    """Mutual TLS: no certificate, a self-signed one or a foreign CA's is refused."""
    ns = Namespace.page("dp-mtls")
    good = dial()
    assert good.call(wire.Put(ns, Item(1, 1, b"secret"))).status == Status.OK
    if who == "no-certificate":
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(cafile=str(config.cluster_dir / "ca.pem"))
    elif who == "self-signed":
        # It names a real member; only the signature is wrong.
        ctx = self_signed_context(config, tmp_path / "self", "test-host")
    else:
        foreign = Config(home=tmp_path / "foreign")
        ClusterCA.init(foreign, name="foreign")
        issue_node_cert(foreign, "test-host", sans=["127.0.0.1"])
        (foreign.cluster_dir / "ca.pem").write_bytes(
            (config.cluster_dir / "ca.pem").read_bytes())  # it trusts our server
        ctx = client_ssl_context(foreign, node="test-host")
    assert refused(node, page_port, ctx)
    f = good.call(wire.Get(ns, 1))
    assert wire.decode_get(f.payload) == (1, b"secret")
    assert wire.decode_count(good.call(wire.Delete(ns, (1,))).payload) == 1


# Chunks on disk ----------------------------------------------------------------------


@pytest.mark.parametrize("fsync", [True, False], ids=["fsync", "no-fsync"])
def test_chunks_written_on_the_data_port_survive_a_restart(
        start_node, client_ctx: ssl.SSLContext, tmp_path: Path, fsync: bool) -> None:
    """Chunks acknowledged by the data port are there after SIGTERM and a new
    daemon on the same directory, on both ports, with their versions."""
    data = tmp_path / "restart-data"
    ns = Namespace.chunk("dp-restart")
    blobs = {k: os.urandom(4096 + 29) for k in range(200)}
    node = start_node("dp-restart", data_dir=data, fsync=fsync)
    with DataConn(node, page_port_of(node, client_ctx), client_ctx) as c:
        keys = list(blobs)
        for i in range(0, len(keys), 64):
            f = c.call(wire.BatchPut(ns, tuple(Item(k, 1, blobs[k]) for k in keys[i:i + 64])))
            assert wire.decode_statuses(f.payload) == [Status.OK] * len(keys[i:i + 64])
        for k in range(0, 200, 2):  # a second version of half of them
            blobs[k] = os.urandom(4096 + 29)
            assert c.call(wire.Put(ns, Item(k, 2, blobs[k]))).status == Status.OK
        assert wire.decode_count(c.call(wire.Delete(ns, tuple(range(190, 200)))).payload) == 10
    assert node.stop() == 0
    node = start_node("dp-restart", port=node.address[1], data_dir=data, fsync=fsync)
    with DataConn(node, page_port_of(node, client_ctx), client_ctx) as c:
        got = wire.decode_batch_get(c.call(wire.BatchGet(ns, tuple(range(200)))).payload)
    assert got == [((2 if k % 2 == 0 else 1), blobs[k]) if k < 190 else None
                   for k in range(200)]
    stat = on_main_port(node, client_ctx, lambda p: p.stat())
    assert (stat.disk_used, stat.chunks) == (190 * (4096 + 29), 190)
    assert on_main_port(node, client_ctx, lambda p: p.get(ns, 4)) == (2, blobs[4])


def test_a_data_directory_of_the_old_layout_is_served_after_an_upgrade(
        start_node, client_ctx: ssl.SSLContext, host_identity: str, tmp_path: Path) -> None:
    """One file per chunk (as older peers wrote them): converted at start, then
    served on both ports to their owner, and the old files are gone."""
    data = tmp_path / "old-data"
    (data / "dp-old").mkdir(parents=True)
    (data / "dp-old" / "owner").write_text(host_identity)
    blobs = {k: os.urandom(4096 + 29) for k in (0, 1, 2**40, 2**64 - 1)}
    for k, blob in blobs.items():
        (data / "dp-old" / f"{k:016x}").write_bytes(struct.pack(">4sQI", b"OMCH", 7,
                                                                len(blob)) + blob)
    node = start_node("dp-upgrade", data_dir=data)
    ns = Namespace.chunk("dp-old")
    with DataConn(node, page_port_of(node, client_ctx), client_ctx) as c:
        got = wire.decode_batch_get(c.call(wire.BatchGet(ns, tuple(blobs))).payload)
    assert got == [(7, b) for b in blobs.values()]
    assert on_main_port(node, client_ctx, lambda p: p.list(ns)) == [(k, 7) for k in sorted(blobs)]
    assert sorted(p.name for p in (data / "dp-old").iterdir()) == ["owner", "slots-4125"]


def test_chunk_corrupted_on_disk_is_an_internal_error_not_data(
        start_node, client_ctx: ssl.SSLContext, tmp_path: Path) -> None:
    """A slot whose bytes changed on disk under the daemon: GET and BATCH_GET on
    the data port answer INTERNAL (the connection stays usable), the main port
    too; the other chunks are served."""
    data = tmp_path / "corrupt-data"
    mport = free_port()
    node = start_node("dp-corrupt", data_dir=data, metrics=mport)
    ns = Namespace.chunk("dp-corrupt")
    with DataConn(node, page_port_of(node, client_ctx), client_ctx) as c:
        assert c.call(wire.BatchPut(ns, (Item(1, 1, b"a" * 1000), Item(2, 1, b"b" * 1000)))
                      ).status == Status.OK
        slots = data / "dp-corrupt" / "slots-1000"
        with open(slots, "r+b") as fh:  # the first slot: key 1
            fh.seek(40 + 10)
            fh.write(b"X")
        for req in (wire.Get(ns, 1), wire.BatchGet(ns, (2, 1))):
            f = c.call(req)
            assert f.status == Status.INTERNAL and b"check" in f.payload
        assert c.call(wire.Ping()).status == Status.OK
        assert wire.decode_get(c.call(wire.Get(ns, 2)).payload) == (1, b"b" * 1000)

    async def main_side(p: PeerClient) -> int:
        frame = await p.call(wire.Get(ns, 1))
        return frame.status

    assert on_main_port(node, client_ctx, main_side) == Status.INTERNAL
    samples = scrape(mport)
    assert samples[("omega_node_errors_total", (("cause", "store"),))] == 3


# The daemon -------------------------------------------------------------------------


def test_page_port_flag(serve_with, start_node, client_ctx: ssl.SSLContext) -> None:
    """``--page-port``: -1 turns it off, N picks it, a taken port stops the daemon."""
    off = serve_with("dp-flag-off", "--page-port", "-1")
    assert isinstance(off, NodeProcess)
    assert page_port_of(off, client_ctx) == 0
    # The main port still serves pages.
    assert on_main_port(off, client_ctx, lambda p: p.put(PAGES, 1, 1, b"x")) is None

    wanted = free_port()
    fixed = serve_with("dp-flag-fixed", "--page-port", str(wanted))
    assert isinstance(fixed, NodeProcess)
    assert page_port_of(fixed, client_ctx) == wanted
    with DataConn(fixed, wanted, client_ctx) as c:
        assert c.call(wire.Ping()).status == Status.OK

    # Nothing lent, nothing to serve: no data port.
    assert page_port_of(start_node("dp-flag-nolend", memory_lend=0, disk_lend=0),
                        client_ctx) == 0
    # Disk only: the data port serves its chunks (and has no room for pages).
    disk_only = start_node("dp-flag-disk", memory_lend=0, disk_lend=1 << 20)
    with DataConn(disk_only, page_port_of(disk_only, client_ctx), client_ctx) as c:
        chunks = Namespace.chunk("dp-flag")
        assert c.call(wire.Put(chunks, Item(1, 1, b"c" * 4096))).status == Status.OK
        assert wire.decode_get(c.call(wire.Get(chunks, 1)).payload) == (1, b"c" * 4096)
        assert c.call(wire.Put(PAGES, Item(1, 1, b"p"))).status == Status.FULL

    # A port that is taken: the daemon says so and exits.
    taken = serve_with("dp-flag-taken", "--page-port", str(wanted))
    assert isinstance(taken, subprocess.Popen) and taken.returncode == 1
    assert "data port" in _log_of(taken)


def _log_of(proc: subprocess.Popen[str]) -> str:
    """The stderr log :func:`serve_with` kept for ``proc``."""
    name = proc.args[proc.args.index("--name") + 1]
    data = Path(proc.args[proc.args.index("--data") + 1])
    return (data.parent / f"{name}.log").read_text(errors="replace")


def _ended(read: Callable[[], object]) -> bool:
    """Whether a connection's next read shows it closed (end of stream, alert or reset)."""
    try:
        return read() in (None, b"")
    except (ssl.SSLError, ConnectionResetError):
        return True


def _drain(sock: socket.socket) -> bytes:
    """Read a plain socket to its end (a reset counts as the end)."""
    out = b""
    try:
        while data := sock.recv(4096):
            out += data
    except ConnectionResetError:
        pass
    return out


def test_sigterm_with_data_port_connections_open_exits_cleanly(
        start_node, client_ctx: ssl.SSLContext) -> None:
    """SIGTERM ends idle, half-sent and unhandshaken connections; exit status 0."""
    node = start_node("dp-term")
    port = page_port_of(node, client_ctx)
    idle = DataConn(node, port, client_ctx)
    assert idle.call(wire.Ping()).status == Status.OK  # handshake done, then silence
    partial = DataConn(node, port, client_ctx)
    partial.send(wire.encode_request(1, wire.Put(PAGES, Item(1, 1, b"x" * 1000)))[:100])
    bare = socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT)  # no handshake
    try:
        os.kill(node.pid, signal.SIGTERM)
        assert node.proc.wait(IO_TIMEOUT) == 0
        assert _ended(idle.recv) and _ended(partial.recv_raw)
        # The one that never began its handshake gets at most a TLS alert, then the end.
        assert len(_drain(bare)) < 64
    finally:
        idle.close()
        partial.close()
        bare.close()
    log = node.log_path.read_text(errors="replace")
    assert "Traceback" not in log


def test_sigterm_closes_an_idle_data_port_connection_with_close_notify(
        start_node, client_ctx: ssl.SSLContext) -> None:
    """Like the main port, the data port ends its connections with a TLS close_notify."""
    node = start_node("dp-term-clean")
    port = page_port_of(node, client_ctx)
    with DataConn(node, port, client_ctx) as idle:
        assert idle.call(wire.Ping()).status == Status.OK
        os.kill(node.pid, signal.SIGTERM)
        assert node.proc.wait(IO_TIMEOUT) == 0
        assert idle.recv() is None  # a TLS close_notify: the end of the stream


def test_metrics_count_the_data_port(start_node, client_ctx: ssl.SSLContext,
                                     config: Config) -> None:
    """The Prometheus endpoint adds the data port's counters to the main port's."""
    mport = free_port()
    node = start_node("dp-metrics", metrics=mport)
    port = page_port_of(node, client_ctx)

    async def main_side(p: PeerClient) -> None:
        await p.put(PAGES, 1, 1, b"m" * 4096)
        assert await p.get(PAGES, 1) == (1, b"m" * 4096)

    on_main_port(node, client_ctx, main_side)
    chunks = Namespace.chunk("dp-metrics")
    with DataConn(node, port, client_ctx) as c:
        for key in (1, 1, 1, 1, 2):
            c.call(wire.Get(PAGES, key))
        c.call(wire.BatchGet(PAGES, (1, 2)))
        c.call(wire.Put(PAGES, Item(3, 1, b"d" * 100)))
        c.call(wire.Ping())
        c.call(wire.BatchPut(chunks, (Item(1, 1, b"c" * 300), Item(2, 1, b"c" * 200))))
        c.call(wire.Get(chunks, 1))
        c.call(wire.Get(chunks, 9))
        c.call(wire.Delete(chunks, (2,)))
        samples = scrape(mport)
        assert samples[("omega_node_connections", ())] >= 1
    for op, n in (("BATCH_PUT", 1), ("GET", 2), ("DELETE", 1)):
        assert samples[("omega_node_ops_total", (("kind", "chunk"), ("op", op)))] == n
    assert samples[("omega_node_bytes_total", (("direction", "in"), ("kind", "chunk")))] == 500
    assert samples[("omega_node_bytes_total", (("direction", "out"), ("kind", "chunk")))] == 300
    assert samples[("omega_node_used_bytes", (("kind", "chunk"),))] == 300
    assert samples[("omega_node_ops_total", (("kind", "page"), ("op", "GET")))] == 1 + 5
    assert samples[("omega_node_ops_total", (("kind", "page"), ("op", "BATCH_GET")))] == 1
    assert samples[("omega_node_ops_total", (("kind", "page"), ("op", "PUT")))] == 2
    assert samples[("omega_node_ops_total", (("kind", "node"), ("op", "PING")))] == 1
    assert samples[("omega_node_bytes_total", (("direction", "out"), ("kind", "page")))] == \
        4096 + 4 * 4096 + 4096
    assert samples[("omega_node_bytes_total", (("direction", "in"), ("kind", "page")))] == \
        4096 + 100
    assert samples[("omega_node_used_bytes", (("kind", "page"),))] == 4096 + 100

    with DataConn(node, port, client_ctx) as bad:
        bad.send(frame(0x7F, 1))
        assert bad.recv_raw()[1] == Status.BAD_REQUEST
    bare = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    bare.load_verify_locations(cafile=str(config.cluster_dir / "ca.pem"))
    assert refused(node, port, bare)
    errors = wait_for(lambda: (s := scrape(mport)) and s[
        ("omega_node_errors_total", (("cause", "handshake"),))] >= 1 and s,
        what="the refused handshake to be counted")
    assert errors[("omega_node_errors_total", (("cause", "protocol"),))] == 1


def test_batch_get_whose_answer_exceeds_the_frame_limit_is_refused(
        start_node, client_ctx: ssl.SSLContext) -> None:
    """Four MAX_BLOB pages asked for at once would make an answer no client
    decodes: both ports refuse it with BAD_REQUEST instead of sending it (or,
    as the main port did, never answering)."""
    node = start_node("dp-huge", memory_lend=5 * wire.MAX_BLOB)
    ns = Namespace.page("huge")
    big = bytes(wire.MAX_BLOB)
    c = DataConn(node, page_port_of(node, client_ctx), client_ctx)
    try:
        for k in range(4):
            assert c.call(wire.Put(ns, Item(k, 1, big))).status == Status.OK
        assert c.call(wire.BatchGet(ns, (0, 1, 2))).status == Status.OK  # just below
        f = c.call(wire.BatchGet(ns, (0, 1, 2, 3)))
        assert f.status == Status.BAD_REQUEST and b"frame limit" in f.payload
        assert c.at_eof()
    finally:
        c.close()

    async def main_port(p: PeerClient) -> tuple[int, bytes]:
        frame = await p.call(wire.BatchGet(ns, (0, 1, 2, 3)))
        return frame.status, frame.payload

    status, why = on_main_port(node, client_ctx, main_port)
    assert status == Status.BAD_REQUEST and b"frame limit" in why
