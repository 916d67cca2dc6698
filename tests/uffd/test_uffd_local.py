"""userfaultfd primitives in one process: a thread faults, the test thread serves it."""

from __future__ import annotations

import errno
import os

import pytest

from hypervisor.dsm import uffd
from tests.uffd._support import PAGES, SHMEM_FEATURES, SharedRegion, Toucher, next_events, pattern


def test_missing_read_fault_is_served_by_copy(region: SharedRegion,
                                               fault_fd: uffd.Userfaultfd) -> None:
    ioctls = fault_fd.register(region.mapping.address, region.mapping.length)
    assert ioctls & uffd.IOCTL_COPY and ioctls & uffd.IOCTL_ZEROPAGE and ioctls & uffd.IOCTL_WAKE
    assert fault_fd.read_events() == []  # non-blocking: nothing pending yet

    reader = Toucher(lambda: region.mapping.read(3 * region.page, region.page))
    (event,) = next_events(fault_fd, 1)
    assert event.kind is uffd.EventKind.PAGEFAULT
    assert event.address == region.addr(3)
    assert not event.write and not event.wp and not event.minor
    assert event.ptid == reader.native_id  # FEATURE_THREAD_ID

    data = pattern(1, region.page)
    assert fault_fd.copy_bytes(region.addr(3), data) == region.page
    assert reader.join() == data
    # The page went into the memory file itself, not a private copy.
    assert os.pread(region.memfd, region.page, 3 * region.page) == data


def test_write_fault_is_served_by_zeropage(region: SharedRegion,
                                           fault_fd: uffd.Userfaultfd) -> None:
    fault_fd.register(region.mapping.address, region.mapping.length)
    writer = Toucher(lambda: region.mapping.write(region.page + 100, b"written"))
    (event,) = next_events(fault_fd, 1)
    assert event.write and event.address == region.addr(1)
    assert event.flags & uffd.PAGEFAULT_FLAG_WRITE

    assert fault_fd.zeropage(region.addr(1), region.page) == region.page
    writer.join()
    expected = bytearray(region.page)
    expected[100:107] = b"written"
    assert region.mapping.read(region.page, region.page) == bytes(expected)


def test_dontwake_copy_leaves_the_thread_asleep_until_wake(
        region: SharedRegion, fault_fd: uffd.Userfaultfd) -> None:
    fault_fd.register(region.mapping.address, region.mapping.length)
    reader = Toucher(lambda: region.mapping.read(0, 16))
    next_events(fault_fd, 1)
    data = pattern(2, region.page)
    assert fault_fd.copy_bytes(region.addr(0), data, dontwake=True) == region.page
    # Without a wake the thread stays asleep even though the page is present.
    reader.thread.join(0.3)
    assert reader.thread.is_alive()
    fault_fd.wake(region.addr(0), region.page)
    assert reader.join() == data[:16]


def test_write_protect_fault_then_unprotect(region: SharedRegion,
                                            fault_fd: uffd.Userfaultfd) -> None:
    ioctls = fault_fd.register(region.mapping.address, region.mapping.length, wp=True)
    assert ioctls & uffd.IOCTL_WRITEPROTECT
    original = pattern(3, region.page)
    # Installed write-protected: reads go through, writes fault.
    fault_fd.copy_bytes(region.addr(2), original, wp=True)
    assert region.mapping.read(2 * region.page, region.page) == original
    assert fault_fd.read_events() == []

    writer = Toucher(lambda: region.mapping.write(2 * region.page, b"WP"))
    (event,) = next_events(fault_fd, 1)
    assert event.wp and event.write and event.address == region.addr(2)
    fault_fd.writeprotect(region.addr(2), region.page, enable=False)  # wakes the writer
    writer.join()
    assert region.mapping.read(2 * region.page, 4) == b"WP" + original[2:4]

    # Protect again: the next write faults again.
    fault_fd.writeprotect(region.addr(2), region.page, enable=True)
    writer = Toucher(lambda: region.mapping.write(2 * region.page + 8, b"again"))
    (event,) = next_events(fault_fd, 1)
    assert event.wp
    fault_fd.writeprotect(region.addr(2), region.page, enable=False)
    writer.join()
    assert region.mapping.read(2 * region.page + 8, 5) == b"again"


def test_batched_copy_wakes_every_waiting_thread(region: SharedRegion,
                                                 fault_fd: uffd.Userfaultfd) -> None:
    fault_fd.register(region.mapping.address, region.mapping.length)
    first, count = 2, 5
    readers = [Toucher(lambda i=i: region.mapping.read(i * region.page, region.page))
               for i in range(first, first + count)]
    events = next_events(fault_fd, count)
    assert sorted(e.address for e in events) == [region.addr(i)
                                                 for i in range(first, first + count)]
    assert {e.ptid for e in events} == {r.native_id for r in readers}

    batch = b"".join(pattern(100 + i, region.page) for i in range(first, first + count))
    assert fault_fd.copy_bytes(region.addr(first), batch) == len(batch)  # one ioctl
    for i, reader in zip(range(first, first + count), readers, strict=True):
        assert reader.join() == pattern(100 + i, region.page)


def test_second_copy_raises_exists(region: SharedRegion, fault_fd: uffd.Userfaultfd) -> None:
    fault_fd.register(region.mapping.address, region.mapping.length)
    fault_fd.copy_bytes(region.addr(0), pattern(4, region.page))
    with pytest.raises(uffd.UffdExists) as info:
        fault_fd.copy_bytes(region.addr(0), pattern(5, region.page))
    assert info.value.errno == errno.EEXIST
    with pytest.raises(uffd.UffdExists):
        fault_fd.zeropage(region.addr(0), region.page)
    assert region.mapping.read(0, region.page) == pattern(4, region.page)


def test_copy_stops_at_a_present_page_and_reports_partial(
        region: SharedRegion, fault_fd: uffd.Userfaultfd) -> None:
    fault_fd.register(region.mapping.address, region.mapping.length)
    fault_fd.copy_bytes(region.addr(5), pattern(6, region.page))
    data = pattern(7, region.page) * 3  # pages 4, 5 (present), 6
    assert fault_fd.copy_bytes(region.addr(4), data) == region.page
    assert region.mapping.read(4 * region.page, region.page) == pattern(7, region.page)
    assert region.mapping.read(5 * region.page, region.page) == pattern(6, region.page)
    # Page 6 was not installed: the caller copies the rest itself.
    assert os.pread(region.memfd, region.page, 6 * region.page) == bytes(region.page)


def test_bad_ranges_raise_bad_range(region: SharedRegion, fault_fd: uffd.Userfaultfd) -> None:
    base, page = region.mapping.address, region.page
    with pytest.raises(uffd.UffdBadRange) as info:
        fault_fd.register(base + 1, page)
    assert info.value.errno == errno.EINVAL
    # Copy into a range that was never registered.
    with pytest.raises(uffd.UffdBadRange) as info:
        fault_fd.copy_bytes(base, pattern(8, page))
    assert info.value.errno == errno.ENOENT
    fault_fd.register(base, PAGES * page)
    with pytest.raises(uffd.UffdBadRange):
        fault_fd.copy_bytes(base + 8, pattern(8, page))  # unaligned destination
    with pytest.raises(uffd.UffdBadRange):
        fault_fd.copy_bytes(base, b"short")  # not a page multiple
    with pytest.raises(uffd.UffdBadRange):
        fault_fd.wake(base + 1, page)
    with pytest.raises(uffd.UffdBadRange):
        fault_fd.writeprotect(base, page, enable=True)  # registered without wp
    with pytest.raises(uffd.UffdBadRange):
        region.mapping.read(PAGES * page - 4, 8)  # outside the mapping, no segfault
    with pytest.raises(uffd.UffdBadRange):
        uffd.MappedFile.map(region.memfd, page, offset=3)


def test_unregistered_range_no_longer_faults(region: SharedRegion,
                                             fault_fd: uffd.Userfaultfd) -> None:
    fault_fd.register(region.mapping.address, region.mapping.length)
    fault_fd.unregister(region.mapping.address, region.mapping.length)
    assert region.mapping.read(0, region.page) == bytes(region.page)
    assert fault_fd.read_events() == []


def test_missing_feature_is_named() -> None:
    impossible = 1 << 62
    with pytest.raises(uffd.UffdFeatureMissing) as info:
        uffd.Userfaultfd.create(features=uffd.FEATURE_MISSING_SHMEM | impossible)
    assert info.value.missing == impossible
    assert "bit 62" in str(info.value)
    assert uffd.feature_names(uffd.FEATURE_MISSING_SHMEM | impossible) == [
        "MISSING_SHMEM", "bit 62"]


def test_available_features_reports_every_named_feature() -> None:
    features = uffd.available_features()
    assert set(features) == set(uffd.FEATURES)
    # design.md: this host's kernel serves shared-memory faults; DSM depends on it.
    assert features["missing_shmem"] is True
    supported = uffd.supported_features()
    assert all(features[name] == bool(supported & bit) for name, bit in uffd.FEATURES.items())


def test_handshake_reports_features_and_ioctls() -> None:
    with uffd.Userfaultfd.create(features=SHMEM_FEATURES, nonblocking=False) as fd:
        assert fd.features == SHMEM_FEATURES
        assert fd.ioctls & (1 << 63)  # _UFFDIO_API
        assert os.get_blocking(fd.fd) is True
        assert os.get_inheritable(fd.fd) is False  # O_CLOEXEC
    assert fd.closed
    fd.close()  # idempotent
    with uffd.Userfaultfd.create(user_mode_only=True) as user_only:
        assert os.get_blocking(user_only.fd) is False


def test_closed_uffd_raises_typed_error() -> None:
    fd = uffd.Userfaultfd.create()
    fd.close()
    with pytest.raises(uffd.UffdError) as info:
        fd.read_events()
    assert info.value.errno == errno.EBADF


def test_memfd_and_punch_hole(region: SharedRegion) -> None:
    region.mapping.write(0, pattern(9, region.page) * 2)
    uffd.punch_hole(region.memfd, 0, region.page)
    assert os.fstat(region.memfd).st_size == PAGES * region.page  # KEEP_SIZE
    assert region.mapping.read(0, region.page) == bytes(region.page)
    assert region.mapping.read(region.page, region.page) == pattern(9, region.page)
    with pytest.raises(uffd.UffdError) as info:
        uffd.punch_hole(-1, 0, region.page)
    assert info.value.errno == errno.EBADF


def test_memfd_flags() -> None:
    import fcntl

    plain = uffd.memfd_create("omega-test-plain", cloexec=False)
    sealable = uffd.memfd_create("omega-test-seal", allow_sealing=True)
    try:
        assert os.get_inheritable(plain) is True
        assert os.get_inheritable(sealable) is False
        assert os.readlink(f"/proc/self/fd/{sealable}").startswith("/memfd:omega-test-seal")
        fcntl.fcntl(sealable, fcntl.F_ADD_SEALS, fcntl.F_SEAL_GROW)
        with pytest.raises(PermissionError):
            fcntl.fcntl(plain, fcntl.F_ADD_SEALS, fcntl.F_SEAL_GROW)
    finally:
        os.close(plain)
        os.close(sealable)


def test_write_fault_on_a_hole_after_punch_faults_again(region: SharedRegion,
                                                        fault_fd: uffd.Userfaultfd) -> None:
    fault_fd.register(region.mapping.address, region.mapping.length)
    fault_fd.copy_bytes(region.addr(0), pattern(10, region.page))
    assert region.mapping.read(0, 4) == pattern(10, region.page)[:4]
    uffd.punch_hole(region.memfd, 0, region.page)
    reader = Toucher(lambda: region.mapping.read(0, 4))
    (event,) = next_events(fault_fd, 1)
    assert event.address == region.addr(0)
    fault_fd.copy_bytes(region.addr(0), pattern(11, region.page))
    assert reader.join() == pattern(11, region.page)[:4]


def test_remove_and_unmap_events_are_decoded(region: SharedRegion) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madv_remove = 9  # MADV_REMOVE, linux/mman.h
    features = uffd.FEATURE_MISSING_SHMEM | uffd.FEATURE_EVENT_REMOVE | uffd.FEATURE_EVENT_UNMAP
    with uffd.Userfaultfd.create(features=features) as fault_fd:
        fault_fd.register(region.mapping.address, region.mapping.length)
        # The kernel holds madvise/munmap until the handler has read the event.
        remover = Toucher(lambda: libc.madvise(region.addr(1), 2 * region.page, madv_remove))
        (event,) = next_events(fault_fd, 1)
        assert event.kind is uffd.EventKind.REMOVE
        assert (event.start, event.end) == (region.addr(1), region.addr(3))
        assert remover.join() == 0

        start, end = region.mapping.address, region.mapping.address + region.mapping.length
        unmapper = Toucher(region.mapping.close)
        (event,) = next_events(fault_fd, 1)
        assert event.kind is uffd.EventKind.UNMAP
        assert (event.start, event.end) == (start, end)
        unmapper.join()
        assert region.mapping.closed
