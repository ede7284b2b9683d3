"""An in-memory network for the sans-I/O cores: one ``BrokerCore``, several ``WorkerCore``s with
real LMDB stores in a temporary directory, and a test-controlled clock. Tests decide which
messages are delivered, dropped or delayed; no sockets, no sleeping, fully repeatable.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from broker.core import BrokerCore
from broker.history import in_history
from broker.meta import MetaStore
from broker.ready import execute
from broker.state import BrokerConfig, Pos, Restored
from protocol.frames import C_REQUEST, MDPC, MDPW, SERVICE, W_HEARTBEAT, pack, unpack
from protocol.replication import Replicate, decode_replication, worker_topic
from worker.core import WorkerCore
from worker.records import decode_record
from worker.store import SlotStore

DropRule = Callable[[str, Replicate], bool]


@dataclass
class SimWorker:
    wid: str
    path: Path
    core: WorkerCore | None = None
    identity: bytes = b""
    up: bool = False
    reads: str = ""  # a reads endpoint (read leases): the worker asks for leases and answers direct reads
    rate: float = 1.0  # how fast its monotonic clock runs beside the simulation's (clock drift)

    def clock(self, t: float) -> float:
        return t * self.rate

    def start(self, incarnation: int) -> None:
        store = SlotStore(str(self.path), map_size=1 << 28, sync=False)
        self.core = WorkerCore(self.wid, store, reads=self.reads)
        self.identity = f"{self.wid}#{incarnation}".encode()
        self.up = True

    def stop(self) -> None:
        if self.core is not None:
            self.core.store.close()
        self.core = None
        self.up = False

    def reconnect(self, incarnation: int) -> list[bytes]:
        """As the real worker does: a new socket (identity), and READY from the core's reconnect."""
        assert self.core is not None
        self.identity = f"{self.wid}#{incarnation}".encode()
        return [MDPW, *self.core.reconnect()]


@dataclass
class SimCluster:
    root: Path
    n_workers: int = 3
    slots: int = 8
    rf: int = 3
    w: int = 2
    grace: float = 30.0
    initial_workers: int = 0
    auto_rebalance: bool = True
    t: float = 0.0
    wall: int = 1_700_000_000_000
    drop: DropRule | None = None
    # Holds a worker's message to the broker (wid, frames) -> True to hold; release() delivers.
    intercept: Callable[[str, list[bytes]], bool] | None = None
    held_messages: list[tuple[str, list[bytes]]] = field(default_factory=list)
    replies: dict[bytes, list[dict[str, Any]]] = field(default_factory=dict)
    reply_values: dict[bytes, list[list[bytes]]] = field(default_factory=dict)
    # etcd mode: a broker restart is a failover. The successor knows what etcd keeps (membership,
    # slot map, epoch histories) and no positions; broker/recovery.py learns those from the workers.
    etcd_mode: bool = False
    read_cache: int = BrokerConfig.read_cache
    read_lease: float = 0.0  # > 0: the broker grants read leases and every worker has a reads endpoint
    # Workers cut off from the broker (both ways), and workers paused: a paused worker takes
    # nothing in and sends nothing until it resumes, when what was sent to it is delivered.
    partitioned: set[str] = field(default_factory=set)
    paused: dict[str, list[Callable[[], None]]] = field(default_factory=dict)
    checks: bool = True  # check_invariants after every step (off: bench/sim_mset.py counts the write path alone)

    def __post_init__(self) -> None:
        self._inc = itertools.count(1)
        self._rid = itertools.count(1)
        self._ids = itertools.count(1)
        self.broker = self._new_broker()
        self.workers = {f"w{i}": SimWorker(f"w{i}", self.root / f"w{i}", reads=self._reads(f"w{i}"))
                        for i in range(1, self.n_workers + 1)}
        self.last_lease_request = -1e9
        for w in self.workers.values():
            self.start_worker(w.wid)
        self.settle()

    def _new_broker(self) -> BrokerCore:
        self.meta = MetaStore(str(self.root / "broker"))
        cfg = BrokerConfig(slots=self.slots, rf=self.rf, w=self.w, heartbeat=1.0, request_timeout=5.0,
                           grace=self.grace, initial_workers=self.initial_workers,
                           auto_rebalance=self.auto_rebalance, read_cache=self.read_cache,
                           read_lease=self.read_lease)
        restored = self.meta.load()
        if self.etcd_mode:
            restored = what_etcd_keeps(restored)
        return BrokerCore(cfg, restored, self.meta.next_epoch(), clock=lambda: self.t,
                          wall_ms=lambda: self.wall, new_id=lambda: next(self._ids).to_bytes(16, "big"),
                          lookup_dedup=(lambda cid, rid: None) if self.etcd_mode else self.meta.lookup_dedup)

    # -- faults ---------------------------------------------------------------------------------

    def start_worker(self, wid: str) -> None:
        w = self.workers[wid]
        w.start(next(self._inc))
        assert w.core is not None
        self.broker.on_worker(w.identity, [MDPW, *w.core.reconnect()])

    def _reads(self, wid: str) -> str:
        return f"tcp://sim-{wid}:1" if self.read_lease else ""

    def add_worker(self, wid: str) -> None:
        """A new worker joins the running cluster."""
        self.workers[wid] = SimWorker(wid, self.root / wid, reads=self._reads(wid))
        self.start_worker(wid)

    def kill_worker(self, wid: str) -> None:
        self.paused.pop(wid, None)
        self.workers[wid].stop()

    def pause_worker(self, wid: str) -> None:
        self.paused.setdefault(wid, [])

    def resume_worker(self, wid: str) -> None:
        """Deliver what reached the paused worker, in order, by its clock of now."""
        for deliver in self.paused.pop(wid, []):
            deliver()

    def _reachable(self, wid: str) -> bool:
        return wid not in self.partitioned and wid not in self.paused

    def restart_broker(self) -> None:
        """The broker process dies (its outboxes with it) and starts again on the same metadata."""
        self.meta.close()
        self.broker = self._new_broker()
        for w in self.workers.values():  # workers notice and re-register (a paused or cut off one later)
            if w.up and self._reachable(w.wid):
                ready = w.reconnect(next(self._inc))
                self.broker.on_worker(w.identity, ready)

    # -- delivery -------------------------------------------------------------------------------

    def _by_identity(self, identity: bytes) -> SimWorker | None:
        for w in self.workers.values():
            if w.up and w.identity == identity:
                return w
        return None

    def step(self) -> bool:
        """Deliver everything queued once. Returns whether anything moved."""
        b = self.broker
        ready = b.ready()
        moved = bool(ready.replication or ready.workers or ready.client)
        execute(ready, self.meta, publish=self._publish, send_worker=self._to_worker, send_client=self._to_client)
        for w in self.workers.values():
            if w.up and w.core is not None and w.wid not in self.paused:
                w.core.flush()
                for identity, frames in w.core.leases.replies:
                    self.replies.setdefault(identity, []).append(unpack(frames[0]))
                    self.reply_values.setdefault(identity, []).append(frames[1:])
                    moved = True
                w.core.leases.replies = []
                outbox, w.core.outbox = w.core.outbox, []
                if w.wid in self.partitioned:
                    continue
                for frames in outbox:
                    if self.intercept is not None and self.intercept(w.wid, frames):
                        self.held_messages.append((w.wid, frames))
                        continue
                    b.on_worker(w.identity, [MDPW, *frames])
                    moved = True
        return moved

    def _publish(self, frames: list[bytes]) -> None:
        w = next(w for w in self.workers.values() if worker_topic(w.wid) == frames[0])
        if w.wid in self.partitioned:
            return
        for rep in decode_replication(frames):
            if w.up and w.core is not None and not (self.drop and self.drop(w.wid, rep)):
                self._at_worker(w, lambda core, rep=rep: core.on_replicate(rep, w.clock(self.t)))

    def _to_worker(self, identity: bytes, frames: list[bytes]) -> None:
        w = self._by_identity(identity)
        if w is not None and w.core is not None and w.wid not in self.partitioned:
            self._at_worker(w, lambda core: core.on_broker(frames[1], frames[2:], w.clock(self.t)), identity)

    def _at_worker(self, w: SimWorker, deliver: Callable[[WorkerCore], None], identity: bytes | None = None) -> None:
        """Deliver now, or when the worker resumes if it is paused: to the same process, and for a
        message on the broker connection (``identity``) only if that connection is still its own
        (a worker that registered again meanwhile has closed the old one)."""
        core = w.core
        assert core is not None
        if w.wid in self.paused:
            self.paused[w.wid].append(
                lambda: deliver(core) if w.core is core and identity in (None, w.identity) else None)
        else:
            deliver(core)

    def direct_get(self, client: bytes, wid: str, key: bytes, rid: int | None = None) -> int:
        """A GET sent to a worker's reads endpoint (read leases); its answer reaches
        ``sim.replies[client]`` as the broker's do."""
        rid = next(self._rid) if rid is None else rid
        w = self.workers[wid]
        frames = [pack({"op": "get", "id": rid, "key": key})]
        if w.up and w.core is not None:
            self._at_worker(w, lambda core: core.leases.on_read(client, frames, w.clock(self.t),
                                                                lambda: w.clock(self.t)))
        return rid

    def _to_client(self, identity: bytes, frames: list[bytes]) -> None:
        self.replies.setdefault(identity, []).append(unpack(frames[3]))
        self.reply_values.setdefault(identity, []).append(frames[4:])

    def settle(self, max_steps: int = 1000) -> None:
        for _ in range(max_steps):
            moved = self.step()
            if self.checks:
                self.check_invariants()
            if not moved:
                return
        raise AssertionError("network did not settle")

    def release(self) -> None:
        """Deliver the held worker messages (late, as a slow network would)."""
        held, self.held_messages = self.held_messages, []
        for wid, frames in held:
            w = self.workers[wid]
            if w.up and wid not in self.partitioned:
                self.broker.on_worker(w.identity, [MDPW, *frames])
        self.settle()

    def check_invariants(self) -> None:
        """The broker never counts more than a replica has on disk (for W, for reads)."""
        for s, slot in self.broker.slots.items():
            if slot.recovering:
                continue
            for wid, pos in slot.applied.items():
                w = self.workers.get(wid)
                if pos is None or w is None or not w.up or w.core is None or wid not in slot.replicas:
                    continue
                if self.broker.workers[wid].identity != w.identity:
                    continue  # this process is not registered (yet): the broker knows another one
                disk = w.core.store.position(s)
                assert pos.seq <= disk.seq, f"slot {s}: broker counts {wid} at {pos}, its disk is at {disk}"
        # Read leases: a worker that believes it holds one has every write the broker has committed.
        for w in self.workers.values():
            if not (w.up and w.core is not None and w.core.leases.until):
                continue
            now = w.clock(self.t)
            for s, slot in self.broker.slots.items():
                if w.core.leases.holds(s, now):
                    disk = w.core.store.position(s)
                    assert disk.seq >= slot.committed, \
                        f"slot {s}: {w.wid} holds a read lease at {disk}, the broker committed {slot.committed}"
                    if not slot.recovering and w.core.broker_epoch == self.broker.epoch:
                        assert in_history(slot, Pos(disk.seq, disk.epoch)), \
                            f"slot {s}: {w.wid} holds a read lease at {disk}, off the broker's history"

    def advance(self, seconds: float, tick: float = 0.1) -> None:
        """Let time pass: ticks, heartbeats from the live workers, deliveries."""
        steps = max(1, int(round(seconds / tick)))
        for _ in range(steps):
            self.t += tick
            self.wall += int(tick * 1000)
            renew = self.read_lease and self.t - self.last_lease_request >= self.read_lease / 4
            if renew:
                self.last_lease_request = self.t
            for w in self.workers.values():
                if not w.up or w.core is None or w.wid in self.paused:
                    continue
                if w.core.reconnect_requested and w.wid not in self.partitioned:
                    ready = w.reconnect(next(self._inc))
                    self.broker.on_worker(w.identity, ready)
                w.core.retry_stalled_repairs(self.t)
                w.core.leases.expire_held(w.clock(self.t))
                if renew:
                    w.core.request_leases(w.clock(self.t))
                if w.wid not in self.partitioned:
                    self.broker.on_worker(w.identity, [MDPW, W_HEARTBEAT])
            self.broker.tick()
            self.settle()

    # -- client ---------------------------------------------------------------------------------

    def send(self, client: bytes, op: str, values: list[bytes] | None = None, cid: bytes = b"",
             rid: int | None = None, **fields: Any) -> int:
        rid = next(self._rid) if rid is None else rid
        hdr = {"op": op, "id": rid, "cid": cid or client, **fields}
        self.broker.on_client(client, [MDPC, C_REQUEST, SERVICE, pack(hdr), *(values or [])])
        return rid

    def reply(self, client: bytes, rid: int, after: int = 0) -> tuple[dict[str, Any], list[bytes]] | None:
        """The first reply to request ``rid`` among the client's replies from number ``after`` on
        (``len(sim.replies[client])`` before a resend: the answer to that attempt)."""
        pairs = zip(self.replies.get(client, []), self.reply_values.get(client, []), strict=True)
        for hdr, vals in itertools.islice(pairs, after, None):
            if hdr.get("id") == rid:
                return hdr, vals
        return None

    def call(self, op: str, values: list[bytes] | None = None, client: bytes = b"c1", settle_time: float = 0.0,
             **fields: Any) -> tuple[dict[str, Any], list[bytes]]:
        rid = self.send(client, op, values, **fields)
        self.settle()
        if settle_time:
            self.advance(settle_time)
        got = self.reply(client, rid)
        assert got is not None, f"no reply to {op} {fields}"
        return got

    def put(self, key: bytes, value: bytes, **kw: Any) -> dict[str, Any]:
        return self.call("put", [value], key=key, **kw)[0]

    def get(self, key: bytes, **kw: Any) -> bytes | None:
        hdr, vals = self.call("get", key=key, **kw)
        assert hdr["ok"], hdr
        return vals[0] if hdr["found"] else None

    def positions(self, slot: int) -> dict[str, tuple[int, int]]:
        out = {}
        for w in self.workers.values():
            if w.up and w.core is not None:
                p = w.core.store.position(slot)
                out[w.wid] = (p.epoch, p.seq)
        return out

    def worker_data(self, wid: str) -> dict[bytes, bytes]:
        """Every live record of one worker: user key -> value."""
        w = self.workers[wid]
        assert w.core is not None
        out = {}
        with w.core.store.env.begin() as txn:
            for k, v in txn.cursor(db=w.core.store.data):
                r = decode_record(v)
                out[r.long_key or bytes(k[2:])] = r.value
        return out

    def close(self) -> None:
        for w in self.workers.values():
            w.stop()
        self.meta.close()


def what_etcd_keeps(restored: Restored) -> Restored:
    """The metadata a successor broker finds in etcd (broker/etcd.py EtcdMeta): no positions, no
    de-duplication table."""
    return Restored(restored.cluster,
                    {w: {"data_id": i["data_id"], "draining": i.get("draining", False)}
                     for w, i in restored.workers.items()},
                    {s: {"replicas": i["replicas"], "epochs": i.get("epochs", [])} for s, i in restored.slots.items()},
                    restored.streams, positions_known=False)


class RandomFaults:
    """Random faults for a simulation, one ``step`` at a time: at most one worker down, one worker
    that loses a share of its replication messages, broker restarts, time passing. Probabilities
    are per step; ``heal`` ends every fault."""

    def __init__(self, sim: SimCluster, rng: Any, p_kill: float, p_restart: float, p_lossy: float,
                 p_broker: float, p_advance: float = 0.0, loss: float = 0.4, after_broker: float = 0.0) -> None:
        self.sim, self.rng = sim, rng
        # Cumulative thresholds over one draw per step (kill, restart, lossy, broker, advance).
        self.edges = list(itertools.accumulate([p_kill, p_restart, p_lossy, p_broker, p_advance]))
        self.after_broker = after_broker
        self.down: str | None = None
        self.lossy: str | None = None
        sim.drop = lambda wid, rep: wid == self.lossy and rng.random() < loss

    def step(self) -> None:
        sim, rng, (kill, restart, lossy, broker, advance) = self.sim, self.rng, self.edges
        r = rng.random()
        if r < kill and self.down is None:
            self.down = rng.choice(sorted(sim.workers))
            sim.kill_worker(self.down)
        elif r < restart and self.down is not None:
            sim.start_worker(self.down)
            self.down = None
        elif r < lossy:
            self.lossy = rng.choice([None, *sorted(sim.workers)])
        elif r < broker:
            sim.restart_broker()
            if self.after_broker:
                sim.advance(self.after_broker)
        elif r < advance:
            sim.advance(rng.choice([0.2, 1.0, 3.5, 6.0]))

    def heal(self) -> None:
        self.sim.drop = None
        self.lossy = None
        if self.down is not None:
            self.sim.start_worker(self.down)
            self.down = None


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


def dedup_table(sim: SimCluster, wid: str, slot: int) -> dict[bytes, bytes]:
    """One replica's record of the client requests a slot's writes came from (worker/dedup.py)."""
    w = sim.workers[wid]
    assert w.core is not None
    st = w.core.store
    prefix = slot.to_bytes(2, "big")
    with st.env.begin() as txn:
        return {bytes(k[2:]): bytes(v) for k, v in txn.cursor(db=st.tables.dedup) if bytes(k[:2]) == prefix}
