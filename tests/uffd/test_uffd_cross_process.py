"""Process B serves process A's page faults through a uffd passed over SCM_RIGHTS.

This is the DSM shape: QEMU (A) registers its guest RAM, hands the uffd and the
memory file to the handler (B), and B installs pages with UFFDIO_COPY; pages
punched out of the file fault again and are served again.
"""

from __future__ import annotations

import hashlib
import json
import os
import select
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from hypervisor.dsm import uffd
from tests.uffd._support import WAIT_S, pattern

SCRIPT = Path(__file__).with_name("faulting_process.py")
REPO = Path(__file__).resolve().parents[2]
PAGES = 8


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class FaultServer:
    """Process B's side: answers A's faults from ``contents`` (None = zero page)."""

    fault_fd: uffd.Userfaultfd
    sock: socket.socket
    base: int
    page: int
    contents: dict[int, bytes | None]
    faults: list[int] = field(default_factory=list)

    def request(self, **command: object) -> dict[str, object]:
        """Send A a command and serve its faults until it replies (bounded)."""
        self.sock.send(json.dumps(command).encode())
        poller = select.poll()
        poller.register(self.fault_fd.fd, select.POLLIN)
        poller.register(self.sock.fileno(), select.POLLIN)
        deadline = time.monotonic() + WAIT_S
        while True:
            remaining = deadline - time.monotonic()
            ready = dict(poller.poll(max(0, int(remaining * 1000))))
            assert ready, f"process A did not answer {command} within {WAIT_S}s"
            if self.fault_fd.fd in ready:
                for event in self.fault_fd.read_events():
                    assert event.kind is uffd.EventKind.PAGEFAULT
                    self.serve(event.address)
            if self.sock.fileno() in ready:
                reply = self.sock.recv(65536)
                assert reply, "process A died"
                return json.loads(reply)

    def serve(self, address: int) -> None:
        index = (address - self.base) // self.page
        self.faults.append(index)
        data = self.contents[index]
        page_addr = self.base + index * self.page
        if data is None:
            self.fault_fd.zeropage(page_addr, self.page)
        else:
            assert self.fault_fd.copy_bytes(page_addr, data) == self.page


@dataclass
class ProcessA:
    proc: subprocess.Popen[bytes]
    sock: socket.socket
    hello: dict[str, int]
    fault_fd: uffd.Userfaultfd
    memfd: int


@pytest.fixture
def process_a() -> Iterator[ProcessA]:
    """Start process A and receive its uffd and memfd."""
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), str(theirs.fileno()), str(PAGES)],
        pass_fds=[theirs.fileno()], env=env, stderr=subprocess.PIPE,
    )
    theirs.close()
    fault_fd = None
    memfd = -1
    try:
        ready = select.select([mine], [], [], WAIT_S)[0]
        assert ready, "process A never sent its descriptors"
        payload, fds = uffd.recv_fds(mine, max_fds=2)
        assert len(fds) == 2, (payload, proc.poll())
        fault_fd = uffd.Userfaultfd.from_fd(fds[0], features=uffd.FEATURE_MISSING_SHMEM)
        memfd = fds[1]
        yield ProcessA(proc, mine, json.loads(payload), fault_fd, memfd)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(WAIT_S)
        assert proc.stderr is not None
        stderr = proc.stderr.read().decode()
        proc.stderr.close()
        if fault_fd is not None:
            fault_fd.close()
        if memfd >= 0:
            os.close(memfd)
        mine.close()
        assert "Traceback" not in stderr, stderr


def test_b_serves_a_and_serves_again_after_punch_hole(process_a: ProcessA) -> None:
    page = process_a.hello["page"]
    assert process_a.hello["length"] == PAGES * page
    assert process_a.hello["pid"] == process_a.proc.pid
    contents: dict[int, bytes | None] = {i: pattern(10 + i, page) for i in range(PAGES)}
    contents[2] = None  # served with UFFDIO_ZEROPAGE
    server = FaultServer(process_a.fault_fd, process_a.sock, process_a.hello["address"],
                         page, contents)

    # A reads pages 0..3 one at a time: one fault each, each answered by B.
    for i in range(4):
        reply = server.request(op="read", page=i)
        expected = bytes(page) if contents[i] is None else contents[i]
        assert reply["sha256"] == [digest(expected)]
    assert server.faults == [0, 1, 2, 3]
    # Present now: no fault, same data.
    assert server.request(op="read", page=0)["sha256"] == [digest(contents[0])]
    assert server.faults == [0, 1, 2, 3]
    # B's copies landed in the shared memory file.
    assert os.pread(process_a.memfd, page, 0) == contents[0]

    # Evict page 0 by punching it out of the file: A's next touch faults again.
    uffd.punch_hole(process_a.memfd, 0, page)
    assert os.pread(process_a.memfd, page, 0) == bytes(page)
    contents[0] = pattern(99, page)
    assert server.request(op="read", page=0)["sha256"] == [digest(contents[0])]
    assert server.faults == [0, 1, 2, 3, 0]
    # Page 1 was not punched: still present, no fault.
    assert server.request(op="read", page=1)["sha256"] == [digest(contents[1])]
    assert server.faults == [0, 1, 2, 3, 0]

    # One read over four pages: four faults, in order, all served.
    reply = server.request(op="read", page=4, count=4)
    assert reply["sha256"] == [digest(contents[i]) for i in range(4, 8)]  # type: ignore[arg-type]
    assert server.faults[-4:] == [4, 5, 6, 7]

    process_a.sock.send(json.dumps({"op": "exit"}).encode())
    assert process_a.proc.wait(WAIT_S) == 0


def test_copy_after_a_exits_raises_process_gone(process_a: ProcessA) -> None:
    page = process_a.hello["page"]
    process_a.sock.send(json.dumps({"op": "exit"}).encode())
    assert process_a.proc.wait(WAIT_S) == 0
    with pytest.raises(uffd.UffdProcessGone):
        process_a.fault_fd.copy_bytes(process_a.hello["address"], pattern(1, page))
