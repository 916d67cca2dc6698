"""Sealing: authenticated encryption of pages and chunks before they leave the host.

A peer stores what it is given as opaque bytes. The owner (a VM's DSM handler, a
netblock export) seals each page or chunk with AES-256-GCM under a key that never
leaves the owner, binding it with associated data to *what* it is: its kind,
owner id, index and version (:func:`build_aad`). A blob returned for another
index (swapped), an older version (stale), or with any bit changed (tampered)
fails to open with :class:`~hypervisor.errors.SecurityError`; it is never served.

Blob layout (all sealed blobs)::

    1 byte  format (0x01)
    12 bytes nonce (random per seal)
    N bytes ciphertext
    16 bytes GCM tag

Random 96-bit nonces are safe for up to 2**32 seals per key (NIST SP 800-38D);
owners rotate keys per VM run / per export long before that.
"""

from __future__ import annotations

import os
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from hypervisor.errors import SecurityError

KEY_SIZE = 32
NONCE_SIZE = 12
TAG_SIZE = 16
FORMAT = 0x01
OVERHEAD = 1 + NONCE_SIZE + TAG_SIZE

_AAD_MAGIC = b"omega-seal-v1\0"


def build_aad(kind: str, owner: str, index: int, version: int) -> bytes:
    """Build the associated data that names a sealed blob unambiguously.

    Fields are length-prefixed, so no two different tuples encode alike.

    Args:
        kind: what the blob is (``"page"``, ``"chunk"``).
        owner: the owner's id (VM uuid, export id).
        index: page number or chunk index (non-negative, < 2**64).
        version: the blob's version (non-negative, < 2**64).

    Returns:
        The associated data.

    Raises:
        ValueError: index or version out of range.
    """
    if not (0 <= index < 1 << 64 and 0 <= version < 1 << 64):
        raise ValueError("index and version must be in [0, 2**64)")
    k, o = kind.encode(), owner.encode()
    return b"".join((_AAD_MAGIC, struct.pack(">H", len(k)), k, struct.pack(">H", len(o)), o,
                     struct.pack(">QQ", index, version)))


class Sealer:
    """AES-256-GCM sealing with a per-owner key.

    Thread-safe and cheap to share: it holds only the key.
    """

    __slots__ = ("_aead",)

    def __init__(self, key: bytes) -> None:
        """Create a sealer.

        Args:
            key: 32 random bytes (see :meth:`generate_key`).

        Raises:
            SecurityError: the key is not 32 bytes.
        """
        if not isinstance(key, (bytes, bytearray)) or len(key) != KEY_SIZE:
            raise SecurityError(f"sealing key must be {KEY_SIZE} bytes")
        self._aead = AESGCM(bytes(key))

    @staticmethod
    def generate_key() -> bytes:
        """Return a fresh random 256-bit key."""
        return AESGCM.generate_key(bit_length=256)

    def seal(self, aad: bytes, plaintext: bytes) -> bytes:
        """Encrypt and authenticate ``plaintext``, bound to ``aad``.

        Args:
            aad: associated data (see :func:`build_aad`); not stored in the blob.
            plaintext: the page or chunk.

        Returns:
            The sealed blob (``len(plaintext) + OVERHEAD`` bytes).
        """
        nonce = os.urandom(NONCE_SIZE)
        return bytes((FORMAT,)) + nonce + self._aead.encrypt(nonce, bytes(plaintext), aad)

    def open(self, aad: bytes, blob: bytes) -> bytes:
        """Authenticate and decrypt a blob sealed with the same key and ``aad``.

        Args:
            aad: the associated data the blob must have been sealed with.
            blob: the sealed blob.

        Returns:
            The plaintext.

        Raises:
            SecurityError: the blob is malformed, tampered with, or sealed for other
                associated data (another index, an older version) or another key.
        """
        if len(blob) < OVERHEAD:
            raise SecurityError(f"sealed blob too short ({len(blob)} bytes)")
        if blob[0] != FORMAT:
            raise SecurityError(f"sealed blob has unknown format {blob[0]:#x}")
        nonce = bytes(blob[1:1 + NONCE_SIZE])
        try:
            return self._aead.decrypt(nonce, bytes(blob[1 + NONCE_SIZE:]), aad)
        except InvalidTag:
            raise SecurityError("sealed blob failed authentication "
                                "(tampered, stale, swapped or wrong key)") from None
