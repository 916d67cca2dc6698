"""Sealing: round trips, and every kind of tampering detected (property tests)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hypervisor.errors import SecurityError
from hypervisor.sealing import OVERHEAD, Sealer, build_aad

KEY = Sealer.generate_key()
SEALER = Sealer(KEY)

aads = st.builds(build_aad, st.sampled_from(["page", "chunk"]), st.text(max_size=40),
                 st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1))


@given(aad=aads, data=st.binary(max_size=8192))
def test_round_trip(aad: bytes, data: bytes) -> None:
    blob = SEALER.seal(aad, data)
    assert len(blob) == len(data) + OVERHEAD
    assert SEALER.open(aad, blob) == data


@given(aad=aads, data=st.binary(min_size=1, max_size=512), pos=st.integers(0, 10_000),
       bit=st.integers(0, 7))
def test_any_flipped_bit_is_detected(aad: bytes, data: bytes, pos: int, bit: int) -> None:
    blob = bytearray(SEALER.seal(aad, data))
    blob[pos % len(blob)] ^= 1 << bit
    with pytest.raises(SecurityError):
        SEALER.open(aad, bytes(blob))


@given(data=st.binary(max_size=256), cut=st.integers(0, 300))
def test_truncated_or_extended_blob_is_detected(data: bytes, cut: int) -> None:
    aad = build_aad("page", "vm", 1, 1)
    blob = SEALER.seal(aad, data)
    for bad in (blob[:cut % len(blob)], blob + b"\0"):
        with pytest.raises(SecurityError):
            SEALER.open(aad, bad)


@given(owner=st.text(max_size=20), index=st.integers(0, 2**32), version=st.integers(1, 2**32))
def test_swapped_and_stale_blobs_are_detected(owner: str, index: int, version: int) -> None:
    blob = SEALER.seal(build_aad("chunk", owner, index, version), b"x" * 64)
    for other in (build_aad("chunk", owner, index + 1, version),        # swapped index
                  build_aad("chunk", owner, index, version + 1),        # stale version
                  build_aad("page", owner, index, version),             # other kind
                  build_aad("chunk", owner + "x", index, version)):     # other owner
        with pytest.raises(SecurityError):
            SEALER.open(other, blob)


@settings(max_examples=300)
@given(junk=st.binary(max_size=200))
def test_arbitrary_bytes_never_open(junk: bytes) -> None:
    with pytest.raises(SecurityError):
        SEALER.open(build_aad("page", "vm", 0, 0), junk)


def test_aad_encoding_is_unambiguous() -> None:
    assert build_aad("page", "ab", 1, 2) != build_aad("pagea", "b", 1, 2)
    assert build_aad("page", "a", 1, 2) != build_aad("page", "a", 2, 1)


def test_wrong_key_is_detected() -> None:
    aad = build_aad("page", "vm", 3, 4)
    blob = SEALER.seal(aad, b"secret")
    with pytest.raises(SecurityError):
        Sealer(Sealer.generate_key()).open(aad, blob)


def test_nonces_are_fresh_and_ciphertext_hides_plaintext() -> None:
    aad = build_aad("page", "vm", 0, 0)
    a, b = SEALER.seal(aad, b"\0" * 4096), SEALER.seal(aad, b"\0" * 4096)
    assert a != b
    assert b"\0" * 64 not in a[13:]


@pytest.mark.parametrize("key", [b"", b"x" * 16, b"x" * 31, "x" * 32])
def test_bad_keys_are_refused(key) -> None:
    with pytest.raises(SecurityError):
        Sealer(key)


def test_aad_range_is_checked() -> None:
    with pytest.raises(ValueError):
        build_aad("page", "vm", -1, 0)
    with pytest.raises(ValueError):
        build_aad("page", "vm", 0, 2**64)
