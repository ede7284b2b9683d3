"""bench/relay.py and bench/peers.py: the relay measures something sane; the table, targets and
document writer produce the expected rows from given measurements. No speed target here."""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import pytest

from tests.support.requirements import missing

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import peers  # noqa: E402
import relay  # noqa: E402

M = peers.Measurement


def sample_rows() -> list[peers.Measurement]:
    return [
        M("put.zkv.c1000", "PUT 256 B key, 1 KiB value", "zkv, c=1000", 20_000, "writes/s", 50, 90, 120, "`zkv`"),
        M("put.zkv.best", "PUT 256 B key, 1 KiB value", "zkv, c=200", 8_000, "writes/s", 25, 60, 900, "`zkv`"),
        M("put.etcd", "PUT 256 B key, 1 KiB value", "etcd 3-node", 5_000, "writes/s", None, None, 680, "check perf"),
        M("get.zkv", "GET 256 B key, 100 B value", "zkv c=200", 13_000, "req/s", 13, 30, 33, "", 0.05),
        M("get.zkv.hot", "GET 256 B key, 100 B value", "zkv c=200, 20,000 keys", 45_500, "req/s", 4, 9, 12, ""),
        M("get.relay", "echo 100 B value", "bare relay", 65_000, "req/s", 2.3, 5.5, 8.2, ""),
        M("mset.zkv", "MSET", "zkv x1000", 15_000, "keys/s", 180, 420, 430, ""),
        M("mget.zkv", "MGET", "zkv x1000", 330_000, "keys/s", 28, 70, 71, ""),
        M("put.redis", "PUT 256 B key, 1 KiB value", "Redis", None, "writes/s",
          note=f"{peers.NOT_INSTALLED}; `{peers.APT_INSTALL}`"),
    ]


@pytest.mark.timeout(60)
def test_relay_measures_a_positive_rate_with_sane_latencies() -> None:
    r = relay.run_relay(seconds=2.0, window=20, workers=1, payload=100, warmup=0.3)
    assert r["replies"] > 0 and r["ops_per_sec"] > 0
    assert r["workers"] == 1 and r["window"] == 20 and r["payload"] == 100
    assert 0 < r["p50_ms"] <= r["p99_ms"] <= r["max_ms"] < 10_000
    assert r["seconds"] == pytest.approx(2.0, abs=0.5)


def test_targets_from_given_measurements() -> None:
    t = {x.name: x for x in peers.evaluate_targets(sample_rows())}
    assert t["PUT vs etcd (c=1000)"].ratio == pytest.approx(4.0)
    assert t["PUT vs etcd (c=1000)"].met is True  # 4x and slowest 120 ms < 680 ms
    assert t["PUT vs etcd (c=200)"].ratio == pytest.approx(1.6)
    assert t["PUT vs etcd (c=200)"].met is False
    assert t["GET vs bare relay"].ratio == pytest.approx(13 / 65)
    assert t["GET vs bare relay"].met is False
    assert t["GET vs bare relay (hot keys)"].ratio == pytest.approx(0.7) and t["GET vs bare relay (hot keys)"].met
    assert t["MSET keys/s"].met is False and t["MGET keys/s"].met is True
    assert t["MGET keys/s"].ratio == pytest.approx(1.1)
    assert t["MSET keys/s"].ratio == pytest.approx(15 / 110) and t["MSET keys/s"].required == ">= 110,000 keys/s"


def test_targets_without_peers_are_not_evaluated() -> None:
    rows = [r for r in sample_rows() if r.id not in ("put.etcd", "get.relay")]
    t = {x.name: x for x in peers.evaluate_targets(rows)}
    assert t["PUT vs etcd (c=1000)"].met is None and t["PUT vs etcd (c=1000)"].ratio is None
    assert t["GET vs bare relay"].met is None
    assert t["GET vs bare relay (hot keys)"].met is None  # measured, but nothing to compare it with


def test_table_has_one_row_per_measurement() -> None:
    rows = sample_rows()
    table = peers.format_table(rows).splitlines()
    assert table[0].startswith("| workload | system | rate | unit | p50 ms | p99 ms | max ms | vs target |")
    body = table[2:]
    assert len(body) == len(rows)
    assert "| zkv, c=1000 | **20,000** | writes/s | 50.00 | 90.00 | 120 | 4.00x etcd (target 4x) |" in body[0]
    assert "| etcd 3-node | 5,000 | writes/s | - | - | 680 |" in body[2]
    assert "0.20x relay (target 0.6x)" in body[3] and "background CPU 5%" in body[3]
    assert "0.70x relay (target 0.6x)" in body[4]
    assert "0.14x of 110k keys/s" in body[6]  # MSET's target (issue 16), MGET's below
    assert "1.10x of 300k keys/s" in body[7]
    assert "| Redis | not installed | writes/s |" in body[8] and peers.APT_INSTALL in body[8]


def test_section_replaced_between_markers_and_appended_otherwise() -> None:
    section = peers.render_section(sample_rows(), command="python bench/peers.py", date="2026-11-27",
                                   machine="test", plots=["img/peers.png"])
    assert section.startswith(peers.BEGIN) and section.endswith(peers.END)
    assert "`python bench/peers.py`" in section and "2026-11-27" in section and "![peers](img/peers.png)" in section
    doc = "# Benchmarks\n\nintro\n"
    once = peers.replace_section(doc, section)
    assert once.startswith(doc.rstrip("\n")) and once.count(peers.BEGIN) == 1
    twice = peers.replace_section(once + "\n## after\n", section.replace("2026-11-27", "2026-11-28"))
    assert twice.count(peers.BEGIN) == 1 and "2026-11-28" in twice and "2026-11-27" not in twice
    assert twice.rstrip().endswith("## after")


def test_parse_check_perf_and_redis_csv() -> None:
    out = ("60 / 60 100.00% 1m0s\nFAIL: Throughput too low: 4812 writes/s\n"
           "Slowest request took too long: 0.672637s\nPASS: Stddev is 0.094318s\nFAIL\n")
    p = peers.parse_check_perf(out)
    assert p["writes_per_sec"] == 4812 and p["slowest_s"] == pytest.approx(0.672637)
    assert p["stddev_s"] == pytest.approx(0.094318) and p["pass"] == 0
    ok = "PASS: Throughput is 150 writes/s\nPASS: Slowest request took 0.2s\nPASS: Stddev is 0.01s\nPASS\n"
    assert peers.parse_check_perf(ok) == {"writes_per_sec": 150, "slowest_s": 0.2, "stddev_s": 0.01, "pass": 1.0}
    csv = ('"test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms","p99_latency_ms",'
           '"max_latency_ms"\n"SET","144927.55","0.194","0.048","0.183","0.279","0.399","1.031"\n'
           '"MSET (10 keys)","128205.12","0.220","0.056","0.207","0.287","0.455","3.159"\n')
    r = peers.parse_redis_csv(csv)
    assert r["SET"]["rps"] == pytest.approx(144927.55) and r["SET"]["p99_ms"] == pytest.approx(0.399)
    assert r["MSET (10 keys)"]["max_ms"] == pytest.approx(3.159)


@pytest.mark.timeout(60)
def test_redis_peer_starts_and_is_measured() -> None:
    if shutil.which("redis-server") is None or shutil.which("redis-benchmark") is None:
        missing("redis-server / redis-benchmark not installed (apt-get install -y redis-server redis-tools)")
    root = Path(tempfile.mkdtemp(prefix="zkv-test-redis-"))
    try:
        with peers.redis_server(root, durable=False) as (port, proc):
            r = peers.redis_benchmark(port, "-t", "get", "-d", "100", "-c", "5", "-n", "2000")
        assert proc.poll() is not None  # stopped on leaving
        assert r["GET"]["rps"] > 0 and 0 <= r["GET"]["p50_ms"] <= r["GET"]["max_ms"]
    finally:
        shutil.rmtree(root, ignore_errors=True)
