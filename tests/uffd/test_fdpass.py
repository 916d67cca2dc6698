"""Passing descriptors with a payload over unix sockets (SCM_RIGHTS)."""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hypervisor.dsm import uffd


@pytest.fixture
def socket_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with left, right:
        yield left, right


def same_file(a: int, b: int) -> bool:
    sa, sb = os.fstat(a), os.fstat(b)
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_several_fds_travel_with_the_payload(
        socket_pair: tuple[socket.socket, socket.socket]) -> None:
    left, right = socket_pair
    memfd = uffd.memfd_create("omega-test-fdpass")
    read_end, write_end = os.pipe()
    received: list[int] = []
    try:
        assert uffd.send_fds(left, [memfd, read_end, write_end], b"hello fds") == 9
        data, received = uffd.recv_fds(right.fileno())
        assert data == b"hello fds"
        assert len(received) == 3
        for sent, got in zip([memfd, read_end, write_end], received, strict=True):
            assert same_file(sent, got) and sent != got
            assert os.get_inheritable(got) is False  # MSG_CMSG_CLOEXEC
        os.write(received[2], b"x")  # the received pipe end is the real one
        assert os.read(read_end, 1) == b"x"
    finally:
        for fd in [memfd, read_end, write_end, *received]:
            os.close(fd)


def test_stream_socket_payload_without_fds() -> None:
    left, right = socket.socketpair()
    with left, right:
        assert uffd.send_fds(left, [], b"only data") == 9
        assert uffd.recv_fds(right) == (b"only data", [])


def test_too_many_fds_is_an_error_and_leaks_nothing(
        socket_pair: tuple[socket.socket, socket.socket]) -> None:
    left, right = socket_pair
    fds = [os.dup(0) for _ in range(3)]
    try:
        uffd.send_fds(left, fds, b"three")
        before = open_fds()
        with pytest.raises(uffd.UffdError) as info:
            uffd.recv_fds(right, max_fds=1)
        assert info.value.errno == errno.EMSGSIZE
        assert open_fds() == before
    finally:
        for fd in fds:
            os.close(fd)


def test_bad_arguments_are_refused(socket_pair: tuple[socket.socket, socket.socket]) -> None:
    left, right = socket_pair
    with pytest.raises(uffd.UffdBadRange):
        uffd.send_fds(left, [0], b"")
    with pytest.raises(uffd.UffdBadRange):
        uffd.send_fds(left, [0] * (uffd.MAX_FDS_PER_MESSAGE + 1))
    with pytest.raises(uffd.UffdBadRange):
        uffd.recv_fds(right, max_fds=uffd.MAX_FDS_PER_MESSAGE + 1)
    with pytest.raises(uffd.UffdError) as info:
        uffd.send_fds(left, [-1])
    assert info.value.errno == errno.EBADF


def test_peer_gone(socket_pair: tuple[socket.socket, socket.socket]) -> None:
    left, right = socket_pair
    right.setblocking(False)
    with pytest.raises(uffd.UffdAgain):
        uffd.recv_fds(right)
    left.close()
    assert uffd.recv_fds(right) == (b"", [])
    with pytest.raises(uffd.UffdError) as info:
        uffd.send_fds(right, [], b"x")  # MSG_NOSIGNAL: an error, not SIGPIPE
    assert info.value.errno == errno.EPIPE


@settings(max_examples=60, deadline=None)
@given(payload=st.binary(min_size=1, max_size=3000), nfds=st.integers(0, 6))
def test_roundtrip_any_payload(payload: bytes, nfds: int) -> None:
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with left, right:
        sent = [os.dup(1) for _ in range(nfds)]
        got: list[int] = []
        try:
            uffd.send_fds(left, sent, payload)
            data, got = uffd.recv_fds(right, bufsize=4096)
            assert data == payload
            assert len(got) == nfds
            assert all(same_file(a, b) for a, b in zip(sent, got, strict=True))
        finally:
            for fd in sent + got:
                os.close(fd)
