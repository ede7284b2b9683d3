"""A read lease holder cut off from the broker while clients can still reach it (real processes,
workers in network namespaces, nftables): the case read leases exist to get right.

The holder of the workload's keys loses its broker connections (backend and replication) but not
its reads endpoint. While its lease runs, it may answer alone; then it must refuse, and the
broker must commit its slots' writes without it. Meanwhile a register workload (puts, deletes and
GETs that go to the holders) runs; its whole history must be linearizable, no acknowledged write
lost, and the probe must have seen the cut-off holder answer and then refuse.
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
import zmq

from client.cli.linearizability import check_history
from client.cli.lost_writes import lost_writes
from client.cli.workload import Workload, WorkloadConfig
from protocol.frames import C_REQUEST, MDPC, MMI_LEASES, pack, unpack
from protocol.replication import slot_for_key
from tests.support import requirements
from tests.support.cluster import wait_for
from tests.support.nemesis import FaultCluster
from tests.support.netns import netns_unavailable, nft_unavailable

pytestmark = pytest.mark.timeout(180)

LEASE = 1.0
CUT_S = 6.0


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def ask(url: str, frames: list[bytes], wait: float = 2.0) -> list[bytes] | None:
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    try:
        s.connect(url)
        s.send_multipart(frames)
        return s.recv_multipart() if s.poll(int(wait * 1000)) else None
    finally:
        s.close()


def lease_map(cluster: FaultCluster) -> dict[str, Any]:
    reply = ask(cluster.frontend, [MDPC, C_REQUEST, MMI_LEASES, b""])
    assert reply is not None and reply[2] == MMI_LEASES
    return unpack(reply[3])


def test_a_cut_off_holder_answers_until_its_lease_ends_then_refuses_and_its_writes_commit(
        fault_cluster: Callable[..., FaultCluster]) -> None:
    if reason := netns_unavailable() or nft_unavailable():
        requirements.missing(reason)
    cluster = fault_cluster(netns=True, read_lease=LEASE, keys=False, workers=3)
    cluster.start()
    lab = cluster.lab
    assert lab is not None
    wait_for(lambda: all(i >= 0 for i in lease_map(cluster)["holders"]), 20, 0.1, "a lease on every slot")

    cfg = WorkloadConfig(keys=6, duration=CUT_S + 12.0, think=0.01)
    workload = Workload(cluster.frontend, cfg, random.SystemRandom().randrange(1 << 31))
    keys = workload.keys
    m = lease_map(cluster)
    holders = [m["urls"][m["holders"][slot_for_key(k, m["slots"])]] for k in keys]
    victim_url = max(set(holders), key=holders.count)
    victim = next(w for w, u in cluster.reads.items() if u == victim_url)
    probe_key = keys[holders.index(victim_url)]
    probes: list[tuple[float, str]] = []  # (seconds since the cut, "ok" / code / "silent")

    with workload:
        time.sleep(4.0)
        lab.cut_tcp(victim, remote=((lab.service_addr, port_of(cluster.backend)),
                                    (lab.service_addr, port_of(cluster.replication))))
        cut_at = time.monotonic()
        try:
            while time.monotonic() - cut_at < CUT_S:
                reply = ask(victim_url, [pack({"op": "get", "id": 1, "cid": uuid.uuid4().bytes, "key": probe_key})],
                            wait=1.0)
                hdr = unpack(reply[0]) if reply is not None else None
                probes.append((time.monotonic() - cut_at,
                               "silent" if hdr is None else "ok" if hdr["ok"] else hdr["code"]))
                time.sleep(0.05)
        finally:
            lab.heal_tcp(victim)
        ops = workload.join()

    wait_for(cluster.fully_replicated, 60, 0.2, "every worker alive and every slot fully replicated")
    final_ops, final = workload.final_reads()
    history = ops + final_ops
    result = check_history(history, time_limit=15.0)
    lost = lost_writes(history, final)
    assert result.ok, "history not linearizable:\n" + "\n".join(result.failures[:5])
    assert lost == [], f"acknowledged writes lost: {lost[:10]}"
    # The holder answered alone at first (at most its lease), then refused for the rest of the cut.
    last_ok = max((t for t, what in probes if what == "ok"), default=None)
    assert any(what == "NOT_LEASED" for _, what in probes), probes
    assert last_ok is None or last_ok < LEASE, f"the cut-off holder answered {last_ok:.2f}s into the cut: {probes}"
    # Its slots' writes committed without it during the cut.
    victim_slots = {slot_for_key(k, m["slots"]) for k, u in zip(keys, holders, strict=True) if u == victim_url}
    t0 = cut_at
    # (Sent after the cut: none could commit with the holder's acknowledgement.)
    written = [op for op in ops if op.kind in ("put", "delete") and op.outcome == "ok" and op.complete is not None
               and slot_for_key(op.key, m["slots"]) in victim_slots and t0 + 0.2 < op.invoke
               and op.complete < t0 + CUT_S]
    assert written, "no write of the cut-off holder's slots committed during the cut"
    gets = sum(1 for op in history if op.kind == "get" and op.outcome == "ok")
    assert gets > 100, gets
