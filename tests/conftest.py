"""Fixtures shared by the integration and fault tests: ``cluster_factory`` (real processes on
loopback, tests/support/cluster.py; every process killed afterwards, logs printed if the test
failed) and ``cluster`` (a started 3-worker cluster). The report hook records each phase's
outcome on the test item (``rep_call``) for those finalizers. Per-folder fixtures live in
tests/sim/conftest.py (``sim``) and tests/faults/conftest.py (``fault_cluster``).

``ZKV_TEST_CURVE=1`` runs every cluster the factory makes with CURVE keys (``Cluster(keys=True)``)
and points ZKV_CREDENTIALS at its admin client, so that a test module runs unchanged over CURVE:
``ZKV_TEST_CURVE=1 python -m pytest tests/integration/test_cli_commands.py``."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from protocol.curve import CREDENTIALS_ENV
from tests.support.cluster import CURVE_ENV, Cluster

# Several tests send SIGINT to a zkv process (Ctrl-C). A suite started as a background job
# (`nohup ... &` from a script) inherits SIGINT ignored, and ignored dispositions survive exec:
# the processes under test would ignore it too. A handler here is reset to the default at exec,
# so every process the tests start gets Python's own Ctrl-C handling, as in a terminal.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture
def cluster_factory(tmp_path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator:
    made: list[Cluster] = []

    def make(**kw) -> Cluster:  # type: ignore[no-untyped-def]
        curve_run = os.environ.get(CURVE_ENV) == "1"
        if curve_run:
            kw.setdefault("keys", True)
        c = Cluster(tmp_path / f"c{len(made)}", **kw)
        if curve_run and c.credentials is not None:
            monkeypatch.setenv(CREDENTIALS_ENV, str(c.credentials))  # for the tests' own Client()s
        made.append(c)
        return c

    yield make
    failed = getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed
    for c in made:
        if failed:
            print(c.logs())
        c.stop_all()


@pytest.fixture
def cluster(cluster_factory) -> Cluster:  # type: ignore[no-untyped-def]
    return cluster_factory().start()


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):  # type: ignore[no-untyped-def]
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)
