from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.cluster import Cluster
from tests.support.sim import SimCluster


@pytest.fixture
def cluster_factory(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator:
    made: list[Cluster] = []

    def make(**kw) -> Cluster:  # type: ignore[no-untyped-def]
        c = Cluster(tmp_path / f"c{len(made)}", **kw)
        made.append(c)
        return c

    yield make
    failed = getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed
    for c in made:
        if failed:
            print(c.logs())
        c.stop_all()


@pytest.fixture
def sim(tmp_path: Path) -> Iterator[SimCluster]:
    """The in-memory cluster of tests/support/sim.py: the broker and worker cores, real LMDB, no sockets."""
    s = SimCluster(tmp_path)
    yield s
    s.close()


@pytest.fixture
def cluster(cluster_factory) -> Cluster:  # type: ignore[no-untyped-def]
    return cluster_factory().start()


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):  # type: ignore[no-untyped-def]
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)
