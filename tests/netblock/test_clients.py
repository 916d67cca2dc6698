"""The NBD server driven by real clients: qemu-io, qemu-img, nbdinfo, nbdsh, nbdcopy, fio."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from hypervisor.config import Config
from tests.netblock.conftest import RunningServer, run, start_server


def qemu_io(uri: str, *commands: str) -> str:
    args = ["qemu-io", "-f", "raw"]
    for c in commands:
        args += ["-c", c]
    out = run(*args, uri).stdout
    assert "Pattern verification failed" not in out and "failed" not in out.lower(), out
    return out


def test_qemu_io_commands(mem_server: RunningServer) -> None:
    uri = mem_server.uri("mem")
    qemu_io(uri, "write -P 0xab 0 1M", "read -P 0xab 0 1M",
            "write -z 1M 1M", "read -P 0 1M 1M",
            "write -P 0x11 2M 64k", "write -z -u 2M 64k", "read -P 0 2M 64k",
            "write -P 0x22 3M 128k", "discard 3M 64k", "read -P 0 3M 64k", "read -P 0x22 3136k 64k",
            "flush", "write -f -P 0x33 4M 4k", "read -P 0x33 4M 4k",
            "aio_write -P 0x44 5M 64k", "aio_write -P 0x45 6M 64k", "aio_flush",
            "aio_read -P 0x44 5M 64k", "aio_read -P 0x45 6M 64k", "aio_flush")
    # data persists across connections
    qemu_io(uri, "read -P 0xab 0 1M", "read -P 0x33 4M 4k")
    # other export is independent
    qemu_io(mem_server.uri("other"), "read -P 0 0 1M")


def test_qemu_io_errors(mem_server: RunningServer) -> None:
    proc = run("qemu-io", "-f", "raw", "-c", "read 63M 2M", mem_server.uri("mem"), check=False)
    assert "Input/output error" in proc.stdout + proc.stderr or "Invalid" in proc.stdout + \
        proc.stderr, proc.stdout + proc.stderr
    proc = run("qemu-io", "-f", "raw", "-c", "read 0 4k", mem_server.uri("nope"), check=False)
    assert proc.returncode != 0


def test_nbdinfo_json_can_and_map(mem_server: RunningServer) -> None:
    uri = mem_server.uri("mem")
    info = json.loads(run("nbdinfo", "--json", uri).stdout)
    assert info["protocol"] == "newstyle-fixed" and info["structured"] is True
    export = info["exports"][0]
    assert export["export-size"] == 64 << 20
    assert export["contexts"] == ["base:allocation"]
    for key in ("can_flush", "can_fua", "can_trim", "can_zero", "can_fast_zero", "can_cache",
                "can_df", "can_multi_conn"):
        assert export[key] is True, key
    assert export["is_read_only"] is False
    assert export["block_size_minimum"] == 1 and export["block_size_preferred"] == 4096
    for can in ("connect", "read", "write", "flush", "fua", "trim", "zero", "fast-zero",
                "cache", "df", "multi-conn", "structured-reply"):
        assert run("nbdinfo", "--can", can, uri, check=False).returncode == 0, can
    assert run("nbdinfo", "--is", "read-only", uri, check=False).returncode == 2
    listing = run("nbdinfo", "--list", "--json", f"nbd+unix://?socket={mem_server.socket}")
    names = {e["export-name"] for e in json.loads(listing.stdout)["exports"]}
    assert names == {"mem", "other"}
    qemu_io(uri, "write -P 1 1M 64k", "write -P 2 8M 4k")
    extents = json.loads(run("nbdinfo", "--map", "--json", uri).stdout)
    data = [(e["offset"], e["length"]) for e in extents if e["type"] == 0]
    assert data == [(1 << 20, 64 << 10), (8 << 20, 4096)], extents
    assert sum(e["length"] for e in extents) == 64 << 20


NBDSH_SCRIPT = r"""
import nbd, sys
h = nbd.NBD()
h.set_export_name("mem")
h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
h.connect_unix(sys.argv[1])
assert h.get_structured_replies_negotiated()
assert h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
h.pwrite(b"\x5a" * 65536, 131072)
# structured read with DF: exactly one data chunk
chunks = []
def chunk(subbuf, offset, status, err):
    chunks.append((offset, len(subbuf), status))
    return 0
buf = h.pread_structured(65536, 131072, chunk, flags=nbd.CMD_FLAG_DF)
assert buf == b"\x5a" * 65536 and chunks == [(131072, 65536, nbd.READ_DATA)], chunks
# block status, with and without REQ_ONE
seen = []
def extent(meta, offset, entries, err):
    seen.append((meta, list(entries)))
    return 0
h.block_status(1 << 20, 0, extent)
assert seen[0][0] == "base:allocation"
ents = seen[0][1]
assert ents[0:2] == [131072, 3] and ents[2:4] == [65536, 0], ents
seen.clear()
h.block_status(1 << 20, 131072, extent, flags=nbd.CMD_FLAG_REQ_ONE)
assert seen[0][1] == [65536, 0], seen
# FAST_ZERO: supported, turns data into a hole when trimming is allowed
h.zero(65536, 131072, flags=nbd.CMD_FLAG_FAST_ZERO)
seen.clear()
h.block_status(65536, 131072, extent)
assert seen[0][1] == [65536, 3], seen
assert h.pread(65536, 131072) == bytes(65536)
# NO_HOLE zeroing keeps the range allocated
h.zero(65536, 262144, flags=nbd.CMD_FLAG_NO_HOLE)
seen.clear()
h.block_status(65536, 262144, extent)
assert seen[0][1] == [65536, 0], seen
# errors come back as structured errors, the connection survives
try:
    h.pread(4096, (64 << 20) - 1)
    raise SystemExit("read past end succeeded")
except nbd.Error as e:
    assert e.errno is not None
h.flush()
h.cache(4096, 0)
h.trim(4096, 0, flags=nbd.CMD_FLAG_FUA)
h.shutdown()
print("ok")
"""


def test_nbdsh_structured_block_status_fast_zero(mem_server: RunningServer,
                                                 nbd_tmp: Path) -> None:
    code = f"import sys\nsys.argv = ['check', {str(mem_server.socket)!r}]\n" + NBDSH_SCRIPT
    proc = run("env", "PATH=/usr/bin:/bin", "nbdsh", "-c", code)  # system python has libnbd
    assert proc.stdout.strip() == "ok"


def test_nbdcopy_and_qemu_img_roundtrip(mem_server: RunningServer, nbd_tmp: Path) -> None:
    src = nbd_tmp / "src.raw"
    with open(src, "wb") as f:
        f.write(os.urandom(3 << 20))
        f.seek(20 << 20)
        f.write(os.urandom(1 << 20))
        f.truncate(32 << 20)
    qcow = nbd_tmp / "src.qcow2"
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(src), str(qcow))
    uri = mem_server.uri("mem")
    run("qemu-img", "convert", "-n", "-f", "qcow2", "-O", "raw", str(qcow), uri)
    out = nbd_tmp / "out.raw"
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", uri, str(out))
    want = hashlib.sha256(src.read_bytes() + bytes(32 << 20)).hexdigest()
    assert hashlib.sha256(out.read_bytes()).hexdigest() == want
    copied = nbd_tmp / "copied.raw"
    run("nbdcopy", uri, str(copied))
    assert hashlib.sha256(copied.read_bytes()).hexdigest() == want
    # and back in through nbdcopy, into the other export's first 8 MiB
    small = nbd_tmp / "small.raw"
    small.write_bytes(os.urandom(8 << 20))
    run("nbdcopy", str(small), mem_server.uri("other"))
    run("nbdcopy", mem_server.uri("other"), str(nbd_tmp / "small2.raw"))
    assert (nbd_tmp / "small2.raw").read_bytes() == small.read_bytes()


def test_fio_verify(mem_server: RunningServer) -> None:
    proc = run("fio", "--name=verify", "--ioengine=nbd", f"--uri={mem_server.uri('mem')}",
               "--rw=randwrite", "--bs=4k", "--iodepth=16", "--size=16M",
               "--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--output-format=json",
               "--verify_state_save=0",  # no *-verify.state left in the working directory
               timeout=300)
    body = proc.stdout[proc.stdout.index("{"):]
    job = json.loads(body)["jobs"][0]
    assert job["error"] == 0 and job["write"]["io_bytes"] == 16 << 20
    assert job["read"]["io_bytes"] == 16 << 20  # the verify pass read it all back


def test_local_export_cli_roundtrip(config: Config, omega, nbd_tmp: Path) -> None:
    src = nbd_tmp / "img.raw"
    src.write_bytes(os.urandom(2 << 20) + bytes(2 << 20))
    qcow = nbd_tmp / "img.qcow2"
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(src), str(qcow))
    omega("netblock", "import", "n-local-rt", str(qcow), "--local", check=True)
    listed = json.loads(omega("netblock", "list", "--json", check=True).stdout)
    assert any(r["name"] == "n-local-rt" and r["kind"] == "local" for r in listed)
    out = nbd_tmp / "back.qcow2"
    omega("netblock", "export", "n-local-rt", str(out), "-O", "qcow2", check=True)
    raw = nbd_tmp / "back.raw"
    run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(out), str(raw))
    assert hashlib.sha256(raw.read_bytes()).digest() == hashlib.sha256(src.read_bytes()).digest()
    # serve it, write through qemu-io, restart, data is still there (sparse file)
    server = start_server(config, nbd_tmp, "n-local-rt", socket=nbd_tmp / "l.sock")
    try:
        qemu_io(server.uri("n-local-rt"), "write -P 0x77 3M 64k", "flush")
    finally:
        assert server.stop() == 0
    server = start_server(config, nbd_tmp, "n-local-rt", socket=nbd_tmp / "l.sock")
    try:
        qemu_io(server.uri("n-local-rt"), "read -P 0x77 3M 64k")
        extents = json.loads(run("nbdinfo", "--map", "--json", server.uri("n-local-rt")).stdout)
        assert any(e["type"] == 3 for e in extents)  # the untouched tail is a hole
    finally:
        assert server.stop() == 0
    repair = omega("netblock", "repair", "n-local-rt")
    assert repair.returncode == 2 and "is local" in repair.stderr
    # errors: exists, bad file, bad name
    assert omega("netblock", "export", "n-local-rt", str(out)).returncode == 1
    assert omega("netblock", "import", "n-local-rt", str(nbd_tmp / "missing")).returncode == 1
    assert omega("netblock", "create", "bad/name", "1M").returncode == 2
    assert omega("netblock", "create", "n-odd", "1001").returncode == 2
    omega("netblock", "delete", "n-local-rt", check=True)
    assert omega("netblock", "show", "n-local-rt").returncode == 1


def test_read_only_flags_are_honest(config: Config, nbd_tmp: Path) -> None:
    server = start_server(config, nbd_tmp, "--memory", "ro:4M", "--read-only",
                          socket=nbd_tmp / "ro.sock")
    try:
        uri = server.uri("ro")
        assert run("nbdinfo", "--is", "read-only", uri, check=False).returncode == 0
        for can in ("write", "trim", "zero", "fast-zero"):
            assert run("nbdinfo", "--can", can, uri, check=False).returncode == 2, can
        assert run("nbdinfo", "--can", "read", uri, check=False).returncode == 0
        proc = run("qemu-io", "-f", "raw", "-r", "-c", "read -P 0 0 64k", uri)
        assert "fail" not in proc.stdout.lower()
        # a client that writes anyway gets EPERM, and the export stays untouched
        import socket
        import struct

        from hypervisor.netblock import protocol as nbd

        s = socket.socket(socket.AF_UNIX)
        s.settimeout(20)
        s.connect(str(server.socket))
        s.recv(18)
        s.sendall(struct.pack(">IQII", 3, nbd.IHAVEOPT, nbd.OPT_EXPORT_NAME, 2) + b"ro")
        _size, flags = struct.unpack(">QH", s.recv(10))
        assert flags & nbd.TFLAG_READ_ONLY
        for cmd, payload in ((nbd.CMD_WRITE, b"abcd"), (nbd.CMD_TRIM, b""),
                             (nbd.CMD_WRITE_ZEROES, b"")):
            s.sendall(struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, 0, cmd, 9, 0, 4) + payload)
            assert struct.unpack(">IIQ", s.recv(16)) == (nbd.SIMPLE_REPLY_MAGIC, nbd.EPERM, 9)
        s.close()
        run("qemu-io", "-f", "raw", "-r", "-c", "read -P 0 0 4k", uri)
    finally:
        assert server.stop() == 0


def test_serve_bad_input(omega, nbd_tmp: Path) -> None:
    import socket

    sock = str(nbd_tmp / "bad.sock")
    cases = [
        (["netblock", "serve", "n-nope", "--socket", sock], 1, "no export named"),
        (["netblock", "serve", "--memory", "m", "--socket", sock], 2, "NAME:SIZE"),
        (["netblock", "serve", "--memory", "m:lots", "--socket", sock], 2, ""),
        (["netblock", "serve", "--memory", "m:1M", "--listen", "nohost", "--socket", sock], 2,
         "HOST:PORT"),
        (["netblock", "serve", "--memory", "m:1M", "--tls-creds", str(nbd_tmp / "none"),
          "--socket", sock], 2, "TLS credentials"),
        (["netblock", "create", "n-bad", "1M", "--chunk-size", "3K"], 2, "power of two"),
        (["netblock", "create", "n-bad", "1M", "--replicas", "0"], 2, "replicas"),
        (["netblock", "repair", "n-nope"], 1, "no export named"),
    ]
    for args, code, text in cases:
        proc = omega(*args)
        assert proc.returncode == code, (args, proc.stderr)
        assert text in proc.stderr, (args, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1 or code == 2, proc.stderr
    assert not Path(sock).exists()
    with socket.socket() as taken:  # a port already in use: one clear line, exit 1
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = omega("netblock", "serve", "--memory", "m:1M", "--socket", sock, "--listen",
                     f"127.0.0.1:{port}")
        assert proc.returncode == 1 and "cannot listen" in proc.stderr, proc.stderr
        assert not Path(sock).exists()  # the unix listener bound first is gone again
    proc = omega("netblock", "serve", "-s", "--memory", "m:1M")  # stdin is a pipe here
    assert proc.returncode == 2 and "not one" in proc.stderr, proc.stderr
