"""Exactly-once writes in the cores (tests/support/sim.py): a retry with the same (client id,
request number) is answered from the record, also across broker restarts, and re-applied only
where the first attempt was lost."""

from __future__ import annotations

import pytest

from protocol.replication import slot_for_key
from tests.support.sim import SimCluster

pytestmark = pytest.mark.timeout(120)


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
