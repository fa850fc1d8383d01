"""Fixtures for the checkpoint tests; helpers live in ckpt_helpers.py."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from ckpt_helpers import NO_WAIT, saved_files  # noqa: E402

from tlaunch.storage import CheckpointStore  # noqa: E402


@pytest.fixture
def store(any_store_url) -> CheckpointStore:
    """A checkpoint store on each backend: local disk, memory://, fake-gcs-server, moto S3."""
    return CheckpointStore(any_store_url, retry=NO_WAIT)


@pytest.fixture(scope="session")
def two_steps() -> dict[int, dict[str, bytes]]:
    """The files of two good steps (1 and 2), saved once per session; ``plant`` copies them."""
    return saved_files(1, 2)
