"""Recovery in the cores (tests/support/sim.py): repair of lost replication messages, snapshots
for a wiped disk, catch-up from the log tail, broker restarts, rollback of writes that never
committed, and writes of older broker incarnations that must never come back."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from protocol.replication import slot_for_key
from tests.support.sim import SimCluster

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(params=[False, True], ids=["embedded", "failover"])
def sim(tmp_path: Path, request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    """Each test twice: a broker restart on its own metadata, and (etcd mode) a successor that
    knows only what etcd keeps (tests/support/sim.py ``what_etcd_keeps``)."""
    s = SimCluster(tmp_path, etcd_mode=request.param)
    yield s
    s.close()


def test_dropped_replication_messages_are_repaired(sim: SimCluster) -> None:
    rng = random.Random(7)
    sim.drop = lambda wid, rep: wid == "w2" and rng.random() < 0.3
    for i in range(100):
        assert sim.put(f"k{i}".encode(), b"v%d" % i)["ok"]
    sim.drop = None
    sim.advance(3.0)
    assert sim.worker_data("w2") == sim.worker_data("w1") == sim.worker_data("w3")
    assert sim.broker.stats["replays_sent"] > 0


def test_worker_with_wiped_disk_is_refilled_by_snapshots(sim: SimCluster, tmp_path: Path) -> None:
    for i in range(40):
        sim.put(f"k{i}".encode(), b"v")
    sim.restart_broker()  # the new broker has no log tail: only snapshots can refill w2
    sim.settle()
    sim.kill_worker("w2")
    import shutil

    shutil.rmtree(tmp_path / "w2")
    sim.start_worker("w2")  # refused while the old w2 still counts as alive, then accepted
    sim.advance(6.0)
    assert sim.worker_data("w2") == sim.worker_data("w1")
    assert sim.broker.stats["snapshots_sent"] > 0


def test_restarted_worker_catches_up_from_the_tail(sim: SimCluster) -> None:
    sim.put(b"before", b"1")
    sim.kill_worker("w1")
    sim.advance(3.5)
    for i in range(20):
        sim.put(f"during{i}".encode(), b"2")
    sim.start_worker("w1")
    sim.advance(2.0)
    assert sim.worker_data("w1") == sim.worker_data("w2")
    assert sim.broker.stats["snapshots_sent"] == 0  # the tail reached back far enough


def test_broker_restart_keeps_data_and_serves_again(sim: SimCluster) -> None:
    for i in range(20):
        sim.put(f"k{i}".encode(), b"v%d" % i)
    epoch = sim.broker.epoch
    sim.restart_broker()
    sim.settle()
    assert sim.broker.epoch == epoch + 1
    assert sim.broker.status()["recovering_slots"] == 0
    for i in range(20):
        assert sim.get(f"k{i}".encode()) == b"v%d" % i
    assert sim.put(b"after", b"x")["ok"]
    assert sim.get(b"after") == b"x"


def test_replica_with_a_write_never_committed_is_rolled_back(sim: SimCluster) -> None:
    key = b"ghost"
    slot = slot_for_key(key, sim.slots)
    sim.put(key, b"committed")
    # w1 alone applies a write; the broker crashes before it commits.
    sim.drop = lambda wid, rep: wid != "w1" and rep.slot == slot
    sim.send(b"c1", "put", [b"uncommitted"], key=key)
    sim.settle()
    sim.kill_worker("w1")
    sim.drop = None
    sim.restart_broker()
    sim.settle()
    assert sim.get(key) == b"committed"
    assert sim.put(key, b"newer")["ok"]  # takes the same seq in the new epoch
    sim.start_worker("w1")
    sim.advance(3.0)
    assert sim.worker_data("w1")[key] == b"newer"
    assert len(set(sim.positions(slot).values())) == 1


def test_recovery_ignores_a_replica_holding_writes_a_later_incarnation_truncated(sim: SimCluster) -> None:
    """Found by the fault suite: a broker recovering a slot adopted a replica's orphan writes
    (published by an older incarnation, truncated by a newer one), losing an acknowledged write."""
    key = b"orphan"
    slot = slot_for_key(key, sim.slots)
    assert sim.put(key, b"A")["ok"]
    sim.drop = lambda wid, rep: wid != "w1" and rep.slot == slot  # only w1 gets X1, X2
    sim.send(b"c1", "put", [b"X1"], key=key)
    sim.send(b"c1", "put", [b"X2"], key=key)
    sim.settle()
    sim.drop = None
    for w in ("w1", "w2", "w3"):
        sim.kill_worker(w)
    sim.restart_broker()
    sim.start_worker("w2")
    sim.start_worker("w3")
    sim.settle()
    assert sim.put(key, b"Y")["ok"]  # acknowledged at the seq X1 had
    sim.kill_worker("w3")
    sim.restart_broker()
    sim.start_worker("w1")  # holds X1, X2: past the history the metadata persisted
    sim.settle()
    assert sim.get(key) == b"Y"
    sim.start_worker("w3")
    sim.advance(4.0)
    assert sim.worker_data("w1")[key] == b"Y"
    assert len(set(sim.positions(slot).values())) == 1


def test_a_message_of_an_older_broker_incarnation_is_never_applied(sim: SimCluster) -> None:
    """Found by the fault suite: a paused worker applied, after the broker restarted and had
    truncated the slot, a write still queued from the old incarnation; the next broker then
    found no replica on its history and resurrected the refused write."""
    key = b"stale"
    slot = slot_for_key(key, sim.slots)
    assert sim.put(key, b"A")["ok"]
    held: list = []

    def hold_for_w2(wid: str, rep) -> bool:  # type: ignore[no-untyped-def]
        if rep.slot != slot or wid == "w1":
            return False
        if wid == "w2":
            held.append(rep)  # w2 is paused: the message waits in its queue
        return True  # w3 misses it

    sim.drop = hold_for_w2
    sim.send(b"c1", "put", [b"orphan"], key=key)  # only w1 applies it; it never commits
    sim.settle()
    sim.drop = None
    sim.kill_worker("w1")
    sim.restart_broker()  # recovers the slot from w2 and w3: the orphan's seq is truncated
    sim.settle()
    w2 = sim.workers["w2"].core
    assert w2 is not None
    for rep in held:  # w2 wakes up and reads its queue
        w2.on_replicate(rep, sim.t)
    sim.settle()
    assert w2.stale_dropped == len(held) == 1
    assert sim.get(key) == b"A"
    sim.start_worker("w1")
    sim.restart_broker()
    sim.advance(4.0)
    assert sim.get(key) == b"A"
    assert all(sim.worker_data(w)[key] == b"A" for w in ("w1", "w2", "w3"))


def test_acknowledged_write_survives_a_restart_with_one_of_its_holders_down(sim: SimCluster) -> None:
    """Recovery needs only RF - W + 1 replicas: an acknowledged write is on W of them, so on one
    of any RF - W + 1. Here w1 and w2 hold B, w3 only A; w2 is down when the (new) broker starts."""
    key = b"held-by-two"
    slot = slot_for_key(key, sim.slots)
    assert sim.put(key, b"A")["ok"]
    sim.drop = lambda wid, rep: wid == "w3" and rep.slot == slot
    assert sim.put(key, b"B")["ok"]
    sim.drop = None
    sim.kill_worker("w2")
    sim.restart_broker()
    assert sim.get(key) == b"B"  # from w1, or from w3 once it holds B: never A
    assert sim.broker.status()["recovering_slots"] == 0
    sim.advance(3.0)
    assert sim.worker_data("w3")[key] == b"B"
    sim.start_worker("w2")
    sim.advance(3.0)
    assert {sim.worker_data(w)[key] for w in ("w1", "w2", "w3")} == {b"B"}


def test_after_a_failover_reads_wait_until_the_adopted_history_is_committed(tmp_path: Path) -> None:
    """etcd mode: the successor adopts w1's history, which holds B; w3 (holding A) qualifies for
    reads only once B is committed, i.e. after it is repaired: a read never returns A."""
    sim = SimCluster(tmp_path, etcd_mode=True)
    try:
        key = b"adopted"
        slot = slot_for_key(key, sim.slots)
        assert sim.put(key, b"A")["ok"]
        sim.drop = lambda wid, rep: wid == "w3" and rep.slot == slot
        assert sim.put(key, b"B")["ok"]
        sim.drop = None
        sim.kill_worker("w2")
        sim.restart_broker()
        b_slot = sim.broker.slots[slot]
        assert b_slot.read_floor == b_slot.last.seq > 0
        assert b_slot.epochs[-1] == (sim.broker.epoch, b_slot.last.seq + 1)  # the new epoch starts after it
        for _ in range(6):
            assert sim.get(key) == b"B"
        assert b_slot.committed >= b_slot.read_floor
    finally:
        sim.close()
