"""Fixtures of the simulator tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.sim import SimCluster


@pytest.fixture
def sim(tmp_path: Path) -> Iterator[SimCluster]:
    """The in-memory cluster of tests/support/sim.py: the broker and worker cores, real LMDB, no sockets."""
    s = SimCluster(tmp_path)
    yield s
    s.close()
