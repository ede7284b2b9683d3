"""Fixtures of the fault tests: ``fault_cluster`` makes ``FaultCluster``s (tests/support/nemesis.py),
optionally with their workers in network namespaces, and cleans up every process, namespace and
veth afterwards. ``ZKV_TEST_CURVE=1`` runs them with CURVE keys, as tests/conftest.py's factory."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from protocol.curve import CREDENTIALS_ENV
from tests.support.cluster import CURVE_ENV
from tests.support.nemesis import FaultCluster
from tests.support.netns import NetLab


@pytest.fixture
def fault_cluster(tmp_path: Path, request: pytest.FixtureRequest,
                  monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., FaultCluster]]:
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
        curve_run = os.environ.get(CURVE_ENV) == "1"
        if curve_run:
            kw.setdefault("keys", True)
        c = FaultCluster(tmp_path / f"c{len(made)}", lab=lab, **kw)  # type: ignore[arg-type]
        if curve_run and c.credentials is not None:
            monkeypatch.setenv(CREDENTIALS_ENV, str(c.credentials))  # for the tests' own Client()s
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
