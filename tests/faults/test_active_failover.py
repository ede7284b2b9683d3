"""Active brokers under faults (issue 15): three brokers lead six slot groups 2/2/2 under the
register workload of test_failover.py (10 clients, 8 keys, puts, gets and deletes through the
routing client); one broker is SIGKILLed and restarted, then another SIGSTOPped past its lease
and resumed. Afterwards no acknowledged write is lost and every key's history is linearizable:
a group's new leader recovers it as a successor does with one leader, and a woken broker's
groups are fenced by their epochs."""

from __future__ import annotations

import dataclasses
import json
import random
import signal
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from client.cli.linearizability import check_history
from client.cli.lost_writes import lost_writes
from client.cli.workload import Workload, WorkloadConfig, summarize
from tests.support.active import broker_status, full_map, wait_served
from tests.support.ha import EtcdCluster, HaCluster, stop
from tests.support.netns import NetLab, netns_unavailable, nft_unavailable
from tests.support.requirements import missing

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


@pytest.fixture
def active_partitioned(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[HaCluster, NetLab]]:
    """The three active brokers of ``active``, each in a network namespace of its own (as
    test_failover.py's ``partitioned``); etcd, the workers and the clients in the host's. Cleans
    up every process, namespace and veth, also when the test fails."""
    why = netns_unavailable() or nft_unavailable()
    if why:
        missing(why)
    lab = NetLab()
    etcd: EtcdCluster | None = None
    cluster: HaCluster | None = None
    try:
        lab.setup()
        etcd = EtcdCluster(tmp_path / "etcd", host=lab.service_addr).start()
        cluster = HaCluster(tmp_path / "zkv", etcd=etcd, brokers=3, lease_ttl=LEASE_TTL, slots=48,
                            broker_args=["--groups", str(GROUPS)], lab=lab)
        yield cluster, lab
    finally:
        stop(cluster, etcd, request)
        problems = lab.cleanup() + [f"left over: {n}" for n in lab.leftovers()]
        assert not problems, problems


def log_events(cluster: HaCluster, name: str, event: str) -> list[dict[str, Any]]:
    """``name``'s JSON log lines of ``event``, each with ``at`` (wall clock, s)."""
    found = []
    for line in (cluster.root / "logs" / f"{name}.log").read_text(errors="replace").splitlines():
        try:
            ev = json.loads(line)
        except ValueError:
            continue
        if isinstance(ev, dict) and ev.get("event") == event and "timestamp" in ev:
            ev["at"] = datetime.fromisoformat(ev["timestamp"].replace("Z", "+00:00")).timestamp()
            found.append(ev)
    return found


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


PARTITION_WORKLOAD = dataclasses.replace(WORKLOAD, duration=60.0)  # stopped once the victim leads again


@pytest.mark.parametrize("cut", ["etcd", "workers", "everything"])
@pytest.mark.timeout(180)
def test_active_broker_partitioned_under_load(cut: str, active_partitioned: tuple[HaCluster, NetLab],
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """One of three active brokers is cut off under the register workload: from etcd only (it
    still reaches its workers and clients, and must stop sequencing its groups at its lease
    deadline, before the others may take them), from its workers only (it keeps its lease, and
    must leave its groups to the others when it has seen too few workers for two leases), or
    from everything (its link down). The other
    two take its groups (their slot maps name only them); the cut heals, it rejoins with a new
    lease and gets its share back by handovers. Its give-up of each group precedes the group's
    next leader, no acknowledged write is lost, and every key's history is linearizable."""
    cluster, lab = active_partitioned
    etcd = cluster.etcd
    assert etcd is not None
    everyone = list(cluster.broker_endpoints)
    cluster.start_broker()
    for i in range(1, 4):
        cluster.start_worker(f"w{i}")
    sts = wait_served(cluster, everyone, GROUPS)
    seed = random.SystemRandom().randrange(1 << 31)
    victim = random.Random(seed).choice(everyone)
    others = [n for n in everyone if n != victim]
    its_groups = sorted(int(g) for g in sts[victim]["leading"])
    assert its_groups, sts[victim]
    workload = Workload(cluster.frontend, PARTITION_WORKLOAD, seed)
    with workload:
        time.sleep(2.0)
        t_cut = time.time()
        t0 = time.monotonic()
        if cut == "etcd":
            lab.cut_tcp(victim, remote=tuple((etcd.host, port_of(m.client_url)) for m in etcd.members))
        elif cut == "workers":
            _front, back, repl = cluster.broker_endpoints[victim]
            lab.cut_tcp(victim, local_ports=(port_of(back), port_of(repl)))
        else:
            lab.link_down(victim)
        try:
            # A lease runs out 3 s after the cut at most; the workers' give-way takes 2 leases.
            served = wait_served(cluster, others, GROUPS, timeout=25.0)
        except AssertionError as e:
            try:
                st = broker_status(cluster, victim)
                held = f"it leads {sorted(st.get('leading', {}))}, ha {st.get('ha')}"
            except Exception as why:  # noqa: BLE001 - cut off from the clients too
                held = f"its status unreachable ({why!r})"
            raise AssertionError(f"{e}; {victim} cut off from {cut}: {held}") from None
        taken = time.monotonic() - t0
        fronts = {cluster.broker_endpoints[n][0] for n in others}
        for n in others:  # every group's leader, as the survivors' maps name them: one of them
            full_map(cluster, n, leaders=fronts)
        assert set(its_groups) <= {int(g) for st in served.values() for g in st["leading"]}
        time.sleep(1.5)  # the survivors serve the victim's groups under load for a while
        if cut != "everything":
            lab.heal_tcp(victim)
        else:
            lab.link_up(victim)
        t1 = time.monotonic()
        back = wait_served(cluster, everyone, GROUPS)
        rejoined = time.monotonic() - t1
        assert back[victim]["leading"], back[victim]
        time.sleep(2.0)  # and the victim its new share
        workload.stop()
        ops = workload.join()
    # From the logs: the victim gave each of its groups up (it noticed its lease deadline pass)
    # before the group's next leader took it.
    given_up = {ev["group"]: ev for ev in log_events(cluster, victim, "group_given_up") if ev["at"] >= t_cut}
    assert set(its_groups) <= set(given_up), (its_groups, given_up)
    for g in its_groups:
        # (Cut from etcd: its lease deadline passed, maybe during a turn; cut from its workers
        # alone: it left its groups to the others, each handed over in order.)
        expected = "handed over" if cut == "workers" else "lease deadline passed"
        assert given_up[g]["reason"].startswith(expected), given_up[g]
        successors = [ev for n in others for ev in log_events(cluster, n, "group_leading")
                      if ev["group"] == g and ev["at"] >= t_cut]
        assert successors, f"group {g}: no successor logged"
        first = min(successors, key=lambda ev: ev["at"])
        assert given_up[g]["at"] < first["at"], (g, given_up[g], first)
        assert first["epoch"] > sts[victim]["leading"][str(g)], (g, first, sts[victim]["leading"])
    final_ops, final = workload.final_reads()
    history = ops + final_ops
    result = check_history(history, time_limit=15.0)
    lost = lost_writes(history, final)
    counts = summarize(history)
    # Write batches the replicas found were retries (worker/dedup.py), as each broker's lowest
    # group sees the workers: late first attempts delivered after the heal are among them.
    absorbed = {n: [w.get("retries_absorbed") for w in broker_status(cluster, n)["workers"]] for n in everyone}
    with capsys.disabled():
        print(f"\n[active partition {cut}] seed={seed} victim={victim} groups={its_groups} "
              f"groups_led_again_s={taken:.2f} rejoined_and_leading_s={rejoined:.2f} "
              f"ops={len(history)} ok={counts.get('ok', 0)} unknown={counts.get('unknown', 0)} "
              f"fail={counts.get('fail', 0)} lost={len(lost)} linearizable={result.ok} "
              f"errors={dict(workload.errors)} retries_absorbed_by_replicas={absorbed}")
    assert len(final) == len(workload.keys), "final reads failed"
    assert lost == [], f"{len(lost)} acknowledged writes lost: {lost[:10]}"
    assert counts.get("ok", 0) >= 1000, counts
    for kind in ("put", "get", "delete"):
        assert counts.get(f"{kind}_ok", 0) > 0, counts
    assert result.ok, "not linearizable:\n" + "\n".join(result.failures[:5])
