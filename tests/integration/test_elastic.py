"""Elastic membership with real processes: a worker joins and receives its share of slots, a
worker is drained and removed through the CLI, all while a writer runs."""

from __future__ import annotations

import json

import pytest

from tests.support.cluster import Cluster, wait_for
from tests.support.helpers import Writer, copies, terminate

pytestmark = pytest.mark.timeout(150)


def test_join_then_drain_and_remove_under_writes(cluster_factory) -> None:  # type: ignore[no-untyped-def]
    cluster: Cluster = cluster_factory(slots=128).start()
    c = cluster.client()
    base = {b"k%d" % i: b"v%d" % i * 50 for i in range(400)}
    c.mset(base)
    with Writer(cluster.frontend, prefix="during") as writer:
        cluster.start_worker("w4")
        wait_for(lambda: cluster.status()["misplaced_slots"] == 0 and not cluster.status()["moves"]
                 and any(w["id"] == "w4" and w["slots"] > 0 for w in cluster.status()["workers"]),
                 60, 0.2, "w4 received its slots")
        st = cluster.status()
        held = {w["id"]: w["slots"] for w in st["workers"]}
        assert abs(held["w4"] - 128 * 3 / 4) <= 128 * 3 / 4 * 0.25, held  # its share, not more
        assert st["slots_moved"] == held["w4"]  # each move gave w4 one replica: minimal movement

        r = cluster.zkv("drain", "w2", "--wait", "--url", cluster.frontend, timeout=90)
        assert r.returncode == 0, r.stderr.decode()
        st = cluster.status()
        assert next(w for w in st["workers"] if w["id"] == "w2")["slots"] == 0
        assert not st["under_replicated_slots"]
        r = cluster.zkv("remove", "w2", "--url", cluster.frontend)
        assert r.returncode == 1 and b"still running" in r.stderr
        terminate(cluster, "w2")
        wait_for(lambda: "w2" not in cluster.alive_workers(), 20, 0.2, "w2 gone")
        r = cluster.zkv("remove", "w2", "--url", cluster.frontend)
        assert r.returncode == 0, r.stderr.decode()
        wait_for(lambda: len(writer.acked) > 100, 30, 0.1, "writes during the moves")
    assert writer.failed == [], writer.failed[:5]
    st = json.loads(cluster.zkv("status", "--json", "--url", cluster.frontend).stdout)
    assert [w["id"] for w in st["workers"]] == ["w1", "w3", "w4"]
    for k, v in base.items():
        assert c.get(k) == v
    for k, (v, version) in writer.acked.items():
        assert c.get_versioned(k) == (v, version)
    expected = len(base) + len(writer.acked)
    wait_for(lambda: sum(w["keys"] for w in cluster.status()["workers"]) == 3 * expected, 20, 0.2,
             "replicas settled")
    terminate(cluster, "w1", "w3", "w4")
    count, _ = copies(cluster, ["w1", "w2", "w3", "w4"])
    assert set(count.values()) == {3} and len(count) == expected


def test_rebalance_wait_moves_slots_to_a_new_worker_when_auto_rebalance_is_off(cluster_factory) -> None:  # type: ignore[no-untyped-def]
    cluster: Cluster = cluster_factory(slots=64, broker_args=["--no-auto-rebalance"]).start()
    c = cluster.client()
    c.mset({b"r%d" % i: b"v%d" % i for i in range(200)})
    cluster.start_worker("w4")
    cluster.wait_worker_state("w4", "alive")
    st = cluster.status()
    assert st["misplaced_slots"] > 0 and next(w for w in st["workers"] if w["id"] == "w4")["slots"] == 0
    r = cluster.zkv("rebalance", "--wait", "--url", cluster.frontend, timeout=90)
    assert r.returncode == 0, r.stderr.decode()
    assert b"balanced" in r.stdout
    st = cluster.status()
    assert st["misplaced_slots"] == 0 and not st["moves"]
    assert next(w for w in st["workers"] if w["id"] == "w4")["slots"] == st["slots_moved"] > 0
    assert c.mget([b"r%d" % i for i in range(200)]) == [b"v%d" % i for i in range(200)]
