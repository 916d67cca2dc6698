"""The agent's hello message (see native/agent/agent_proto.h): pure codec.

The agent in QEMU sends one hello, with [userfaultfd, memfd] attached by
SCM_RIGHTS; the handler answers ``OMEGAACK`` or ``OMEGANAK<reason>``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from hypervisor.errors import ProtocolError

MAGIC = b"OMEGADSM"
ACK = b"OMEGAACK"
NAK = b"OMEGANAK"
VERSION = 1
FLAG_WP = 1
FLAG_USER_MODE_ONLY = 2
FLAG_RESEND = 4

_FORMAT = struct.Struct("<8sIIQQQQiI")
SIZE = _FORMAT.size


@dataclass(frozen=True)
class Hello:
    """What the agent says about the guest-RAM region it registered."""

    flags: int
    addr: int
    length: int
    offset: int
    page_size: int
    pid: int

    @property
    def wp(self) -> bool:
        """The range is registered for write-protect (safe eviction)."""
        return bool(self.flags & FLAG_WP)

    @property
    def resend(self) -> bool:
        """The agent re-sends after a handler restart."""
        return bool(self.flags & FLAG_RESEND)


def decode_hello(data: bytes) -> Hello:
    """Parse a hello.

    Raises:
        ProtocolError: wrong size, magic, version, or an impossible region.
    """
    if len(data) != SIZE:
        raise ProtocolError(f"DSM hello is {len(data)} bytes, want {SIZE}")
    magic, version, flags, addr, length, offset, page_size, pid, _ = _FORMAT.unpack(data)
    if magic != MAGIC:
        raise ProtocolError(f"DSM hello has bad magic {magic!r}")
    if version != VERSION:
        raise ProtocolError(f"DSM hello version {version}, this handler speaks {VERSION}")
    if page_size not in (4096, 16384, 65536) or length == 0 or length % page_size \
            or addr % page_size or offset % page_size or addr + length > 1 << 64:
        raise ProtocolError(f"DSM hello describes a bad region {addr:#x}+{length:#x} "
                            f"(page {page_size})")
    return Hello(flags, addr, length, offset, page_size, pid)


def encode_hello(hello: Hello) -> bytes:
    """Encode a hello (tests and the benchmark's stand-in for QEMU)."""
    return _FORMAT.pack(MAGIC, VERSION, hello.flags, hello.addr, hello.length, hello.offset,
                        hello.page_size, hello.pid, 0)
