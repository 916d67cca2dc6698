"""Replicated exports on real peer daemons: qemu-io through the NBD server, a peer killed
mid-write, tampered and stale replicas, re-replication."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from hypervisor.config import Config
from hypervisor.netblock.exports import ExportStore
from hypervisor.netblock.replicated import ChunkPlacement, PeerLoad, ReplicatedBackend
from hypervisor.netblock.server import Export, NbdServer
from tests.netblock.peers import PeerSet, Served, healthy_pool, qemu_io

BASE_PORT = 19220


@pytest.fixture
async def served(peer_home: Config, peers: PeerSet, nbd_tmp: Path) -> AsyncIterator[Served]:
    store = ExportStore(peer_home)
    record = store.create("n-rep", 16 << 20, replicas=2, chunk_size=64 << 10)
    pool = await healthy_pool(peers)
    backend = ReplicatedBackend(record, store, pool, store.key(record), own_pool=True)
    server = NbdServer({"n-rep": Export.of("n-rep", backend)})
    sock = nbd_tmp / "rep.sock"
    await server.listen_unix(sock)
    yield Served(server, sock, backend)
    await server.shutdown()
    store.close()


async def test_replicated_io_and_placement(served: Served, peers: PeerSet) -> None:
    uri = served.uri("n-rep")
    await qemu_io(uri, "write -P 0x31 0 1M", "write -P 0x32 3000k 100k", "flush",
                  "read -P 0x31 0 1M", "read -P 0x32 3000k 100k", "read -P 0 1M 1M")
    states = served.backend.store.chunk_states(served.backend.record)
    # 1 MiB + 100k across a chunk boundary: 16 + 3 chunks, 2 distinct holders each
    assert len(states) == 19
    assert all(len(set(s.peers)) == 2 for s in states.values())
    # chunks are spread over all three peers
    assert {p for s in states.values() for p in s.peers} == {"n-p1", "n-p2", "n-p3"}
    # trim frees chunks on peers: holes again
    await qemu_io(uri, "discard 0 512k", "read -P 0 0 512k", "read -P 0x31 512k 512k", "flush")
    holes = served.backend.store.chunk_states(served.backend.record)
    assert sum(1 for s in holes.values() if s.peers) == 11
    for peer in ("n-p1", "n-p2", "n-p3"):
        keys = await served.backend.pool.client(peer).list(served.backend.ns)
        assert all(k >= 8 for k, _ in keys), keys


async def test_peer_killed_mid_write_then_repair(served: Served, peers: PeerSet,
                                                 nbd_tmp: Path) -> None:
    uri = served.uri("n-rep")
    data = os.urandom(12 << 20)
    src = nbd_tmp / "src.raw"
    src.write_bytes(data)
    copy = asyncio.create_subprocess_exec(
        "qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", "-W", str(src), uri,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    proc = await copy
    stats = served.backend.peer_stats
    while sum(st.puts for st in stats.values()) < 60 and proc.returncode is None:
        await asyncio.sleep(0.005)
    peers.kill("n-p2")  # SIGKILL while writes are in flight
    puts_at_kill = sum(st.puts for st in stats.values())
    out = (await proc.communicate())[0].decode()
    assert sum(st.puts for st in stats.values()) > puts_at_kill + 60  # writes went on
    assert proc.returncode == 0, out
    await qemu_io(uri, "flush")
    back = nbd_tmp / "back.raw"
    proc = await asyncio.create_subprocess_exec(
        "qemu-img", "convert", "-f", "raw", "-O", "raw", uri, str(back),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    assert await proc.wait() == 0
    assert hashlib.sha256(back.read_bytes()[:12 << 20]).digest() == hashlib.sha256(data).digest()
    backend = served.backend
    await backend.pool.measure(samples=1)
    assert not backend.pool.health("n-p2").healthy
    lost = backend.under_replicated()
    assert lost  # the chunks n-p2 held (before it died) now have one live copy
    # writes during/after the kill went only to live peers
    states = backend.store.chunk_states(backend.record)
    assert all(any(p != "n-p2" for p in s.peers) for s in states.values() if s.peers)
    peers.start("n-p2")
    await backend.pool.measure(samples=1)
    result = await backend.repair()
    assert result.backlog == 0
    assert not backend.under_replicated()
    states = backend.store.chunk_states(backend.record)
    assert all(len(set(s.peers)) == 2 for s in states.values() if s.peers)
    # with two copies again, any one peer may die and every byte still reads back
    peers.kill("n-p1")
    backend._cache.clear()
    proc = await asyncio.create_subprocess_exec(
        "qemu-img", "convert", "-f", "raw", "-O", "raw", uri, str(back),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    assert await proc.wait() == 0
    assert hashlib.sha256(back.read_bytes()[:12 << 20]).digest() == hashlib.sha256(data).digest()


async def test_stale_and_tampered_replicas_are_never_served(served: Served) -> None:
    backend = served.backend
    uri = served.uri("n-rep")
    await qemu_io(uri, "write -P 0x41 0 64k")
    old_state = backend._states[0]
    holder = old_state.peers[0]
    client = backend.pool.client(holder)
    stale = await client.get(backend.ns, 0)
    await qemu_io(uri, "write -P 0x42 0 64k")
    # replay the old sealed blob onto one holder under the new version number: the AAD
    # (export id, index, version) no longer matches, so authentication fails
    new_version = backend._states[0].version
    await client.put(backend.ns, 0, new_version + 1, stale[1])
    # and put chunk 0's blob where chunk 1 should be (a swapped replica)
    await qemu_io(uri, "write -P 0x43 64k 64k")
    cur = await client.get(backend.ns, 0)
    for p in backend._states[1].peers:
        await backend.pool.client(p).put(backend.ns, 1, cur[0] + 5, cur[1])
    backend._cache.clear()
    # chunk 0: the tampered holder is skipped, the other replica serves the new data
    await qemu_io(uri, "read -P 0x42 0 64k")
    # chunk 1: every replica was swapped: an error, never chunk 0's bytes
    proc = await asyncio.create_subprocess_exec(
        "qemu-io", "-f", "raw", "-c", "read -P 0x43 64k 64k", uri,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out = (await proc.communicate())[0].decode()
    assert "Input/output error" in out, out
    # a multi-chunk read with a replayed copy on one holder of chunk 3: the bad
    # copy is refused, the good one served
    await qemu_io(uri, "write -P 0x44 128k 256k")
    st3 = backend._states[3]
    old3 = await backend.pool.client(st3.peers[0]).get(backend.ns, 3)
    await qemu_io(uri, "write -P 0x45 192k 64k")
    await backend.pool.client(backend._states[3].peers[0]).put(
        backend.ns, 3, backend._states[3].version + 1, old3[1])
    backend._cache.clear()
    await qemu_io(uri, "read -v 128k 256k", "read -P 0x44 128k 64k", "read -P 0x45 192k 64k",
                  "read -P 0x44 256k 128k")


def test_placement_is_distinct_weighted_and_stable() -> None:
    place = ChunkPlacement("e1")
    loads = [PeerLoad("a", 100 << 30, 0.0002), PeerLoad("b", 100 << 30, 0.0002),
             PeerLoad("c", 1 << 30, 0.0002), PeerLoad("d", 100 << 30, 0.05)]
    counts: dict[str, int] = {}
    for i in range(2000):
        chosen = place.choose(i, loads, 2)
        assert len(set(chosen)) == 2
        assert chosen == place.choose(i, loads, 2)
        for c in chosen:
            counts[c] = counts.get(c, 0) + 1
    assert counts["a"] > counts["c"] and counts["b"] > counts["d"]
    assert sorted(place.choose(1, loads, 3, exclude=["a", "b"])) == ["c", "d"]
    assert place.choose(1, loads, 2, need=2 << 30) and "c" not in place.choose(
        1, loads, 4, need=2 << 30)


def test_cli_serve_replicated_with_metrics_repair_delete(peer_home: Config, peers: PeerSet,
                                                         nbd_tmp: Path) -> None:
    import json
    import subprocess
    import sys
    import urllib.request

    from tests.netblock.conftest import REPO, run, start_server

    env = {**os.environ, "OMEGA_HOME": str(peer_home.home)}

    def omega(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "hypervisor.cli", *args], cwd=REPO,
                              env=env, capture_output=True, text=True, timeout=120, check=False)

    peer_args = [f"--peer={p.name}=127.0.0.1:{p.port}" for p in peers.peers.values()]
    assert omega("netblock", "create", "n-cli", "8M", "--replicas", "2").returncode == 0
    server = start_server(peer_home, nbd_tmp, "n-cli", *peer_args, "--node", "n-host",
                          "--metrics", "127.0.0.1:19203", "--no-repair")
    try:
        uri = server.uri("n-cli")
        out = run("qemu-io", "-f", "raw", "-c", "write -P 0x66 0 2M", "-c", "flush", "-c",
                  "read -P 0x66 0 2M", uri).stdout
        assert "fail" not in out.lower()
        extents = json.loads(run("nbdinfo", "--map", "--json", uri).stdout)
        assert [(e["offset"], e["length"], e["type"]) for e in extents] == [
            (0, 2 << 20, 0), (2 << 20, 6 << 20, 3)]
        metrics = urllib.request.urlopen("http://127.0.0.1:19203/metrics", timeout=10).read()
        text = metrics.decode()
        assert 'omega_netblock_requests_total{export="n-cli",op="write"}' in text
        assert 'omega_netblock_chunks{export="n-cli"} 32.0' in text
        assert 'omega_netblock_rereplication_backlog_chunks{export="n-cli"} 0.0' in text
        assert "omega_netblock_peer_latency_seconds_bucket" in text
        assert 'omega_netblock_peer_up{peer="n-p1"} 1.0' in text
        # the native backend served it: the read after the write hit its cache
        assert 'omega_netblock_cache_lookups_total{export="n-cli",result="hit"} 512.0' in text
        assert 'omega_netblock_table_unpersisted_chunks{export="n-cli"} 0.0' in text
        batches = re.search(r'omega_netblock_batches_total\{export="n-cli"\} ([\d.]+)', text)
        assert batches and float(batches.group(1)) >= 1, text
        # the chunk table has one owner: repair and delete refuse while it is served
        busy = omega("netblock", "repair", "n-cli", *peer_args, "--node", "n-host")
        assert busy.returncode == 1 and "in use by process" in busy.stderr, busy.stderr
        busy = omega("netblock", "delete", "n-cli", *peer_args, "--node", "n-host")
        assert busy.returncode == 1 and "in use by process" in busy.stderr, busy.stderr
    finally:
        assert server.stop() == 0, server.log.read_text()
    shown = json.loads(omega("netblock", "show", "n-cli", "--json").stdout)
    assert shown["chunks_written"] == 32 and shown["chunks_under_replicated"] == 0
    # a peer lost while nothing is served: repair copies its chunks elsewhere
    peers.kill("n-p3")
    rep = omega("netblock", "repair", "n-cli", *peer_args, "--node", "n-host", "--json")
    assert rep.returncode == 0, rep.stderr
    assert json.loads(rep.stdout)["stale"] == 0, rep.stderr
    shown = json.loads(omega("netblock", "show", "n-cli", "--json").stdout)
    assert "n-p3" not in shown["chunks_per_peer"]
    # import (qcow2) and export through the peers, bytes identical
    src = nbd_tmp / "img.raw"
    src.write_bytes(os.urandom(3 << 20) + bytes(1 << 20))
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(src), str(nbd_tmp / "img.qcow2"))
    imp = omega("netblock", "import", "n-cli-img", str(nbd_tmp / "img.qcow2"), *peer_args,
                "--node", "n-host")
    assert imp.returncode == 0, imp.stderr
    exp = omega("netblock", "export", "n-cli-img", str(nbd_tmp / "out.raw"), *peer_args,
                "--node", "n-host")
    assert exp.returncode == 0, exp.stderr
    assert hashlib.sha256((nbd_tmp / "out.raw").read_bytes()).digest() == \
        hashlib.sha256(src.read_bytes()).digest()
    shown = json.loads(omega("netblock", "show", "n-cli-img", "--json").stdout)
    assert shown["kind"] == "replicated" and shown["chunks_written"] == 48  # zeroes stay holes
    deleted = omega("netblock", "delete", "n-cli", *peer_args, "--node", "n-host")
    assert deleted.returncode == 0, deleted.stderr
    assert omega("netblock", "show", "n-cli").returncode == 1


async def test_reads_racing_writes_never_cache_old_data(served: Served) -> None:
    backend = served.backend
    cs = backend.chunk_size
    for round_ in range(10):
        await backend.write(0, bytes([round_]) * (9 * cs), fua=False)
        backend._cache.clear()
        new = bytes([round_ + 100]) * cs
        # a long read (nine chunk fetches queue at the peers, chunk 8's last) races a
        # whole-chunk write of chunk 8, which needs no fetch and can finish first
        await asyncio.gather(backend.read(0, 9 * cs), backend.write(8 * cs, new, fua=False))
        assert await backend.read(8 * cs, cs) == new


def test_serve_rereplicates_automatically(peer_home: Config, peers: PeerSet,
                                          nbd_tmp: Path) -> None:
    import subprocess
    import sys
    import time
    import urllib.request

    from tests.netblock.conftest import REPO, run, start_server

    env = {**os.environ, "OMEGA_HOME": str(peer_home.home)}
    subprocess.run([sys.executable, "-m", "hypervisor.cli", "netblock", "create", "n-auto", "4M"],
                   cwd=REPO, env=env, check=True, capture_output=True)
    peer_args = [f"--peer={p.name}=127.0.0.1:{p.port}" for p in peers.peers.values()]
    server = start_server(peer_home, nbd_tmp, "n-auto", *peer_args, "--node", "n-host",
                          "--metrics", "127.0.0.1:19204")

    def metric(name: str) -> float:
        text = urllib.request.urlopen("http://127.0.0.1:19204/metrics", timeout=10).read()
        m = re.search(rf'^{name}{{export="n-auto"}} ([0-9.e+]+)$', text.decode(), re.M)
        return float(m.group(1)) if m else -1.0

    try:
        uri = server.uri("n-auto")
        run("qemu-io", "-f", "raw", "-c", "write -P 0x70 0 4M", "-c", "flush", uri)
        assert metric("omega_netblock_chunks") == 64
        peers.kill("n-p1")
        deadline = time.monotonic() + 120  # a bound on the wait, not a speed assertion
        while metric("omega_netblock_rereplicated_chunks_total") <= 0 or \
                metric("omega_netblock_rereplication_backlog_chunks") != 0:
            assert time.monotonic() < deadline, server.log.read_text()
            time.sleep(0.5)
        run("qemu-io", "-f", "raw", "-c", "read -P 0x70 0 4M", uri)
    finally:
        assert server.stop() == 0, server.log.read_text()
    store = ExportStore(peer_home)
    try:
        states = store.chunk_states(store.get("n-auto"))
    finally:
        store.close()
    assert all(set(s.peers) == {"n-p2", "n-p3"} for s in states.values())


async def test_newer_copy_after_lost_table_never_outranks_new_write(served: Served) -> None:
    """A peer holds a newer version than the chunk table (the host crashed before a flush)."""
    backend = served.backend
    cs = backend.chunk_size
    await backend.write(0, b"\x01" * cs, fua=False)
    state = backend._states[0]
    # what an unflushed pre-crash write left on one holder: an authentic version 9
    blob = backend._sealer.seal(backend._aad(0, 9), b"\x09" * cs)
    await backend.pool.client(state.peers[0]).put(backend.ns, 0, 9, blob)
    await backend.write(0, b"\x02" * cs, fua=False)  # numbered from the table: 2 < 9
    assert backend._states[0].version > 9
    for holder in backend._states[0].peers:
        version, _blob = await backend.pool.client(holder).get(backend.ns, 0)
        assert version == backend._states[0].version
    backend._cache.clear()
    assert await backend.read(0, cs) == b"\x02" * cs


async def test_concurrent_writes_go_as_batches_with_per_chunk_outcomes(served: Served) -> None:
    """Writes to many chunks at once reach each peer as BATCH_PUTs; one chunk
    refused as stale inside a batch is retried alone, the others stand."""
    backend = served.backend
    cs = backend.chunk_size
    await backend.write(0, b"\x01" * cs, fua=False)
    holder = backend._states[0].peers[0]
    # an authentic newer copy of chunk 0 on one holder (an unflushed pre-crash write)
    blob = backend._sealer.seal(backend._aad(0, 9), b"\x09" * cs)
    await backend.pool.client(holder).put(backend.ns, 0, 9, blob)
    sizes: list[int] = []
    for name in backend.pool.names():  # observe the real calls, change nothing
        client = backend.pool.client(name)
        real = client.batch_put

        def spy(ns, items, real=real):  # noqa: ANN001, ANN202
            items = list(items)
            sizes.append(len(items))
            return real(ns, items)

        client.batch_put = spy
    data = {i: bytes([i + 2]) * cs for i in range(24)}
    await asyncio.gather(*(backend.write(i * cs, d, fua=False) for i, d in data.items()))
    assert sizes and max(sizes) > 1, sizes  # batched, not one request per chunk
    assert backend._states[0].version > 9  # the stale item was renumbered and rewritten
    backend._cache.clear()
    for i, d in data.items():
        assert await backend.read(i * cs, cs) == d
        assert len(set(backend._states[i].peers)) == 2
