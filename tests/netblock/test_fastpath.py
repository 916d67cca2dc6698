"""The native transmission-phase fast path (native/nbd, hypervisor/netblock/fastpath.py).

Two real ``omega netblock serve`` processes run side by side with the same
exports: one with the fast path (default), one with ``OMEGA_NBD_FASTPATH=0``
(pure Python). Real clients drive the fast one; a raw client sends the same
request bytes to both and the replies must be identical, byte for byte
(fixed sequences and hypothesis-generated ones). Exports: ``mem`` (64 MiB,
memfd), ``fresh`` (64 MiB memfd, for the nbdsh script's expectations of
an untouched export), ``par`` (48 MiB memfd, parity tests only) and ``file`` (16 MiB local
sparse file, in each server's own OMEGA_HOME).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hypervisor.config import Config
from hypervisor.netblock.memfd import MemfdBackend
from hypervisor.netblock.server import Export, NbdServer
from tests.netblock.conftest import (REPO, RunningServer, native_thread_policies, native_threads,
                                     run, start_server)
from tests.netblock.rawclient import (CMD_BLOCK_STATUS, CMD_CACHE, CMD_FLUSH, CMD_READ,
                                      CMD_TRIM, CMD_WRITE, CMD_WRITE_ZEROES, FLAG_DF,
                                      FLAG_FAST_ZERO, FLAG_FUA, FLAG_NO_HOLE, FLAG_REQ_ONE,
                                      RawNbd, exchange, request)
from tests.netblock.test_clients import NBDSH_SCRIPT, qemu_io
from tests.waiting import wait_for

MiB = 1 << 20
PAR_SIZE = 48 * MiB
FILE_SIZE = 16 * MiB


def _home(root: Path, name: str) -> Config:
    home = root / name
    home.mkdir(mode=0o755)
    env = {**os.environ, "OMEGA_HOME": str(home)}
    for name in ("file", "pfile"):
        subprocess.run([sys.executable, "-m", "hypervisor.cli", "netblock", "create", name,
                        str(FILE_SIZE), "--local"], env=env, cwd=REPO, check=True,
                       capture_output=True)
    return Config(home=home)


def _serve(config: Config, root: Path, tag: str, *, fast: bool) -> RunningServer:
    saved = os.environ.get("OMEGA_NBD_FASTPATH")
    os.environ["OMEGA_NBD_FASTPATH"] = "1" if fast else "0"
    try:
        return start_server(config, root, "file", "pfile", "--memory", "mem:64M", "--memory",
                            f"par:{PAR_SIZE}", "--memory", "fresh:64M",
                            socket=root / f"{tag}.sock")
    finally:
        if saved is None:
            os.environ.pop("OMEGA_NBD_FASTPATH", None)
        else:
            os.environ["OMEGA_NBD_FASTPATH"] = saved


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[RunningServer, RunningServer]]:
    """(fast path server, pure-Python server) with identical exports."""
    root = Path(tempfile.mkdtemp(prefix="omega-f-", dir="/var/tmp"))
    root.chmod(0o755)
    fast = _serve(_home(root, "fast"), root, "fast", fast=True)
    try:
        slow = _serve(_home(root, "py"), root, "py", fast=False)
    except BaseException:
        fast.stop()
        raise
    yield fast, slow
    codes = (fast.stop(), slow.stop())
    logs = fast.log.read_text() + slow.log.read_text()
    shutil.rmtree(root, ignore_errors=True)
    assert codes == (0, 0), logs


@pytest.fixture
def fast(servers: tuple[RunningServer, RunningServer]) -> RunningServer:
    return servers[0]


# --- which path serves ----------------------------------------------------------


def test_fast_path_serves_plain_connections_and_switch_disables_it(
        servers: tuple[RunningServer, RunningServer]) -> None:
    fast, slow = servers
    with RawNbd(fast.socket, "mem") as a, RawNbd(fast.socket, "file", structured=False) as b:
        wait_for(lambda: native_threads(fast.proc.pid) == 2, interval=0.02,
                 what="two native connection threads")
        # batch scheduling: a request's wake-up does not preempt the client mid-burst
        assert native_thread_policies(fast.proc.pid) == [os.SCHED_BATCH] * 2
        a.send(request(CMD_FLUSH, 0, 0, cookie=7))
        assert a.recv_exact(20) == struct.pack(">IHHQI", 0x668E33EF, 1, 0, 7, 0)
        b.send(request(CMD_FLUSH, 0, 0, cookie=8))
        assert b.recv_exact(16) == struct.pack(">IIQ", 0x67446698, 0, 8)
    wait_for(lambda: native_threads(fast.proc.pid) == 0, interval=0.02,
             what="native threads to end")
    with RawNbd(slow.socket, "mem") as c:
        c.send(request(CMD_FLUSH, 0, 0, cookie=7))
        c.recv_exact(20)
        assert native_threads(slow.proc.pid) == 0


def test_fast_path_over_tcp(nbd_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import re

    monkeypatch.delenv("OMEGA_NBD_FASTPATH", raising=False)
    home = nbd_tmp / "tcp-home"
    home.mkdir(mode=0o755)
    server = start_server(Config(home=home), nbd_tmp, "--memory", "t:16M", "--listen",
                          "127.0.0.1:0", socket=nbd_tmp / "tcp.sock")
    try:
        wait_for(lambda: "on tcp:" in server.log.read_text(), interval=0.02,
                 what="the TCP listener")
        port = int(re.search(r"on tcp:127\.0\.0\.1:(\d+)", server.log.read_text()).group(1))
        uri = f"nbd://127.0.0.1:{port}/t"
        qemu_io(uri, "write -P 0x5c 0 1M", "read -P 0x5c 0 1M", "write -z -u 0 64k",
                "read -P 0 0 64k", "flush")
        with RawNbd(("127.0.0.1", port), "t") as conn:
            wait_for(lambda: native_threads(server.proc.pid) == 1, interval=0.02,
                     what="the native thread")
            conn.send(request(CMD_READ, 65536, 4, cookie=3))
            assert conn.recv_exact(32)[20:] == struct.pack(">Q", 65536) + b"\x5c" * 4
    finally:
        assert server.stop() == 0, server.log.read_text()


# --- real clients against the fast path -------------------------------------------


@pytest.mark.parametrize("export", ["mem", "file"])
def test_qemu_io_on_fast_path(fast: RunningServer, export: str) -> None:
    uri = fast.uri(export)
    qemu_io(uri, "write -P 0xab 0 1M", "read -P 0xab 0 1M",
            "write -z 1M 1M", "read -P 0 1M 1M",
            "write -P 0x11 2M 64k", "write -z -u 2M 64k", "read -P 0 2M 64k",
            "write -P 0x22 3M 128k", "discard 3M 64k", "read -P 0 3M 64k",
            "read -P 0x22 3136k 64k", "flush", "write -f -P 0x33 4M 4k", "read -P 0x33 4M 4k",
            "aio_write -P 0x44 5M 64k", "aio_write -P 0x45 6M 1M", "aio_flush",
            "aio_read -P 0x44 5M 64k", "aio_read -P 0x45 6M 1M", "aio_flush")
    qemu_io(uri, "read -P 0xab 0 1M", "read -P 0x33 4M 4k", "read -P 0x45 6M 1M")
    proc = run("qemu-io", "-f", "raw", "-c", "read 15M 2M", fast.uri("file"), check=False)
    assert "Input/output error" in proc.stdout + proc.stderr or \
        "Invalid" in proc.stdout + proc.stderr, proc.stdout + proc.stderr


def test_nbdsh_structured_block_status_fast_zero_on_fast_path(fast: RunningServer) -> None:
    script = NBDSH_SCRIPT.replace('h.set_export_name("mem")', 'h.set_export_name("fresh")')
    assert script != NBDSH_SCRIPT
    code = f"import sys\nsys.argv = ['check', {str(fast.socket)!r}]\n" + script
    proc = run("env", "PATH=/usr/bin:/bin", "nbdsh", "-c", code)
    assert proc.stdout.strip() == "ok"
    wait_for(lambda: native_threads(fast.proc.pid) == 0, interval=0.02,
             what="native threads to end")


def test_nbdinfo_can_and_map_match_python_path(
        servers: tuple[RunningServer, RunningServer]) -> None:
    maps = []
    for server in servers:
        uri = server.uri("pfile")
        for can in ("flush", "fua", "trim", "zero", "fast-zero", "cache", "df", "multi-conn",
                    "structured-reply"):
            assert run("nbdinfo", "--can", can, uri, check=False).returncode == 0, can
        qemu_io(uri, "write -P 1 8M 64k", "write -P 2 12M 4k", "discard 8M 4k")
        maps.append(json.loads(run("nbdinfo", "--map", "--json", uri).stdout))
    assert maps[0] == maps[1]
    data = [(e["offset"], e["length"]) for e in maps[0] if e["type"] == 0]
    assert (8 * MiB + 4096, 60 * 1024) in data and (12 * MiB, 4096) in data, maps[0]


@pytest.mark.parametrize("export,jobs", [("mem", 1), ("file", 2)])
def test_fio_verify_on_fast_path(fast: RunningServer, tmp_path: Path, export: str,
                                 jobs: int) -> None:
    size = 8 * MiB
    proc = subprocess.run(
        ["fio", "--name=fastverify", "--ioengine=nbd", f"--uri={fast.uri(export)}",
         "--rw=randwrite", "--bs=4k", "--iodepth=32", f"--numjobs={jobs}", f"--size={size}",
         f"--offset_increment={size}", "--verify=crc32c", "--do_verify=1",
         "--verify_fatal=1", "--output-format=json"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for job in json.loads(proc.stdout[proc.stdout.index("{"):])["jobs"]:
        assert job["error"] == 0 and job["write"]["io_bytes"] == size
        assert job["read"]["io_bytes"] == size  # verify pass read it all back
    assert not list(REPO.glob("*fastverify*.state"))  # fio ran in tmp_path


def test_qemu_img_convert_roundtrip_on_fast_path(fast: RunningServer, tmp_path: Path) -> None:
    src = tmp_path / "src.raw"
    with open(src, "wb") as f:
        f.write(os.urandom(3 * MiB))
        f.seek(10 * MiB)
        f.write(os.urandom(MiB))
        f.truncate(FILE_SIZE)
    qcow = tmp_path / "src.qcow2"
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(src), str(qcow))
    run("qemu-img", "convert", "-n", "-f", "qcow2", "-O", "raw", str(qcow), fast.uri("file"))
    out = tmp_path / "out.raw"
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", fast.uri("file"), str(out))
    assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(src.read_bytes()).digest()
    run("nbdcopy", fast.uri("file"), str(tmp_path / "copy.raw"))
    assert (tmp_path / "copy.raw").read_bytes() == src.read_bytes()


# --- byte-for-byte parity with the Python path ---------------------------------------


def _fixed_sequence(size: int) -> bytes:
    def pattern(n: int, seed: int) -> bytes:
        return bytes((i * 7 + seed) & 0xFF for i in range(n))

    reqs = [
        request(CMD_WRITE, 0, 4096, cookie=1, payload=pattern(4096, 1)),
        request(CMD_WRITE, 1 * MiB, 300_000, flags=FLAG_FUA, cookie=2,
                payload=pattern(300_000, 2)),
        request(CMD_WRITE, 0, 0, cookie=3),                          # empty write
        request(CMD_READ, 0, 0, cookie=4),                           # empty read
        request(CMD_READ, 0, 8192, cookie=5),
        request(CMD_READ, size - 10, 20, cookie=8),                  # past the end
        request(CMD_READ, 2**64 - 1, 2, cookie=9),                   # offset overflow
        request(CMD_READ, 0, 33 * MiB, cookie=10),                   # > max_block
        request(CMD_WRITE, size - 4, 8, cookie=11, payload=b"x" * 8),  # ENOSPC
        request(CMD_WRITE, 0, 4, flags=FLAG_DF, cookie=12, payload=b"abcd"),  # bad flag
        request(CMD_WRITE_ZEROES, 8192, 65536, flags=FLAG_NO_HOLE, cookie=13),
        request(CMD_WRITE_ZEROES, 1 * MiB, 65536, flags=FLAG_FAST_ZERO, cookie=14),
        request(CMD_WRITE_ZEROES, 1 * MiB, 4096, flags=FLAG_FAST_ZERO | FLAG_NO_HOLE,
                cookie=15),
        request(CMD_WRITE_ZEROES, size - 1, 2, cookie=16),           # ENOSPC
        request(CMD_TRIM, 1 * MiB + 65536, 131072, flags=FLAG_FUA, cookie=17),
        request(CMD_TRIM, 0, 0, cookie=18),
        request(CMD_FLUSH, 0, 0, flags=FLAG_FUA, cookie=19),
        request(CMD_FLUSH, 1, 0, cookie=20),                         # EINVAL
        request(CMD_CACHE, 0, 1 * MiB, cookie=21),
        request(CMD_CACHE, size, 1, cookie=22),                      # past the end
        request(CMD_BLOCK_STATUS, 0, 4 * MiB, cookie=23),
        request(CMD_BLOCK_STATUS, 0, 4 * MiB, flags=FLAG_REQ_ONE, cookie=24),
        request(CMD_BLOCK_STATUS, 0, 0, cookie=25),                  # EINVAL
        request(CMD_BLOCK_STATUS, size - 4096, 8192, cookie=26),     # past the end
        request(9, 0, 0, cookie=27),                                 # unknown command
        request(CMD_READ, 0, 16, flags=1 << 9, cookie=28),           # unknown flag
        request(CMD_READ, 1 * MiB, 4096, cookie=29),
        request(CMD_WRITE, 2 * MiB, 33 * MiB - 2 * MiB, cookie=30,
                payload=bytes(31 * MiB)),                             # in range, fine
        request(CMD_WRITE, 0, 33 * MiB, cookie=31, payload=bytes(33 * MiB)),  # > max_block
        request(CMD_READ, 2 * MiB, 4096, cookie=32),
        # long reads (sendfile) last: see _no_overlap_after_long_read
        request(CMD_READ, 1 * MiB - 100, 400_000, cookie=6),
        request(CMD_READ, 4 * MiB, 2 * MiB, flags=FLAG_DF | FLAG_FUA, cookie=7),
    ]
    return b"".join(reqs)


@pytest.mark.parametrize("structured,meta", [(True, True), (True, False), (False, False)])
@pytest.mark.parametrize("export,size", [("par", PAR_SIZE), ("pfile", FILE_SIZE)])
def test_fixed_sequence_replies_identical(servers: tuple[RunningServer, RunningServer],
                                          export: str, size: int, structured: bool,
                                          meta: bool) -> None:
    seq = _fixed_sequence(size)
    fast, slow = servers
    got = [exchange(s.socket, export, seq, structured=structured, meta=meta)
           for s in (fast, slow)]
    assert len(got[0]) > 1000
    assert got[0] == got[1]


def test_requests_sent_with_the_handshake_are_served(
        servers: tuple[RunningServer, RunningServer]) -> None:
    early = (request(CMD_WRITE, 3 * MiB, 5, cookie=1, payload=b"early") +
             request(CMD_READ, 3 * MiB, 5, cookie=2) + request(2, 0, 0, cookie=3))  # + DISC
    got = []
    for server in servers:
        with RawNbd(server.socket, "par", early=early) as conn:
            got.append(conn.read_until_eof())
    assert got[0] == got[1]
    assert got[0].endswith(struct.pack(">IHHQIQ", 0x668E33EF, 1, 1, 2, 13, 3 * MiB) + b"early")


_OFFSETS = st.one_of(st.integers(0, 8 * MiB), st.sampled_from([0, FILE_SIZE - 1, FILE_SIZE,
                                                                FILE_SIZE + 1, 2**63, 2**64 - 1]))
_LENGTHS = st.one_of(st.integers(0, 200_000), st.sampled_from([1, 4096, FILE_SIZE,
                                                               2**31, 2**32 - 1]))


LONG_READ = 64 * 1024
"""READs this long leave by sendfile (native/nbd/nbd_ops.c SENDFILE_MIN)."""


def _no_overlap_after_long_read(reqs: list[tuple[int, int, int, bytes]]) -> bytes:
    """Drop write-class requests that overlap an earlier long READ still in flight.

    A long READ's reply carries the file's pages by reference (sendfile), so a
    later overlapping write sent before that reply was received may show in
    it. NBD lets a server reorder in-flight requests, so clients never issue
    overlapping ones without waiting; the Python path happens to answer them
    in order, the native one need not. Everything else must match.
    """
    out = []
    long_reads: list[tuple[int, int]] = []
    for cmd, offset, length, raw in reqs:
        if cmd in (CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES) and any(
                offset < r_off + r_len and r_off < offset + max(length, 1)
                for r_off, r_len in long_reads):
            continue
        if cmd == CMD_READ and length >= LONG_READ:
            long_reads.append((offset, length))
        out.append(raw)
    return b"".join(out)


@st.composite
def _requests(draw: st.DrawFn) -> bytes:
    out = []
    for cookie in range(draw(st.integers(1, 12))):
        cmd = draw(st.sampled_from([0, 1, 3, 4, 5, 6, 7, 8, 11]))
        flags = draw(st.one_of(st.just(0), st.integers(0, 31), st.integers(0, 0xFFFF)))
        offset = draw(_OFFSETS)
        if cmd == CMD_WRITE:
            length = draw(st.integers(0, 70_000))
            payload = bytes([cookie + 1]) * length
        else:
            length = draw(_LENGTHS)
            payload = b""
        out.append((cmd, offset, length, request(cmd, offset, length, flags=flags,
                                                 cookie=cookie + 100, payload=payload)))
    return _no_overlap_after_long_read(out)


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(seq=_requests(), structured=st.booleans())
def test_fuzzed_requests_replies_identical(servers: tuple[RunningServer, RunningServer],
                                           seq: bytes, structured: bool) -> None:
    fast, slow = servers
    got = [exchange(s.socket, "pfile", seq, structured=structured, meta=structured)
           for s in (fast, slow)]
    assert got[0] == got[1]


# --- malformed input: the connection ends, others are untouched -------------------------


def test_malformed_requests_close_only_their_connection(fast: RunningServer) -> None:
    with RawNbd(fast.socket, "mem") as bystander:
        bystander.send(request(CMD_WRITE, 0, 4, cookie=1, payload=b"live"))
        assert bystander.recv_exact(20)[4:6] == b"\x00\x01"  # DONE
        bad_inputs = [
            (request(CMD_READ, 0, 4096, magic=0xDEADBEEF), False),     # bad magic
            (request(CMD_WRITE, 0, 64 * MiB + 1, cookie=2), False),    # oversized payload
            (request(CMD_READ, 0, 4096, cookie=3)[:20], True),         # truncated, then EOF
        ]
        for bad, then_close in bad_inputs:
            with RawNbd(fast.socket, "mem") as victim:
                victim.send(request(CMD_READ, 0, 4, cookie=9) + bad)
                if then_close:
                    victim.sock.shutdown(socket.SHUT_WR)
                reply = victim.read_until_eof()
                # the request before the bad one is answered, then the server closes
                assert reply == struct.pack(">IHHQIQ", 0x668E33EF, 1, 1, 9, 12, 0) + b"live"
        bystander.send(request(CMD_READ, 0, 4, cookie=5))
        header = bystander.recv_exact(28)
        assert struct.unpack(">IHHQI", header[:20])[3] == 5
        assert bystander.recv_exact(4) == b"live"
    qemu_io(fast.uri("mem"), "read -P 0x6c 0 1")  # and new connections are served


# --- in-process: metrics and drain --------------------------------------------------------


class _LoopThread:
    """An asyncio loop on a thread, for an in-process server."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def call(self, coro):  # noqa: ANN001, ANN201
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=60)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


@pytest.fixture
def in_process(nbd_tmp: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
               ) -> Iterator[tuple[_LoopThread, NbdServer, Export, Path]]:
    monkeypatch.delenv("OMEGA_NBD_FASTPATH", raising=False)
    runner = _LoopThread()
    export = Export.of("m", MemfdBackend(8 * MiB))
    server = NbdServer({"m": export}, **getattr(request, "param", {}))
    sock = nbd_tmp / "inproc.sock"

    async def make() -> None:
        await server.listen_unix(sock)

    runner.call(make())
    yield runner, server, export, sock
    runner.call(server.shutdown(timeout=10))
    runner.stop()


def test_native_counters_reach_export_stats_and_metrics(in_process) -> None:  # noqa: ANN001
    runner, server, export, sock = in_process
    uri = f"nbd+unix:///m?socket={sock}"
    qemu_io(uri, "write -P 5 0 1M", "read -P 5 0 1M", "read -P 5 0 4k", "flush")
    wait_for(lambda: export.stats.connections == 0 and export.stats.ops.get("flush", 0) >= 1,
             interval=0.02, what="the connection's counters to be folded")
    stats = export.stats
    assert stats.bytes_written == MiB and stats.bytes_read == MiB + 4096
    assert stats.ops["write"] >= 1 and stats.ops["read"] >= 2
    for op, hist in stats.latency.items():
        assert hist.count == stats.ops[op], op
    from hypervisor.netblock.metrics import NetblockMetricsCollector

    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in NetblockMetricsCollector(server).collect()
               for s in family.samples}
    assert samples[("omega_netblock_bytes_total", (("direction", "read"), ("export", "m")))] \
        == MiB + 4096


def test_shutdown_drains_native_connection(in_process) -> None:  # noqa: ANN001
    runner, server, export, sock = in_process
    with RawNbd(sock, "m") as conn:
        conn.send(request(CMD_WRITE, 0, 3, cookie=1, payload=b"abc") +
                  request(CMD_READ, 0, 3, cookie=2))
        runner.call(server.shutdown(timeout=10))
        data = conn.read_until_eof()  # both replies, then the close
    assert data[:20] == struct.pack(">IHHQI", 0x668E33EF, 1, 0, 1, 0)
    assert data[20:] == struct.pack(">IHHQIQ", 0x668E33EF, 1, 1, 2, 11, 0) + b"abc"


def _memfd_mappings(fd: int) -> list[str]:
    """This process's mappings of the file behind fd, as /proc/self/maps lines."""
    st = os.fstat(fd)
    inode = str(st.st_ino)
    return [line for line in Path("/proc/self/maps").read_text().splitlines()
            if line.split()[4:5] == [inode] and "memfd:" in line]


def test_memory_export_writes_go_through_a_sealed_mapping(in_process) -> None:  # noqa: ANN001
    """A memory export's memfd is sealed against resizing, and its connection
    maps it (read-write, shared) for WRITEs while it lasts: no store through
    the mapping can fault past the end. Writes into trimmed holes, reads of
    holes and block status stay exact (the fuzz tests compare every reply
    with the Python path's)."""
    import fcntl

    runner, server, export, sock = in_process
    fd = export.backend.fd
    seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    assert seals & fcntl.F_SEAL_SHRINK and seals & fcntl.F_SEAL_GROW
    with pytest.raises(OSError):
        os.ftruncate(fd, 4096)
    assert _memfd_mappings(fd) == []
    with RawNbd(sock, "m") as conn:
        wait_for(lambda: native_threads(os.getpid()) == 1, interval=0.02,
                 what="the native thread")
        conn.send(request(CMD_WRITE, 0, 8192, cookie=1, payload=b"\x07" * 8192))
        assert conn.recv_exact(20) == struct.pack(">IHHQI", 0x668E33EF, 1, 0, 1, 0)
        maps = _memfd_mappings(fd)
        assert len(maps) == 1 and maps[0].split()[1] == "rw-s", maps
        conn.send(request(CMD_TRIM, 0, 8192, cookie=2))
        assert conn.recv_exact(20) == struct.pack(">IHHQI", 0x668E33EF, 1, 0, 2, 0)
        conn.send(request(CMD_WRITE, 4096, 4096, cookie=3, payload=b"\x09" * 4096) +
                  request(CMD_READ, 0, 8192, cookie=4))
        assert conn.recv_exact(20) == struct.pack(">IHHQI", 0x668E33EF, 1, 0, 3, 0)
        # a structured reply: an OFFSET_DATA chunk (its offset, then the data)
        assert conn.recv_exact(20 + 8 + 8192)[20:] == struct.pack(">Q", 0) + bytes(4096) \
            + b"\x09" * 4096
    assert os.pread(fd, 8192, 0) == bytes(4096) + b"\x09" * 4096
    wait_for(lambda: native_threads(os.getpid()) == 0, interval=0.02,
             what="the native thread to end")
    assert _memfd_mappings(fd) == []


@pytest.mark.parametrize("in_process", [{"busy_poll_us": 0}, {"busy_poll_us": 1},
                                        {"busy_poll_us": 100_000}],
                         indirect=True, ids=["never", "1us", "100ms"])
def test_busy_poll_serves_every_arrival_pattern(in_process) -> None:  # noqa: ANN001
    """Waiting awake for requests (nbd_receive) loses no byte, whatever the timing.

    With a 1 µs spin every wait runs out and the connection sleeps in recv
    (and turns spinning off until requests come fast again); with 100 ms
    the client's pauses fall inside the spin; 0 never spins. Each pattern:
    a pipelined burst, a request after a pause longer than a short spin,
    one request split over two sends with a pause between, and the end of
    the connection (a clean close, and a shutdown while it waits).
    """
    import time

    runner, server, export, sock = in_process
    with RawNbd(sock, "m") as conn:
        wait_for(lambda: native_threads(os.getpid()) == 1, interval=0.02,
                 what="the native thread")
        conn.send(b"".join(request(CMD_WRITE, 4096 * i, 4096, cookie=i,
                                   payload=bytes([i]) * 4096) for i in range(16)))
        for i in range(16):
            assert conn.recv_exact(20) == struct.pack(">IHHQI", 0x668E33EF, 1, 0, i, 0)
        for pause in (0.02, 0.0, 0.02):
            time.sleep(pause)
            conn.send(request(CMD_READ, 4096 * 5, 8, cookie=100))
            assert conn.recv_exact(36)[20:] == struct.pack(">Q", 4096 * 5) + b"\x05" * 8
        whole = request(CMD_READ, 4096 * 9, 4, cookie=101)
        conn.send(whole[:11])
        time.sleep(0.02)
        conn.send(whole[11:])
        assert conn.recv_exact(32)[20:] == struct.pack(">Q", 4096 * 9) + b"\x09" * 4
    wait_for(lambda: native_threads(os.getpid()) == 0, interval=0.02,
             what="the native thread to end after the client closed")
    with RawNbd(sock, "m") as conn:
        wait_for(lambda: native_threads(os.getpid()) == 1, interval=0.02,
                 what="the native thread")
        runner.call(server.shutdown(timeout=10))  # while the connection waits for requests
        assert conn.read_until_eof() == b""
    assert native_threads(os.getpid()) == 0
