"""Stalls on a loaded machine (the CI failure of test_a_standby_killed_while_it_takes_over: final
reads failed for a minute after every worker had been declared lost at once): a broker that was
not running does not count that time as its workers' silence, and a write whose ACKs were
refused while its replicas counted as lost commits when they register again."""

from __future__ import annotations

from pathlib import Path

import pytest

from protocol.frames import MDPW, W_HEARTBEAT
from protocol.replication import slot_for_key
from tests.support.sim import SimCluster

pytestmark = pytest.mark.timeout(60)


def _silence_every_worker(sim: SimCluster, seconds: float) -> None:
    """Every worker stalls (a saturated disk, a paused machine): what it sends is held back
    (``sim.intercept``), while the broker ticks on without a heartbeat from any of them."""
    sim.intercept = lambda wid, frames: True
    for _ in range(int(round(seconds / 0.1))):
        sim.t += 0.1
        sim.wall += 100
        sim.broker.tick()
        sim.settle()


def test_a_write_whose_acks_were_refused_commits_when_its_replicas_register_again(tmp_path: Path) -> None:
    """Every replica applied a write, then the broker declared them all lost before their ACKs
    came; those ACKs were refused (DISCONNECT) and the replicas registered again, READY reporting
    the write. The broker must count what READY reports: the slot gets no more writes, so no ACK
    would ever raise its committed seq, and every read of the key was held until it timed out."""
    sim = SimCluster(tmp_path)
    try:
        key = b"acked-too-late"
        slot = sim.broker.slots[slot_for_key(key, sim.slots)]
        assert sim.put(key, b"old")["ok"]
        sim.intercept = lambda wid, frames: True
        wid = sim.send(b"w", "put", [b"new"], key=key)
        sim.settle()
        assert all(p == (sim.broker.epoch, slot.last.seq) for p in sim.positions(slot.id).values())
        _silence_every_worker(sim, 3.5)  # past the broker's liveness (3 heartbeats of 1 s)
        assert not any(w.alive for w in sim.broker.workers.values())
        sim.intercept = None
        sim.release()  # the late ACKs and heartbeats: refused, each worker is told to register again
        sim.advance(0.5)
        assert all(w.alive for w in sim.broker.workers.values())
        assert slot.committed == slot.last.seq  # W replicas hold it: committed, without another write
        assert sim.get(key) == b"new"
        got = sim.reply(b"w", wid)
        assert got is not None and got[0]["ok"]  # within its timeout: the write is acknowledged
    finally:
        sim.close()


@pytest.mark.parametrize("op", ["cas", "failed-cas", "delete", "cas-delete"])
def test_a_write_whose_answer_was_in_the_refused_acks_is_answered_without_guessing(tmp_path: Path, op: str) -> None:
    """As above, for writes whose answer is what the replicas found (a CAS, a delete): the ACKs
    that carried it were refused, so the broker cannot know it. It must not crash or make one up
    (a CAS answered as refused, a delete as "existed"): a plain delete is "applied, existence
    unknown" (deleted: null), anything else TIMEOUT, and so is a retry of it."""
    sim = SimCluster(tmp_path)
    try:
        key = b"answer-lost"
        slot = sim.broker.slots[slot_for_key(key, sim.slots)]
        version = sim.put(key, b"old")["version"]
        fields: dict = {"key": key, "cid": b"c-lost", "retry": False}
        if op == "cas":
            name, values, fields["if_version"] = "put", [b"new"], version
        elif op == "failed-cas":
            name, values, fields["if_version"] = "put", [b"new"], version + 100
        elif op == "delete":
            name, values = "delete", []
        else:
            name, values, fields["if_version"] = "delete", [], version
        sim.intercept = lambda wid, frames: True
        rid = sim.send(b"w", name, values, **fields)
        sim.settle()
        _silence_every_worker(sim, 3.5)
        sim.intercept = None
        sim.release()
        sim.advance(0.5)
        assert all(w.alive for w in sim.broker.workers.values())  # no READY was refused (a crash)
        assert slot.committed == slot.last.seq
        got = sim.reply(b"w", rid)
        assert got is not None, "no answer at all"
        hdr = got[0]
        if op == "delete":
            assert hdr["ok"] and hdr["deleted"] is None, hdr
        else:
            assert not hdr["ok"] and hdr["code"] == "TIMEOUT", hdr
            after = len(sim.replies[b"w"])
            sim.send(b"w", name, values, rid=rid, **{**fields, "retry": True})
            sim.settle()
            again = sim.reply(b"w", rid, after)
            assert again is not None and again[0].get("code") == "TIMEOUT", again
        applied = op in ("cas", "delete", "cas-delete")
        expected = None if op in ("delete", "cas-delete") else b"new" if applied else b"old"
        assert sim.get(key) == expected
    finally:
        sim.close()


def test_a_worker_heard_just_before_the_tick_after_a_stall_is_not_credited_into_the_future(tmp_path: Path) -> None:
    """The server drains what waited before it ticks: a worker heard in that drain must not have
    the stall added on top (its last_seen would lie in the future, and its death go unseen for as
    long as the broker stalled)."""
    sim = SimCluster(tmp_path)
    try:
        assert sim.put(b"k", b"v")["ok"]
        sim.t += 30.0  # a long pause
        sim.wall += 30_000
        for w in ("w1", "w2", "w3"):  # the wake-up drain, before the first tick
            sim.broker.on_worker(sim.workers[w].identity, [MDPW, W_HEARTBEAT])
        sim.broker.tick()
        assert all(w.last_seen <= sim.t for w in sim.broker.workers.values())
        sim.kill_worker("w3")
        sim.advance(3.5)  # liveness: 3 heartbeats of 1 s
        assert not sim.broker.workers["w3"].alive
        assert sim.broker.workers["w1"].alive and sim.broker.workers["w2"].alive
    finally:
        sim.close()


def test_a_stalled_broker_does_not_count_its_stall_as_the_workers_silence(tmp_path: Path) -> None:
    """The broker is paused for longer than its liveness (3 heartbeats of 1 s); it ticks on
    waking before it has read the heartbeats the workers sent meanwhile. No live worker is
    lost; one that died just before the pause is, ``liveness`` heartbeats after the pause."""
    sim = SimCluster(tmp_path)
    try:
        assert sim.put(b"k", b"v")["ok"]
        sim.kill_worker("w3")
        sim.t += 4.0  # paused; the workers' heartbeats of that time wait, unread
        sim.wall += 4000
        sim.broker.tick()
        assert all(sim.broker.workers[w].alive for w in ("w1", "w2", "w3"))
        for w in ("w1", "w2"):  # the broker reads what waited
            sim.broker.on_worker(sim.workers[w].identity, [MDPW, W_HEARTBEAT])
        sim.settle()
        sim.advance(2.0)
        assert sim.broker.workers["w3"].alive  # not yet: 3 s of silence after the pause
        sim.advance(1.5)
        assert not sim.broker.workers["w3"].alive
        assert sim.broker.workers["w1"].alive and sim.broker.workers["w2"].alive
        assert sim.get(b"k") == b"v"
    finally:
        sim.close()
