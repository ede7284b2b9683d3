"""Read leases (broker/leases.py, worker/leases.py) driven through the cores: a lease holder answers
reads alone, holds back what is not committed, stops before the broker stops waiting for it (a
partition, a pause, a clock running slow), a new broker commits nothing while an old lease may
hold, and random concurrent histories under those faults stay linearizable."""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from client.cli.history import Op
from client.cli.linearizability import check_history
from protocol.frames import MDPW, W_ACK, W_LEASE_GRANT, pack, unpack
from protocol.replication import slot_for_key
from tests.support.helpers import keys_in_slot
from tests.support.sim import SimCluster, SimWorker
from worker import leases as worker_leases

pytestmark = pytest.mark.timeout(180)

LEASE = 2.0


def leased(tmp_path: Path, rates: list[float] | None = None, **kw: Any) -> SimCluster:
    sim = SimCluster(tmp_path, slots=4, read_lease=LEASE, **kw)
    for w, rate in zip(sim.workers.values(), rates or [], strict=False):
        w.rate = rate  # (at time 0: a worker's clock, t * rate, never jumps)
    sim.advance(LEASE + 0.5)  # past the new broker's hold, and the first grants
    return sim


def holder(sim: SimCluster, key: bytes) -> str | None:
    m = sim.broker.leases.lease_map()
    i = m["holders"][slot_for_key(key, m["slots"])]
    return None if i < 0 else m["urls"][i].split("sim-")[1].split(":")[0]


def direct(sim: SimCluster, wid: str, key: bytes, client: bytes = b"d") -> tuple[dict[str, Any], list[bytes]] | None:
    rid = sim.direct_get(client, wid, key)
    sim.settle()
    return sim.reply(client, rid)


def test_the_holder_answers_reads_alone_and_the_others_refuse(tmp_path: Path) -> None:
    sim = leased(tmp_path)
    try:
        assert sim.put(b"k", b"v1")["ok"]
        h = holder(sim, b"k")
        assert h is not None
        hdr, vals = direct(sim, h, b"k") or ({}, [])
        assert hdr["ok"] and hdr["found"] and vals == [b"v1"] and hdr["version"] >= 1
        assert sim.put(b"k", b"v2")["ok"]
        hdr, vals = direct(sim, h, b"k") or ({}, [])
        assert hdr["ok"] and vals == [b"v2"]
        hdr, vals = direct(sim, h, b"never-written") or ({}, [])
        assert hdr["ok"] and hdr["found"] is False and vals == []
        for other in sorted(set(sim.workers) - {h}):
            hdr, _ = direct(sim, other, b"k") or ({}, [])
            assert hdr["ok"] is False and hdr["code"] == "NOT_LEASED", hdr
        # One holder per slot, and every slot has one.
        m = sim.broker.leases.lease_map()
        assert all(i >= 0 for i in m["holders"]) and len(m["holders"]) == 4
        assert all(len(sim.broker.slots[s].leases) == 1 for s in range(4))
    finally:
        sim.close()


def test_a_key_with_a_ttl_or_a_malformed_request_is_refused_and_nothing_changes(tmp_path: Path) -> None:
    sim = leased(tmp_path)
    try:
        assert sim.put(b"t", b"v", ttl=60_000)["ok"]
        h = holder(sim, b"t")
        assert h is not None
        hdr, _ = direct(sim, h, b"t") or ({}, [])
        assert hdr["code"] == "NOT_LEASED" and "clock" in hdr["message"]
        core = sim.workers[h].core
        assert core is not None
        for frames in ([b"junk"], [b"\xc1"], [b"\x90"], [pack({"op": "get", "id": 1, "key": b"k"}), b"x"],
                       [pack({"op": "put", "id": 2, "key": b"k"})], [pack({"op": "get", "id": True, "key": b"k"})]):
            core.leases.on_read(b"x", frames, sim.t, lambda: sim.t)
        sim.settle()
        bad = sim.replies[b"x"]
        assert [r["code"] for r in bad] == ["BAD_REQUEST"] * 6
        assert [r["id"] for r in bad] == [None, None, None, None, 2, None]
        assert sim.get(b"t") == b"v"
    finally:
        sim.close()


def test_a_version_not_yet_committed_is_held_until_it_is(tmp_path: Path) -> None:
    sim = leased(tmp_path)
    try:
        assert sim.put(b"k", b"old")["ok"]
        h = holder(sim, b"k")
        assert h is not None
        others = set(sim.workers) - {h}
        sim.intercept = lambda wid, frames: wid in others and frames[0] == W_ACK
        rid = sim.send(b"w", "put", [b"new"], key=b"k")
        sim.settle()  # the holder applied it; the others' ACKs are held, so it is not committed
        assert sim.reply(b"w", rid) is None
        read = sim.direct_get(b"d", h, b"k")
        sim.settle()
        assert sim.reply(b"d", read) is None  # held: its version is not known to be committed
        sim.intercept = None
        sim.release()
        assert sim.reply(b"w", rid)[0]["ok"]  # type: ignore[index]
        hdr, vals = sim.reply(b"d", read) or ({}, [])
        assert hdr["ok"] and vals == [b"new"]
    finally:
        sim.close()


def test_a_held_read_is_refused_after_a_while(tmp_path: Path) -> None:
    sim = leased(tmp_path)
    try:
        h = holder(sim, b"k")
        assert h is not None
        others = set(sim.workers) - {h}
        sim.intercept = lambda wid, frames: wid in others and frames[0] == W_ACK
        sim.send(b"w", "put", [b"new"], key=b"k")
        sim.settle()
        read = sim.direct_get(b"d", h, b"k")
        sim.advance(worker_leases.HOLD_MAX + 0.3)
        hdr, _ = sim.reply(b"d", read) or ({}, [])
        assert hdr["code"] == "NOT_LEASED"
    finally:
        sim.close()


def test_a_cut_off_holder_stops_answering_before_the_broker_commits_without_it(tmp_path: Path) -> None:
    sim = leased(tmp_path)
    try:
        assert sim.put(b"k", b"old")["ok"]
        h = holder(sim, b"k")
        assert h is not None
        sim.partitioned.add(h)
        rid = sim.send(b"w", "put", [b"new"], key=b"k")
        sim.settle()
        assert sim.reply(b"w", rid) is None  # the lease holds: the write waits for the holder
        hdr, vals = direct(sim, h, b"k") or ({}, [])
        assert vals == [b"old"]  # right: the write is not committed, nobody has seen it
        committed_at = None
        for _ in range(40):
            sim.advance(0.1)
            if committed_at is None and sim.reply(b"w", rid) is not None:
                committed_at = sim.t
            got = direct(sim, h, b"k", client=b"d%d" % int(sim.t * 10))
            assert got is not None
            if got[0]["ok"]:
                assert committed_at is None, "the holder answered after the broker committed without it"
        assert committed_at is not None and sim.get(b"k") == b"new"
    finally:
        sim.close()


def test_the_invariant_check_catches_a_worker_that_counts_its_lease_too_long(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The check every step runs (a holder has every committed write) is what the random histories
    lean on; with the worker counting longer than the broker it must fail."""
    monkeypatch.setattr(worker_leases, "LEASE_SHARE", 1.5)
    sim = leased(tmp_path)
    try:
        h = holder(sim, b"k")
        assert h is not None
        sim.partitioned.add(h)
        sim.send(b"w", "put", [b"new"], key=b"k")
        with pytest.raises(AssertionError, match="holds a read lease"):
            sim.advance(LEASE * 1.2)
    finally:
        sim.partitioned.clear()
        sim.close()


def test_a_new_process_under_the_holders_id_holds_nothing_of_its_lease(tmp_path: Path) -> None:
    """The holder is cut off, declared dead, and a new process with a new data directory registers
    under its id before the old one's lease is out (found by review): the new process's position
    must not count for the old one's lease, so no write commits while the old one may answer."""
    sim = SimCluster(tmp_path, slots=4, read_lease=10.0)
    sim.advance(10.5)
    try:
        assert sim.put(b"k", b"old")["ok"]
        h = holder(sim, b"k")
        assert h is not None
        old = sim.workers[h]
        sim.partitioned.add(h)
        sim.advance(3.5)
        assert not sim.broker.workers[h].alive
        sim.workers[h] = SimWorker(h, tmp_path / "new", reads=old.reads)
        sim.partitioned.discard(h)
        sim.start_worker(h)
        sim.advance(1.0)
        rid = sim.send(b"w", "put", [b"new"], key=b"k")
        sim.advance(0.5)
        assert old.core is not None
        old.core.leases.on_read(b"x", [pack({"op": "get", "id": 1, "key": b"k"})],
                                old.clock(sim.t), lambda: old.clock(sim.t))
        (_, frames), = old.core.leases.replies
        answered_old = unpack(frames[0]).get("ok") and frames[1:] == [b"old"]
        committed = (sim.reply(b"w", rid) or ({}, []))[0].get("ok")
        assert answered_old, "the old process's lease should still hold by its own count"
        assert not committed, "the new value committed while the old holder still answers the old one"
    finally:
        sim.close()


@pytest.mark.parametrize("new_lease", [0.5, 0.0])
def test_a_broker_restarted_with_a_shorter_lease_waits_out_the_longer_one(tmp_path: Path, new_lease: float) -> None:
    """The longest lease the cluster granted is in its metadata: a broker given a shorter one, or
    none, still holds commits for that long (found by review)."""
    sim = SimCluster(tmp_path, slots=4, read_lease=10.0)
    sim.advance(10.5)
    try:
        assert sim.put(b"k", b"old")["ok"]
        h = holder(sim, b"k")
        assert h is not None
        sim.partitioned.add(h)
        sim.read_lease = new_lease
        sim.restart_broker()
        slot = slot_for_key(b"k", 4)
        before = sim.broker.slots[slot].committed
        sim.advance(2.0)
        sim.send(b"w", "put", [b"new"], key=b"k")
        sim.advance(6.0)  # (the old holder's lease is 8 s by its count; the put times out meanwhile)
        assert sim.broker.slots[slot].committed == before, "committed while the old 10 s lease may hold"
        sim.advance(3.0)
        assert sim.broker.slots[slot].committed > before
        assert sim.get(b"k") == b"new"
        assert sim.broker.state.lease_recorded == new_lease  # once waited out, the record is its own
        sim.partitioned.clear()
        sim.restart_broker()
        assert sim.broker.state.commit_hold_until == (sim.t + new_lease if new_lease else 0.0)
    finally:
        sim.partitioned.clear()
        sim.close()


def test_a_holder_that_cannot_keep_up_is_not_renewed(tmp_path: Path) -> None:
    """A holder that receives writes but never acknowledges them (its disk refuses them, found by
    review) must not hold its slot's writes back for ever."""
    sim = leased(tmp_path)
    try:
        h = holder(sim, b"k")
        assert h is not None
        sim.intercept = lambda wid, frames: wid == h and frames[0] == W_ACK
        rid = sim.send(b"w", "put", [b"v"], key=b"k")
        sim.advance(LEASE * 2 + 1.0)
        assert sim.reply(b"w", rid) is not None and sim.reply(b"w", rid)[0]["ok"]  # type: ignore[index]
    finally:
        sim.intercept = None
        sim.close()


def test_a_stuck_holder_is_not_granted_its_lease_again_when_it_runs_out(tmp_path: Path) -> None:
    """The broker handles the stuck holder's lease request before the tick that would drop its
    run-out lease (found by the second review): it must not qualify again by the writes it held."""
    sim = SimCluster(tmp_path, slots=4, read_lease=1.95)
    try:
        sim.advance(2.5)
        h = holder(sim, b"k")
        assert h is not None
        sim.intercept = lambda wid, frames: wid == h and frames[0] == W_ACK
        tick = sim.broker.tick

        def settle_then_tick() -> None:
            sim.settle()  # what arrived since the last tick is handled first, as a real broker may
            tick()
        sim.broker.tick = settle_then_tick  # type: ignore[method-assign]
        rid = sim.send(b"w", "put", [b"v"], key=b"k")
        sim.advance(3 * 1.95 + 1.0)
        assert sim.reply(b"w", rid) is not None and sim.reply(b"w", rid)[0]["ok"]  # type: ignore[index]
        assert h not in sim.broker.slots[slot_for_key(b"k", 4)].leases
    finally:
        sim.intercept = None
        sim.close()


def test_a_holder_a_step_behind_keeps_its_lease(tmp_path: Path) -> None:
    """A holder whose ACKs come one step after the others' holds each write back a little, but
    progresses: it must stay the holder (found by the second review: it lost its lease)."""
    sim = leased(tmp_path)
    try:
        slot = sim.broker.slots[slot_for_key(b"k", 4)]
        h = holder(sim, b"k")
        assert h is not None
        sim.intercept = lambda wid, frames: wid == h and frames[0] == W_ACK
        for i in range(80):  # 8 s, a write every 0.1 s
            late, sim.held_messages = sim.held_messages, []
            sim.send(b"w", "put", [b"v%d" % i], key=b"k")
            sim.settle()
            for wid, frames in late:  # the holder's ACKs of the step before
                sim.broker.on_worker(sim.workers[wid].identity, [MDPW, *frames])
            sim.advance(0.1)
            assert any(w == h and x.until > sim.t for w, x in slot.leases.items()), f"lost its lease at {sim.t:.1f}"
    finally:
        sim.intercept = None
        sim.close()


def test_a_move_away_from_the_holder_waits_for_its_lease_not_the_writes(tmp_path: Path) -> None:
    sim = SimCluster(tmp_path, n_workers=4, slots=4, read_lease=5.0, auto_rebalance=False)
    try:
        sim.advance(5.5)
        s = slot_for_key(b"k", 4)
        slot = sim.broker.slots[s]
        h = holder(sim, b"k")
        assert h is not None
        other = next(w for w in sim.workers if w not in slot.replicas)
        assert sim.broker.admin({"cmd": "move", "slot": s, "from": h, "to": other})["ok"]
        sim.advance(0.3)
        rid = sim.send(b"w", "put", [b"v"], key=b"k")
        sim.advance(0.3)
        assert sim.reply(b"w", rid) is not None and sim.reply(b"w", rid)[0]["ok"]  # type: ignore[index]
        assert h in slot.replicas  # the move waits for the lease, which is not renewed meanwhile
        sim.advance(5.5)
        assert other in slot.replicas and h not in slot.replicas and s not in sim.broker.moves.moves
    finally:
        sim.close()


@pytest.mark.parametrize("etcd_mode", [False, True], ids=["embedded", "failover"])
def test_a_new_broker_commits_nothing_while_an_old_lease_may_hold(tmp_path: Path, etcd_mode: bool) -> None:
    sim = leased(tmp_path, etcd_mode=etcd_mode)
    try:
        assert sim.put(b"k", b"v1")["ok"]
        h = holder(sim, b"k")
        assert h is not None
        sim.partitioned.add(h)  # still holding its lease, cut off: it never hears of the new broker
        sim.restart_broker()
        sim.advance(0.5)
        rid = sim.send(b"w", "put", [b"v2"], key=b"k")
        sim.settle()
        sim.advance(0.5)
        assert sim.reply(b"w", rid) is None, "committed while the old broker's lease may hold"
        sim.advance(LEASE + 1.0)
        assert sim.reply(b"w", rid) is not None and sim.reply(b"w", rid)[0]["ok"]  # type: ignore[index]
        hdr, _ = direct(sim, h, b"k", client=b"late") or ({}, [])
        assert hdr["code"] == "NOT_LEASED"
    finally:
        sim.close()


def test_a_paused_holder_answers_nothing_stale_when_it_resumes(tmp_path: Path) -> None:
    sim = leased(tmp_path)
    try:
        assert sim.put(b"k", b"old")["ok"]
        h = holder(sim, b"k")
        assert h is not None
        sim.pause_worker(h)
        read = sim.direct_get(b"d", h, b"k")  # reaches it while paused
        rid = sim.send(b"w", "put", [b"new"], key=b"k")
        sim.advance(LEASE + 1.0)
        assert sim.reply(b"w", rid)[0]["ok"]  # type: ignore[index]
        sim.resume_worker(h)
        sim.settle()
        hdr, vals = sim.reply(b"d", read) or ({}, [])
        assert hdr["ok"] is False or vals == [b"new"], (hdr, vals)
    finally:
        sim.close()


def test_grants_from_another_broker_incarnation_are_ignored(tmp_path: Path) -> None:
    sim = leased(tmp_path)
    try:
        w = sim.workers["w1"]
        assert w.core is not None
        w.core.leases.until.clear()
        w.core.request_leases(sim.t)
        rid = max(w.core.leases.sent)
        w.core.on_broker(W_LEASE_GRANT, [pack(
            {"id": rid, "epoch": sim.broker.epoch + 7, "lease": 60.0, "slot_count": 4, "slots": [0, 1, 2, 3],
             "committed": [0, 0, 0, 0]})], sim.t)
        assert not w.core.leases.until
    finally:
        sim.close()


# -- random concurrent histories ----------------------------------------------------------------


class LeaseClients:
    """Clients that each keep one GET, PUT or DELETE in flight. A GET goes to the worker the client's
    lease map (fetched now and then, so sometimes stale) names, and to the broker after a
    NOT_LEASED or a few rounds without an answer, as the real client does."""

    def __init__(self, sim: SimCluster, n: int, rng: random.Random) -> None:
        self.sim, self.rng = sim, rng
        self.names = [b"c%d" % i for i in range(n)]
        # rids asked (the first one to a worker when ``direct``), the op, rounds waited
        self.inflight: dict[bytes, tuple[list[int], Op, int, bool]] = {}
        self.history: list[Op] = []
        self.now = 0.0
        self.map: dict[str, Any] = {}
        self.direct_ok = 0

    def refresh(self) -> None:
        self.map = self.sim.broker.leases.lease_map()

    def target(self, key: bytes) -> str | None:
        if not self.map.get("holders"):
            return None
        i = self.map["holders"][slot_for_key(key, self.map["slots"])]
        return None if i < 0 else self.map["urls"][i].split("sim-")[1].split(":")[0]

    def send(self, client: bytes, kind: str, key: bytes, value: bytes | None) -> None:
        op = Op(self.names.index(client), key, kind, value, self.now, None, "unknown")
        wid = self.target(key) if kind == "get" else None
        if wid is not None:
            rid = self.sim.direct_get(client, wid, key)
        else:
            rid = self.sim.send(client, kind, [value] if value is not None else None, key=key)
        self.inflight[client] = ([rid], op, 0, wid is not None)

    def collect(self) -> None:
        self.now += 1.0
        for client, (rids, op, waited, direct) in list(self.inflight.items()):
            got = next((g for r in rids if (g := self.sim.reply(client, r)) is not None
                        and not (g[0].get("code") == "NOT_LEASED")), None)
            refused = any((g := self.sim.reply(client, r)) is not None and g[0].get("code") == "NOT_LEASED"
                          for r in rids)
            if got is None:
                if op.kind == "get" and len(rids) == 1 and (refused or waited > 5):
                    rids.append(self.sim.send(client, "get", key=op.key))  # through the broker
                self.inflight[client] = (rids, op, waited + 1, direct)
                continue
            del self.inflight[client]
            hdr, vals = got
            if hdr["ok"]:
                if direct and hdr.get("id") == rids[0]:
                    self.direct_ok += 1
                value = (vals[0] if hdr["found"] else None) if op.kind == "get" else op.value
                op = replace(op, outcome="ok", complete=self.now, value=value,
                             deleted=hdr.get("deleted") if op.kind == "delete" else None)
            elif op.kind == "get":
                op = replace(op, outcome="fail", complete=self.now)
            self.history.append(op)

    def abandon_writes(self) -> None:
        """A restarted broker answers none of its writes in flight: their outcome stays unknown."""
        for client, (rids, op, _, _) in list(self.inflight.items()):
            if op.kind != "get" or len(rids) > 1:
                self.history.append(op)
                del self.inflight[client]


def heal(sim: SimCluster, kind: str, wid: str) -> None:
    if kind == "kill":
        sim.start_worker(wid)
    elif kind == "partition":
        sim.partitioned.discard(wid)
    else:
        sim.resume_worker(wid)


@pytest.mark.parametrize("etcd_mode", [False, True], ids=["embedded", "failover"])
@pytest.mark.parametrize("seed", range(5))
def test_random_concurrent_histories_with_lease_reads_are_linearizable(tmp_path: Path, seed: int,
                                                                       etcd_mode: bool) -> None:
    """Five clients put, get and delete four keys (two slots) concurrently, reading from lease
    holders, while workers crash and restart, are cut off from the broker, pause past their lease,
    run their clocks 10 % slow or fast, and the broker restarts (a failover with ``failover``).
    Every step checks that a worker that believes it holds a lease has every committed write; the
    whole history must be linearizable; and a good share of the reads must have been direct."""
    rng = random.Random(seed)
    sim = leased(tmp_path, [rng.choice([0.9, 1.0, 1.1]) for _ in range(3)], n_workers=3, initial_workers=3,
                 etcd_mode=etcd_mode)
    try:
        keys = keys_in_slot(0, 4, 2, prefix="a") + keys_in_slot(1, 4, 2, prefix="b")
        clients = LeaseClients(sim, 5, rng)
        fault: tuple[str, str, int] | None = None  # (kind, worker, step it heals at): one at a time
        for step in range(1500):
            if step % 10 == 0:
                clients.refresh()
            if fault is not None and step >= fault[2]:
                heal(sim, fault[0], fault[1])
                fault = None
            r = rng.random()
            if r < 0.02 and fault is None:
                fault = (rng.choice(["kill", "partition", "pause"]), rng.choice(sorted(sim.workers)),
                         step + rng.randrange(10, 120))
                start = {"kill": sim.kill_worker, "partition": sim.partitioned.add, "pause": sim.pause_worker}
                start[fault[0]](fault[1])
            elif r < 0.024:
                sim.restart_broker()
                clients.abandon_writes()
            elif r < 0.08:
                sim.advance(rng.choice([0.1, 0.5, 1.0, LEASE * 1.5]))
            for client in [c for c in clients.names if c not in clients.inflight]:
                if rng.random() < 0.5:
                    key = rng.choice(keys)
                    k = rng.random()
                    if k < 0.3:
                        clients.send(client, "put", key, b"%d-%d-%s" % (seed, step, client))
                    elif k < 0.37:
                        clients.send(client, "delete", key, None)
                    else:
                        clients.send(client, "get", key, None)
            sim.step()
            sim.check_invariants()
            clients.collect()
        if fault is not None:
            heal(sim, fault[0], fault[1])
        for _ in range(20):
            sim.advance(0.5)
            clients.collect()
        clients.abandon_writes()
        for _, op, _, _ in clients.inflight.values():
            clients.history.append(op)
        result = check_history(clients.history, time_limit=30.0)
        assert result.ok, (seed, result.failures[:3])
        reads = sum(1 for o in clients.history if o.kind == "get" and o.outcome == "ok")
        assert reads > 300 and clients.direct_ok > reads // 4, (reads, clients.direct_ok)
    finally:
        sim.close()
