"""The one exception hierarchy of Omega.

Every failure that reaches a user is an :class:`OmegaError`. The CLI prints its
message as one line and exits with :attr:`OmegaError.exit_code` (1: the operation
failed; 2: the request itself was wrong).
"""

from __future__ import annotations


class OmegaError(Exception):
    """Base of every error Omega raises on purpose.

    Attributes:
        exit_code: the process exit status the CLI uses for this error.
    """

    exit_code: int = 1


class UsageError(OmegaError):
    """The request is malformed: bad spec, bad size, unknown option value."""

    exit_code = 2


class SpecError(UsageError):
    """A VM, export or cluster spec failed validation."""


class NotFoundError(OmegaError):
    """A named thing (VM, image, export, peer) does not exist."""


class AlreadyExistsError(OmegaError):
    """A named thing already exists and may not be created again."""


class LibvirtError(OmegaError):
    """libvirt is unreachable or refused an operation."""


class ImageError(OmegaError):
    """A guest image is missing, corrupt or could not be built."""


class NativeError(OmegaError):
    """The native (cffi) layer failed or does not match this package."""


class PeerError(OmegaError):
    """A peer node is unreachable, refused a request, or answered wrongly."""


class SecurityError(OmegaError):
    """Certificates, keys or authentication failed."""


class ProtocolError(OmegaError):
    """Bytes on a wire did not follow the protocol."""
