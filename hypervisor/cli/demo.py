"""`omega demo`: the main job on the local cluster."""

from __future__ import annotations


def demo() -> None:
    """Build the tiny image, boot it through libvirt and stream its console."""
    raise NotImplementedError
