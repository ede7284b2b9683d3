"""Stalls on a loaded machine (the CI failure of test_a_standby_killed_while_it_takes_over: final
reads failed for a minute after every worker had been declared lost at once): a write whose ACKs
were refused while its replicas counted as lost commits when they register again."""

from __future__ import annotations

from pathlib import Path

import pytest

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

