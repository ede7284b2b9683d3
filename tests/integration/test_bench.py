"""``zkv bench`` against a real cluster: every op it ran succeeded, with a positive rate."""

from __future__ import annotations

import json

import pytest

from tests.support.cluster import Cluster


@pytest.mark.timeout(120)
def test_bench_put_get_json(cluster: Cluster) -> None:
    proc = cluster.zkv("bench", "--url", cluster.frontend, "-n", "200", "-c", "8", "-t", "put,get", "--json",
                       timeout=100)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    report = json.loads(proc.stdout)
    assert set(report["ops"]) == {"put", "get"}
    for op, figures in report["ops"].items():
        assert figures["ops_per_sec"] > 0, op
        assert figures["errors"] == 0, (op, figures["errors_by_kind"])
        assert figures["ok"] == 200, op
        assert 0 < figures["p50_ms"] <= figures["p99_ms"] <= figures["max_ms"], op
    assert report["ops"]["get"]["misses"] == 0
    assert report["errors"] == 0 and report["ok"] is True


@pytest.mark.timeout(120)
def test_bench_two_processes_batches(cluster: Cluster) -> None:
    proc = cluster.zkv("bench", "--url", cluster.frontend, "-n", "100", "-c", "8", "-P", "2", "-b", "5",
                       "--key-size", "256", "-d", "100", "-t", "mget,mset,exists,delete", "--json", timeout=100)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    report = json.loads(proc.stdout)
    assert list(report["ops"]) == ["mget", "mset", "exists", "delete"]
    for op, figures in report["ops"].items():
        assert figures["ops_per_sec"] > 0 and figures["errors"] == 0 and figures["ok"] == 100, op
        assert figures["misses"] == 0, op  # the mget and exists phases prefill what they read
    assert report["ops"]["mset"]["keys_per_sec"] == pytest.approx(
        5 * report["ops"]["mset"]["ops_per_sec"], rel=1e-3)


def test_bench_reports_errors_without_broker(cluster_factory) -> None:  # type: ignore[no-untyped-def]
    cluster = cluster_factory()  # ports chosen, nothing started
    proc = cluster.zkv("bench", "--url", cluster.frontend, "-n", "10", "-c", "2", "-t", "put", timeout=60)
    assert proc.returncode != 0
    assert b"did not report service 'kv' ready" in proc.stderr


@pytest.mark.timeout(120)
def test_bench_cleans_up_its_keys_unless_kept(cluster: Cluster) -> None:
    """`zkv bench` left its `key:*` keys behind: a run now writes under a prefix of its own and
    deletes its keys when it ends; --keep leaves them (under a prefix given or printed)."""
    c = cluster.client()
    c.put(b"mine", b"untouched")
    for args in (["-t", "put,get"], ["-t", "mset,mget", "-b", "4", "-P", "2"], ["-r", "30", "-t", "put"]):
        proc = cluster.zkv("bench", "--url", cluster.frontend, "-n", "60", "-c", "4", *args, timeout=100)
        assert proc.returncode == 0, proc.stderr.decode(errors="replace")
        assert b"deleted" in proc.stderr
        assert [i.key for i in c.scan(b"")] == [b"mine"], args
    proc = cluster.zkv("bench", "--url", cluster.frontend, "-n", "50", "-c", "4", "-t", "put", "--keep",
                       "--prefix", "kept:", "--json", timeout=100)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    assert json.loads(proc.stdout)["config"]["prefix"] == "kept:"
    assert len(list(c.scan_keys(b"kept:"))) == 50
