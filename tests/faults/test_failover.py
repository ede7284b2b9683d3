"""Failover (etcd mode, issue 11): the leading broker is killed or paused under load; a standby
takes over; afterwards every key's history must be linearizable (which also shows retries across
a failover applied once), no acknowledged write lost, and no two brokers may have led in
overlapping terms.

The workload is the register workload of test_linearizability_under_faults.py (10 clients, 8
keys) following the leader through the client's broker list; three workers are given every
broker; leases are 3 s. The nemesis here is a loop of its own: it finds the leader in etcd and

- ``kill`` (two brokers, one etcd member): SIGKILLs it, restarts it 1.5 s later (it comes back
  as a standby), three times;
- ``pause`` (same): SIGSTOPs it for 2 x the lease TTL, then SIGCONTs it: on waking it must not act
  as leader (it logs ``leadership_given_up`` and answers NOT_LEADER), twice;
- a standby killed while it takes over (three brokers, three etcd members): the leader is killed,
  then its successor as soon as it holds the leader key; the third broker takes over; twice;
- etcd members killed (three brokers, three members): the first member of every endpoint list,
  then etcd's own Raft leader, each restarted; zkv keeps serving.

Terms are read from the brokers' logs (``leading epoch=E`` starts one; ``leadership_given_up``
or the broker's death ends it) and must not overlap.
"""

from __future__ import annotations

import json
import random
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest

from client import Client
from client.cli.history import Op
from client.cli.linearizability import check_history
from client.cli.lost_writes import lost_writes
from client.cli.workload import Workload, WorkloadConfig, summarize
from tests.support.cluster import wait_for
from tests.support.ha import EtcdCluster, EtcdMember, HaCluster, stop
from tests.support.netns import NetLab, netns_unavailable, nft_unavailable
from tests.support.requirements import missing

LEASE_TTL = 3
CHECK_TIME_LIMIT = 15.0


@dataclass
class Term:
    broker: str
    epoch: int
    start: float  # wall clock, s
    end: float | None  # None: still leading when the test ended


@pytest.fixture
def ha_cluster(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[HaCluster]:
    etcd = EtcdCluster(tmp_path / "etcd").start()
    cluster = HaCluster(tmp_path / "zkv", etcd=etcd, brokers=2, lease_ttl=LEASE_TTL)
    try:
        yield cluster
    finally:
        stop(cluster, etcd, request)


def terms(cluster: HaCluster, deaths: dict[str, list[float]]) -> list[Term]:
    """Every broker's leadership terms, from its JSON log; a term still open when the broker was
    SIGKILLed ends at that kill."""
    found: list[Term] = []
    for name in cluster.broker_endpoints:
        open_term: Term | None = None
        kills = sorted(deaths.get(name, []))
        log_path = cluster.root / "logs" / f"{name}.log"
        for line in log_path.read_text(errors="replace").splitlines():
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            if "timestamp" not in ev:
                continue
            at = datetime.fromisoformat(ev["timestamp"].replace("Z", "+00:00")).timestamp()
            if open_term is not None and kills and kills[0] < at:
                open_term.end = kills.pop(0)  # died leading, before this line (a restart)
                found.append(open_term)
                open_term = None
            if ev.get("event") == "leading":
                open_term = Term(name, int(ev["epoch"]), float(at), None)
            elif ev.get("event") == "leadership_given_up" and open_term is not None:
                # A broker paused past its deadline logs this on waking; it sent nothing after
                # its deadline (checked before every send), which it logs as acted_until.
                open_term.end = min(float(at), float(ev.get("acted_until", at)))
                found.append(open_term)
                open_term = None
        if open_term is not None:
            later = [k for k in kills if k >= open_term.start]
            open_term.end = later[0] if later else None
            found.append(open_term)
    return sorted(found, key=lambda t: t.start)


def overlapping(found: list[Term]) -> list[str]:
    problems = []
    for i, a in enumerate(found):
        for b in found[i + 1:]:
            a_end = a.end if a.end is not None else float("inf")
            if b.start < a_end and a.broker != b.broker:
                problems.append(f"{a} and {b} overlap")
    return problems


WORKLOAD = WorkloadConfig(keys=8, duration=40.0, max_ops=20000, think=0.02,
                          mix=(("put", 0.4), ("get", 0.35), ("delete", 0.25)), timeout=12.0, attempt_timeout=1.5)


def first_acked_write(cluster: HaCluster, since: float) -> float:
    """Seconds from ``since`` (wall clock) to the first write acknowledged through the broker list."""
    with Client(cluster.frontend, timeout=20, attempt_timeout=1.0) as c:
        c.put(b"failover-probe", str(since).encode())
    return time.time() - since


def check_run(label: str, cluster: HaCluster, workload: Workload, ops: list[Op], deaths: dict[str, list[float]],
              seed: int, failovers: list[float], capsys: pytest.CaptureFixture[str]) -> list[Term]:
    """What every scenario must show afterwards: the cluster serving again, no acknowledged write
    lost, every key's history linearizable (retries applied once: a retry applied twice makes it
    not), and no two brokers leading in overlapping terms. Returns the terms."""
    wait_for(lambda: all(p.running for p in cluster.broker_procs()), 10, 0.1, "every broker running")
    try:
        cluster.wait_ready(60)
    except AssertionError as e:
        raise AssertionError(f"{e}; status: {cluster.status()}") from None
    final_ops, final = workload.final_reads()
    history = ops + final_ops
    result = check_history(history, time_limit=CHECK_TIME_LIMIT)
    lost = lost_writes(history, final)
    counts = summarize(history)
    found = terms(cluster, deaths)
    with capsys.disabled():
        print(f"\n[failover {label}] seed={seed} failovers_s={[round(f, 2) for f in failovers]} "
              f"ops={len(history)} ok={counts.get('ok', 0)} unknown={counts.get('unknown', 0)} "
              f"fail={counts.get('fail', 0)} lost={len(lost)} linearizable={result.ok} "
              f"terms={[(t.broker, t.epoch) for t in found]} errors={dict(workload.errors)} "
              f"retries_absorbed_by_replicas={[w.get('retries_absorbed') for w in cluster.status()['workers']]}")
    assert len(final) == len(workload.keys), "final reads failed"
    assert lost == [], f"{len(lost)} acknowledged writes lost: {lost[:10]}"
    assert not overlapping(found), overlapping(found)
    assert [t.epoch for t in found] == sorted({t.epoch for t in found}), found  # one term per epoch, in order
    assert counts.get("ok", 0) >= 1000, counts
    for kind in ("put", "get", "delete"):
        assert counts.get(f"{kind}_ok", 0) > 0, counts
    # Retries across a failover are applied once (worker/dedup.py): with them applied twice, this
    # history is not linearizable (a delete that finds nothing after its own first attempt).
    assert result.ok, "not linearizable:\n" + "\n".join(result.failures[:5])
    return found


@pytest.mark.parametrize("fault", ["kill", "pause"])
@pytest.mark.timeout(300)
def test_failover_under_load(fault: str, ha_cluster: HaCluster, capsys: pytest.CaptureFixture[str]) -> None:
    cluster = ha_cluster.start(timeout=60)
    seed = random.SystemRandom().randrange(1 << 31)
    workload = Workload(cluster.frontend, WORKLOAD, seed)
    deaths: dict[str, list[float]] = {}
    failovers: list[float] = []
    rounds = 3 if fault == "kill" else 2
    with workload:
        time.sleep(2.5)  # the workload under way before the first fault
        for _ in range(rounds):
            old = cluster.leader()
            assert old is not None
            name = old["value"]["name"]
            proc = cluster.procs[name]
            t0 = time.time()
            if fault == "kill":
                proc.signal(signal.SIGKILL)
                proc.popen.wait(timeout=10)  # type: ignore[union-attr]
                deaths.setdefault(name, []).append(t0)
            else:
                proc.signal(signal.SIGSTOP)
            new = cluster.wait_new_leader(old["create_revision"], timeout=20)
            assert new["value"]["name"] != name
            failovers.append(first_acked_write(cluster, t0))
            if fault == "kill":
                time.sleep(1.5)
                cluster.start_broker(name)
            else:
                time.sleep(max(0.0, 2 * LEASE_TTL - (time.time() - t0)))
                proc.signal(signal.SIGCONT)
                # On waking it must stand by: it answers NOT_LEADER, naming the new leader.
                front = cluster.broker_endpoints[name][0]
                try:
                    with Client(front, timeout=15, attempt_timeout=1.0) as c:  # a woken, loaded process may be slow
                        st = wait_for(lambda c=c: (s := c.status()).get("role") == "standby" and s.get("leader") and s,
                                      10, 0.1, f"{name} standing by after SIGCONT")
                except Exception as e:
                    # What the woken broker is doing instead of answering: its threads' stacks.
                    proc.signal(signal.SIGUSR1)
                    time.sleep(1.0)
                    raise AssertionError(f"{name} did not stand by after SIGCONT: {e!r}\n{proc.log_tail(120)}") from e
                assert st["leader"] == new["value"]["frontend"], st  # the successor, never itself
            time.sleep(2.5)
        workload.stop()  # the faults are over and the cluster has settled: no need to run out the clock
        ops = workload.join()
    found = check_run(fault, cluster, workload, ops, deaths, seed, failovers, capsys)
    assert len({t.epoch for t in found}) == rounds + 1, found  # each failover made one new term


@pytest.fixture
def three_brokers(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[HaCluster]:
    """Three brokers on a three-member etcd."""
    etcd = EtcdCluster(tmp_path / "etcd", members=3).start()
    cluster = HaCluster(tmp_path / "zkv", etcd=etcd, brokers=3, lease_ttl=LEASE_TTL)
    try:
        yield cluster
    finally:
        stop(cluster, etcd, request)


@pytest.mark.timeout(300)
def test_a_standby_killed_while_it_takes_over(three_brokers: HaCluster, capsys: pytest.CaptureFixture[str]) -> None:
    """The leader is killed; the moment a standby has won the leader key (it is recovering the
    slots, nothing acknowledged yet) it is killed too; the third broker must take over. Twice."""
    cluster = three_brokers.start(timeout=60)
    seed = random.SystemRandom().randrange(1 << 31)
    workload = Workload(cluster.frontend, WORKLOAD, seed)
    deaths: dict[str, list[float]] = {}
    failovers: list[float] = []
    with workload:
        time.sleep(2.5)  # the workload under way before the first fault
        for _ in range(2):
            old = cluster.leader()
            assert old is not None
            t0 = time.time()
            for _victim in range(2):  # the leader, then its successor as soon as etcd names it
                name = old["value"]["name"]
                cluster.procs[name].signal(signal.SIGKILL)
                cluster.procs[name].popen.wait(timeout=10)  # type: ignore[union-attr]
                deaths.setdefault(name, []).append(time.time())
                old = cluster.wait_new_leader(old["create_revision"], timeout=20)
            survivor = old["value"]["name"]
            assert all(d < t0 for d in deaths.get(survivor, [])), (survivor, deaths)  # the third broker
            failovers.append(first_acked_write(cluster, t0))
            time.sleep(1.5)
            cluster.start_broker()  # the two killed ones come back as standbys
            time.sleep(2.5)
        workload.stop()  # the faults are over and the cluster has settled: no need to run out the clock
        ops = workload.join()
    check_run("standby killed in takeover", cluster, workload, ops, deaths, seed, failovers, capsys)


def etcd_leader(etcd: EtcdCluster) -> EtcdMember:
    """The etcd member that is the Raft leader of the etcd cluster."""
    import requests

    def find() -> EtcdMember | None:
        for m in etcd.members:
            if not m.running:
                continue
            try:
                st = requests.post(m.client_url + "/v3/maintenance/status", json={}, timeout=2).json()
            except (requests.RequestException, ValueError):
                continue
            if st.get("leader") and st.get("leader") == st.get("header", {}).get("member_id"):
                return m
        return None

    return wait_for(find, 15, 0.1, "an etcd leader")


@pytest.mark.timeout(300)
def test_etcd_members_killed_under_load(three_brokers: HaCluster, capsys: pytest.CaptureFixture[str]) -> None:
    """etcd loses a member (the first of every broker's endpoint list), then its Raft leader; each
    comes back. etcd keeps a quorum throughout, so zkv keeps serving: at most one failover per
    etcd fault (a renewal may miss its deadline while etcd elects a leader), and afterwards the
    usual checks."""
    cluster = three_brokers.start(timeout=60)
    etcd = cluster.etcd
    assert etcd is not None
    seed = random.SystemRandom().randrange(1 << 31)
    workload = Workload(cluster.frontend, WORKLOAD, seed)
    served_after: list[float] = []
    with workload:
        time.sleep(2.5)  # the workload under way before the first fault
        for victim in (etcd.members[0], etcd_leader(etcd)):
            t0 = time.time()
            victim.kill()
            served_after.append(first_acked_write(cluster, t0))  # zkv writes through the fault
            time.sleep(6.0)
            victim.start(etcd.initial)  # its data directory: it rejoins as the member it was
            wait_for(etcd.healthy, 20, 0.1, "etcd healthy again")
            time.sleep(3.0)
        workload.stop()  # the faults are over and the cluster has settled: no need to run out the clock
        ops = workload.join()
    found = check_run("etcd member killed", cluster, workload, ops, {}, seed, served_after, capsys)
    assert len(found) <= 1 + 2, found


@pytest.fixture
def partitioned(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[HaCluster, NetLab]]:
    """Two brokers, each in a network namespace of its own (tests/support/ha.py ``lab``); etcd,
    the workers and the clients in the host's. Cleans up every process, namespace and veth."""
    why = netns_unavailable() or nft_unavailable()
    if why:
        missing(why)
    lab = NetLab()
    etcd: EtcdCluster | None = None
    cluster: HaCluster | None = None
    try:
        lab.setup()
        etcd = EtcdCluster(tmp_path / "etcd", host=lab.service_addr).start()
        cluster = HaCluster(tmp_path / "zkv", etcd=etcd, brokers=2, lease_ttl=LEASE_TTL, lab=lab)
        yield cluster, lab
    finally:
        stop(cluster, etcd, request)
        problems = lab.cleanup() + [f"left over: {n}" for n in lab.leftovers()]
        assert not problems, problems


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


@pytest.mark.parametrize("cut", ["etcd", "workers", "both"])
@pytest.mark.timeout(300)
def test_leader_cut_off(cut: str, partitioned: tuple[HaCluster, NetLab], capsys: pytest.CaptureFixture[str]) -> None:
    """The leader is cut off (packets dropped, connections stall) from etcd only, from its workers
    only, or from everything; 8 s later the cut heals. A leader without etcd stops at its lease
    deadline; one without W workers gives its lease up; either way a standby takes over, and the
    old leader, healed, stands by. Twice, then the usual checks."""
    cluster, lab = partitioned
    cluster.start(timeout=60)
    etcd = cluster.etcd
    assert etcd is not None
    seed = random.SystemRandom().randrange(1 << 31)
    workload = Workload(cluster.frontend, WORKLOAD, seed)
    failovers: list[float] = []
    with workload:
        time.sleep(2.5)  # the workload under way before the first fault
        for _ in range(2):
            old = cluster.leader()
            assert old is not None
            name = old["value"]["name"]
            _front, back, repl = cluster.broker_endpoints[name]
            t0 = time.time()
            if cut == "etcd":
                lab.cut_tcp(name, remote=tuple((etcd.host, port_of(m.client_url)) for m in etcd.members))
            elif cut == "workers":
                lab.cut_tcp(name, local_ports=(port_of(back), port_of(repl)))
            else:
                lab.link_down(name)
            new = cluster.wait_new_leader(old["create_revision"], timeout=30)
            assert new["value"]["name"] != name
            failovers.append(first_acked_write(cluster, t0))
            time.sleep(max(0.0, 8.0 - (time.time() - t0)))  # under load, cut off past two leases
            if cut == "both":
                lab.link_up(name)
            else:
                lab.heal_tcp(name)
            front = cluster.broker_endpoints[name][0]
            with Client(front, timeout=15, attempt_timeout=1.0) as c:
                st = wait_for(lambda c=c: (s := c.status()).get("role") == "standby" and s.get("leader") and s,
                              20, 0.2, f"{name} standing by after the cut healed")
            assert st["leader"] == new["value"]["frontend"], st
            time.sleep(2.5)
        workload.stop()  # the faults are over and the cluster has settled: no need to run out the clock
        ops = workload.join()
    found = check_run(f"leader cut from {cut}", cluster, workload, ops, {}, seed, failovers, capsys)
    assert len({t.epoch for t in found}) == 3, found
