"""Fixtures shared by the test modules."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from reactor_peer import Harness


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    """The processes, peers and sockets one test starts, stopped when it ends."""
    harness = Harness(tmp_path)
    try:
        yield harness
    finally:
        harness.close()
