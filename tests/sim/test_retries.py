"""Exactly-once writes in the cores (tests/support/sim.py): a retry with the same (client id,
request number) is answered from the record, also across broker restarts and failovers, and
re-applied only where the first attempt was lost.

Every test runs twice: ``embedded`` (a broker restart on its own metadata, whose de-duplication
entries answer the retry) and ``failover`` (a successor that knows only what etcd keeps: the
replicas' record of each write's client request makes the retry a no-op, worker/dedup.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from protocol.limits import DEDUP_RETENTION_MS
from protocol.replication import slot_for_key
from tests.support.sim import SimCluster, dedup_table

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(params=[False, True], ids=["embedded", "failover"])
def sim(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[SimCluster]:
    s = SimCluster(tmp_path, etcd_mode=request.param)
    yield s
    s.close()


def last_reply(sim: SimCluster, client: bytes, rid: int) -> dict[str, Any]:
    replies = [h for h in sim.replies.get(client, []) if h["id"] == rid]
    assert replies, f"no reply to request {rid}"
    return replies[-1]


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
    # And across a broker restart or a failover: the retry is recognised from the broker's
    # metadata, or (etcd mode) sequenced again and applied by every replica as a no-op.
    sim.restart_broker()
    sim.settle()
    sim.send(b"c1", "put", [b"v"], key=key, cid=b"client-1", rid=rid)
    sim.settle()
    assert last_reply(sim, b"c1", rid) == first[0]  # the first answer: ok, the first write's version
    assert sim.broker.stats["writes_deduplicated"] == (1 if sim.etcd_mode else 0)
    assert sim.broker.slots[slot].last.seq == (2 if sim.etcd_mode else 1)


def test_a_write_retried_after_a_restart_does_not_undo_a_later_write(sim: SimCluster) -> None:
    """The failover suite's finding: a client's put, acknowledged too late for it, retried through
    the successor after another client wrote the key, must not overwrite that write."""
    key = b"shared"
    rid = sim.send(b"c1", "put", [b"first"], key=key, cid=b"client-1")
    sim.settle()
    first = last_reply(sim, b"c1", rid)
    assert first["ok"]
    later = sim.put(key, b"later", client=b"c2", cid=b"client-2")
    assert later["ok"] and later["version"] > first["version"]
    sim.restart_broker()
    sim.settle()
    sim.send(b"c1", "put", [b"first"], key=key, cid=b"client-1", rid=rid)
    sim.settle()
    assert last_reply(sim, b"c1", rid) == first
    assert sim.get(key) == b"later"
    hdr, _ = sim.call("get", key=key)
    assert hdr["version"] == later["version"]  # the retry wrote nothing, not even the same value


def answers_across_a_restart(sim: SimCluster, op: str, values: list[bytes], **fields: Any) -> tuple[dict, dict]:
    """Send a write from client-1, restart the broker (a failover in etcd mode), send it again
    with the same request number: (the first answer, the retry's answer)."""
    rid = sim.send(b"c1", op, values, cid=b"client-1", **fields)
    sim.settle()
    first = last_reply(sim, b"c1", rid)
    sim.restart_broker()
    sim.settle()
    sim.send(b"c1", op, values, cid=b"client-1", rid=rid, **fields)
    sim.settle()
    return first, last_reply(sim, b"c1", rid)


def test_a_conditional_write_retried_after_a_restart_gets_its_first_answer(sim: SimCluster) -> None:
    """put-if-absent succeeded; its retry must say so, not CONDITION_FAILED (the key exists now:
    because of the first attempt)."""
    first, again = answers_across_a_restart(sim, "put", [b"mine"], key=b"lock", if_absent=True)
    assert first["ok"] and again == first
    # And a CAS on a version: the retry does not fail against the version it created itself.
    second, again = answers_across_a_restart(sim, "put", [b"next"], key=b"lock", if_version=first["version"])
    assert second["ok"] and again == second
    assert sim.get(b"lock") == b"next"


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


def test_a_delete_retried_after_a_restart_does_not_delete_the_key_written_again(sim: SimCluster) -> None:
    assert sim.put(b"d", b"v")["ok"]
    rid = sim.send(b"c1", "delete", key=b"d", cid=b"client-d")
    sim.settle()
    assert last_reply(sim, b"c1", rid)["deleted"] is True
    assert sim.put(b"d", b"again", client=b"c2", cid=b"client-2")["ok"]
    sim.restart_broker()
    sim.settle()
    sim.send(b"c1", "delete", key=b"d", cid=b"client-d", rid=rid)
    sim.settle()
    assert last_reply(sim, b"c1", rid)["deleted"] is True
    assert sim.get(b"d") == b"again"


def test_a_retry_changes_nothing_that_a_watch_could_see(sim: SimCluster) -> None:
    rid = sim.send(b"c1", "put", [b"v1"], key=b"w:k", cid=b"client-1")
    sim.settle()
    assert last_reply(sim, b"c1", rid)["ok"]
    sim.restart_broker()
    sim.settle()
    wid = sim.send(b"watcher", "watch", prefix=b"w:")
    sim.settle()
    sim.send(b"c1", "put", [b"v1"], key=b"w:k", cid=b"client-1", rid=rid)
    sim.settle()
    assert sim.put(b"w:other", b"x")["ok"]
    sim.advance(0.5)
    events = [(e[0], bytes(e[1])) for h in sim.replies.get(b"watcher", []) if h.get("id") == wid
              for e in h.get("events", [])]
    assert events == [("put", b"w:other")], events


def test_replicas_keep_the_same_table_through_snapshots_and_forget_it_alike(sim: SimCluster,
                                                                           tmp_path: Path) -> None:
    """The table is replicated state: a replica refilled by snapshots holds the same entries as
    the others (else it would apply a retry they refuse), and every replica forgets an entry at
    the same write, by the broker's clock carried in the batches."""
    import shutil

    key = b"t"
    slot = slot_for_key(key, sim.slots)
    rids = [sim.send(b"c1", "put", [b"v%d" % i], key=key, cid=b"client-1") for i in range(5)]
    sim.settle()
    assert all(last_reply(sim, b"c1", r)["ok"] for r in rids)
    tables = [dedup_table(sim, w, slot) for w in ("w1", "w2", "w3")]
    assert len(tables[0]) == 5 and tables[0] == tables[1] == tables[2]
    sim.restart_broker()  # no log tail: w2 is refilled by a snapshot
    sim.settle()
    sim.kill_worker("w2")
    shutil.rmtree(tmp_path / "w2")
    sim.start_worker("w2")
    sim.advance(6.0)
    assert sim.broker.stats["snapshots_sent"] > 0
    assert dedup_table(sim, "w2", slot) == tables[0]
    # Past the retention (broker clock), the next write of the slot forgets the old entries.
    sim.wall += DEDUP_RETENTION_MS + 1
    assert sim.put(key, b"after", cid=b"client-3")["ok"]
    sim.advance(1.0)
    after = [dedup_table(sim, w, slot) for w in ("w1", "w2", "w3")]
    assert after[0] == after[1] == after[2] and len(after[0]) == 1, after
    # A retry of a forgotten write is applied again: what the retention means.
    sim.send(b"c1", "put", [b"v0"], key=key, cid=b"client-1", rid=rids[0])
    sim.settle()
    assert last_reply(sim, b"c1", rids[0])["ok"]
