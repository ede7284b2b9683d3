"""``zkv verify``: the shipped workload and checker against a live cluster (passes, exit 0, counts
printed, history written), and ``--check`` on a history made non-linearizable (fails, exit 6,
names the key)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from client.cli.verify import EXIT_VIOLATION
from client.cli.workload import load_history
from tests.support.cluster import Cluster

pytestmark = pytest.mark.timeout(120)


def test_verify_passes_on_a_healthy_cluster_and_a_broken_history_fails(cluster: Cluster, tmp_path: Path) -> None:
    history = tmp_path / "history.jsonl"
    r = cluster.zkv("verify", "--url", cluster.frontend, "--duration", "4", "--clients", "4", "--keys", "3",
                    "--seed", "7", "--history", str(history), timeout=90)
    out = r.stdout.decode()
    assert r.returncode == 0, out + r.stderr.decode()
    m = re.search(r"operations: (\d+) in [\d.]+ s \(\d+/s\): (\d+) ok, (\d+) failed, (\d+) unknown", out)
    assert m is not None, out
    total, ok = int(m[1]), int(m[2])
    assert total > 50 and ok == total  # a healthy cluster: every operation answered
    by_kind = dict(re.findall(r"(put|get|delete|cas) (\d+)", out.split("by kind:")[1].splitlines()[0]))
    assert all(int(by_kind[k]) > 0 for k in ("put", "get", "delete", "cas")), out
    assert "errors: none" in out
    assert "verdict: linearizable, no acknowledged write lost" in out

    # The saved history checks the same; keys end empty (the run deletes them).
    ops = load_history(history)
    assert len(ops) == total
    assert len(history.read_text().splitlines()) == total
    r = cluster.zkv("verify", "--check", str(history))
    assert r.returncode == 0, r.stdout.decode()
    keys = {o.key for o in ops}
    c = cluster.client()
    assert [c.get(k) for k in sorted(keys)] == [None] * len(keys)

    # Break it: the last ok get of some key after a put returns the value of that key's first put instead.
    lines = [json.loads(x) for x in history.read_text().splitlines()]
    puts = [d for d in lines if d["kind"] == "put" and d["outcome"] == "ok"]
    first = puts[0]
    later = [d for d in lines if d["key"] == first["key"] and (d["kind"] in ("put", "delete") or d.get("swapped"))
             and d["outcome"] == "ok" and d["invoke"] > first["complete"]]
    gets = [d for d in lines if d["key"] == first["key"] and d["kind"] == "get" and d["outcome"] == "ok"
            and later and d["invoke"] > later[0]["complete"] and d["value"] != first["value"]]
    assert gets, "the workload should overwrite a key and read it afterwards"
    gets[-1]["value"] = first["value"]
    broken = tmp_path / "broken.jsonl"
    broken.write_text("".join(json.dumps(d) + "\n" for d in lines))
    r = cluster.zkv("verify", "--check", str(broken))
    out = r.stdout.decode()
    assert r.returncode == EXIT_VIOLATION, out
    assert f"key b'{first['key']}': not linearizable" in out
    assert "verdict: VIOLATION (1 keys not linearizable" in out

    # A file that is not a history is refused with its line number.
    junk = tmp_path / "junk.jsonl"
    junk.write_text('{"process": 1}\n')
    r = cluster.zkv("verify", "--check", str(junk))
    assert r.returncode == 1 and b"junk.jsonl:1: not a history line" in r.stderr
