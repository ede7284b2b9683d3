"""The write and read paths of the cores (tests/support/sim.py): versions, every replica applying
every write in order, the commit rule (W replicas), reads held until what they read commits,
malformed client messages, a write a worker cannot store, a read whose replica drops the slot."""

from __future__ import annotations

import itertools

import pytest

from protocol.frames import W_FINAL, unpack
from protocol.replication import slot_for_key
from tests.support.helpers import keys_in_slot
from tests.support.sim import SimCluster

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


def test_a_read_sent_to_a_replica_that_then_drops_the_slot_is_asked_again(sim: SimCluster) -> None:
    """Between the broker choosing a replica and the replica answering, the replica may lose the
    slot (a move finished and it dropped its copy). Its "not found" must not be believed."""
    sim.put(b"k", b"v")
    s = slot_for_key(b"k", sim.slots)
    rid = sim.send(b"c1", "get", key=b"k")
    sim.broker.reads.end_turn()
    (chosen,) = {wr.worker for wr in sim.broker.reads.worker_reads.values()}
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


def test_one_failing_key_does_not_fail_unrelated_reads_batched_in_the_same_turn(sim: SimCluster) -> None:
    """Reads of one turn share one worker REQUEST: a worker error caused by one key (here injected
    for key b"bad") used to fail every other client's read batched with it."""
    sim.put(b"good", b"v")
    s_good = slot_for_key(b"good", sim.slots)
    bad = next(b"bad%d" % i for i in range(10_000)
               if sim.broker.slots[slot_for_key(b"bad%d" % i, sim.slots)].replicas
               == sim.broker.slots[s_good].replicas)
    for w in sim.workers.values():
        store = w.core.store  # type: ignore[union-attr]
        orig = store.read

        def read(slots_keys, now, with_values=True, _orig=orig):  # type: ignore[no-untyped-def]
            if any(k == bad for _, k in slots_keys):
                raise ValueError("corrupt record")
            return _orig(slots_keys, now, with_values)

        store.read = read
    sim.broker.state.rr = itertools.repeat(0)  # both parts go to the first replica: one batch
    r1 = sim.send(b"c1", "get", key=b"good")
    r2 = sim.send(b"c2", "get", key=bad)
    sim.settle()
    got = sim.reply(b"c1", r1)
    assert got is not None and got[0]["ok"] and got[1] == [b"v"], got
    failed = sim.reply(b"c2", r2)  # the read that fails fails alone, with its cause
    assert failed is not None and failed[0]["ok"] is False and failed[0]["code"] == "INTERNAL", failed
    assert "corrupt record" in failed[0]["message"]


def test_an_mget_of_one_slot_is_answered_packed_with_large_values_apart(sim: SimCluster) -> None:
    # One slot, so one replica answers every key: the broker asks for packed values, the worker
    # packs them (the 70,000-byte one as a frame of its own) and the broker unpacks them in order.
    small, large, empty, missing = keys_in_slot(2, sim.slots, 4, prefix="pk")
    values = {small: b"s", large: b"L" * 70_000, empty: b""}
    for k, v in values.items():
        assert sim.put(k, v)["ok"]
    answers: list[list[bytes]] = []

    def record(_wid: str, frames: list[bytes]) -> bool:
        if frames[0] == W_FINAL:
            answers.append(frames)
        return False  # (delivered as usual)

    sim.intercept = record
    hdr, vals = sim.call("mget", keys=[large, missing, small, empty, large])
    assert hdr["ok"] and hdr["found"] == [True, False, True, True, True]
    assert vals == [values[large], b"", b"s", b"", values[large]]
    assert len(answers) == 1 and unpack(answers[0][3])["packed"] is True
    assert answers[0][5:] == [values[large], values[large]]  # [final, token, b"", header, packed array, *large]
