"""Bad clients get NBD errors or a clean disconnect; other clients keep working."""

from __future__ import annotations

import socket
import struct
import subprocess
import threading

import pytest

from hypervisor.netblock import protocol as nbd
from tests.netblock.conftest import RunningServer, run


def connect(server: RunningServer) -> socket.socket:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(20)
    s.connect(str(server.socket))
    greeting = recv_exact(s, 18)
    magic, opt_magic, flags = struct.unpack(">QQH", greeting)
    assert (magic, opt_magic) == (nbd.NBDMAGIC, nbd.IHAVEOPT)
    assert flags == nbd.FLAG_FIXED_NEWSTYLE | nbd.FLAG_NO_ZEROES
    return s


def recv_exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise EOFError(f"closed after {len(buf)} of {n} bytes")
        buf += chunk
    return buf


def closed(s: socket.socket) -> bool:
    try:
        while True:
            if not s.recv(65536):
                return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def option(s: socket.socket, opt: int, data: bytes = b"") -> tuple[int, bytes]:
    s.sendall(struct.pack(">QII", nbd.IHAVEOPT, opt, len(data)) + data)
    magic, ropt, rtype, length = struct.unpack(">QIII", recv_exact(s, 20))
    assert magic == nbd.REPLY_MAGIC and ropt == opt
    return rtype, recv_exact(s, length)


def transmission(server: RunningServer, export: str = "mem") -> socket.socket:
    s = connect(server)
    s.sendall(struct.pack(">I", nbd.FLAG_C_FIXED_NEWSTYLE | nbd.FLAG_C_NO_ZEROES))
    raw = export.encode()
    s.sendall(struct.pack(">QII", nbd.IHAVEOPT, nbd.OPT_EXPORT_NAME, len(raw)) + raw)
    size, flags = struct.unpack(">QH", recv_exact(s, 10))
    assert size == 64 << 20 and flags & nbd.TFLAG_HAS_FLAGS
    return s


def request(s: socket.socket, cmd: int, offset: int, length: int, *, flags: int = 0,
            payload: bytes = b"", cookie: int = 1) -> int:
    s.sendall(struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, flags, cmd, cookie, offset, length)
              + payload)
    magic, error, handle = struct.unpack(">IIQ", recv_exact(s, 16))
    assert magic == nbd.SIMPLE_REPLY_MAGIC and handle == cookie
    if cmd == nbd.CMD_READ and error == 0:
        recv_exact(s, length)
    return error


class Bystander:
    """A qemu-io client writing and verifying in a loop while others misbehave."""

    def __init__(self, server: RunningServer) -> None:
        self.server = server
        self.errors: list[str] = []
        self.rounds = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            pattern = self.rounds % 250 + 1
            proc = subprocess.run(
                ["qemu-io", "-f", "raw", "-c", f"write -P {pattern} 32M 256k", "-c",
                 f"read -P {pattern} 32M 256k", self.server.uri("mem")],
                capture_output=True, text=True, timeout=60, check=False)
            if proc.returncode != 0 or "fail" in proc.stdout.lower():
                self.errors.append(proc.stdout + proc.stderr)
            self.rounds += 1

    def finish(self) -> None:
        self.stop.set()
        self.thread.join(timeout=120)
        assert not self.errors, self.errors[0]
        assert self.rounds > 0


@pytest.fixture
def bystander(mem_server: RunningServer):
    b = Bystander(mem_server)
    yield b
    b.finish()


def test_malformed_handshakes_close_cleanly(mem_server: RunningServer,
                                            bystander: Bystander) -> None:
    # unknown client flags
    s = connect(mem_server)
    s.sendall(struct.pack(">I", 0xFF00))
    assert closed(s)
    # bad option magic
    s = connect(mem_server)
    s.sendall(struct.pack(">I", 3) + b"NOTMAGIC" + bytes(8))
    assert closed(s)
    # absurd option length
    s = connect(mem_server)
    s.sendall(struct.pack(">IQII", 3, nbd.IHAVEOPT, nbd.OPT_GO, 1 << 30))
    assert closed(s)
    # unknown export via EXPORT_NAME: no reply possible, the server closes
    s = connect(mem_server)
    s.sendall(struct.pack(">I", 3) + struct.pack(">QII", nbd.IHAVEOPT, nbd.OPT_EXPORT_NAME, 3)
              + b"zzz")
    assert closed(s)
    # garbage right away, and a client that hangs up mid-option
    s = connect(mem_server)
    s.sendall(b"\xff" * 1000)
    assert closed(s)
    s = connect(mem_server)
    s.sendall(struct.pack(">I", 3) + struct.pack(">QII", nbd.IHAVEOPT, nbd.OPT_GO, 100) + b"x")
    s.close()


def test_option_errors_keep_the_connection(mem_server: RunningServer) -> None:
    s = connect(mem_server)
    s.sendall(struct.pack(">I", 3))
    assert option(s, 4242, b"whatever")[0] == nbd.REP_ERR_UNSUP
    assert option(s, nbd.OPT_LIST, b"junk")[0] == nbd.REP_ERR_INVALID
    assert option(s, nbd.OPT_GO, b"\0\0")[0] == nbd.REP_ERR_INVALID
    assert option(s, nbd.OPT_GO, b"\0\0\0\2no\0\0")[0] == nbd.REP_ERR_UNKNOWN
    assert option(s, nbd.OPT_STARTTLS)[0] == nbd.REP_ERR_POLICY  # no TLS configured
    assert option(s, nbd.OPT_STRUCTURED_REPLY, b"x")[0] == nbd.REP_ERR_INVALID
    assert option(s, nbd.OPT_ABORT)[0] == nbd.REP_ACK
    assert closed(s)


def test_bad_requests_get_errors(mem_server: RunningServer, bystander: Bystander) -> None:
    s = transmission(mem_server)
    assert request(s, nbd.CMD_READ, (64 << 20) - 512, 1024) == nbd.EINVAL  # past the end
    assert request(s, nbd.CMD_WRITE, 64 << 20, 1, payload=b"x") == nbd.ENOSPC
    assert request(s, nbd.CMD_READ, 0, 64 << 20) == nbd.EOVERFLOW  # over max block
    assert request(s, 77, 0, 0) == nbd.EINVAL  # unknown command
    assert request(s, nbd.CMD_READ, 0, 512, flags=1 << 9) == nbd.EINVAL  # unknown flag
    assert request(s, nbd.CMD_READ, 0, 512, flags=nbd.CMD_FLAG_DF) == nbd.EINVAL  # no SR
    assert request(s, nbd.CMD_BLOCK_STATUS, 0, 512) == nbd.EINVAL  # no meta context
    assert request(s, nbd.CMD_FLUSH, 5, 0) == nbd.EINVAL
    assert request(s, nbd.CMD_WRITE, 0, 4, payload=b"abcd", flags=nbd.CMD_FLAG_FUA) == 0
    assert request(s, nbd.CMD_READ, 0, 4) == 0  # the connection is still healthy
    # DISC: no reply, the server closes
    s.sendall(struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, 0, nbd.CMD_DISC, 9, 0, 0))
    assert closed(s)


def test_framing_errors_disconnect(mem_server: RunningServer, bystander: Bystander) -> None:
    s = transmission(mem_server)
    s.sendall(struct.pack(">IHHQQI", 0xDEADBEEF, 0, nbd.CMD_READ, 1, 0, 512))
    assert closed(s)
    s = transmission(mem_server)
    s.sendall(struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, 0, nbd.CMD_WRITE, 1, 0, 1 << 30))
    assert closed(s)
    s = transmission(mem_server)  # a client that dies mid-payload
    s.sendall(struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, 0, nbd.CMD_WRITE, 1, 0, 4096) + b"ab")
    s.close()
    run("qemu-io", "-f", "raw", "-c", "read 0 4k", mem_server.uri("mem"))


def test_many_clients_at_once(mem_server: RunningServer) -> None:
    procs = [subprocess.Popen(
        ["qemu-io", "-f", "raw", "-c", f"write -P {i + 1} {i}M 1M", "-c",
         f"read -P {i + 1} {i}M 1M", mem_server.uri("mem")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(12)]
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0 and "fail" not in out.lower(), out
