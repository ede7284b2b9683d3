"""Issue 13's defect 1 as a user met it, with real processes: four workers, two replicas of one
slot SIGKILLed, a put to that slot that cannot commit. Reads of the slot's other keys, scans and
status keep answering; the one read that depends on the stuck write fails fast with UNAVAILABLE."""

from __future__ import annotations

import json
import signal

import pytest

from broker.placement import slot_map
from protocol.replication import slot_for_key
from tests.support.cluster import Cluster, wait_for
from tests.support.helpers import keys_in_slot

pytestmark = pytest.mark.timeout(120)

SLOTS = 16


def test_a_slot_whose_write_cannot_commit_keeps_answering(cluster_factory) -> None:  # type: ignore[no-untyped-def]
    cluster: Cluster = cluster_factory(workers=4, slots=SLOTS, broker_args=["--initial-workers", "4"]).start()
    slot = 5
    stuck, other = keys_in_slot(slot, SLOTS, 2, prefix="user:")
    c = cluster.client(timeout=2.0)
    c.put(other, b"committed")
    elsewhere = next(k for k in (b"elsewhere%d" % i for i in range(100)) if slot_for_key(k, SLOTS) != slot)
    c.put(elsewhere, b"e")
    replicas = slot_map(SLOTS, ["w1", "w2", "w3", "w4"], 3)[slot]
    for wid in replicas[:2]:
        cluster.procs[wid].signal(signal.SIGKILL)
    r = cluster.zkv("put", stuck.decode(), "never", "--url", cluster.frontend, "--timeout", "4")
    assert r.returncode != 0  # TIMEOUT (or, had the broker noticed already, NOT_ENOUGH_REPLICAS)
    wait_for(lambda: not {w for w in replicas[:2]} & cluster.alive_workers(), 20, 0.2, "the two declared dead")

    assert c.get(other) == b"committed"  # the slot's committed state is served
    (absent,) = [k for k in keys_in_slot(slot, SLOTS, 3, prefix="user:") if k not in (stuck, other)]
    assert c.get(absent) is None  # a miss in the slot does not wait for the stuck write either
    r = cluster.zkv("scan", "elsewhere", "--url", cluster.frontend, "--timeout", "4")
    assert r.returncode == 0 and elsewhere in r.stdout, r.stderr
    r = cluster.zkv("get", stuck.decode(), "--url", cluster.frontend, "--timeout", "4")
    # UNAVAILABLE naming the slot, at once: not TIMEOUT after the 4 s the command would wait
    assert r.returncode == 5 and b"UNAVAILABLE" in r.stderr and f"slot {slot}".encode() in r.stderr, r.stderr
    r = cluster.zkv("scan", "user:", "--url", cluster.frontend, "--timeout", "4")
    assert r.returncode == 5 and b"UNAVAILABLE" in r.stderr and f"slot {slot}".encode() in r.stderr, r.stderr

    st = json.loads(cluster.zkv("status", "--json", "--url", cluster.frontend).stdout)
    (stalled,) = st["stalled_slots"]
    assert stalled["slot"] == slot and stalled["live_replicas"] == 1 and stalled["pending_writes"] >= 1
    text = cluster.zkv("status", "--url", cluster.frontend).stdout.decode()
    assert f"stalled slot {slot}" in text, text

    for wid in replicas[:2]:  # the replicas come back: the write commits, the slot is whole again
        cluster.start_worker(wid)
    wait_for(lambda: not cluster.status()["stalled_slots"], 30, 0.2, "the slot unstalled")
    assert c.get(stuck) == b"never"
