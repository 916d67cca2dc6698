"""Process A of the cross-process userfaultfd test (run as a script, not collected).

It maps a memfd MAP_SHARED, registers the mapping with a userfaultfd, hands
both descriptors to process B over the unix socket given as argv[1]
(SCM_RIGHTS), closes its own copies, and then reads pages when B asks. Every
fault those reads take is served by B. Replies are JSON over the same
SOCK_SEQPACKET socket.

Usage: faulting_process.py SOCKET_FD PAGES
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sys

from hypervisor.dsm import uffd


def main(argv: list[str]) -> int:
    """Run process A.

    Args:
        argv: ``[SOCKET_FD, PAGES]``.

    Returns:
        The exit status.
    """
    sock = socket.socket(fileno=int(argv[0]))
    pages = int(argv[1])
    page = uffd.page_size()
    memfd = uffd.memfd_create("omega-test-process-a")
    os.ftruncate(memfd, pages * page)
    mapping = uffd.MappedFile.map(memfd, pages * page)
    fault_fd = uffd.Userfaultfd.create(features=uffd.FEATURE_MISSING_SHMEM)
    fault_fd.register(mapping.address, mapping.length)
    hello = {"address": mapping.address, "length": mapping.length, "page": page,
             "pid": os.getpid()}
    uffd.send_fds(sock, [fault_fd.fd, memfd], json.dumps(hello).encode())
    # B owns the uffd and the file now; A keeps only its mapping.
    fault_fd.close()
    os.close(memfd)
    while True:
        request = sock.recv(4096)
        if not request:
            return 1
        command = json.loads(request)
        if command["op"] == "exit":
            return 0
        first, count = command["page"], command.get("count", 1)
        data = mapping.read(first * page, count * page)
        reply = {"sha256": [hashlib.sha256(data[i * page:(i + 1) * page]).hexdigest()
                            for i in range(count)]}
        sock.send(json.dumps(reply).encode())


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
