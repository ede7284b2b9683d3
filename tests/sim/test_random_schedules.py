"""Seeded random fault schedules on the cores (tests/support/sim.py): crashes, restarts, lost
replication messages, broker restarts and membership changes at random while a client writes
(plain and streamed values); no acknowledged write lost, replicas converge."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from protocol.replication import slot_for_key
from tests.support.sim import RandomFaults, SimCluster, dedup_table, replica_state

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize("etcd_mode", [False, True], ids=["embedded", "failover"])
@pytest.mark.parametrize("seed", range(12))
def test_random_fault_schedules_lose_no_acknowledged_write(tmp_path: Path, seed: int, etcd_mode: bool) -> None:
    """Random writes and reads while one worker at a time crashes, restarts, loses replication
    messages, and the broker restarts. Checks: every acknowledged write is what a later read
    returns (the simulation serialises clients, so the last acknowledged write of a key wins
    unless a later, unacknowledged one of it may have landed), and replicas converge. With
    ``failover`` each broker restart is a standby taking over with what etcd keeps, no positions."""
    rng = random.Random(seed)
    n = 3 + seed % 2  # with a fourth worker, slots of a worker gone too long move to it
    sim = SimCluster(tmp_path, slots=4, n_workers=n, initial_workers=n, grace=5.0, etcd_mode=etcd_mode)
    try:
        acked: dict[bytes, bytes] = {}
        maybe: dict[bytes, set[bytes]] = {}
        faults = RandomFaults(sim, rng, p_kill=0.04, p_restart=0.02, p_lossy=0.02, p_broker=0.01, p_advance=0.11)
        unsure: tuple[int, bytes, bytes] | None = None  # a put whose outcome is unknown: resent next
        for step in range(300):
            faults.step()
            key = b"k%d" % rng.randrange(12)
            if unsure is not None or rng.random() < 0.6:
                # A client resends a put it got no answer to (same request number), before anything
                # else, as the client library does: applied once, whichever broker sequences it.
                rid, key, value = unsure or (None, key, b"s%d-%d" % (seed, step))
                seen = len(sim.replies.get(b"c", []))
                rid = sim.send(b"c", "put", [value], key=key, rid=rid)
                sim.settle()
                got = sim.reply(b"c", rid, after=seen)
                unsure = None
                if got is not None and got[0]["ok"]:
                    acked[key] = value
                    maybe.pop(key, None)
                elif got is None or got[0].get("code") == "TIMEOUT":
                    maybe.setdefault(key, set()).add(value)  # outcome unknown
                    if rng.random() < 0.7:
                        unsure = (rid, key, value)
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
            tables = [dedup_table(sim, w, s) for w in slot.replicas]  # replicated state too
            assert tables[0] == tables[1] == tables[2], (seed, s)
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
        assert sim.broker.moves.moves == {} and sim.broker.moves.misplaced(sim.t) == [], seed
        for s, slot in sim.broker.slots.items():
            assert len(slot.replicas) == 3 and not slot.learners
            copies = [{k: v for k, v in sim.worker_data(w).items() if slot_for_key(k, sim.slots) == s}
                      for w in slot.replicas]
            assert all(c == copies[0] for c in copies), (seed, s)
        for k, v in acked.items():
            assert sim.get(k) in {v} | maybe.get(k, set()), (seed, k)
    finally:
        sim.close()


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
