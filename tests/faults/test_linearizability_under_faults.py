"""Fault injection: a concurrent register workload runs while a nemesis kills, pauses and cuts off
processes; afterwards every key's history must be linearizable and no acknowledged write lost.

Each scenario: start a cluster (3 workers, RF=3, W=2, heartbeats 0.3 s), run ``client.cli.workload``
(10 clients, 8 keys, put 40 % / get 35 % / delete 25 %, up to ~500 ops/s) while ``tests.support.nemesis``
injects faults at random, heal everything, wait until the cluster is fully replicated (every
worker alive, no slot recovering, under-replicated or behind), read every key (those reads join
the history), then check:

- ``check_history(ops).ok``: every key's history is linearizable (unknown writes may take effect
  at any time after their invocation, or never);
- ``lost_writes(ops, final) == []``: every acknowledged write survives or was overwritten;
- the run is not vacuous: enough operations succeeded and every fault kind was injected, and
  without broker restarts some reads were answered from the broker's read cache;
- no product process exited on its own;
- after a clean stop, every worker holds the same record for each key, equal to the final read.

Scenarios (``SCENARIOS``): ``crash_pause_drop`` (worker SIGKILL/restart and SIGSTOP/SIGCONT, up to
two at once, w3 dropping every 9th replication message), ``broker_restarts`` (broker SIGKILL/restart),
``partitions`` (every worker in its own network namespace, links cut, up to two at once; root only),
``mixed`` (all of the above together; root only), ``lease_reads`` (as ``mixed``, with read leases of
1 s that the pauses outlast and a worker whose wall clock is 1.5 s ahead; the clients read from the
lease holders, and some reads must have been answered there). About 3.3 minutes in all.

The seed is printed (``fault seed=...``); ``ZKV_FAULT_SEED=<n>`` replays the same fault schedule and
operation choices (not the same timing), ``ZKV_FAULT_SCALE=<x>`` multiplies durations and op budgets
(longer local soaks). A failing run writes its history to ``history.jsonl`` in the test's temporary
directory and names the seed, the logs and the fault timeline on the checker's clock.
"""

from __future__ import annotations

import os
import random
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest

from client.cli.history import Op
from client.cli.linearizability import check_history
from client.cli.lost_writes import lost_writes
from client.cli.workload import Workload, WorkloadConfig, dump_history, summarize
from protocol.replication import slot_for_key
from tests.support import requirements
from tests.support.cluster import wait_for
from tests.support.helpers import worker_records
from tests.support.nemesis import FAULT_KINDS, FaultCluster, Nemesis, NemesisConfig
from tests.support.netns import netns_unavailable

SCALE = float(os.environ.get("ZKV_FAULT_SCALE", "1"))
BASE_SEED = int(os.environ.get("ZKV_FAULT_SEED") or random.SystemRandom().randrange(1 << 31))
DROP_EVERY = 9  # the drop worker loses every 9th replication message it receives
CHECK_TIME_LIMIT = 15.0  # s per key for the linearizability search (inconclusive = failure)
KEYS = 8
CLOCK_SKEW_MS = 1500


@dataclass(frozen=True)
class Scenario:
    name: str
    kinds: tuple[str, ...]
    duration: float  # s of workload (the nemesis stops starting faults a little before)
    netns: bool = False  # workers in network namespaces (root only)
    drop_worker: str | None = None
    max_active: int = 1  # faults in place at once
    think: float = 0.02  # s: each client pauses uniform(0, think) between operations
    mix: tuple[tuple[str, float], ...] = (("put", 0.4), ("get", 0.35), ("delete", 0.25))
    max_ops: int = 20000
    min_ok: int = 1000  # ok operations a run must have, or it proves nothing
    read_lease: float = 0.0  # > 0: read leases on (the broker's --read-lease), clients read from holders
    skew_worker: str | None = None  # its wall clock is CLOCK_SKEW_MS ahead (--test-clock-skew-ms)

    @property
    def timeout(self) -> int:
        """pytest timeout: start + workload + heal + checks, generously."""
        return int(self.duration * SCALE + 90 + KEYS * CHECK_TIME_LIMIT)


SCENARIOS = [
    Scenario("crash_pause_drop", ("kill_worker", "pause_worker"), 35.0, drop_worker="w3", max_active=2),
    Scenario("broker_restarts", ("kill_broker",), 30.0),
    Scenario("partitions", ("partition",), 30.0, netns=True, max_active=2),
    Scenario("mixed", FAULT_KINDS, 45.0, netns=True, drop_worker="w3", max_active=2),
    # Read leases of 1 s: pauses (1.35-3.15 s) outlast them, holders are cut off and killed, the
    # broker restarts and must wait out the leases it cannot know, one worker's clock is skewed.
    Scenario("lease_reads", FAULT_KINDS, 45.0, netns=True, drop_worker="w3", max_active=2, read_lease=1.0,
             skew_worker="w2"),
]


def _seed(name: str) -> int:
    return zlib.crc32(f"{BASE_SEED}/{name}".encode())


def _failed_but_read(history: list[Op], details: dict[Op, str], t0: float) -> str:
    """Puts the client was told definitely failed, whose value somebody read anyway (smoking guns)."""
    read = {(op.key, op.value) for op in history if op.kind == "get" and op.outcome == "ok"}
    hits = [op for op in history if op.kind == "put" and op.outcome == "fail" and (op.key, op.value) in read]
    if not hits:
        return ""
    lines = [f"  p{op.process} put {op.key!r}={op.value!r} [+{op.invoke - t0:.3f}, +{op.complete - t0:.3f}]: "
             f"{details.get(op, '?')}" for op in hits if op.complete is not None]
    return "\nputs that failed definitely, yet their value was read:\n" + "\n".join(lines)


def _replicas_agree(cluster: FaultCluster, final: dict[bytes, bytes | None]) -> list[str]:
    """Stop the workers cleanly; every worker's on-disk record of each key must equal the final read."""
    for wid in cluster.worker_ids():
        rc = cluster.procs[wid].terminate()
        assert rc == 0, f"{wid} exited with {rc} after SIGTERM:\n{cluster.procs[wid].log_tail()}"
    problems = []
    for wid in cluster.worker_ids():
        recs = worker_records(cluster.worker_dir(wid))
        for key, value in final.items():
            rec = recs.get((slot_for_key(key, cluster.slots), key))
            held = None if rec is None else rec[2]
            if held != value:
                problems.append(f"{wid} holds {key!r}={held!r}, the final read gave {value!r}")
    return problems


@pytest.mark.parametrize("scenario", [pytest.param(s, id=s.name, marks=pytest.mark.timeout(s.timeout))
                                      for s in SCENARIOS])
def test_faults(scenario: Scenario, fault_cluster: Callable[..., FaultCluster], tmp_path: Path,
                capsys: pytest.CaptureFixture[str]) -> None:
    if scenario.netns and (reason := netns_unavailable()):
        requirements.missing(reason)
    seed = _seed(scenario.name)
    with capsys.disabled():
        print(f"\n[{scenario.name}] fault seed={seed} (ZKV_FAULT_SEED={BASE_SEED} replays this run)")

    extra = {}
    if scenario.drop_worker:
        extra[scenario.drop_worker] = ["--test-drop-replication", f"every={DROP_EVERY}"]
    if scenario.skew_worker:
        extra[scenario.skew_worker] = [*extra.get(scenario.skew_worker, []), "--test-clock-skew-ms", str(CLOCK_SKEW_MS)]
    lease_kw = {"read_lease": scenario.read_lease, "keys": False} if scenario.read_lease else {}
    cluster = fault_cluster(netns=scenario.netns, worker_extra=extra, **lease_kw)
    cluster.start()

    duration = scenario.duration * SCALE
    wcfg = WorkloadConfig(keys=KEYS, duration=duration, max_ops=int(scenario.max_ops * SCALE), think=scenario.think,
                          mix=scenario.mix)
    workload = Workload(cluster.frontend, wcfg, seed)
    nemesis = Nemesis(cluster, NemesisConfig(kinds=scenario.kinds, duration=duration - 3.0,
                                             max_active=scenario.max_active, drop_worker=scenario.drop_worker,
                                             drop_every=DROP_EVERY), seed)
    t0 = time.monotonic()
    with workload:
        nemesis.start()
        try:
            ops = workload.join()
        finally:
            nemesis.stop()
    run_s = time.monotonic() - t0

    def evidence(history: list[Op]) -> str:
        """Where to look: the seed, the history (dumped), the logs, the faults on the checker's clock."""
        # The checker shows times as seconds since the first invocation; the logs use UTC wall time.
        h0 = min((op.invoke for op in history), default=t0)
        wall0 = datetime.fromtimestamp(time.time() - (time.monotonic() - h0), UTC).strftime("%H:%M:%S.%f")
        hist_path = tmp_path / "history.jsonl"
        dump_history(hist_path, history, workload.details, h0)
        return (f"\nseed={seed}; history in {hist_path}; full logs in {cluster.root / 'logs'}; "
                f"+0 s (first invocation) = {wall0} UTC in the logs"
                f"\nfaults (seconds since the first invocation):\n{nemesis.timeline(h0)}"
                + _failed_but_read(history, workload.details, h0))

    # Heal, wait for full replication, read every key: those reads close the history.
    healed_in = time.monotonic()
    try:
        wait_for(cluster.fully_replicated, 60, 0.2, "every worker alive and every slot fully replicated")
    except AssertionError as e:
        raise AssertionError(f"{e}; status: {cluster.quick_status(5.0)}{evidence(ops)}") from None
    healed_in = time.monotonic() - healed_in
    nemesis.sample()
    final_ops, final = workload.final_reads()
    history = ops + final_ops
    # Reads the broker answered from its read cache (broker/read_cache.py), since its last start.
    end_status = cluster.quick_status(5.0) or {}
    reads_cached = end_status.get("reads_cached")
    # Reads the workers answered at their reads endpoints (lease reads), since each one's last start.
    direct_reads = sum(w.get("direct_reads", 0) for w in end_status.get("workers", []))

    check_started = time.monotonic()
    result = check_history(history, time_limit=CHECK_TIME_LIMIT)
    lost = lost_writes(history, final)
    check_s = time.monotonic() - check_started

    counts = summarize(history)
    faults = nemesis.counts()
    summary = (f"[{scenario.name}] seed={seed} faults={dict(sorted(faults.items()))} "
               f"max_overlap={nemesis.max_overlap} broker_repairs={nemesis.repairs_seen()} "
               f"ops={len(history)} checked={result.ops_checked} keys={result.keys_checked} "
               f"ok={counts.get('ok', 0)} fail={counts.get('fail', 0)} unknown={counts.get('unknown', 0)} "
               f"lost_writes={len(lost)} lost_by_reads={len(result.lost_writes)} linearizable={result.ok} "
               f"reads_cached={reads_cached} direct_reads={direct_reads} "
               f"run={run_s:.1f}s heal={healed_in:.1f}s check={check_s:.1f}s")
    with capsys.disabled():
        print(summary)
        print(f"[{scenario.name}] ops by kind/outcome: {dict(sorted(counts.items()))}; "
              f"client errors: {dict(sorted(workload.errors.items()))}")

    why = ""
    if not result.ok or lost or len(final) != len(workload.keys):
        why = evidence(history)

    assert not nemesis.unexpected_exits, "processes exited on their own:\n" + "\n".join(nemesis.unexpected_exits)
    assert len(final) == len(workload.keys), \
        f"final reads failed: {[(op, workload.details.get(op)) for op in final_ops if op.outcome != 'ok']}{why}"
    assert result.ok, "history not linearizable:\n" + "\n".join(result.failures[:5]) + why
    assert lost == [], f"{len(lost)} acknowledged writes lost: {lost[:10]}{why}"
    assert counts.get("ok", 0) >= scenario.min_ok, f"only {counts.get('ok', 0)} ok operations: {counts}"
    for op_kind in ("put", "get", "delete"):
        assert counts.get(f"{op_kind}_ok", 0) > 0, f"no successful {op_kind}: {counts}"
    missing = [k for k in scenario.kinds if faults.get(k, 0) == 0]
    assert not missing, f"faults never injected: {missing}"
    if scenario.drop_worker:
        assert faults["drop_replication"] > 0, "the drop hook dropped nothing"
    if scenario.read_lease:
        assert direct_reads > 0, f"no read was answered by a lease holder: {end_status.get('workers')}"
    elif "kill_broker" not in scenario.kinds:
        # The same broker served the whole run: the read cache answered some of its reads under the
        # faults (a restarted broker starts with an empty cache and counts from 0).
        assert reads_cached, f"no read was answered from the read cache: {reads_cached}"
    disagree = _replicas_agree(cluster, final)
    assert not disagree, "replicas disagree after healing:\n" + "\n".join(disagree[:20])
