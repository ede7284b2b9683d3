"""Fixtures of the fault tests: ``fault_cluster`` makes ``FaultCluster``s (tests/support/nemesis.py),
optionally with their workers in network namespaces, and cleans up every process, namespace and
veth afterwards."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.nemesis import FaultCluster
from tests.support.netns import NetLab


@pytest.fixture
def fault_cluster(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Callable[..., FaultCluster]]:
    """Makes one FaultCluster (with a NetLab when asked); kills every process and deletes every
    namespace and veth afterwards, even when the test fails."""
    made: list[FaultCluster] = []
    labs: list[NetLab] = []

    def make(netns: bool = False, **kw: object) -> FaultCluster:
        lab = None
        if netns:
            lab = NetLab()
            labs.append(lab)  # registered before setup: a half-made lab is cleaned up too
            lab.setup()
            kw.setdefault("netns_workers", tuple(f"w{i}" for i in range(1, int(kw.get("workers", 3)) + 1)))
        c = FaultCluster(tmp_path / f"c{len(made)}", lab=lab, **kw)  # type: ignore[arg-type]
        made.append(c)
        return c

    try:
        yield make
    finally:
        failed = getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed
        for c in made:
            if failed:
                print(c.logs())
            c.stop_all()
        problems: list[str] = []
        for lab in labs:
            problems += lab.cleanup()
            problems += [f"left over: {n}" for n in lab.leftovers()]
        assert not problems, problems
