"""Membership and slot moves in the cores (tests/support/sim.py): new replicas for the slots of a
worker gone past the grace period, a joining worker's share, drain and remove, moves whose target
or source dies, a move by hand, and a late ACK about a copy the worker has dropped."""

from __future__ import annotations

from pathlib import Path

import pytest

from protocol.replication import slot_for_key
from tests.support.sim import SimCluster

pytestmark = pytest.mark.timeout(120)


def test_slots_of_a_worker_gone_past_the_grace_period_get_new_replicas(tmp_path: Path) -> None:
    sim = SimCluster(tmp_path, n_workers=4, initial_workers=4, grace=10.0, auto_rebalance=False)
    try:
        for i in range(60):
            assert sim.put(b"k%d" % i, b"v%d" % i)["ok"]
        held = set(sim.broker.workers["w1"].slots)
        assert held
        sim.kill_worker("w1")
        sim.advance(5.0)
        assert sim.broker.workers["w1"].slots == held  # within the grace period nothing moves
        sim.advance(12.0)  # dead after 3 s of silence, then 10 s of grace, then the snapshots
        st = sim.broker.status()
        assert st["under_replicated_slots"] == []
        assert sim.broker.workers["w1"].slots == set()
        for s, slot in sim.broker.slots.items():
            assert len(slot.replicas) == 3 and "w1" not in slot.replicas
            data = [sim.worker_data(w) for w in slot.replicas]
            keys = {k for k in data[0] if slot_for_key(k, sim.slots) == s}
            for d in data[1:]:
                assert {k for k in d if slot_for_key(k, sim.slots) == s} == keys
        for i in range(60):
            assert sim.get(b"k%d" % i) == b"v%d" % i
        # The old worker comes back: its copies of the moved slots are stale and are dropped.
        sim.start_worker("w1")
        sim.advance(1.0)
        w1 = sim.workers["w1"].core
        assert w1 is not None and w1.assigned == set()
        assert sim.worker_data("w1") == {}
    finally:
        sim.close()


def _check_placement(sim: SimCluster, acked: dict[bytes, bytes]) -> None:
    """Every slot has RF replicas holding identical data, and every acknowledged write reads back."""
    for s, slot in sim.broker.slots.items():
        assert len(slot.replicas) == sim.rf and not slot.learners, (s, slot.replicas, slot.learners)
        copies = [{k: v for k, v in sim.worker_data(w).items() if slot_for_key(k, sim.slots) == s}
                  for w in slot.replicas]
        assert all(c == copies[0] for c in copies), s
    for k, v in acked.items():
        assert sim.get(k) == v


def test_a_joining_worker_receives_about_one_in_n_plus_one_slots(tmp_path: Path) -> None:
    sim = SimCluster(tmp_path, slots=32)
    try:
        acked = {b"k%d" % i: b"v%d" % i for i in range(200)}
        for k, v in acked.items():
            assert sim.put(k, v)["ok"]
        sim.add_worker("w4")
        for i in range(100):  # writes go on while slots move
            k, v = b"during%d" % i, b"x%d" % i
            hdr = sim.put(k, v)
            assert hdr["ok"], hdr
            acked[k] = v
            if i % 10 == 0:
                sim.advance(0.2)
        sim.advance(5.0)
        assert sim.broker.moves.moves == {} and sim.broker.moves.misplaced(sim.t) == []
        moved = sim.broker.stats["slots_moved"]
        assert moved == len(sim.broker.workers["w4"].slots)
        assert abs(moved - 32 * 3 / 4) <= 6  # rendezvous: the newcomer's fair share, no more
        _check_placement(sim, acked)
    finally:
        sim.close()


def test_drain_moves_every_slot_away_and_remove_needs_a_stopped_drained_worker(tmp_path: Path) -> None:
    sim = SimCluster(tmp_path, n_workers=4, initial_workers=4, slots=16)
    try:
        acked = {b"k%d" % i: b"v%d" % i for i in range(100)}
        for k, v in acked.items():
            sim.put(k, v)
        assert sim.broker.admin({"cmd": "remove", "worker": "w1"})["ok"] is False  # holds slots
        r = sim.broker.admin({"cmd": "drain", "worker": "w1"})
        assert r["ok"], r
        assert sim.broker.admin({"cmd": "drain", "worker": "w2"})["ok"] is False  # would leave < RF
        sim.advance(5.0)
        assert sim.broker.workers["w1"].slots == set()
        assert sim.worker_data("w1") == {}  # it dropped its copies once the new owners were durable
        assert sim.broker.admin({"cmd": "remove", "worker": "w1"})["ok"] is False  # still running
        sim.kill_worker("w1")
        sim.advance(4.0)
        assert sim.broker.admin({"cmd": "remove", "worker": "w1"})["ok"] is True
        sim.step()  # the step's Ready persists the removal
        assert "w1" not in sim.broker.workers and "w1" not in sim.meta.load_workers()
        _check_placement(sim, acked)
    finally:
        sim.close()


def test_a_move_whose_target_dies_is_abandoned_and_one_whose_source_dies_completes(tmp_path: Path) -> None:
    sim = SimCluster(tmp_path, slots=8)
    try:
        acked = {b"k%d" % i: b"v%d" % i * 1000 for i in range(100)}
        for k, v in acked.items():
            sim.put(k, v)
        sim.broker.cfg.move_concurrency = 0  # hold the planner while the stage is set
        sim.add_worker("w4")
        sim.broker.cfg.move_concurrency = 8
        sim.broker.moves.plan(sim.t)  # starts the moves; snapshots are requested, not yet delivered
        moves = dict(sim.broker.moves.moves)
        assert moves
        sim.kill_worker("w4")  # the target dies mid-move
        sim.advance(4.0)
        assert all(len(sl.replicas) == 3 and not sl.learners for sl in sim.broker.slots.values())
        assert sim.broker.stats["moves_abandoned"] >= len(moves)
        sim.start_worker("w4")
        sim.broker.moves.plan(sim.t)
        source = next(iter(sim.broker.moves.moves.values())).remove
        sim.kill_worker(source)  # a source dies mid-move: another replica donates
        sim.advance(6.0)
        sim.start_worker(source)
        sim.advance(6.0)
        assert sim.broker.moves.moves == {} and sim.broker.moves.misplaced(sim.t) == []
        _check_placement(sim, acked)
    finally:
        sim.close()


def test_a_slot_moved_by_hand_moves_and_comes_back(sim: SimCluster) -> None:
    sim.add_worker("w4")
    sim.advance(3.0)
    assert sim.broker.moves.misplaced(sim.t) == []
    slot = next(s for s, sl in sim.broker.slots.items() if "w4" not in sl.replicas)
    src = sim.broker.slots[slot].replicas[0]
    before = sim.broker.stats["slots_moved"]
    assert sim.broker.admin({"cmd": "move", "slot": slot, "from": src, "to": "w4"})["ok"]
    assert sim.broker.admin({"cmd": "move", "slot": slot, "from": src, "to": "w4"})["ok"] is False
    sim.advance(5.0)  # it moves, then auto-rebalance puts it back where placement wants it
    assert sim.broker.moves.moves == {} and sim.broker.moves.misplaced(sim.t) == []
    assert sim.broker.stats["slots_moved"] == before + 2


def test_a_late_ack_from_a_worker_that_dropped_the_slot_is_not_counted(tmp_path: Path) -> None:
    """Found by the elastic fault test: a slot moved off X and straight back to X; an ACK X had
    sent about its old copy arrived after X became a learner again, so the broker finished the
    move and counted X for W and reads before X had the data."""
    from protocol.frames import W_ACK

    sim = SimCluster(tmp_path, n_workers=4, initial_workers=4, slots=4, auto_rebalance=False)
    try:
        key = b"k"
        s = slot_for_key(key, sim.slots)
        reps = list(sim.broker.slots[s].replicas)
        x, spare = reps[0], next(w for w in sim.workers if w not in reps)
        assert sim.put(key, b"v1")["ok"]
        sim.drop = lambda wid, rep: wid != x and rep.slot == s  # only X gets v2 ...
        sim.intercept = lambda wid, frames: wid == x and frames[0] == W_ACK  # ... and its ACK is late
        rid = sim.send(b"c1", "put", [b"v2"], key=key)
        sim.settle()
        assert sim.reply(b"c1", rid) is None
        sim.intercept = None
        assert sim.broker.admin({"cmd": "move", "slot": s, "from": x, "to": spare})["ok"]
        sim.settle()
        assert x not in sim.broker.slots[s].replicas
        other = next(w for w in sim.broker.slots[s].replicas if w != spare)
        assert sim.broker.admin({"cmd": "move", "slot": s, "from": other, "to": x})["ok"]
        sim.release()  # X's ACK for v2 arrives now: it describes a copy X has dropped
        assert sim.reply(b"c1", rid) is None  # v2 is on no disk but... it must not commit
        sim.drop = None
        sim.advance(4.0)
        reads = [sim.get(key) for _ in range(6)]
        assert len(set(reads)) == 1, reads  # no alternating old/new values
    finally:
        sim.close()


def test_move_progress_never_shows_more_copied_than_total(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Move progress (status `moves`) said "19/11 keys" (every snapshot entry, chunks of streamed
    values too, counted as a key against a total of records) and mostly "0/0 keys 0 B/0 B" (before
    the first part and once the copy was done). Copied never exceeds total, the totals are known
    whenever the state is `copying`, and a finished copy keeps its figures while catching up."""
    import worker.donor

    monkeypatch.setattr(worker.donor, "SNAPSHOT_PART_BYTES", 400)  # many parts
    sim = SimCluster(tmp_path, n_workers=4, slots=4, auto_rebalance=False)
    try:
        s = slot_for_key(b"big", 4)
        keys = [k for k in (b"k%d" % i for i in range(400)) if slot_for_key(k, 4) == s][:30]
        for k in keys:
            assert sim.put(k, b"v" * 50)["ok"]
        stream = b"S" * 16
        for i in range(5):  # a streamed value: five chunks, one record
            assert sim.call("put_chunk", [b"c" * 100], key=b"big", stream=stream, index=i)[0]["ok"]
        assert sim.call("put_commit", key=b"big", stream=stream, chunks=5, size=500)[0]["ok"]
        sim.broker.state.cfg.copy_rate = 1000  # bytes/s: a part or so per tick
        slot = sim.broker.slots[s]
        spare = next(w for w in sim.workers if w not in slot.replicas)
        assert sim.broker.admin({"cmd": "move", "slot": s, "from": slot.replicas[0], "to": spare})["ok"]
        seen = []
        for _ in range(200):
            moves = sim.broker.status()["moves"]
            if not moves:
                break
            seen.extend(moves)
            sim.advance(0.1)
        assert not sim.broker.status()["moves"], "the move finished"
        states = {m["state"] for m in seen}
        assert "copying" in states, states
        for m in seen:
            assert m["keys_copied"] <= m["keys_total"] and m["bytes_copied"] <= m["bytes_total"], m
            if m["state"] in ("copying", "catching up"):
                assert m["keys_total"] == len(keys) + 1 and m["bytes_total"] > 0, m
            if m["state"] == "catching up":
                assert (m["keys_copied"], m["bytes_copied"]) == (m["keys_total"], m["bytes_total"]), m
        assert any(0 < m["keys_copied"] < m["keys_total"] for m in seen), "progress seen mid-copy"
    finally:
        sim.close()
