"""Active brokers under faults (issue 15): three brokers lead six slot groups 2/2/2 under the
register workload of test_failover.py (10 clients, 8 keys, puts, gets and deletes through the
routing client); one broker is SIGKILLed and restarted, then another SIGSTOPped past its lease
and resumed. Afterwards no acknowledged write is lost and every key's history is linearizable:
a group's new leader recovers it as a successor does with one leader, and a woken broker's
groups are fenced by their epochs."""

from __future__ import annotations

import random
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from client.cli.linearizability import check_history
from client.cli.lost_writes import lost_writes
from client.cli.workload import Workload, WorkloadConfig, summarize
from tests.support.active import broker_status, wait_served
from tests.support.ha import EtcdCluster, HaCluster, stop

GROUPS = 6
LEASE_TTL = 3
WORKLOAD = WorkloadConfig(keys=8, duration=20.0, max_ops=12000, think=0.02,
                          mix=(("put", 0.4), ("get", 0.35), ("delete", 0.25)), timeout=12.0, attempt_timeout=1.5)


@pytest.fixture
def active(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[HaCluster]:
    etcd = EtcdCluster(tmp_path / "etcd").start()
    cluster = HaCluster(tmp_path / "zkv", etcd=etcd, brokers=3, lease_ttl=LEASE_TTL, slots=48,
                        broker_args=["--groups", str(GROUPS)])
    try:
        yield cluster
    finally:
        stop(cluster, etcd, request)


@pytest.mark.timeout(240)
def test_active_brokers_killed_and_paused_under_load(active: HaCluster, capsys: pytest.CaptureFixture[str]) -> None:
    cluster = active
    everyone = list(cluster.broker_endpoints)
    cluster.start_broker()
    for i in range(1, 4):
        cluster.start_worker(f"w{i}")
    wait_served(cluster, everyone, GROUPS)
    seed = random.SystemRandom().randrange(1 << 31)
    workload = Workload(cluster.frontend, WORKLOAD, seed)
    taken: list[float] = []
    with workload:
        time.sleep(3.0)
        # A kill: b2's groups go to b1 and b3 after its lease lapses; b2 comes back and gets
        # its share again by handovers.
        cluster.procs["b2"].signal(signal.SIGKILL)
        cluster.procs["b2"].popen.wait(timeout=10)  # type: ignore[union-attr]
        t0 = time.monotonic()
        wait_served(cluster, ["b1", "b3"], GROUPS)
        taken.append(time.monotonic() - t0)
        cluster.start_broker("b2")
        wait_served(cluster, everyone, GROUPS)
        # A pause past the lease: b3 wakes with groups it may no longer act for.
        cluster.procs["b3"].signal(signal.SIGSTOP)
        t0 = time.monotonic()
        wait_served(cluster, ["b1", "b2"], GROUPS)
        taken.append(time.monotonic() - t0)
        cluster.procs["b3"].signal(signal.SIGCONT)
        wait_served(cluster, everyone, GROUPS)
        ops = workload.join()
    final_ops, final = workload.final_reads()
    history = ops + final_ops
    result = check_history(history, time_limit=15.0)
    lost = lost_writes(history, final)
    counts = summarize(history)
    redirected = {n: broker_status(cluster, n).get("redirected") for n in everyone}
    with capsys.disabled():
        print(f"\n[active failover] seed={seed} groups_led_again_s={[round(t, 2) for t in taken]} "
              f"ops={len(history)} ok={counts.get('ok', 0)} unknown={counts.get('unknown', 0)} "
              f"fail={counts.get('fail', 0)} lost={len(lost)} linearizable={result.ok} "
              f"errors={dict(workload.errors)} redirected={redirected}")
    assert len(final) == len(workload.keys), "final reads failed"
    assert lost == [], f"{len(lost)} acknowledged writes lost: {lost[:10]}"
    assert counts.get("ok", 0) >= 1000, counts
    for kind in ("put", "get", "delete"):
        assert counts.get(f"{kind}_ok", 0) > 0, counts
    assert result.ok, "not linearizable:\n" + "\n".join(result.failures[:5])
