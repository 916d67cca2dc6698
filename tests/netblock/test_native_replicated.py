"""The native replicated backend (native/nbd/nbd_repl*.c) on real peer daemons.

The same scenarios as test_replicated.py (which drives the Python backend),
through real clients (qemu-io, qemu-img, nbdsh, nbdinfo) and the NBD fast
path: batched reads and writes, placement, holes, a peer killed mid-write,
re-replication, stale and tampered copies, a newer copy left by a lost chunk
table, FUA and FLUSH persisting the table, and both backends agreeing on
where a chunk goes.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from hypervisor.config import Config
from hypervisor.netblock.exports import ExportStore
from hypervisor.netblock.native_replicated import NativeReplicatedBackend
from hypervisor.netblock.replicated import ChunkPlacement, PeerLoad
from hypervisor.netblock.server import Export, NbdServer
from hypervisor.node.wire import Namespace
from hypervisor.sealing import Sealer, build_aad
from tests.netblock.conftest import native_thread_policies, native_threads, thread_policies
from tests.netblock.peers import PeerSet, Served, healthy_pool, qemu_io
from tests.netblock.rawclient import CMD_DISC, CMD_WRITE, FLAG_FUA, RawNbd, request
from tests.waiting import wait_for

BASE_PORT = 19240


@pytest.fixture(params=[4 << 10, 64 << 10], ids=["4k-blocks", "whole-chunks"])
async def served(request: pytest.FixtureRequest, peer_home: Config, peers: PeerSet,
                 nbd_tmp: Path) -> AsyncIterator[Served]:
    """A 16 MiB export of 64 KiB chunks sealed as 4 KiB blocks (the default
    layout) or whole (the Python backend's layout), served natively."""
    store = ExportStore(peer_home)
    record = store.create("n-rep", 16 << 20, replicas=2, chunk_size=64 << 10,
                          block_size=request.param)
    pool = await healthy_pool(peers)
    backend = NativeReplicatedBackend(record, store, pool, store.key(record), node="n-host",
                                      config=peer_home, own_pool=True)
    await backend.start()
    server = NbdServer({"n-rep": Export.of("n-rep", backend)})
    sock = nbd_tmp / "rep.sock"
    await server.listen_unix(sock)
    yield Served(server, sock, backend)
    await server.shutdown()
    store.close()


async def test_connection_threads_run_in_batch_scheduling(served: Served) -> None:
    """A connection to a replicated export: the reader and its three workers
    run in SCHED_BATCH (omega_thread_batch), and no thread of the process is
    left in it once the connection has ended."""
    def connect_and_look() -> list[int]:
        with RawNbd(served.sock, "n-rep") as conn:
            wait_for(lambda: native_threads(os.getpid()) == 4, interval=0.02,
                     what="the reader and three workers")
            policies = native_thread_policies(os.getpid())
            conn.send(request(CMD_DISC, 0, 0, cookie=1))
        return policies

    assert await asyncio.to_thread(connect_and_look) == [os.SCHED_BATCH] * 4
    await asyncio.to_thread(wait_for, lambda: native_threads(os.getpid()) == 0,
                            interval=0.02, what="the connection's threads to end")
    assert os.SCHED_BATCH not in thread_policies(os.getpid())


async def test_io_placement_holes_and_the_fast_path(served: Served) -> None:
    backend = served.backend
    uri = served.uri("n-rep")
    before = backend.stats()["batches"]
    await qemu_io(uri, "write -P 0x31 0 1M", "write -P 0x32 3000k 100k", "flush",
                  "read -P 0x31 0 1M", "read -P 0x32 3000k 100k", "read -P 0 1M 1M")
    assert backend.stats()["batches"] > before  # the C data path served them
    states = backend.store.chunk_states(backend.record)  # persisted by the flush
    assert len(states) == 19  # 1 MiB + 100k across a chunk boundary: 16 + 3 chunks
    assert all(len(set(s.peers)) == 2 for s in states.values())
    assert {p for s in states.values() for p in s.peers} == {"n-p1", "n-p2", "n-p3"}
    # the Python backend's placement picks the same peers (one hash, two languages)
    place = ChunkPlacement(backend.record.id)
    loads = [PeerLoad(n, backend._free.get(n), backend.pool.health(n).rtt)
             for n in backend.pool.names()]
    for index, state in states.items():
        assert set(state.peers) == set(place.choose(index, loads, 2)), index
    # trim frees chunks on peers: holes again, in block status too
    await qemu_io(uri, "discard 0 512k", "read -P 0 0 512k", "read -P 0x31 512k 512k", "flush")
    holes = backend.store.chunk_states(backend.record)
    assert sum(1 for s in holes.values() if s.peers) == 11
    first_kept = 8 * backend.record.blocks_per_chunk  # keys are block numbers
    for peer in ("n-p1", "n-p2", "n-p3"):
        keys = await backend.pool.client(peer).list(Namespace.chunk(f"nb-{backend.record.id}"))
        assert all(k >= first_kept for k, _ in keys), keys
    assert backend.extents(0, 2 << 20) == [(512 << 10, 3), (512 << 10, 0), (1 << 20, 3)]


async def test_nbdsh_structured_replies_zeroes_and_errors(served: Served) -> None:
    script = f"""
import nbd
h = nbd.NBD()
h.set_export_name("n-rep")
h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
h.connect_unix({str(served.sock)!r})
assert h.can_fast_zero() and h.can_multi_conn() and h.can_fua()
h.pwrite(b"\\x5a" * 131072, 65536)
seen = []
def extent(meta, offset, entries, err):
    seen.append(list(entries))
    return 0
h.block_status(1 << 20, 0, extent)
assert seen[0][:6] == [65536, 3, 131072, 0, 851968, 3], seen
h.zero(65536, 65536, flags=nbd.CMD_FLAG_FAST_ZERO)        # a whole chunk: a hole again
assert h.pread(65536, 65536) == bytes(65536)
try:
    h.zero(4096, 65536 + 8192, flags=nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE)
    raise SystemExit("stored zeroes claimed to be fast")
except nbd.Error as e:
    assert e.errno is not None
h.zero(8192, 131072 + 4096, flags=nbd.CMD_FLAG_NO_HOLE)   # partial: stored as data
assert h.pread(8192, 131072 + 4096) == bytes(8192)
assert h.pread(4096, 131072 + 8192 + 4096) == b"\\x5a" * 4096
try:
    h.pread(4096, (16 << 20) - 1)
    raise SystemExit("read past the end succeeded")
except nbd.Error as e:
    assert e.errno is not None
h.flush()
h.trim(65536, 0, flags=nbd.CMD_FLAG_FUA)
h.shutdown()
print("ok")
"""
    proc = await asyncio.create_subprocess_exec(
        "env", "PATH=/usr/bin:/bin", "nbdsh", "-c", script,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out = (await proc.communicate())[0].decode()
    assert proc.returncode == 0 and out.strip().endswith("ok"), out


async def test_peer_killed_mid_write_then_repair(served: Served, peers: PeerSet,
                                                 nbd_tmp: Path) -> None:
    backend = served.backend
    uri = served.uri("n-rep")
    data = os.urandom(12 << 20)
    src = nbd_tmp / "src.raw"
    src.write_bytes(data)

    def puts() -> int:
        return sum(st.puts for st in backend.peer_stats.values())

    proc = await asyncio.create_subprocess_exec(
        "qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", "-W", str(src), uri,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    while puts() < 60 and proc.returncode is None:
        await asyncio.sleep(0.005)
    peers.kill("n-p2")  # SIGKILL while writes are in flight
    at_kill = puts()
    out = (await proc.communicate())[0].decode()
    assert proc.returncode == 0, out
    assert puts() > at_kill + 60  # writes went on to the live peers
    await qemu_io(uri, "flush")
    back = nbd_tmp / "back.raw"

    async def read_back() -> bytes:
        p = await asyncio.create_subprocess_exec(
            "qemu-img", "convert", "-f", "raw", "-O", "raw", uri, str(back),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        assert await p.wait() == 0, (await p.stdout.read()).decode()
        return back.read_bytes()[:12 << 20]

    assert hashlib.sha256(await read_back()).digest() == hashlib.sha256(data).digest()
    await backend.pool.measure(samples=1)
    backend._sync_health()
    assert not backend.pool.health("n-p2").healthy
    assert backend.under_replicated()  # what n-p2 held now has one live copy
    states = backend.store.chunk_states(backend.record)
    assert all(any(p != "n-p2" for p in s.peers) for s in states.values() if s.peers)
    peers.start("n-p2")
    await backend.pool.measure(samples=1)
    result = await backend.repair()
    assert result.backlog == 0 and not backend.under_replicated()
    states = backend.store.chunk_states(backend.record)
    assert all(len(set(s.peers)) == 2 for s in states.values() if s.peers)
    # two copies again: any one peer may die and every byte still reads back
    peers.kill("n-p1")
    await backend.pool.measure(samples=1)
    backend._sync_health()
    backend.clear_cache()
    assert hashlib.sha256(await read_back()).digest() == hashlib.sha256(data).digest()


async def test_stale_and_tampered_copies_are_never_served(served: Served) -> None:
    backend = served.backend
    uri = served.uri("n-rep")
    ns = Namespace.chunk(f"nb-{backend.record.id}")
    bpc = backend.record.blocks_per_chunk  # peers key blobs by block number

    def version(block: int) -> int:
        return backend.states()[block // bpc].blocks[block % bpc] if bpc > 1 else \
            backend.states()[block].version

    await qemu_io(uri, "write -P 0x41 0 64k", "flush")
    holder = backend.states()[0].peers[0]
    client = backend.pool.client(holder)
    stale = await client.get(ns, 0)
    await qemu_io(uri, "write -P 0x42 0 64k", "flush")
    # the old sealed blob replayed under a newer version: authentication fails
    await client.put(ns, 0, version(0) + 1, stale[1])
    # chunk 0's first blob where chunk 1's first should be, on every holder
    await qemu_io(uri, "write -P 0x43 64k 64k", "flush")
    cur = await client.get(ns, 0)
    for p in backend.states()[1].peers:
        await backend.pool.client(p).put(ns, bpc, cur[0] + 5, cur[1])
    backend.clear_cache()
    await qemu_io(uri, "read -P 0x42 0 64k")  # the other replica of chunk 0 serves it
    out = await qemu_io(uri, "read -P 0x43 64k 64k", ok=False)
    assert "Input/output error" in out, out  # never chunk 0's bytes
    # a batch with a replayed copy on one holder of chunk 3: the good one is served
    await qemu_io(uri, "write -P 0x44 128k 256k")
    b3 = 3 * bpc
    old3 = await backend.pool.client(backend.states()[3].peers[0]).get(ns, b3)
    await qemu_io(uri, "write -P 0x45 192k 64k")
    await backend.pool.client(backend.states()[3].peers[0]).put(ns, b3, version(b3) + 1, old3[1])
    backend.clear_cache()
    await qemu_io(uri, "read -P 0x44 128k 64k", "read -P 0x45 192k 64k",
                  "read -P 0x44 256k 128k")


async def test_newer_copy_after_lost_table_never_outranks_new_write(served: Served) -> None:
    """A holder has a newer version than the table (the host crashed before a flush)."""
    backend = served.backend
    bs = backend.block_size
    ns = Namespace.chunk(f"nb-{backend.record.id}")
    sealer = Sealer(backend.store.key(backend.record))
    await backend.write(0, b"\x01" * bs, fua=False)
    state = backend.states()[0]
    blob = sealer.seal(build_aad("chunk", backend.record.id, 0, 9), b"\x09" * bs)
    await backend.pool.client(state.peers[0]).put(ns, 0, 9, blob)
    await backend.write(0, b"\x02" * bs, fua=False)  # numbered from the table: 2 < 9
    assert backend.states()[0].version > 9
    assert backend.stats()["stale_retries"] >= 1
    for holder in backend.states()[0].peers:
        got_version, _blob = await backend.pool.client(holder).get(ns, 0)
        assert got_version == backend.states()[0].version
    backend.clear_cache()
    assert await backend.read(0, bs) == b"\x02" * bs
    # a newer authentic copy read back is recorded (and persisted on flush)
    block = backend.record.blocks_per_chunk  # the first block of chunk 1
    blob = sealer.seal(build_aad("chunk", backend.record.id, block, 7), b"\x07" * bs)
    await backend.write(block * bs, b"\x03" * bs, fua=True)
    for holder in backend.states()[1].peers:
        await backend.pool.client(holder).put(ns, block, 7, blob)
    backend.clear_cache()
    assert await backend.read(block * bs, bs) == b"\x07" * bs
    await backend.flush()
    assert backend.store.chunk_states(backend.record)[1].version == 7


async def test_fua_persists_the_table_and_batches_reach_each_peer_once(
        served: Served, peer_home: Config) -> None:
    backend = served.backend
    uri = served.uri("n-rep")

    def writes() -> tuple[bool, bool]:
        """A plain write, then a FUA write, on one fast-path connection."""
        reader = ExportStore(peer_home)
        try:
            with RawNbd(served.sock, "n-rep", structured=False, meta=False) as conn:
                conn.send(request(CMD_WRITE, 0, 65536, cookie=1, payload=b"\x51" * 65536))
                assert conn.recv_exact(16)[4:8] == bytes(4)
                plain = 0 in reader.chunk_states(backend.record)
                conn.send(request(CMD_WRITE, 65536, 65536, cookie=2, flags=FLAG_FUA,
                                  payload=b"\x52" * 65536))
                assert conn.recv_exact(16)[4:8] == bytes(4)
                fua = {0, 1} <= set(reader.chunk_states(backend.record))
                conn.send(request(CMD_DISC, 0, 0))
            return plain, fua
        finally:
            reader.close()

    plain, fua = await asyncio.to_thread(writes)
    assert not plain  # acknowledged on the peers, the table not yet persisted
    assert fua        # FUA persisted the table (both chunks) before its reply
    # 64 writes in flight (aio) reach each peer as a handful of BATCH_PUTs
    before = {n: st.latency.count for n, st in backend.peer_stats.items()}
    cmds = [f"aio_write -P {i} {i * 64}k 64k" for i in range(64)] + ["aio_flush"]
    await qemu_io(uri, *cmds)
    after = {n: st.latency.count for n, st in backend.peer_stats.items()}
    round_trips = sum(after[n] - before[n] for n in after)
    assert round_trips < 64 * 2, round_trips  # one PUT per chunk per replica would be 128
    await qemu_io(uri, *[f"read -P {i} {i * 64}k 64k" for i in range(64)])


def test_many_threads_write_and_read_one_export(served: Served) -> None:
    """Concurrent C clients on one export: per-chunk locks serialise the writers
    of a chunk, so when they are done every chunk holds one write whole.

    A read that overlaps a write on another connection may see some blocks
    before it and some after (NBD promises nothing across concurrent requests,
    and neither does a disk across sectors), but never a torn block.
    """
    backend = served.backend
    cs, bs = backend.chunk_size, backend.block_size
    errors: list[BaseException] = []
    written: dict[int, set[int]] = {i: set() for i in range(8)}

    def worker(k: int) -> None:
        try:
            for r in range(20):
                # threads overlap on chunks 0..7; each writes a whole chunk
                idx = (k + r) % 8
                value = k * 16 + r % 16
                written[idx].add(value)
                backend._exec("write", idx * cs, cs, data=bytes([value]) * cs)
                got = backend._exec("read", idx * cs, cs)
                for at in range(0, cs, bs):
                    block = got[at:at + bs]
                    assert block.count(block[0]) == bs, f"torn block at {idx * cs + at}"
                    assert block[0] in written[idx]
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for idx in range(8):
        got = backend._exec("read", idx * cs, cs)
        assert got.count(got[0]) == cs, f"chunk {idx} mixes two writes"
        assert got[0] in written[idx]


async def test_streaming_reads_do_not_fill_the_cache(served: Served) -> None:
    """Blocks fetched for reads of 256 KiB or more are not cached (a scan
    would push out what random reads reuse); smaller reads are."""
    backend = served.backend
    uri = served.uri("n-rep")
    await qemu_io(uri, "write -P 0x41 0 2M", "flush")
    backend.clear_cache()

    def lookups() -> tuple[int, int]:
        st = backend.stats()
        return st["cache_hits"], st["cache_misses"]

    await qemu_io(uri, "read -P 0x41 0 1M")          # streaming: fetched, not kept
    await qemu_io(uri, "read -P 0x41 1M 128k")       # small: fetched and kept
    h0, m0 = lookups()
    blocks = (128 << 10) // backend.block_size       # the 32 reads below touch these
    await qemu_io(uri, *[f"read -P 0x41 {k * 4}k 4k" for k in range(32)])
    h1, m1 = lookups()
    # the 1 MiB read left nothing behind: each block misses once (then the
    # small read that missed has cached it)
    assert (h1 - h0, m1 - m0) == (32 - blocks, blocks)
    await qemu_io(uri, *[f"read -P 0x41 {1024 + k * 4}k 4k" for k in range(32)])
    h2, m2 = lookups()
    assert (h2 - h1, m2 - m1) == (32, 0)             # the 128 KiB read's blocks are there
    # what a small read brought in stays, and a streaming read of it still hits
    await qemu_io(uri, "read -P 0x41 1M 1M")
    h3, _ = lookups()
    assert h3 - h2 >= (128 << 10) // backend.block_size


async def test_every_sealed_block_has_its_own_nonce(served: Served) -> None:
    """The C sealer draws its random nonces in pools (one RAND_bytes call per
    256): across the export's blocks (16 pools' worth with 4 KiB blocks), no
    nonce repeats."""
    backend = served.backend
    uri = served.uri("n-rep")
    n = backend.size
    await qemu_io(uri, f"write -P 0x51 0 {n}", "flush")
    ns = Namespace.chunk(f"nb-{backend.record.id}")
    blocks = n // backend.block_size
    nonces = set()
    for peer in backend.pool.names():
        client = backend.pool.client(peer)
        keys = [k for k, _ in await client.list(ns) if k < blocks]
        for got in await client.batch_get(ns, keys):
            assert got is not None
            blob = got[1]
            assert blob[0] == 1  # the sealed format: 01 | nonce(12) | ciphertext | tag
            nonces.add(blob[1:13])
    # each block is on two peers with the same blob: one nonce per block
    assert len(nonces) == blocks


async def test_a_small_write_seals_and_stores_only_its_block(served: Served) -> None:
    backend = served.backend
    uri = served.uri("n-rep")
    await qemu_io(uri, "write -P 0x61 0 256k", "flush")

    def sent() -> int:
        return sum(st.bytes_out for st in backend.peer_stats.values())

    before = sent()
    await qemu_io(uri, "write -P 0x62 68k 4k", "flush")
    blob = backend.block_size + 29  # sealing overhead
    assert sent() - before == 2 * blob  # one block to each of two holders
    await qemu_io(uri, "read -P 0x61 0 68k", "read -P 0x62 68k 4k", "read -P 0x61 72k 184k")
    # a block-aligned trim inside a chunk: a hole there, data around it
    await qemu_io(uri, "discard 72k 8k", "read -P 0 72k 8k", "read -P 0x61 80k 48k", "flush")
    if backend.record.blocks_per_chunk > 1:
        assert backend.extents(64 << 10, 64 << 10) == [(8 << 10, 0), (8 << 10, 3),
                                                       (48 << 10, 0)]
    else:  # one block per chunk: a partial trim stores zeroes
        assert backend.extents(64 << 10, 64 << 10) == [(64 << 10, 0)]


async def test_partial_write_with_a_holder_down_then_repair(served: Served, peers: PeerSet,
                                                            nbd_tmp: Path) -> None:
    """A write to part of a chunk goes to its live holders only (a new peer
    would lack the other blocks); repair then copies the whole chunk."""
    backend = served.backend
    uri = served.uri("n-rep")
    await qemu_io(uri, "write -P 0x71 0 1M", "flush")
    holders = backend.states()[0].peers
    peers.kill(holders[0])
    await backend.pool.measure(samples=1)
    backend._sync_health()
    await qemu_io(uri, "write -P 0x72 4k 4k", "flush")
    if backend.record.blocks_per_chunk > 1:
        assert backend.states()[0].peers == (holders[1],)  # degraded, never a partial copy
        assert 0 in backend.under_replicated()
    else:  # the write rewrote the whole chunk (one block): topped up to R at once
        assert len(backend.states()[0].peers) == 2
    result = await backend.repair()
    assert result.backlog == 0 and not backend.under_replicated()
    now = backend.states()[0].peers
    assert len(now) == 2 and holders[0] not in now
    # the new holder got every block: with the old survivor gone, all reads back
    peers.kill(holders[1])
    await backend.pool.measure(samples=1)
    backend._sync_health()
    backend.clear_cache()
    await qemu_io(uri, "read -P 0x71 0 4k", "read -P 0x72 4k 4k", "read -P 0x71 8k 56k")


async def test_python_backend_reads_what_the_native_one_wrote(peer_home: Config,
                                                              peers: PeerSet) -> None:
    """Whole-chunk layout: both backends share the format, the table and placement."""
    from hypervisor.netblock.replicated import ReplicatedBackend

    store = ExportStore(peer_home)
    record = store.create("n-both", 4 << 20, replicas=2, chunk_size=64 << 10)
    data = os.urandom(1 << 20)
    native = NativeReplicatedBackend(record, store, await healthy_pool(peers), store.key(record),
                                     node="n-host", config=peer_home, own_pool=True)
    await native.start()
    await native.write(128 << 10, data, fua=False)
    await native.trim(0, 64 << 10, fua=True)
    await native.close()
    python = ReplicatedBackend.open(peer_home, store, record, pool=await healthy_pool(peers),
                                    node="n-host")
    try:
        assert await python.read(128 << 10, 1 << 20) == data
        assert await python.read(0, 128 << 10) == bytes(128 << 10)
        await python.write(0, b"\x05" * 4096, fua=True)
    finally:
        await python.close()
        await python.pool.close()
    again = NativeReplicatedBackend(record, store, await healthy_pool(peers), store.key(record),
                                    node="n-host", config=peer_home, own_pool=True)
    try:
        assert await again.read(0, 4096) == b"\x05" * 4096
        assert await again.read(128 << 10, 1 << 20) == data
    finally:
        await again.close()
        store.close()


async def test_the_python_backend_refuses_a_block_layout(peer_home: Config,
                                                         peers: PeerSet) -> None:
    from hypervisor.errors import UsageError
    from hypervisor.netblock.replicated import ReplicatedBackend

    store = ExportStore(peer_home)
    record = store.create("n-blocks", 1 << 20, chunk_size=64 << 10, block_size=4 << 10)
    try:
        with pytest.raises(UsageError, match="only the native backend serves it"):
            ReplicatedBackend(record, store, peers.pool(), store.key(record))
    finally:
        store.close()


async def test_fio_verify_and_nbdcopy(served: Served, nbd_tmp: Path) -> None:
    """Mixed-size random writes verified by fio (crc32c), then a round trip
    through nbdcopy, on the C data path."""
    import json

    uri = served.uri("n-rep")
    proc = await asyncio.create_subprocess_exec(
        "fio", "--name=verify", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite",
        "--bsrange=4k-128k", "--iodepth=32", "--size=8M", "--verify=crc32c", "--do_verify=1",
        "--verify_fatal=1", "--verify_state_save=0", "--output-format=json",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out = (await proc.communicate())[0].decode()
    assert proc.returncode == 0, out
    job = json.loads(out[out.index("{"):])["jobs"][0]
    assert job["error"] == 0 and job["read"]["io_bytes"] == job["write"]["io_bytes"] > 0
    src = nbd_tmp / "src.raw"
    src.write_bytes(os.urandom(3 << 20) + bytes(13 << 20))
    for args in (["nbdcopy", str(src), uri], ["nbdcopy", uri, str(nbd_tmp / "out.raw")]):
        p = await asyncio.create_subprocess_exec(*args, stdout=asyncio.subprocess.PIPE,
                                                 stderr=asyncio.subprocess.STDOUT)
        assert await p.wait() == 0, (await p.stdout.read()).decode()
    assert hashlib.sha256((nbd_tmp / "out.raw").read_bytes()).digest() == \
        hashlib.sha256(src.read_bytes()).digest()


def test_tls_clients_use_the_same_c_export(peer_home: Config, peers: PeerSet,
                                          nbd_tmp: Path) -> None:
    """A TLS connection (served by the Python protocol code, calling the C
    backend) and a plain one (the C fast path) see the same bytes."""
    import subprocess
    import sys

    from hypervisor.security import write_qemu_tls_dir
    from tests.netblock.conftest import REPO, run, start_server

    env = {**os.environ, "OMEGA_HOME": str(peer_home.home)}
    created = subprocess.run([sys.executable, "-m", "hypervisor.cli", "netblock", "create",
                              "n-tls", "8M"], cwd=REPO, env=env, capture_output=True,
                             text=True, timeout=60)
    assert created.returncode == 0, created.stderr
    tls = write_qemu_tls_dir(peer_home, nbd_tmp / "qemu-tls", node="n-host")
    peer_args = [f"--peer={p.name}=127.0.0.1:{p.port}" for p in peers.peers.values()]
    server = start_server(peer_home, nbd_tmp, "n-tls", *peer_args, "--node", "n-host",
                          "--tls-creds", str(tls))
    try:
        obj = f"tls-creds-x509,id=tls0,endpoint=client,dir={tls}"
        over_tls = f"driver=nbd,server.type=unix,server.path={server.socket},export=n-tls," \
                   "tls-creds=tls0,tls-hostname=n-host"
        src = nbd_tmp / "src.raw"
        src.write_bytes(os.urandom(2 << 20))
        run("qemu-img", "convert", "-n", "--object", obj, "--target-image-opts", "-f", "raw",
            str(src), over_tls)
        plain = nbd_tmp / "plain.raw"
        run("qemu-img", "convert", "-f", "raw", "-O", "raw", server.uri("n-tls"), str(plain))
        assert plain.read_bytes()[:2 << 20] == src.read_bytes()
        run("qemu-io", "-f", "raw", "-c", "write -P 0x3c 1M 64k", "-c", "flush",
            server.uri("n-tls"))
        out = run("qemu-io", "--object", obj, "--image-opts", over_tls,
                  "-c", "read -P 0x3c 1M 64k").stdout
        assert "fail" not in out.lower(), out
    finally:
        assert server.stop() == 0, server.log.read_text()


def test_a_forked_child_never_reuses_its_parents_nonces() -> None:
    """The C sealer's nonce pool is drawn again in a forked child (it tracks
    forks with pthread_atfork, not a getpid() per seal): the child's next
    nonce is not the one the parent takes next from the same pool."""
    from hypervisor._native._nbd import ffi, lib

    def nonce() -> bytes:
        out = ffi.new("uint8_t[12]")
        assert lib.nbr_probe_seal_nonce(out) == 0
        return bytes(out)

    first = nonce()  # the sealer and its pool exist before the fork
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.write(w, nonce())
        finally:
            os._exit(0)
    os.close(w)
    _, status = os.waitpid(pid, 0)
    child = os.read(r, 12)
    os.close(r)
    parent = nonce()
    assert status == 0 and len(child) == 12
    assert len({first, child, parent}) == 3
