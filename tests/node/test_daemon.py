"""The node daemon as a real process, over real mutual TLS."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import ssl
import struct
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from hypervisor.config import Config
from hypervisor.errors import PeerError
from hypervisor.node import wire
from hypervisor.node.client import (
    PeerClient,
    PeerFullError,
    PeerPool,
    StaleVersionError,
)
from hypervisor.node.wire import Namespace, Op, Status
from hypervisor.security import ClusterCA, client_ssl_context, issue_node_cert

from .conftest import free_port

PAGES = Namespace.page("vm-test")
CHUNKS = Namespace.chunk("export-test")


def client_of(node, ctx, **kw) -> PeerClient:
    return PeerClient(node.address, ctx, server_name=node.name, **kw)


@pytest.mark.parametrize("ns", [PAGES, CHUNKS], ids=["page", "chunk"])
async def test_put_get_batch_list_delete_drop(start_node, client_ctx, ns: Namespace) -> None:
    node = start_node("peer-ops")
    c = client_of(node, client_ctx)
    try:
        await c.put(ns, 70, 1, b"a" * 4096)
        assert await c.get(ns, 70) == (1, b"a" * 4096)
        assert await c.get(ns, 71) is None
        statuses = await c.batch_put(ns, [(k, 2, bytes([k]) * 100) for k in range(10)])
        assert statuses == [Status.OK] * 10
        got = await c.batch_get(ns, [0, 5, 9, 1000])
        assert got == [(2, b"\0" * 100), (2, b"\5" * 100), (2, b"\x09" * 100), None]
        expected = [*[(k, 2) for k in range(10)], (70, 1)]
        assert await c.list(ns) == expected
        assert await c.list(ns, page_size=3) == expected  # paged
        assert await c.delete(ns, [0, 1, 1000]) == 2
        stat = await c.stat()
        assert stat.name == "peer-ops"
        used = stat.memory_used if ns.kind is wire.NsKind.PAGE else stat.disk_used
        assert used == 4096 + 8 * 100
        infos = {str(i.ns): (i.keys, i.bytes) for i in await c.list_ns()}
        assert infos[str(ns)] == (9, 4096 + 800)
        assert await c.drop_ns(ns) == 9
        assert await c.list(ns) == [] and await c.get(ns, 70) is None
        assert await c.ping() > 0
    finally:
        await c.close()


async def test_full_peer_says_so(start_node, client_ctx) -> None:
    node = start_node("peer-full", memory_lend=10_000, disk_lend=10_000)
    c = client_of(node, client_ctx)
    try:
        for ns in (PAGES, CHUNKS):
            await c.put(ns, 1, 1, b"x" * 8_000)
            with pytest.raises(PeerFullError, match="FULL"):
                await c.put(ns, 2, 1, b"x" * 4_000)
            with pytest.raises(PeerFullError):
                await c.batch_put(ns, [(3, 1, b"y" * 1_000), (4, 1, b"y" * 1_500)])
            assert await c.get(ns, 2) is None and await c.get(ns, 3) is None
            assert await c.get(ns, 1) == (1, b"x" * 8_000)
    finally:
        await c.close()


async def test_stale_put_is_refused(start_node, client_ctx) -> None:
    node = start_node("peer-stale")
    c = client_of(node, client_ctx)
    try:
        await c.put(CHUNKS, 1, 5, b"new")
        with pytest.raises(StaleVersionError):
            await c.put(CHUNKS, 1, 4, b"old")
        assert await c.get(CHUNKS, 1) == (5, b"new")
    finally:
        await c.close()


async def test_many_requests_in_flight_on_one_connection(start_node, client_ctx) -> None:
    node = start_node("peer-pipe")
    c = client_of(node, client_ctx)
    try:
        await c.batch_put(PAGES, [(k, 1, k.to_bytes(4, "big") * 1024) for k in range(256)])
        await c.batch_put(CHUNKS, [(k, 1, k.to_bytes(4, "big") * 1024) for k in range(64)])
        keys = [k % 256 for k in range(3000)]
        page_calls = [c.get(PAGES, k) for k in keys]
        chunk_calls = [c.get(CHUNKS, k % 64) for k in range(500)]
        results = await asyncio.gather(*page_calls, *chunk_calls)
        for k, got in zip(keys + [k % 64 for k in range(500)], results):
            assert got == (1, k.to_bytes(4, "big") * 1024)
        assert c.inflight == 0
    finally:
        await c.close()


async def test_killed_peer_gives_peer_error_and_restart_recovers(start_node, client_ctx,
                                                                  tmp_path: Path) -> None:
    data = tmp_path / "kill-data"
    node = start_node("peer-kill", data_dir=data)
    # Long timeouts: the errors below must come from the dead connection, not a timer.
    c = client_of(node, client_ctx, connect_timeout=60, request_timeout=60)
    try:
        await c.put(CHUNKS, 1, 1, b"kept" * 1000)
        await c.put(PAGES, 1, 1, b"lost")
        in_flight = [asyncio.ensure_future(c.get(PAGES, 1)) for _ in range(50)]
        node.kill()
        results = await asyncio.gather(*in_flight, return_exceptions=True)
        for r in results:
            assert r == (1, b"lost") or isinstance(r, PeerError)
        with pytest.raises(PeerError) as err:
            await c.get(PAGES, 1)
        assert "no answer within" not in str(err.value)
        with pytest.raises(PeerError, match="refused"):
            await c.get(PAGES, 1)

        start_node("peer-kill", port=node.address[1], data_dir=data)
        # The client reconnects by itself; chunks were on disk, pages were in RAM.
        assert await c.get(CHUNKS, 1) == (1, b"kept" * 1000)
        assert await c.get(PAGES, 1) is None
    finally:
        await c.close()


async def test_foreign_certificate_is_refused_and_others_unaffected(
        start_node, client_ctx, config: Config, tmp_path: Path) -> None:
    node = start_node("peer-mtls")
    good = client_of(node, client_ctx)
    foreign_cfg = Config(home=tmp_path / "foreign")
    ClusterCA.init(foreign_cfg, name="foreign")
    issue_node_cert(foreign_cfg, "test-host", sans=["127.0.0.1"])
    # The intruder trusts our CA, so only the server's check can stop it.
    (foreign_cfg.cluster_dir / "ca.pem").write_bytes((config.cluster_dir / "ca.pem").read_bytes())
    intruder = client_of(node, client_ssl_context(foreign_cfg, node="test-host"),
                         connect_timeout=10, request_timeout=10)
    try:
        await good.put(PAGES, 1, 1, b"secret")
        with pytest.raises(PeerError):
            await intruder.get(PAGES, 1)
        # Without any client certificate at all.
        bare = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        bare.load_verify_locations(cafile=str(config.cluster_dir / "ca.pem"))
        anonymous = client_of(node, bare, connect_timeout=10, request_timeout=10)
        with pytest.raises(PeerError):
            await anonymous.get(PAGES, 1)
        await anonymous.close()
        assert await good.get(PAGES, 1) == (1, b"secret")
    finally:
        await good.close()
        await intruder.close()


async def _raw_tls(node, ctx: ssl.SSLContext):
    return await asyncio.open_connection(node.address[0], node.address[1], ssl=ctx,
                                         server_hostname=node.name)


async def test_malformed_frames_close_only_that_connection(start_node, client_ctx) -> None:
    node = start_node("peer-fuzz")
    good = client_of(node, client_ctx)
    try:
        await good.put(PAGES, 1, 1, b"v")
        busy = [asyncio.ensure_future(good.get(PAGES, 1)) for _ in range(200)]

        # 1. A readable header with a bad payload: one BAD_REQUEST answer, then close.
        reader, writer = await _raw_tls(node, client_ctx)
        bad = struct.pack(">IBBHQ", 12 + 3, Op.GET, 0, 0, 42) + b"\x00\x05a"
        writer.write(bad)
        await writer.drain()
        head = await asyncio.wait_for(reader.readexactly(wire.HEADER_SIZE), 30)
        length, op, status, _, rid = wire.HEADER.unpack(head)
        assert (op, status, rid) == (Op.GET, Status.BAD_REQUEST, 42)
        await asyncio.wait_for(reader.readexactly(length - 12), 30)
        assert await asyncio.wait_for(reader.read(), 30) == b""  # closed
        writer.close()

        # 2. Garbage: closed without an answer.
        reader, writer = await _raw_tls(node, client_ctx)
        writer.write(os.urandom(64) + b"\xff" * 64)
        await writer.drain()
        assert await asyncio.wait_for(reader.read(), 30) == b""
        writer.close()

        # 3. Plain TCP junk at a TLS port.
        r2, w2 = await asyncio.open_connection(*node.address)
        w2.write(b"GET / HTTP/1.0\r\n\r\n")
        await w2.drain()
        try:  # refused: closed (FIN) or reset (RST, junk left unread)
            data = await asyncio.wait_for(r2.read(), 30)
            assert b"HTTP" not in data and len(data) < 100  # at most a TLS alert
        except ConnectionResetError:
            pass
        w2.close()

        assert all(r == (1, b"v") for r in await asyncio.gather(*busy))
        assert await good.get(PAGES, 1) == (1, b"v")
        assert node.alive()
    finally:
        await good.close()


async def test_unresponsive_peer_times_out(client_ctx) -> None:
    # A listener that never answers the TLS handshake.
    port = free_port()
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", port))
    lsock.listen()
    try:
        c = PeerClient(("127.0.0.1", port), client_ctx, server_name="nobody",
                       connect_timeout=0.5, request_timeout=0.5)
        with pytest.raises(PeerError, match="no connection within"):
            await c.ping()
        await c.close()
    finally:
        lsock.close()


async def test_sigterm_drains_then_closes(start_node, client_ctx, tmp_path: Path) -> None:
    data = tmp_path / "drain-data"
    node = start_node("peer-drain", data_dir=data)
    c = client_of(node, client_ctx, request_timeout=60)
    try:
        await c.connect()
        puts = [asyncio.ensure_future(c.put(CHUNKS, k, 1, bytes([k % 256]) * 65536))
                for k in range(200)]
        await asyncio.sleep(0)  # let them be written
        os.kill(node.pid, signal.SIGTERM)
        results = await asyncio.gather(*puts, return_exceptions=True)
        acked = [k for k, r in enumerate(results) if r is None]
        for r in results:
            assert r is None or isinstance(r, PeerError)
        exit_status = await asyncio.get_running_loop().run_in_executor(None, node.proc.wait, 30)
        assert exit_status == 0
    finally:
        await c.close()
    node2 = start_node("peer-drain", data_dir=data)
    c2 = client_of(node2, client_ctx)
    try:
        keys = {k for k, _ in await c2.list(CHUNKS)}
        assert set(acked) <= keys  # nothing acknowledged was lost
    finally:
        await c2.close()


async def test_pool_measures_rtt_and_tracks_health(start_node, client_ctx) -> None:
    a, b = start_node("pool-a"), start_node("pool-b")
    pool = PeerPool(client_ctx, connect_timeout=5, request_timeout=5)
    pool.add("pool-a", a.address)
    pool.add("pool-b", b.address)
    try:
        rtts = await pool.measure(samples=3)
        assert set(rtts) == {"pool-a", "pool-b"} and all(r and r > 0 for r in rtts.values())
        assert sorted(pool.healthy()) == ["pool-a", "pool-b"]
        b.kill()
        rtts = await pool.measure(samples=1)
        assert rtts["pool-b"] is None and pool.healthy() == ["pool-a"]
        assert pool.health("pool-b").failures == 1
        with pytest.raises(PeerError):
            await pool.client("pool-b").get(PAGES, 1)
        with pytest.raises(PeerError):
            pool.client("nope")
    finally:
        await pool.close()


def test_metrics_endpoint(start_node, client_ctx) -> None:
    mport = free_port()
    node = start_node("peer-metrics", metrics=mport)

    async def work() -> None:
        c = client_of(node, client_ctx)
        await c.put(PAGES, 1, 1, b"x" * 4096)
        await c.get(PAGES, 1)
        await c.put(CHUNKS, 1, 1, b"y" * 100)
        await c.close()

    asyncio.run(work())
    text = urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=30).read().decode()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(text) for s in fam.samples}
    assert samples[("omega_node_ops_total", (("kind", "page"), ("op", "PUT")))] == 1
    assert samples[("omega_node_bytes_total", (("direction", "out"), ("kind", "page")))] == 4096
    assert samples[("omega_node_used_bytes", (("kind", "chunk"),))] == 100
    assert samples[("omega_node_capacity_bytes", (("kind", "page"),))] == 64 << 20


def test_serve_cli_errors(omega, config: Config, cluster_ca: ClusterCA) -> None:
    r = omega("node", "serve", "--name", "no-cert-node", "--listen", "127.0.0.1:0")
    assert r.returncode == 1 and "omega cluster join no-cert-node" in r.stderr
    r = omega("node", "serve", "--name", "x", "--listen", "nonsense")
    assert r.returncode == 2 and "HOST:PORT" in r.stderr
    r = omega("node", "serve", "--name", "x", "--listen", "127.0.0.1:0", "--memory-lend", "lots")
    assert r.returncode == 2 and "--memory-lend" in r.stderr


async def test_calls_after_a_connection_closes_reconnect(start_node, client_ctx) -> None:
    """Calls made while the old connection is still closing go out on a new one."""
    node = start_node("peer-reconnect")
    c = client_of(node, client_ctx, request_timeout=60)
    try:
        await c.put(PAGES, 1, 1, b"v")
        for _ in range(20):
            old = c._protocol
            assert old is not None and old.transport is not None
            old.transport.close()  # closing: its connection_lost comes after the peer's FIN
            results = await asyncio.gather(*(c.get(PAGES, 1) for _ in range(20)))
            assert results == [(1, b"v")] * 20
    finally:
        await c.close()
