"""Prometheus metrics of the broker, the workers and the gateway (issue 14): each process serves
them on its own --metrics port (the gateway also at /metrics), and their values move as known
operations say they must."""

from __future__ import annotations

import signal
import time
import urllib.request
from typing import Any

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from client import Client
from protocol.errors import ErrorCode, ZkvError
from tests.support.cluster import Cluster, free_port, wait_for

pytestmark = pytest.mark.timeout(120)


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample at ``url``: (name, sorted labels) -> value."""
    with urllib.request.urlopen(url, timeout=5) as r:
        text = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    assert key in samples, f"{name}{labels} not among {sorted({k[0] for k in samples})}"
    return samples[key]


@pytest.fixture
def metered(cluster_factory: Any) -> tuple[Cluster, dict[str, str]]:
    cluster = cluster_factory()
    ports = {name: f"127.0.0.1:{free_port()}" for name in ("broker", "w1", "w2", "w3")}
    cluster.broker_args = ["--metrics", ports["broker"]]
    cluster.start(worker_extra={w: ["--metrics", ports[w]] for w in ("w1", "w2", "w3")})
    return cluster, {name: f"http://{hp}/metrics" for name, hp in ports.items()}


def test_broker_and_worker_metrics_move_with_known_operations(metered: tuple[Cluster, dict[str, str]]) -> None:
    cluster, urls = metered
    def formed() -> dict[Any, float] | None:
        s = scrape(urls["broker"])  # a snapshot is at most a second old
        alive = s.get(("zkv_broker_workers", (("state", "alive"),)))
        return s if s.get(("zkv_broker_formed", ())) == 1 and alive == 3 else None

    before = wait_for(formed, 10, 0.2, "the broker's metrics showing the formed cluster")
    assert value(before, "zkv_broker_leader") == 1 and value(before, "zkv_broker_formed") == 1
    assert value(before, "zkv_broker_workers", state="alive") == 3
    w_before = {w: scrape(urls[w]) for w in ("w1", "w2", "w3")}
    with Client(cluster.frontend) as c:
        for i in range(50):
            c.put(b"m%d" % i, b"v" * 100)
        for i in range(20):
            assert c.get(b"m%d" % i) == b"v" * 100
        with pytest.raises(ZkvError) as refused:
            c.put(b"m0", b"x", if_version=10**9)
        assert refused.value.code == ErrorCode.CONDITION_FAILED

    duration = "zkv_broker_request_duration_seconds"

    def timed(s: dict[Any, float], op: str, outcome: str, suffix: str = "_count") -> float:
        return s.get((duration + suffix, (("op", op), ("outcome", outcome))), 0.0)

    def moved() -> dict[Any, float] | None:
        s = scrape(urls["broker"])
        done = value(s, "zkv_broker_writes_committed_total") - value(before, "zkv_broker_writes_committed_total")
        refused = timed(s, "put", "CONDITION_FAILED") - timed(before, "put", "CONDITION_FAILED")
        return s if done >= 50 and refused else None

    after = wait_for(moved, 10, 0.2, "the committed writes counted")
    # Each request timed once, under its op and outcome.
    assert timed(after, "put", "ok") - timed(before, "put", "ok") == 50
    assert timed(after, "get", "ok") - timed(before, "get", "ok") == 20
    assert timed(after, "put", "CONDITION_FAILED") - timed(before, "put", "CONDITION_FAILED") == 1
    assert 0 < timed(after, "put", "ok", "_sum") < 50 * 3.0  # seconds, each under the request timeout
    inf = (duration + "_bucket", (("le", "+Inf"), ("op", "put"), ("outcome", "ok")))
    assert after[inf] == timed(after, "put", "ok")
    assert value(after, "zkv_broker_reads_served_total") - value(before, "zkv_broker_reads_served_total") >= 20
    assert value(after, "zkv_broker_slots_under_replicated") == 0
    for w in ("w1", "w2", "w3"):  # one series per worker for each per-worker metric
        for name in ("zkv_broker_worker_behind_slots", "zkv_broker_worker_heartbeat_age_seconds"):
            assert (name, (("worker", w),)) in after, (name, w)
    for w in ("w1", "w2", "w3"):
        def counted(w: str = w) -> dict[Any, float] | None:
            s = scrape(urls[w])
            return s if value(s, "zkv_worker_keys") == 50 else None

        ws = wait_for(counted, 10, 0.2, f"{w} reporting its 50 keys")
        # Every write reached every replica (RF=3 on 3 workers): at least 50 batches, each commit timed.
        applied = "zkv_worker_batches_applied_total"
        assert value(ws, applied) - value(w_before[w], applied) >= 50
        commits = value(ws, "zkv_worker_commits_total") - value(w_before[w], "zkv_worker_commits_total")
        assert 1 <= commits <= 51  # 50 puts and the refused CAS, which the replicas evaluate
        assert value(ws, "zkv_worker_commit_seconds_count") - value(w_before[w], "zkv_worker_commit_seconds_count") \
            == commits  # one observation per commit
        fsyncs = value(ws, "zkv_worker_fsync_seconds_count") - value(w_before[w], "zkv_worker_fsync_seconds_count")
        assert fsyncs == commits
        fsync_time = value(ws, "zkv_worker_fsync_seconds_sum") - value(w_before[w], "zkv_worker_fsync_seconds_sum")
        commit_time = value(ws, "zkv_worker_commit_seconds_sum") - value(w_before[w], "zkv_worker_commit_seconds_sum")
        assert 0 < fsync_time <= commit_time  # the fsync is part of each commit
        assert value(ws, "zkv_worker_commit_batches_sum") - value(w_before[w], "zkv_worker_commit_batches_sum") >= 50
        assert value(ws, "zkv_worker_registered") == 1
    # A worker dies: the broker's gauges say so.
    cluster.procs["w3"].signal(signal.SIGKILL)

    def dead() -> dict[Any, float] | None:
        s = scrape(urls["broker"])
        return s if value(s, "zkv_broker_workers", state="dead") == 1 else None

    s = wait_for(dead, 15, 0.2, "w3 counted dead")
    assert value(s, "zkv_broker_workers", state="alive") == 2
    assert value(s, "zkv_broker_slots_under_replicated") == cluster.slots


def test_gateway_metrics_count_requests_by_route_and_status(cluster: Cluster) -> None:
    base = cluster.start_gateway()
    for i in range(3):
        assert requests.put(f"{base}/v1/kv/g{i}", data=b"v", timeout=15).status_code == 200
    assert requests.get(f"{base}/v1/kv/g0", timeout=15).status_code == 200
    assert requests.get(f"{base}/v1/kv/nope", timeout=15).status_code == 404
    assert requests.get(f"{base}/healthz", timeout=15).status_code == 200
    s = scrape(f"{base}/metrics")
    route = "/v1/kv/{key}"
    assert value(s, "zkv_gateway_requests_total", method="PUT", route=route, status="200") == 3
    assert value(s, "zkv_gateway_requests_total", method="GET", route=route, status="200") == 1
    assert value(s, "zkv_gateway_requests_total", method="GET", route=route, status="404") == 1
    assert value(s, "zkv_gateway_request_duration_seconds_count", method="PUT", route=route) == 3
    assert value(s, "zkv_gateway_watches") == 0


def test_every_metric_the_grafana_dashboard_uses_exists(metered: tuple[Cluster, dict[str, str]]) -> None:
    """docs/grafana-zkv.json graphs nothing that no process exports (a renamed metric would leave
    a panel silently empty)."""
    import json
    import re
    from pathlib import Path

    cluster, urls = metered
    base = cluster.start_gateway()
    requests.put(f"{base}/v1/kv/x", data=b"v", timeout=15)
    with Client(cluster.frontend) as c:
        c.put(b"y", b"v")
    dashboard = json.loads((Path(__file__).resolve().parents[2] / "docs" / "grafana-zkv.json").read_text())
    used = {m for p in dashboard["panels"] for t in p["targets"] for m in re.findall(r"zkv_[a-z_]+", t["expr"])}
    assert used

    def exported() -> set[str]:
        # Per-worker series exist once the broker's snapshot (at most a second old) has the workers.
        return {name for url in (urls["broker"], urls["w1"], f"{base}/metrics") for name, _ in scrape(url)}

    deadline = time.monotonic() + 10
    names = exported()
    while not used <= names and time.monotonic() < deadline:
        time.sleep(0.2)
        names = exported()
    assert used <= names, sorted(used - names)
