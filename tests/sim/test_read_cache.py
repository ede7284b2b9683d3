"""The leader's cache of committed values (broker/read_cache.py), driven through the cores: reads it
answers ask no replica, every write drops what it changes, a read that raced a write fills
nothing, and random concurrent histories under faults stay linearizable with it on."""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from broker.read_cache import MAX_CACHED_VALUE
from client.cli.history import Op
from client.cli.linearizability import check_history
from protocol.frames import MDPW, W_FINAL, pack, unpack
from tests.support.helpers import keys_in_slot
from tests.support.sim import RandomFaults, SimCluster

pytestmark = pytest.mark.timeout(120)


class ReplicaReads:
    """Counts the read answers the workers send (sim.intercept), delivering them as usual."""

    def __init__(self, sim: SimCluster) -> None:
        self.count = 0
        sim.intercept = self

    def __call__(self, _wid: str, frames: list[bytes]) -> bool:
        if frames[0] == W_FINAL:
            self.count += 1
        return False


def cached(sim: SimCluster) -> int:
    return sim.broker.stats["reads_cached"]


def test_a_read_of_a_read_key_asks_no_replica_and_a_write_drops_it(sim: SimCluster) -> None:
    replica = ReplicaReads(sim)
    assert sim.put(b"k", b"v1")["ok"]
    assert sim.get(b"k") == b"v1"
    assert (replica.count, cached(sim)) == (1, 0)
    hdr, vals = sim.call("get", key=b"k")
    assert hdr["found"] and vals == [b"v1"]
    assert (replica.count, cached(sim)) == (1, 1)
    for op in ("exists", "ttl", "mget"):
        hdr, _ = sim.call(op, **({"keys": [b"k"]} if op == "mget" else {"key": b"k"}))
        assert hdr["ok"] and (hdr.get("exists") or hdr.get("found")) in (True, [True]), (op, hdr)
    assert (replica.count, cached(sim)) == (1, 4)
    assert sim.put(b"k", b"v2")["ok"]
    assert sim.get(b"k") == b"v2" and replica.count == 2  # the write dropped the entry: a replica answers
    assert sim.get(b"k") == b"v2" and replica.count == 2  # and its answer filled it again
    hdr, _ = sim.call("delete", key=b"k")
    assert hdr["deleted"] is True
    assert sim.get(b"k") is None and replica.count == 3  # (a miss is not cached)
    assert sim.get(b"k") is None and replica.count == 4


def test_the_version_of_a_cached_read_is_the_version_written(sim: SimCluster) -> None:
    version = sim.put(b"k", b"v")["version"]
    first, _ = sim.call("get", key=b"k")
    again, _ = sim.call("get", key=b"k")
    assert cached(sim) == 1 and first["version"] == again["version"] == version


def test_an_answer_that_raced_a_write_fills_nothing(sim: SimCluster) -> None:
    """The replica read the old value; the write of the key commits before the answer arrives. The
    answer is right for its read (which overlapped the write) but must not be cached."""
    assert sim.put(b"k", b"old")["ok"]
    held: list[bool] = []
    sim.intercept = lambda wid, frames: bool(held) and frames[0] == W_FINAL
    held.append(True)
    rid = sim.send(b"c", "get", key=b"k")
    sim.settle()  # the read is answered by a replica; its answer is held on the way
    assert sim.held_messages
    assert sim.put(b"k", b"new")["ok"]
    held.clear()
    sim.release()
    got = sim.reply(b"c", rid)
    assert got is not None and got[1] == [b"old"]
    assert sim.get(b"k") == b"new"
    assert sim.get(b"k") == b"new" and cached(sim) == 1  # (the second read: from the refilled cache)


def test_a_read_sent_while_a_write_of_its_slot_is_pending_fills_nothing(sim: SimCluster) -> None:
    """A replica caught up to the committed seq may or may not show a pending write: its answer
    cannot tell which, so it is not cached, even for another key of the slot."""
    a, b = keys_in_slot(1, sim.slots, 2)
    assert sim.put(a, b"a1")["ok"] and sim.put(b, b"b1")["ok"]
    replica = ReplicaReads(sim)
    put = sim.send(b"c", "put", [b"a2"], key=a)
    get = sim.send(b"c", "get", key=b)
    sim.settle()
    assert sim.reply(b"c", put)[0]["ok"] and sim.reply(b"c", get)[1] == [b"b1"]  # type: ignore[index]
    assert sim.get(b) == b"b1" and replica.count == 2 and cached(sim) == 0


def test_an_exists_asked_again_on_its_own_fills_nothing(sim: SimCluster) -> None:
    """Reads of several requests share a REQUEST ("get", with values); the worker fails it, and
    each part is asked again on its own: an EXISTS alone is asked as "exists", whose answer has no
    values, and must not fill the cache with one (found at a version, value b"")."""
    keys = keys_in_slot(1, sim.slots, 6, prefix="e")
    for k in keys:
        assert sim.put(k, b"value-" + k)["ok"]
    failed: list[tuple[str, bytes]] = []

    def fail_shared_answers(wid: str, frames: list[bytes]) -> bool:
        if frames[0] == W_FINAL and len(unpack(frames[3]).get("found", [])) > 1:
            failed.append((wid, frames[1]))
            return True  # held: an error goes in its place
        return False

    sim.intercept = fail_shared_answers
    rids = [sim.send(b"c", "exists", key=keys[0])] + [sim.send(b"c", "get", key=k) for k in keys[1:]]
    sim.settle()
    assert len(failed) == 3, "each of the three replicas should have had a REQUEST of two reads"
    sim.intercept = None
    for wid, token in failed:
        sim.broker.on_worker(sim.workers[wid].identity,
                             [MDPW, W_FINAL, token, b"", pack({"ok": False, "code": "INTERNAL", "message": "test"})])
    sim.settle()
    for rid in rids:
        got = sim.reply(b"c", rid)
        assert got is not None and got[0]["ok"], got
    for k in keys:
        assert sim.get(k) == b"value-" + k


def test_an_answer_that_names_no_epoch_fills_nothing(sim: SimCluster) -> None:
    """A worker from before 2026-12-04 says [slot, seq]: the broker cannot tell whether what it read
    is on the slot's history, so its answer is used once and not kept."""
    assert sim.put(b"k", b"v")["ok"]
    old_worker: list[bool] = []

    def drop_epochs(wid: str, frames: list[bytes]) -> bool:
        if frames[0] == W_FINAL and not old_worker:
            hdr = unpack(frames[3])
            hdr["applied"] = [a[:2] for a in hdr["applied"]]
            old_worker.append(True)
            sim.broker.on_worker(sim.workers[wid].identity, [MDPW, *frames[:3], pack(hdr), *frames[4:]])
            return True  # (delivered above, rewritten)
        return False

    sim.intercept = drop_epochs
    assert sim.get(b"k") == b"v" and old_worker
    assert sim.get(b"k") == b"v" and cached(sim) == 0  # the second asked a replica too
    assert sim.get(b"k") == b"v" and cached(sim) == 1  # (which named its epoch: now it is kept)


def test_an_entry_past_its_ttl_is_not_served(sim: SimCluster) -> None:
    assert sim.put(b"t", b"v", ttl=1000)["ok"]
    assert sim.get(b"t") == b"v" and sim.get(b"t") == b"v" and cached(sim) == 1
    sim.wall += 1500  # the broker's clock decides expiry; no reaping has run yet
    assert sim.get(b"t") is None
    assert cached(sim) == 1


def test_large_and_streamed_values_are_always_read_from_a_replica(sim: SimCluster) -> None:
    replica = ReplicaReads(sim)
    big = b"x" * (MAX_CACHED_VALUE + 1)
    assert sim.put(b"big", big)["ok"]
    assert sim.get(b"big") == big and sim.get(b"big") == big
    assert replica.count == 2 and cached(sim) == 0
    stream = b"S" * 16  # a streamed value: a read answers its manifest, which is not cached either
    for i, chunk in enumerate((b"a" * 10, b"b" * 10)):
        assert sim.call("put_chunk", [chunk], key=b"streamed", stream=stream, index=i)[0]["ok"]
    assert sim.call("put_commit", key=b"streamed", stream=stream, chunks=2, size=20)[0]["ok"]
    for _ in range(2):
        hdr, _ = sim.call("get", key=b"streamed")
        assert hdr["found"] and hdr["stream"]["stream"] == stream
    assert replica.count == 4 and cached(sim) == 0


def test_an_mget_takes_whole_slots_from_the_cache_and_asks_for_the_rest(sim: SimCluster) -> None:
    hot = keys_in_slot(0, sim.slots, 2, prefix="h")
    cold = keys_in_slot(3, sim.slots, 2, prefix="c")
    for k in hot + cold:
        assert sim.put(k, b"v-" + k)["ok"]
    for k in hot + cold[:1]:
        assert sim.get(k) == b"v-" + k
    replica = ReplicaReads(sim)
    hdr, vals = sim.call("mget", keys=[cold[1], hot[0], cold[0], hot[1]])
    assert hdr["found"] == [True] * 4 and vals == [b"v-" + k for k in (cold[1], hot[0], cold[0], hot[1])]
    assert replica.count == 1 and cached(sim) == 0  # slot 3 asked of a replica (not all cached), slot 0 not
    hdr, vals = sim.call("mget", keys=[cold[1], hot[0], cold[0], hot[1]])
    assert replica.count == 1 and cached(sim) == 1  # the answer for slot 3 filled both


def test_no_cache_when_its_budget_is_zero(tmp_path: Path) -> None:
    sim = SimCluster(tmp_path, read_cache=0)
    try:
        replica = ReplicaReads(sim)
        assert sim.put(b"k", b"v")["ok"]
        assert sim.get(b"k") == b"v" and sim.get(b"k") == b"v"
        assert replica.count == 2 and cached(sim) == 0 and sim.broker.status()["read_cache_bytes"] == 0
    finally:
        sim.close()


def test_the_budget_bounds_the_cache(tmp_path: Path) -> None:
    sim = SimCluster(tmp_path, read_cache=10_000)
    try:
        for i in range(40):
            k = b"k%d" % i
            assert sim.put(k, b"v" * 1000)["ok"]
            assert sim.get(k) == b"v" * 1000
        assert 0 < sim.broker.status()["read_cache_bytes"] <= 10_000
        assert sim.get(b"k39") == b"v" * 1000 and cached(sim) == 1  # the latest stays
        assert sim.get(b"k0") == b"v" * 1000 and cached(sim) == 1  # the oldest went
    finally:
        sim.close()


@pytest.mark.parametrize("etcd_mode", [False, True], ids=["embedded", "failover"])
def test_a_new_broker_starts_with_an_empty_cache(tmp_path: Path, etcd_mode: bool) -> None:
    sim = SimCluster(tmp_path, etcd_mode=etcd_mode)
    try:
        assert sim.put(b"k", b"v1")["ok"]
        assert sim.get(b"k") == b"v1" and sim.get(b"k") == b"v1" and cached(sim) == 1
        sim.restart_broker()
        sim.advance(3.0)
        assert sim.broker.status()["read_cache_bytes"] == 0
        assert sim.put(b"k", b"v2")["ok"]
        assert sim.get(b"k") == b"v2" and cached(sim) == 0
    finally:
        sim.close()


# -- random concurrent histories ----------------------------------------------------------------


class Clients:
    """Clients that each keep one request in flight, timed by the simulation's delivery rounds."""

    def __init__(self, sim: SimCluster, n: int) -> None:
        self.sim = sim
        self.names = [b"c%d" % i for i in range(n)]
        self.inflight: dict[bytes, tuple[int, Op]] = {}
        self.seen = {c: 0 for c in self.names}
        self.history: list[Op] = []
        self.now = 0.0

    def idle(self) -> list[bytes]:
        return [c for c in self.names if c not in self.inflight]

    def send(self, client: bytes, kind: str, key: bytes, value: bytes | None) -> None:
        fields: dict[str, Any] = {"key": key}
        rid = self.sim.send(client, kind, [value] if value is not None else None, **fields)
        self.inflight[client] = (rid, Op(self.names.index(client), key, kind, value, self.now, None, "unknown"))

    def collect(self) -> None:
        self.now += 1.0
        for client, (rid, op) in list(self.inflight.items()):
            replies = self.sim.replies.get(client, [])
            got = self.sim.reply(client, rid, after=self.seen[client])
            if got is None:
                continue
            self.seen[client] = len(replies)
            del self.inflight[client]
            hdr, vals = got
            if hdr["ok"]:
                value = (vals[0] if hdr["found"] else None) if op.kind == "get" else op.value
                op = replace(op, outcome="ok", complete=self.now, value=value,
                             deleted=hdr.get("deleted") if op.kind == "delete" else None)
            elif op.kind == "get":
                op = replace(op, outcome="fail", complete=self.now)
            # (a write refused with an error may still have landed: its outcome stays unknown)
            self.history.append(op)

    def abandon(self) -> None:
        """Requests a restarted broker will never answer: their outcome stays unknown."""
        for _, op in self.inflight.values():
            self.history.append(op)
        self.inflight.clear()


@pytest.mark.parametrize("etcd_mode", [False, True], ids=["embedded", "failover"])
@pytest.mark.parametrize("seed", range(6))
def test_random_concurrent_histories_with_the_cache_are_linearizable(tmp_path: Path, seed: int,
                                                                    etcd_mode: bool) -> None:
    """Five clients put, get and delete four keys (two per slot) concurrently, one delivery round
    at a time, while workers crash and restart, lose replication messages, and the broker restarts
    (a failover with ``failover``). The whole history must be linearizable, and a good share of its
    reads must have come from the cache, or this test would prove nothing about it."""
    rng = random.Random(seed)
    sim = SimCluster(tmp_path, slots=4, n_workers=3, initial_workers=3, etcd_mode=etcd_mode)
    try:
        keys = keys_in_slot(0, 4, 2, prefix="a") + keys_in_slot(1, 4, 2, prefix="b")
        clients = Clients(sim, 5)
        faults = RandomFaults(sim, rng, p_kill=0.01, p_restart=0.01, p_lossy=0.01, p_broker=0.004, p_advance=0.05)
        from_cache = 0
        for step in range(1500):
            before = sim.broker
            cached_before = cached(sim)
            faults.step()
            if sim.broker is not before:
                from_cache += cached_before
                clients.abandon()
            for client in clients.idle():
                if rng.random() < 0.5:
                    key = rng.choice(keys)
                    r = rng.random()
                    if r < 0.3:
                        clients.send(client, "put", key, b"%d-%d-%s" % (seed, step, client))
                    elif r < 0.37:
                        clients.send(client, "delete", key, None)
                    else:
                        clients.send(client, "get", key, None)
            sim.step()
            sim.check_invariants()
            clients.collect()
        sim.drop = None
        sim.advance(6.0)
        clients.collect()
        clients.abandon()
        from_cache += cached(sim)
        result = check_history(clients.history, time_limit=30.0)
        assert result.ok, (seed, result.failures[:3])
        reads = sum(1 for o in clients.history if o.kind == "get" and o.outcome == "ok")
        assert reads > 300 and from_cache > reads // 10, (reads, from_cache)
    finally:
        sim.close()
