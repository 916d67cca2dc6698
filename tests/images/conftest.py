"""Fixtures for the image store tests.

The session's shared image is the root fixture ``tiny_image`` (built once per
session into the session store). Tests that damage or delete an image use
``scratch_store``: a store in its own OMEGA_HOME, so nothing they do can reach
the image other subsystems' tests boot.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from hypervisor.config import Config
from images.store import ImageStore


@pytest.fixture(scope="session")
def image_store(config: Config) -> ImageStore:
    """The session's image store (holds ``tiny_image``)."""
    return ImageStore(config)


@pytest.fixture
def scratch_config() -> Iterator[Config]:
    """A private, world-traversable OMEGA_HOME for destructive tests."""
    home = Path(tempfile.mkdtemp(prefix="omega-test-i-", dir="/var/tmp"))
    home.chmod(0o755)
    cfg = Config(home=home)
    cfg.ensure()
    try:
        yield cfg
    finally:
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def scratch_store(scratch_config: Config) -> ImageStore:
    """An image store nobody else uses, with a tiny image built into it."""
    store = ImageStore(scratch_config)
    store.build("tiny")
    return store
