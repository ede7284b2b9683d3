"""bench/failover.py with two failovers (etcd mode): each round killed the leader, a successor
took the leader key in a later epoch, a write was acknowledged through the client's broker list,
and the killed broker came back as a standby; the figures and the table are what they claim.
No speed target here: the figures of docs/benchmarks.md come from the full run."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.support.ha import etcd_binary

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import failover  # noqa: E402


@pytest.mark.timeout(240)
def test_two_failovers_each_acknowledge_a_write() -> None:
    etcd_binary()  # skips without etcd (fails in CI)
    opts = failover.parse_args(["--failovers", "2", "--slots", "64", "--settle", "0.5"])
    rounds: list[failover.Round] = []
    # run() stops every process and removes its directory, also when this test fails or times out.
    result = failover.run(opts, rounds, swallow_interrupt=False)

    assert result["complete"] is True
    assert len(rounds) == 2 and result["probe_errors"] == 0
    for r in rounds:
        assert r.write_error == "", r
        assert r.new in ("b1", "b2", "b3") and r.new != r.old, r
        assert r.new_epoch > r.old_epoch > 0, r
        assert r.leader_s is not None and r.write_s is not None and r.all_slots_s is not None, r
        assert 0 < r.leader_s < opts.write_timeout and 0 < r.write_s < opts.write_timeout, r
        assert r.load_gap_s is not None and r.load_gap_s > 0, r  # the load wrote again after the kill
    # The successor led until the next round killed it: the second round started from its epoch.
    assert rounds[1].old == rounds[0].new and rounds[1].old_epoch == rounds[0].new_epoch
    assert result["load_writes"] > 0
    s = result["summary"]["write_s"]
    assert s["n"] == 2 and s["min"] <= s["p50"] <= s["p90"] <= s["max"]
    assert s["max"] == max(r.write_s for r in rounds if r.write_s is not None)

    lines = failover.table(rounds, result["summary"]).splitlines()
    assert [line.split("|")[1].strip() for line in lines[2:4]] == ["1", "2"]
    assert any(line.startswith("| first acknowledged write | 2 |") for line in lines)
