"""Client of a DSM handler's control socket (JSON lines)."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

from hypervisor.errors import NotFoundError, ProtocolError


def control_request(path: Path, request: dict[str, Any], *, timeout: float = 5.0) -> dict[str, Any]:
    """Send one request to the handler and return its answer.

    Args:
        path: the control socket.
        request: e.g. ``{"op": "stats"}``.
        timeout: seconds for the whole exchange.

    Returns:
        The answer object (``ok`` is True).

    Raises:
        NotFoundError: no handler listens there.
        ProtocolError: the handler refused or answered garbage.
    """
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(path))
            sock.sendall(json.dumps(request).encode() + b"\n")
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                buf += chunk
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        raise NotFoundError(f"no DSM handler on {path}") from exc
    except OSError as exc:
        raise ProtocolError(f"DSM handler on {path}: {exc}") from exc
    try:
        answer = json.loads(buf)
    except ValueError as exc:
        raise ProtocolError(f"DSM handler on {path} answered garbage") from exc
    if not answer.get("ok"):
        raise ProtocolError(f"DSM handler refused: {answer.get('error')}")
    return answer
