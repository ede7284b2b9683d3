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
