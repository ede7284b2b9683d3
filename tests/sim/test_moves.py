"""The broker and worker cores driven through an in-memory network (tests/support/sim.py): write and
read paths, commit rules, gap repair, snapshots, broker restart, divergent replicas, and many
seeded random fault schedules. No sockets; real LMDB."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from protocol.replication import slot_for_key
from tests.support.sim import RandomFaults, SimCluster

pytestmark = pytest.mark.timeout(120)


def test_put_get_delete_and_versions(sim: SimCluster) -> None:
    r1 = sim.put(b"a", b"1")
    r2 = sim.put(b"a", b"2")
    assert r1["ok"] and r2["ok"] and r2["version"] > r1["version"]
    assert sim.get(b"a") == b"2"
    hdr, _ = sim.call("delete", key=b"a")
    assert hdr == {"id": hdr["id"], "ok": True, "deleted": True}
    assert sim.get(b"a") is None
    hdr, _ = sim.call("delete", key=b"a")
    assert hdr["deleted"] is False


def test_every_replica_applies_every_write_in_order(sim: SimCluster) -> None:
    for i in range(50):
        assert sim.put(f"k{i}".encode(), bytes([i]) * i)["ok"]
    sim.advance(0.5)
    for slot in range(sim.slots):
        assert len(set(sim.positions(slot).values())) == 1
    assert sim.worker_data("w1") == sim.worker_data("w2") == sim.worker_data("w3")
    assert len(sim.worker_data("w1")) == 50


def test_write_commits_with_w_replicas_and_fails_fast_below(sim: SimCluster) -> None:
    sim.kill_worker("w3")
    sim.advance(3.5)  # heartbeat expiry
    assert sim.put(b"x", b"1")["ok"]
    sim.kill_worker("w2")
    sim.advance(3.5)
    hdr = sim.put(b"y", b"1")
    assert hdr["ok"] is False and hdr["code"] == "NOT_ENOUGH_REPLICAS"
    assert sim.get(b"x") == b"1"  # committed data stays readable from the up-to-date replica


def test_read_of_an_uncommitted_write_is_held_until_it_commits(sim: SimCluster) -> None:
    key = b"held"
    slot = slot_for_key(key, sim.slots)
    sim.put(key, b"old")
    # Only w1 receives the new write; w2 and w3 miss it, so it cannot commit yet.
    blocked = {"w2", "w3"}
    sim.drop = lambda wid, rep: wid in blocked and rep.slot == slot
    rid = sim.send(b"c1", "put", [b"new"], key=key)
    sim.settle()
    assert sim.reply(b"c1", rid) is None
    # Route reads only to w1 by making it the only replica that qualifies... all do (committed is
    # the old write), so ask repeatedly: whichever replica answers, no answer shows "new" early.
    seen = []
    for _ in range(6):
        r = sim.send(b"c2", "get", key=key)
        sim.settle()
        got = sim.reply(b"c2", r)
        if got is not None:
            seen.append(got[1][0])
    assert b"new" not in seen
    assert b"old" in seen  # reads that went to w2/w3 answered at once
    sim.drop = None
    blocked.clear()
    sim.advance(2.5)  # the broker notices the lagging replicas and repairs them
    assert sim.reply(b"c1", rid)[0]["ok"]
    assert sim.get(key) == b"new"
    # The held reads were released once the write committed; they may show either value.
    assert all(sim.reply(b"c2", i) is not None for i in range(rid + 1, rid + 7))


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


def test_retried_write_is_applied_once(sim: SimCluster) -> None:
    key = b"once"
    slot = slot_for_key(key, sim.slots)
    rid = sim.send(b"c1", "put", [b"v"], key=key, cid=b"client-1")
    sim.settle()
    first = sim.reply(b"c1", rid)
    sim.send(b"c1", "put", [b"v"], key=key, cid=b"client-1", rid=rid)
    sim.settle()
    replies = [h for h in sim.replies[b"c1"] if h["id"] == rid]
    assert len(replies) == 2 and replies[0] == replies[1] == first[0]
    assert sim.broker.slots[slot].last.seq == 1
    # And across a broker restart: the retry is recognised from the metadata.
    sim.restart_broker()
    sim.settle()
    sim.send(b"c1", "put", [b"v"], key=key, cid=b"client-1", rid=rid)
    sim.settle()
    assert sim.broker.slots[slot].last.seq == 1
    assert [h for h in sim.replies[b"c1"] if h["id"] == rid][-1]["ok"]


def test_ttl_follows_the_broker_clock(sim: SimCluster) -> None:
    sim.put(b"t", b"v", ttl=1000)
    assert sim.get(b"t") == b"v"
    sim.advance(1.1)
    assert sim.get(b"t") is None
    hdr, _ = sim.call("exists", key=b"t")
    assert hdr["exists"] is False
    hdr, _ = sim.call("delete", key=b"t")
    assert hdr["deleted"] is False  # an expired key did not exist, on every replica alike
    # Its space is reclaimed by the broker's clock, whatever the workers' clocks say.
    sim.put(b"t2", b"v", ttl=500)
    sim.advance(1.0)
    for w in sim.workers.values():
        assert w.core is not None
        assert w.core.store.reclaim_expired(w.core.broker_now) >= 1
        assert b"t2" not in sim.worker_data(w.wid)


def test_malformed_client_messages_get_errors_and_change_nothing(sim: SimCluster) -> None:
    from protocol.frames import C_REQUEST, MDPC, SERVICE, pack

    before = {s: sl.last for s, sl in sim.broker.slots.items()}
    bad = [
        [b"junk"],
        [MDPC, C_REQUEST, SERVICE, b"\xc1"],
        [MDPC, C_REQUEST, SERVICE, pack([1, 2])],
        [MDPC, C_REQUEST, SERVICE, pack({"op": "put", "key": b"k"})],
        [MDPC, C_REQUEST, SERVICE, pack({"op": "frobnicate", "id": 1})],
        [MDPC, C_REQUEST, SERVICE, pack({"op": "put", "id": 2, "key": b""}), b"v"],
        [MDPC, C_REQUEST, SERVICE, pack({"op": "put", "id": 3, "key": b"k" * 5000}), b"v"],
        [MDPC, C_REQUEST, SERVICE, pack({"op": "put", "id": 4, "key": b"k"})],
        [MDPC, C_REQUEST, SERVICE, pack({"op": "put", "id": 5, "key": b"k", "ttl": -1}), b"v"],
        [MDPC, C_REQUEST, SERVICE, pack({"op": "mget", "id": 6, "keys": []})],
        [MDPC, C_REQUEST, SERVICE, pack({"op": "get", "id": 7, "key": 12})],
    ]
    expected = ["BAD_REQUEST", "BAD_REQUEST", "BAD_REQUEST", "BAD_REQUEST", "UNKNOWN_COMMAND",
                "BAD_REQUEST", "KEY_TOO_LARGE", "BAD_REQUEST", "BAD_REQUEST", "BAD_REQUEST", "BAD_REQUEST"]
    for frames in bad:
        sim.broker.on_client(b"evil", frames)
    sim.settle()
    codes = [h["code"] for h in sim.replies[b"evil"]]
    assert codes == expected
    assert all(h["ok"] is False and h["message"] for h in sim.replies[b"evil"])
    assert {s: sl.last for s, sl in sim.broker.slots.items()} == before


@pytest.mark.parametrize("seed", range(12))
def test_random_fault_schedules_lose_no_acknowledged_write(tmp_path: Path, seed: int) -> None:
    """Random writes and reads while one worker at a time crashes, restarts, loses replication
    messages, and the broker restarts. Checks: every acknowledged write is what a later read
    returns (the simulation serialises clients, so the last acknowledged write of a key wins
    unless a later, unacknowledged one of it may have landed), and replicas converge."""
    rng = random.Random(seed)
    n = 3 + seed % 2  # with a fourth worker, slots of a worker gone too long move to it
    sim = SimCluster(tmp_path, slots=4, n_workers=n, initial_workers=n, grace=5.0)
    try:
        acked: dict[bytes, bytes] = {}
        maybe: dict[bytes, set[bytes]] = {}
        faults = RandomFaults(sim, rng, p_kill=0.04, p_restart=0.02, p_lossy=0.02, p_broker=0.01, p_advance=0.11)
        for step in range(300):
            faults.step()
            key = b"k%d" % rng.randrange(12)
            if rng.random() < 0.6:
                value = b"s%d-%d" % (seed, step)
                rid = sim.send(b"c", "put", [value], key=key)
                sim.settle()
                got = sim.reply(b"c", rid)
                if got is not None and got[0]["ok"]:
                    acked[key] = value
                    maybe.pop(key, None)
                elif got is None or got[0].get("code") == "TIMEOUT":
                    maybe.setdefault(key, set()).add(value)  # outcome unknown
            else:
                rid = sim.send(b"c", "get", key=key)
                sim.settle()
                got = sim.reply(b"c", rid)
                if got is not None and got[0]["ok"]:
                    value = got[1][0] if got[0]["found"] else None
                    allowed = {acked.get(key)} | maybe.get(key, set())
                    assert value in allowed, (seed, step, key, value, allowed)
        # Heal everything and check convergence and durability.
        faults.heal()
        sim.advance(8.0)
        assert sim.broker.status()["recovering_slots"] == 0
        for key, value in acked.items():
            got = sim.get(key)
            assert got in {value} | maybe.get(key, set()), (seed, key, got, value)
        for s, slot in sim.broker.slots.items():
            assert len(slot.replicas) == 3
            copies = [{k: v for k, v in sim.worker_data(w).items() if slot_for_key(k, sim.slots) == s}
                      for w in slot.replicas]
            assert copies[0] == copies[1] == copies[2], (seed, s)
    finally:
        sim.close()


def test_retry_of_a_write_lost_in_a_broker_restart_is_applied_not_faked(sim: SimCluster) -> None:
    key = b"lost"
    slot = slot_for_key(key, sim.slots)
    other = next(b"o%d" % i for i in range(1000) if slot_for_key(b"o%d" % i, sim.slots) == slot)
    # Only w1 applies the write; the broker dies before it commits; w1 is down during recovery.
    sim.drop = lambda wid, rep: wid != "w1" and rep.slot == slot
    rid = sim.send(b"c1", "put", [b"v1"], key=key, cid=b"client-9")
    sim.settle()
    sim.kill_worker("w1")
    sim.drop = None
    sim.restart_broker()
    sim.settle()
    assert sim.put(other, b"x")["ok"]  # takes the lost write's seq in the new epoch
    sim.send(b"c1", "put", [b"v1"], key=key, cid=b"client-9", rid=rid)
    sim.settle()
    assert [h for h in sim.replies[b"c1"] if h["id"] == rid][-1]["ok"]
    assert sim.get(key) == b"v1"  # really applied, not just answered


def test_retried_mset_reapplies_only_the_parts_lost_in_a_restart(sim: SimCluster) -> None:
    keys = [b"m%d" % i for i in range(40)]
    lost_slot = slot_for_key(keys[0], sim.slots)
    sim.drop = lambda wid, rep: wid != "w1" and rep.slot == lost_slot
    rid = sim.send(b"c1", "mset", [b"first"] * len(keys), keys=keys, cid=b"client-7")
    sim.settle()
    sim.kill_worker("w1")
    sim.drop = None
    sim.restart_broker()
    sim.settle()
    survivor = next(k for k in keys if slot_for_key(k, sim.slots) != lost_slot)
    assert sim.put(survivor, b"later")["ok"]  # a later write the retry must not overwrite
    sim.send(b"c1", "mset", [b"first"] * len(keys), keys=keys, cid=b"client-7", rid=rid)
    sim.settle()
    assert [h for h in sim.replies[b"c1"] if h["id"] == rid][-1]["ok"]
    assert sim.get(survivor) == b"later"
    assert sim.get(keys[0]) == b"first"


def test_a_write_a_worker_cannot_store_does_not_crash_it(sim: SimCluster) -> None:
    """LMDB refuses the batch (here: the map is full); the worker acknowledges nothing of it,
    keeps running, and stores it once it can."""
    import lmdb

    w1 = sim.workers["w1"].core
    assert w1 is not None
    real = w1.store.apply_batch
    failing = True

    def apply_batch(batch):  # type: ignore[no-untyped-def]
        if failing:
            raise lmdb.MapFullError("mdb_put: MDB_MAP_FULL")
        return real(batch)

    w1.store.apply_batch = apply_batch  # type: ignore[method-assign]
    assert sim.put(b"k", b"v")["ok"]  # w2 and w3 make W=2
    assert w1.store.position(slot_for_key(b"k", sim.slots)).seq == 0
    failing = False
    sim.advance(3.0)
    assert sim.worker_data("w1")[b"k"] == b"v"


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
        assert sim.broker.moves == {} and sim.broker.misplaced(sim.t) == []
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
        sim.broker._plan_moves(sim.t)  # starts the moves; snapshots are requested, not yet delivered
        moves = dict(sim.broker.moves)
        assert moves
        sim.kill_worker("w4")  # the target dies mid-move
        sim.advance(4.0)
        assert all(len(sl.replicas) == 3 and not sl.learners for sl in sim.broker.slots.values())
        assert sim.broker.stats["moves_abandoned"] >= len(moves)
        sim.start_worker("w4")
        sim.broker._plan_moves(sim.t)
        source = next(iter(sim.broker.moves.values())).remove
        sim.kill_worker(source)  # a source dies mid-move: another replica donates
        sim.advance(6.0)
        sim.start_worker(source)
        sim.advance(6.0)
        assert sim.broker.moves == {} and sim.broker.misplaced(sim.t) == []
        _check_placement(sim, acked)
    finally:
        sim.close()


@pytest.mark.parametrize("seed", range(6))
def test_random_membership_changes_under_faults(tmp_path: Path, seed: int) -> None:
    """Joins, drains, undrains, crashes and broker restarts at random while a client writes."""
    rng = random.Random(1000 + seed)
    sim = SimCluster(tmp_path, slots=8, grace=5.0)
    try:
        acked: dict[bytes, bytes] = {}
        maybe: dict[bytes, set[bytes]] = {}
        down: set[str] = set()
        for step in range(250):
            r = rng.random()
            live = sorted(w for w in sim.workers if w not in down)
            if r < 0.03 and len(sim.workers) < 6:
                sim.add_worker(f"w{len(sim.workers) + 1}")
            elif r < 0.06:
                sim.broker.admin({"cmd": "drain", "worker": rng.choice(live)})
            elif r < 0.09:
                sim.broker.admin({"cmd": "undrain", "worker": rng.choice(sorted(sim.workers))})
            elif r < 0.12 and not down:
                victim = rng.choice(live)
                sim.kill_worker(victim)
                down.add(victim)
            elif r < 0.16 and down:
                sim.start_worker(down.pop())
            elif r < 0.17:
                sim.restart_broker()
            elif r < 0.3:
                sim.advance(rng.choice([0.3, 1.0, 3.0]))
            key = b"k%d" % rng.randrange(20)
            value = b"s%d-%d" % (seed, step)
            rid = sim.send(b"c", "put", [value], key=key)
            sim.settle()
            got = sim.reply(b"c", rid)
            if got is not None and got[0]["ok"]:
                acked[key] = value
                maybe.pop(key, None)
            elif got is None or got[0].get("code") == "TIMEOUT":
                maybe.setdefault(key, set()).add(value)
        for w in sorted(down):
            sim.start_worker(w)
        for w in sorted(sim.workers):
            sim.broker.admin({"cmd": "undrain", "worker": w})
        sim.advance(20.0)
        assert sim.broker.moves == {} and sim.broker.misplaced(sim.t) == [], seed
        for s, slot in sim.broker.slots.items():
            assert len(slot.replicas) == 3 and not slot.learners
            copies = [{k: v for k, v in sim.worker_data(w).items() if slot_for_key(k, sim.slots) == s}
                      for w in slot.replicas]
            assert all(c == copies[0] for c in copies), (seed, s)
        for k, v in acked.items():
            assert sim.get(k) in {v} | maybe.get(k, set()), (seed, k)
    finally:
        sim.close()


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


def test_a_delete_retried_after_a_broker_restart_gets_its_recorded_answer(sim: SimCluster) -> None:
    assert sim.put(b"d", b"v")["ok"]
    rid = sim.send(b"c1", "delete", key=b"d", cid=b"client-d")
    sim.settle()
    assert sim.reply(b"c1", rid)[0]["deleted"] is True
    sim.restart_broker()
    sim.settle()
    sim.send(b"c1", "delete", key=b"d", cid=b"client-d", rid=rid)
    sim.settle()
    assert [h for h in sim.replies[b"c1"] if h["id"] == rid][-1]["deleted"] is True


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


def test_a_slot_moved_by_hand_moves_and_comes_back(sim: SimCluster) -> None:
    sim.add_worker("w4")
    sim.advance(3.0)
    assert sim.broker.misplaced(sim.t) == []
    slot = next(s for s, sl in sim.broker.slots.items() if "w4" not in sl.replicas)
    src = sim.broker.slots[slot].replicas[0]
    before = sim.broker.stats["slots_moved"]
    assert sim.broker.admin({"cmd": "move", "slot": slot, "from": src, "to": "w4"})["ok"]
    assert sim.broker.admin({"cmd": "move", "slot": slot, "from": src, "to": "w4"})["ok"] is False
    sim.advance(5.0)  # it moves, then auto-rebalance puts it back where placement wants it
    assert sim.broker.moves == {} and sim.broker.misplaced(sim.t) == []
    assert sim.broker.stats["slots_moved"] == before + 2


def test_compare_and_set_succeeds_or_fails_alike_on_every_replica(sim: SimCluster) -> None:
    v1 = sim.put(b"cas", b"a", if_absent=True)["version"]
    hdr = sim.put(b"cas", b"b", if_absent=True)
    assert hdr["ok"] is False and hdr["code"] == "CONDITION_FAILED" and hdr["version"] == v1
    hdr = sim.put(b"cas", b"c", if_version=v1 + 1000)
    assert hdr["code"] == "CONDITION_FAILED" and hdr["version"] == v1
    v2 = sim.put(b"cas", b"d", if_version=v1)["version"]
    assert v2 > v1 and sim.get(b"cas") == b"d"
    hdr, _ = sim.call("delete", key=b"cas", if_version=v1)
    assert hdr["code"] == "CONDITION_FAILED" and hdr["version"] == v2
    hdr, _ = sim.call("delete", key=b"cas", if_version=v2)
    assert hdr["ok"] and hdr["deleted"] is True
    hdr = sim.put(b"cas", b"e", if_version=v2)  # gone: no version matches
    assert hdr["code"] == "CONDITION_FAILED" and hdr["version"] is None
    assert sim.put(b"cas", b"f", if_absent=True)["ok"]
    sim.advance(0.5)
    assert all(sim.worker_data(w)[b"cas"] == b"f" for w in ("w1", "w2", "w3"))
    for bad in ({"if_version": 0}, {"if_version": "1"}, {"if_absent": 1}, {"if_absent": True, "if_version": 3}):
        hdr = sim.put(b"cas", b"x", **bad)
        assert hdr["code"] == "BAD_REQUEST", (bad, hdr)


def test_ttl_can_be_read_changed_and_removed_without_the_value(sim: SimCluster) -> None:
    sim.put(b"t", b"value", ttl=10_000)
    hdr, _ = sim.call("ttl", key=b"t")
    assert hdr["found"] and 9_000 < hdr["ttl"] <= 10_000
    hdr, _ = sim.call("expire", key=b"t", ttl=500)
    assert hdr["applied"] is True
    hdr, _ = sim.call("ttl", key=b"t")
    assert hdr["ttl"] <= 500
    hdr, _ = sim.call("expire", key=b"t")  # no ttl: remove it
    assert hdr["applied"] is True
    sim.advance(1.0)
    hdr, _ = sim.call("ttl", key=b"t")
    assert hdr["found"] and hdr["ttl"] is None
    assert sim.get(b"t") == b"value"
    hdr, _ = sim.call("expire", key=b"missing", ttl=100)
    assert hdr["applied"] is False
    hdr, _ = sim.call("ttl", key=b"missing")
    assert hdr["found"] is False
    sim.call("expire", key=b"t", ttl=300)
    sim.advance(0.5)
    assert sim.get(b"t") is None
    hdr, _ = sim.call("expire", key=b"t", ttl=-5)
    assert hdr["code"] == "BAD_REQUEST"


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


def replica_state(sim: SimCluster, wid: str, slot: int) -> tuple[dict[bytes, bytes], dict[bytes, bytes], set[bytes]]:
    """One replica's records, stored chunks and open streams in one slot."""
    w = sim.workers[wid]
    assert w.core is not None
    st = w.core.store
    prefix = slot.to_bytes(2, "big")
    out: tuple[dict[bytes, bytes], dict[bytes, bytes], set[bytes]] = ({}, {}, set())
    with st.env.begin() as txn:
        for db, target in ((st.data, out[0]), (st.blobs, out[1])):
            for k, v in txn.cursor(db=db):
                if bytes(k[:2]) == prefix:
                    target[bytes(k[2:])] = bytes(v)
        for k, _ in txn.cursor(db=st.staged):
            if bytes(k[:2]) == prefix:
                out[2].add(bytes(k[2:]))
    return out


@pytest.mark.parametrize("seed", range(6))
def test_streamed_values_under_random_faults(tmp_path: Path, seed: int) -> None:
    """Streams written chunk by chunk while workers crash and restart, replication messages are
    lost and the broker restarts. Checks: a committed streamed value reads back whole from
    every replica; after healing (and the idle-stream abort) every replica holds exactly the same
    records and chunks, and no stream is left open anywhere."""
    rng = random.Random(1000 + seed)
    sim = SimCluster(tmp_path, slots=4)
    try:
        faults = RandomFaults(sim, rng, p_kill=0.1, p_restart=0.1, p_lossy=0.1, p_broker=0.05, loss=0.3,
                              after_broker=2.0)
        committed: dict[bytes, bytes] = {}
        maybe: dict[bytes, set[bytes]] = {}
        for step in range(60):
            faults.step()
            key = b"v%d" % rng.randrange(4)
            stream = rng.randbytes(16)
            chunks = [bytes([step, i]) * rng.randrange(1, 300) for i in range(rng.randrange(2, 6))]
            for i, chunk in enumerate(chunks):
                # Answered or not (a lost message, a dead replica): a chunk may still land later,
                # before the commit in the slot's order; the commit checks what is there.
                sim.send(b"c1", "put_chunk", [chunk], key=key, stream=stream, index=i)
                sim.settle()
                sim.advance(0.3)
            if rng.random() < 0.2:
                continue  # the client gives up half way: the broker must clean up after it
            value = b"".join(chunks)
            rid = sim.send(b"c1", "put_commit", key=key, stream=stream, chunks=len(chunks), size=len(value))
            sim.settle()
            sim.advance(0.5)
            got = sim.reply(b"c1", rid)
            if got is not None and got[0]["ok"]:
                committed[key] = value
                maybe.pop(key, None)
            elif got is None or got[0].get("code") == "TIMEOUT":
                maybe.setdefault(key, set()).add(value)  # outcome unknown
        faults.heal()
        assert len(committed) >= 2, (seed, "too few commits for the test to mean anything")
        sim.advance(70.0)  # past --stream-idle: abandoned streams are aborted
        assert sim.broker.status()["open_streams"] == 0
        for s, slot in sim.broker.slots.items():
            states = [replica_state(sim, w, s) for w in slot.replicas]
            assert states[0] == states[1] == states[2], (seed, s)
            assert states[0][2] == set(), (seed, s, "a stream left open")
        for key, value in committed.items():
            hdr, _ = sim.call("get", key=key)
            assert hdr["ok"] and hdr["found"] and "stream" in hdr, (seed, key, hdr)
            m = hdr["stream"]
            for w in sim.workers.values():
                assert w.core is not None
                got = b"".join(w.core.store.read_chunks(slot_for_key(key, sim.slots), m["stream"], 0, m["chunks"]))
                assert got in {value} | maybe.get(key, set()), (seed, key, w.wid)
    finally:
        sim.close()


def test_a_read_sent_to_a_replica_that_then_drops_the_slot_is_asked_again(sim: SimCluster) -> None:
    """Between the broker choosing a replica and the replica answering, the replica may lose the
    slot (a move finished and it dropped its copy). Its "not found" must not be believed."""
    sim.put(b"k", b"v")
    s = slot_for_key(b"k", sim.slots)
    rid = sim.send(b"c1", "get", key=b"k")
    sim.broker.end_turn()
    (chosen,) = {wr.worker for wr in sim.broker.worker_reads.values()}
    w = sim.workers[chosen]
    assert w.core is not None
    # The move that takes the slot away finishes now: the broker's map no longer lists the
    # replica, and the replica drops its copy (as on_assign_message does) before it answers.
    slot = sim.broker.slots[s]
    slot.replicas.remove(chosen)
    slot.applied.pop(chosen, None)
    w.core.store.drop_slot(s)
    sim.settle()
    got = sim.reply(b"c1", rid)
    assert got is not None and got[0]["ok"] and got[0]["found"] is True and got[1] == [b"v"], got
