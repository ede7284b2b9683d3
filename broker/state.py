"""What every part of the broker reads: the configuration, the workers, the slots and the
per-replica progress of each slot. Plain data and a few pure questions about it; no decisions.

Each part owns the rest of its state itself (requests, streams, moves, scans, ...). This module
and the Ready being built (broker/ready.py) are what the parts share; they never call each other.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

from broker.latency import RequestTimes
from broker.messages import Unavailable
from broker.read_cache import ReadCache
from broker.ready import Ready
from protocol.errors import ErrorCode
from protocol.frames import W_ASSIGN, pack
from protocol.limits import DEFAULT_MAX_STREAM_BYTES, DEFAULT_MAX_VALUE_BYTES, DEFAULT_SLOTS, MAX_KEY_BYTES

log = structlog.get_logger("zkv.broker")

TICK_SECONDS = 0.1  # how often the loop calls tick(): the server's TICK and the copy throttle's refill


@dataclass
class BrokerConfig:
    """Every setting of the broker's decisions, with its default: the one place they are defined."""

    slots: int = DEFAULT_SLOTS
    rf: int = 3
    w: int = 2
    heartbeat: float = 1.0
    liveness: int = 3
    request_timeout: float = 5.0
    grace: float = 30.0  # s a dead worker keeps its slots before they are given new replicas
    auto_rebalance: bool = True  # move slots to joining workers without being asked
    move_concurrency: int = 4  # slot moves in flight at once
    copy_rate: int = 64 * 1024 * 1024  # bytes/s of snapshot data the broker relays (moves and repairs)
    initial_workers: int = 0  # workers to wait for before forming the cluster (at least RF)
    max_value: int = DEFAULT_MAX_VALUE_BYTES
    max_key: int = MAX_KEY_BYTES
    max_stream: int = DEFAULT_MAX_STREAM_BYTES  # size limit of a streamed value
    stream_idle: float = 60.0  # s without a chunk before an open stream is aborted
    # Open streams hold staged chunks on every replica (up to max_stream each) until committed,
    # aborted or idle: a cap per broker, and per client connection so that one cannot take them all.
    max_streams: int = 1024
    max_client_streams: int = 64
    # Reply bytes libzmq still holds for one client connection (it does not read them) before
    # further replies to it are refused with UNAVAILABLE (broker/budget.py).
    max_client_bytes: int = 64 * 1024 * 1024
    # Active brokers (etcd mode, --groups): this core leads the slots s with s % groups == group
    # and knows no other; groups 1 is the whole cluster, as with one leader.
    groups: int = 1
    group: int = 0
    # Bytes of committed values the leader keeps of recently read keys, to answer reads of them
    # without a replica (broker/read_cache.py); 0: every read asks a replica.
    read_cache: int = 64 * 1024 * 1024
    # Seconds of a read lease (broker/leases.py): one replica of each slot answers its reads
    # without the broker, and no write of the slot commits without that replica while it holds
    # one. 0: no leases (every read crosses the broker).
    read_lease: float = 0.0

    def owns(self, slot: int) -> bool:
        return slot % self.groups == self.group

    def for_group(self, groups: int, group: int) -> BrokerConfig:
        """The settings of one group's core (active brokers): the broker's read cache budget is
        shared, each group's core getting its share, however many groups this broker leads."""
        return dataclasses.replace(self, groups=groups, group=group, read_cache=self.read_cache // groups)

    def owned_slots(self) -> range:
        return range(self.group, self.slots, self.groups)

    @property
    def group_fields(self) -> dict[str, int]:
        """What ASSIGN and the group's answers carry of the group (nothing with one leader)."""
        return {"group": self.group, "groups": self.groups} if self.groups > 1 else {}


@dataclass(slots=True, frozen=True, order=True)
class Pos:
    """A position in a slot's history: the write at ``seq``, sequenced by broker incarnation ``epoch``."""

    seq: int = 0
    epoch: int = 0


@dataclass
class Worker:
    id: str
    data_id: bytes = b""
    process: bytes = b""
    identity: bytes | None = None
    alive: bool = False
    dead_since: float = 0.0  # monotonic; when it was declared dead (or when this broker started)
    last_seen: float = 0.0
    last_seen_wall: float = 0.0
    last_sent: float = 0.0
    clock_offset_ms: int = 0  # the worker's wall clock minus ours, as last reported
    applied: int = 0  # write batches applied since the worker started
    commits: int = 0  # LMDB commits (fsyncs) since the worker started
    retries_absorbed: int = 0  # write batches it found were retries of earlier writes (worker/dedup.py)
    direct_reads: int = 0  # reads it answered at its reads endpoint under a read lease (worker/leases.py)
    keys: int = 0
    disk_bytes: int = 0
    slots: set[int] = field(default_factory=set)  # slots it is a replica of
    learning: set[int] = field(default_factory=set)  # slots being moved to it (not replicas yet)
    draining: bool = False  # every slot is to move away from it
    reads: str = ""  # its reads endpoint, where clients read the slots it holds leases on ("": none)

    def record(self) -> dict[str, Any]:
        return {"data_id": self.data_id, "state": "alive" if self.alive else "dead",
                "last_seen": self.last_seen_wall, "keys": self.keys, "disk_bytes": self.disk_bytes,
                "draining": self.draining}


@dataclass(slots=True)
class Lease:
    """A read lease as the broker counts it: until when (its clock), and the worker process it was
    granted to (a new process under the same id holds nothing of it, and has not got its data)."""

    until: float
    process: bytes


@dataclass
class TailEntry:
    seq: int
    epoch: int
    prev_epoch: int
    frames: list[bytes]  # [header, *values], without the topic
    size: int


@dataclass
class Slot:
    id: int
    replicas: list[str]
    last: Pos = Pos()
    committed: int = 0
    applied: dict[str, Pos | None] = field(default_factory=dict)
    # Sequenced write batches not yet committed, by seq (broker/writes.py: WriteBatch).
    pending: dict[int, Any] = field(default_factory=dict)
    tail: deque[TailEntry] = field(default_factory=deque)
    tail_bytes: int = 0
    # (epoch, first seq) for each broker incarnation that wrote this slot: which epoch wrote any
    # seq in the history. Persisted, so it outlives the in-memory tail and broker restarts.
    epochs: list[tuple[int, int]] = field(default_factory=list)
    recovering: bool = False
    # etcd mode: the seq of the history a new leader adopted in recovery, which may hold writes
    # the old leader acknowledged; reads wait until it is committed (W replicas hold it), as a
    # Raft leader serves reads only after committing an entry of its own term.
    read_floor: int = 0
    learners: list[str] = field(default_factory=list)  # workers a move is filling; not counted for W or reads
    # Workers whose copy of the slot is being replaced by a snapshot: until the ACK of the install
    # (carrying this transfer token; b"" = none started yet), their other ACKs for the slot describe
    # data that is gone or going, and are ignored.
    snapshot_pending: dict[str, bytes] = field(default_factory=dict)
    last_write: float = 0.0
    repairs: dict[str, float] = field(default_factory=dict)  # worker -> when started
    # Read leases: worker -> its lease (broker/leases.py). Until it ends no write of the slot counts
    # as committed without that worker process (broker/quorum.py).
    leases: dict[str, Lease] = field(default_factory=dict)
    # Since when a lease holder has held commits back (0: it does not): a holder that cannot keep
    # up for long is not renewed, so that the slot's writes commit without it again.
    lease_lag_since: float = 0.0

    def record(self) -> dict[str, Any]:
        """What the broker's metadata keeps of the slot."""
        return {"replicas": self.replicas, "last": [self.last.epoch, self.last.seq],
                "committed": self.committed, "epochs": self.epochs}


@dataclass
class Transfer:
    """A slot snapshot relayed from a donor to a receiver, one part at a time (pulled by the
    broker, so it is throttled and never floods a socket)."""

    token: bytes
    slot: int
    donor: str
    receiver: str
    started: float
    last_activity: float
    next_part: int = 0
    keys: int = 0
    bytes: int = 0
    total_keys: int = 0
    total_bytes: int = 0
    done: bool = False  # its last part was relayed


@dataclass
class Move:
    """Slot ``slot`` gets replica ``add`` (filled as a learner) in place of ``remove``."""

    slot: int
    add: str
    remove: str
    reason: str
    started: float


@dataclass
class Restored:
    """The broker's metadata as it was persisted (broker/meta.py loads it)."""

    cluster: dict[str, Any] = field(default_factory=dict)
    workers: dict[str, dict[str, Any]] = field(default_factory=dict)
    slots: dict[int, dict[str, Any]] = field(default_factory=dict)
    streams: dict[bytes, dict[str, Any]] = field(default_factory=dict)
    # False in etcd mode: slot positions (last, committed) are not in the metadata; recovery
    # learns them from the replicas alone (broker/recovery.py).
    positions_known: bool = True


class BrokerState:
    """The shared state, the clock, the id sources and the Ready the current step is building."""

    def __init__(self, cfg: BrokerConfig, epoch: int, clock: Callable[[], float], wall_ms: Callable[[], int],
                 new_id: Callable[[], bytes]) -> None:
        self.cfg = cfg
        self.epoch = epoch
        self.clock = clock  # monotonic seconds: timeouts, liveness
        self.wall_ms = wall_ms  # the broker's wall clock, ms: the only clock that decides expiry
        self.new_id = new_id  # a fresh random id (the cluster id)
        self.cluster_id = b""
        self.workers: dict[str, Worker] = {}
        self.by_identity: dict[bytes, str] = {}
        self.slots: dict[int, Slot] = {}
        self.ready = Ready()
        # Slots whose committed writes were lost (more replicas than the fault model allows), as
        # recovery found them: shown by status until the broker restarts.
        self.lost: dict[int, dict[str, Any]] = {}
        self.positions_known = True  # False in etcd mode (Restored.positions_known)
        self.started = clock()  # when this incarnation started (status: workers not heard from since)
        # The longest read lease this cluster may have granted, as its record says (broker/leases.py).
        self.lease_recorded = 0.0
        self.commit_hold_until = 0.0
        # Set by the entry (broker/core.py): hands an event to every part that handles it.
        self.emit: Callable[[Any], None] = lambda event: None
        self.latency = RequestTimes(clock)  # request durations by op and outcome (metrics)
        self.read_cache = ReadCache(cfg.read_cache)
        self.stats: dict[str, int] = {
            "writes_committed": 0, "writes_deduplicated": 0, "reads_served": 0, "reads_cached": 0, "bad_requests": 0,
            "rejected_requests": 0,
            "snapshots_sent": 0, "replays_sent": 0, "slots_rereplicated": 0, "slots_moved": 0,
            "moves_abandoned": 0, "streams_aborted": 0}
        self._tokens = itertools.count(1)
        self.rr: Any = itertools.count()  # round robin over the replicas that may serve a read

    def restore(self, restored: Restored) -> None:
        """Take up the persisted metadata: every worker dead until it registers, every slot
        recovering until enough of its replicas have reported (broker/recovery.py)."""
        cluster = restored.cluster
        if cluster.get("formed"):
            if cluster["slots"] != self.cfg.slots or cluster["rf"] != self.cfg.rf:
                log.warning("cluster_settings_from_metadata", slots=cluster["slots"], rf=cluster["rf"])
            self.cfg.slots, self.cfg.rf = cluster["slots"], cluster["rf"]
            self.cluster_id = bytes(cluster.get("id", b""))
        for wid, info in restored.workers.items():
            self.workers[wid] = Worker(id=wid, data_id=info["data_id"], keys=info.get("keys", 0),
                                       dead_since=self.started,
                                       draining=bool(info.get("draining", False)),
                                       disk_bytes=info.get("disk_bytes", 0), last_seen_wall=info.get("last_seen", 0.0))
        self.positions_known = restored.positions_known
        recorded = cluster.get("read_lease", 0.0)
        self.lease_recorded = float(recorded) if isinstance(recorded, (int, float)) and recorded > 0 else 0.0
        for sid, info in restored.slots.items():
            last = info.get("last", [0, 0])
            slot = Slot(sid, list(info["replicas"]), last=Pos(last[1], last[0]), committed=info.get("committed", 0),
                        epochs=[(int(e), int(q)) for e, q in info.get("epochs", [])], recovering=True)
            self.slots[sid] = slot
            for wid in slot.replicas:
                if wid in self.workers:
                    self.workers[wid].slots.add(sid)

    def hold_commits_for_leases(self) -> None:
        """A predecessor may have granted read leases this incarnation does not know, as long as the
        longest its cluster record names (or this broker's own): nothing commits until they have
        run out (broker/leases.py)."""
        hold = max(self.cfg.read_lease, self.lease_recorded)
        self.commit_hold_until = self.started + hold if hold > 0 else 0.0

    def cluster_record(self, **extra: Any) -> dict[str, Any]:
        """What the metadata keeps of the cluster (written when it forms, and when the longest
        read lease it may grant changes)."""
        return {"formed": True, "slots": self.cfg.slots, "rf": self.cfg.rf, "id": self.cluster_id,
                **({"read_lease": self.lease_recorded} if self.lease_recorded else {}), **extra}

    def token(self) -> bytes:
        """The one source of request tokens (reads, chunk reads, scans, snapshot transfers)."""
        return next(self._tokens).to_bytes(8, "big")

    # -- questions every part asks ---------------------------------------------------------------

    def alive(self, wid: str) -> bool:
        w = self.workers.get(wid)
        return w is not None and w.alive

    def live_replicas(self, slot: Slot) -> int:
        return sum(1 for w in slot.replicas if self.alive(w) and slot.applied.get(w) is not None)

    def qualifies(self, slot: Slot, wid: str) -> bool:
        """May this replica serve reads of the slot? Alive and applied everything committed, and
        the history recovery adopted is committed (``read_floor``, etcd mode)."""
        p = slot.applied.get(wid)
        return p is not None and p.seq >= slot.committed >= slot.read_floor and self.alive(wid)

    def choose_replica(self, slot: Slot) -> str | None:
        """The one replica chooser for point reads, chunk reads and scans: round robin over the
        replicas that qualify; None if none does now."""
        cands = [w for w in slot.replicas if self.qualifies(slot, w)]
        return cands[next(self.rr) % len(cands)] if cands else None

    def any_replica_alive(self, slot: Slot) -> bool:
        return any(self.alive(w) for w in slot.replicas)

    def require_all_slots(self) -> None:
        """Refuse a request that needs every slot (scan, watch) while any cannot serve."""
        if not self.slots:
            raise Unavailable(ErrorCode.UNAVAILABLE,
                              f"cluster not formed: waiting for {self.cfg.rf} workers to register")
        recovering = [s for s, sl in self.slots.items() if sl.recovering]
        if recovering:
            raise Unavailable(ErrorCode.UNAVAILABLE,
                              f"{len(recovering)} slots recovering after a broker restart (slot {recovering[0]}, ...)")

    # -- output --------------------------------------------------------------------------------

    def to_worker(self, w: Worker, frames: list[bytes]) -> None:
        if w.identity is None:
            return
        w.last_sent = self.clock()
        self.ready.to_worker(w.identity, frames)

    def send_assign(self, w: Worker) -> None:
        """Tell a worker the slots it holds (and learns), in this broker's epoch."""
        self.to_worker(w, [W_ASSIGN, pack({"slots": sorted(w.slots | w.learning), "epoch": self.epoch,
                                           "cluster": self.cluster_id, **self.cfg.group_fields})])

    def slot_changed(self, slot: Slot) -> None:
        self.ready.metadata.slots[slot.id] = slot

    def worker_changed(self, w: Worker) -> None:
        self.ready.metadata.workers[w.id] = w
