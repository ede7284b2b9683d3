"""The broker's decision logic, free of sockets and clocks: ``BrokerCore``.

The socket loop (broker/server.py) hands it client messages, worker messages and ticks, calls
``persist()`` and then sends what the outboxes hold, in that order: nothing leaves the broker
before the metadata that explains it is written.

Write path: a client write is validated, de-duplicated by (client id, request number), split by
slot, stamped (slot, epoch, seq) and published; it is acknowledged when W replicas of the slot
have acknowledged a position at or past its seq (``Slot.committed``).

Read path: a read goes to a live replica whose acknowledged position is at or past the slot's
committed seq; the replica answers with the version it read, and an answer newer than the
committed seq is held back until that version commits. So a read never misses an acknowledged
write and never shows one that could still be lost.
"""

from __future__ import annotations

import bisect
import itertools
import time
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import structlog

from broker.meta import MetaStore
from broker.placement import replicas_for_slot, slot_map
from protocol.errors import ErrorCode
from protocol.frames import (
    C_FINAL,
    C_PARTIAL,
    C_REQUEST,
    MDPC,
    MDPW,
    MMI_ADMIN,
    MMI_SERVICE,
    MMI_STATUS,
    SERVICE,
    W_ACK,
    W_ASSIGN,
    W_DISCONNECT,
    W_EXPIRED,
    W_FINAL,
    W_HEARTBEAT,
    W_NACK,
    W_PARTIAL,
    W_READY,
    W_REPLAY,
    W_REQUEST,
    W_SNAPSHOT_DELIVER,
    W_SNAPSHOT_PART,
    W_SNAPSHOT_REQUEST,
    pack,
    unpack,
)
from protocol.limits import (
    DEFAULT_MAX_STREAM_BYTES,
    DEFAULT_MAX_VALUE_BYTES,
    DEFAULT_SCAN_LIMIT,
    DEFAULT_SLOTS,
    MAX_CHUNK_BYTES,
    MAX_CHUNKS_PER_READ,
    MAX_KEY_BYTES,
    MAX_KEYS_PER_REQUEST,
    MAX_SCAN_LIMIT,
    MAX_TTL_MS,
    SCAN_MAX_BYTES,
    STREAM_ID_BYTES,
    STREAM_INCOMPLETE,
)
from protocol.replication import (
    COND_ABSENT,
    COND_NONE,
    COND_VERSION,
    OP_ABORT_STREAM,
    OP_CHUNK,
    OP_DELETE,
    OP_EXPIRE,
    OP_PUT,
    OP_PUT_STREAM,
    OP_REAP,
    Manifest,
    Replicate,
    WriteOp,
    chunk_key,
    encode_replication,
    slot_for_key,
)

log = structlog.get_logger("zkv.broker")

INVALID_INPUT = frozenset({ErrorCode.BAD_REQUEST, ErrorCode.UNKNOWN_COMMAND, ErrorCode.KEY_TOO_LARGE,
                           ErrorCode.VALUE_TOO_LARGE})
TAIL_ENTRIES = 512  # per slot, kept in memory for gap repair
TAIL_BYTES = 256 * 1024  # per slot (committed entries; uncommitted ones are all kept)
MAX_UNCOMMITTED_BYTES = 64 * 1024 * 1024  # per slot: writes past this backlog get UNAVAILABLE
REPAIR_RETRY = 2.0
STALLED_TRANSFER = 10.0  # s without a snapshot part before a transfer is abandoned
TICK_SECONDS = 0.1  # how often the loop calls tick()  # s before a repair that has not finished is started again
LAG_GRACE = 1.0  # s a replica may trail the slot's last write before the broker repairs it
DEDUP_MEMORY = 100_000
WRITE_OPS = frozenset({"put", "delete", "mset", "expire", "put_chunk", "put_commit", "put_abort"})
READ_OPS = frozenset({"get", "exists", "mget", "ttl"})
MAX_WATCHES = 1024
WATCH_HEARTBEAT = 1.0  # s between progress messages (events: [], with the cursor) to a watch
WATCH_EXPIRY = 10.0  # s without a keepalive before a watch is dropped
WATCH_BATCH = 1000  # events in one PARTIAL of a replay
WATCH_KINDS = {OP_PUT: "put", OP_DELETE: "delete", OP_EXPIRE: "ttl", OP_REAP: "expired", OP_PUT_STREAM: "put"}
MAX_REAPING = 100_000  # expired keys whose reaping is sequenced and not yet committed
REAP_STALE = 30.0  # s before a reaping that never committed may be sequenced again
SCAN_WATCH_OPS = ("scan", "watch")


class BadRequest(Exception):
    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(slots=True, frozen=True, order=True)
class Pos:
    seq: int = 0
    epoch: int = 0


@dataclass
class BrokerConfig:
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
    keys: int = 0
    disk_bytes: int = 0
    slots: set[int] = field(default_factory=set)  # slots it is a replica of
    learning: set[int] = field(default_factory=set)  # slots being moved to it (not replicas yet)
    draining: bool = False  # every slot is to move away from it

    def record(self) -> dict[str, Any]:
        return {"data_id": self.data_id, "state": "alive" if self.alive else "dead",
                "last_seen": self.last_seen_wall, "keys": self.keys, "disk_bytes": self.disk_bytes,
                "draining": self.draining}


@dataclass
class Request:
    id: int  # client's request number (echoed)
    identity: bytes
    cid: bytes
    op: str
    deadline: float
    keys: list[bytes]
    results: list[Any]
    outstanding: int = 0
    done: bool = False  # the current waiter has been answered (reply or error)
    committed: bool = False  # writes: every part committed; a retry gets the stored answer
    parts: list[list[int]] = field(default_factory=list)  # writes: [slot, epoch, seq]
    dedup_key: tuple[bytes, int] | None = None
    maybe_retry: bool = True  # false when the client says this is its first attempt
    cond: int = COND_NONE  # put/delete: applied only if this condition holds
    expected: int = 0  # COND_VERSION: the version the key must have
    stream: bytes = b""  # put_chunk / put_commit / put_abort / get_chunks: the stream id
    index: int = 0  # put_chunk: the chunk's index; get_chunks: the first chunk asked for
    manifest: bytes = b""  # put_commit: the encoded Manifest


@dataclass
class ReadPart:
    request: Request
    slot: int
    indices: list[int]
    need: int = 0  # highest version in the answer; released once committed >= need
    floor: int = 0  # the slot's committed seq when the part was sent: a replica below it lost the slot


@dataclass
class WriteBatch:
    request: Request
    indices: list[int]
    found: list[list[Any]] | None = None  # per op [flag, version before], from the first ACK


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
    pending: dict[int, WriteBatch] = field(default_factory=dict)
    tail: deque[TailEntry] = field(default_factory=deque)
    tail_bytes: int = 0
    # (epoch, first seq) for each broker incarnation that wrote this slot: which epoch wrote any
    # seq in the history. Persisted, so it outlives the in-memory tail and broker restarts.
    epochs: list[tuple[int, int]] = field(default_factory=list)
    recovering: bool = False
    reported: dict[str, Pos] = field(default_factory=dict)
    learners: list[str] = field(default_factory=list)  # workers a move is filling; not counted for W or reads
    # Workers whose copy of the slot is being replaced by a snapshot: until the ACK of the install
    # (carrying this transfer token; b"" = none started yet), their other ACKs for the slot describe
    # data that is gone or going, and are ignored.
    snapshot_pending: dict[str, bytes] = field(default_factory=dict)
    waiting_reads: list[ReadPart] = field(default_factory=list)  # no replica qualifies yet
    held_reads: list[ReadPart] = field(default_factory=list)  # answered, waiting for commit
    last_write: float = 0.0
    repairs: dict[str, float] = field(default_factory=dict)  # worker -> when started


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


@dataclass
class OpenStream:
    """A streamed put whose chunks are being written (docs/protocol.md §1.8). Persisted in the
    broker's LMDB so that a broker restart still aborts it if its client never comes back."""

    stream: bytes
    slot: int
    key: bytes
    last_activity: float
    sizes: dict[int, int] = field(default_factory=dict)  # chunk index -> bytes
    size: int = 0  # the sum of sizes, kept as chunks come (a sum per chunk is quadratic per stream)

    def chunk(self, index: int, size: int) -> None:
        self.size += size - self.sizes.get(index, 0)
        self.sizes[index] = size


@dataclass
class ChunkRead:
    """A get_chunks request at one worker: chunks [next, end) are still to come."""

    worker: str
    request: Request
    slot: int
    next: int
    end: int


@dataclass
class Move:
    """Slot ``slot`` gets replica ``add`` (filled as a learner) in place of ``remove``."""

    slot: int
    add: str
    remove: str
    reason: str
    started: float


@dataclass
class WorkerRead:
    worker: str
    parts: list[ReadPart]
    keys: list[tuple[int, int]]  # (part index, key index in request)


@dataclass
class Scan:
    """One scan page being gathered: every slot is asked of one replica, then the answers are
    merged in key order and held until committed."""

    id: int
    identity: bytes
    deadline: float
    prefix: bytes
    start_after: bytes | None
    limit: int
    values: bool
    now_ms: int  # the broker's clock when asked: decides which keys have expired
    waiting: set[int]  # slots not asked of any worker yet
    asked: dict[bytes, tuple[str, list[int]]] = field(default_factory=dict)  # token -> (worker, slots)
    floor: dict[int, int] = field(default_factory=dict)  # slot -> committed seq when asked
    entries: list[tuple[bytes, int, bytes, bool]] = field(default_factory=list)  # key, version, value, streamed
    bound: bytes | None = None  # an answer cut short covers keys up to here only
    need: dict[int, int] = field(default_factory=dict)  # slot -> applied seq the answer was read at
    held: bool = False
    unmet: set[int] = field(default_factory=set)  # slots not yet committed up to `need`
    done: bool = False


class WatchEventOut(NamedTuple):
    event: list[Any]  # [kind, key, slot, seq, expire_at]
    value: bytes  # its value frame (b"" but for an inline put)
    stream: dict[str, Any] | None  # a streamed put: where its chunks are (as mget's `streams`)


@dataclass
class Watch:
    identity: bytes
    id: int  # the request id of the watch: every PARTIAL and the FINAL carry it
    prefix: bytes
    n: int = 0  # PARTIALs sent; the client detects a lost one by a gap
    last_heard: float = 0.0  # the last request or keepalive from the client
    last_sent: float = 0.0


class BrokerCore:
    def __init__(self, cfg: BrokerConfig, meta: MetaStore, clock: Any = time.monotonic,
                 wall_ms: Any = None) -> None:
        self.cfg = cfg
        self.meta = meta
        self.clock = clock
        self.wall_ms = wall_ms or (lambda: int(time.time() * 1000))
        self.epoch = meta.next_epoch()
        self.out_client: list[tuple[bytes, list[bytes]]] = []
        self.out_worker: list[tuple[bytes, list[bytes]]] = []
        # Write batches of this turn per destination worker; take_replication() makes them one
        # PUB message per worker.
        self.out_replication: dict[str, list[list[bytes]]] = {}
        self.workers: dict[str, Worker] = {}
        self.by_identity: dict[bytes, str] = {}
        self.slots: dict[int, Slot] = {}
        self.requests: dict[int, Request] = {}
        self.worker_reads: dict[bytes, WorkerRead] = {}
        self.chunk_reads: dict[bytes, ChunkRead] = {}
        self.read_queue: list[ReadPart] = []  # reads of this turn of the loop, not yet sent
        self.streams: dict[bytes, OpenStream] = {}
        self.dirty_streams: dict[bytes, dict[str, Any] | None] = {}
        # put_chunk replies waiting for every in-sync replica (flow control, see _release_chunk_replies)
        self.chunk_replies: dict[int, list[tuple[int, Request]]] = {}
        self.transfers: dict[bytes, Transfer] = {}
        self.moves: dict[int, Move] = {}
        self.rebalance_requested = False
        self._targets: tuple[tuple[str, ...], dict[int, list[str]]] = ((), {})
        self.copy_budget = float(cfg.copy_rate)  # token bucket for relayed snapshot bytes
        self.throttled: list[Transfer] = []  # transfers waiting for budget before their next part
        self.dedup: OrderedDict[tuple[bytes, int], Request] = OrderedDict()
        self.cluster_id = b""
        self.last_rereplication = 0.0
        self._ids = itertools.count(1)
        self._rr = itertools.count()
        self.dirty_slots: set[int] = set()
        self.dirty_workers: set[str] = set()
        self.dirty_dedup: list[tuple[bytes, int, list[list[int]], list[Any] | None]] = []
        self.stats = {"writes_committed": 0, "reads_served": 0, "bad_requests": 0, "rejected_requests": 0,
                      "snapshots_sent": 0, "replays_sent": 0, "slots_rereplicated": 0,
                      "slots_moved": 0, "moves_abandoned": 0,
                      "streams_aborted": 0}
        self._load()
        self._init_scan_watch()

    # -- metadata -------------------------------------------------------------------------------

    def _load(self) -> None:
        cluster = self.meta.load_cluster()
        if cluster.get("formed"):
            if cluster["slots"] != self.cfg.slots or cluster["rf"] != self.cfg.rf:
                log.warning("cluster_settings_from_metadata", slots=cluster["slots"], rf=cluster["rf"])
            self.cfg.slots, self.cfg.rf = cluster["slots"], cluster["rf"]
            self.cluster_id = bytes(cluster.get("id", b""))
        for wid, info in self.meta.load_workers().items():
            self.workers[wid] = Worker(id=wid, data_id=info["data_id"], keys=info.get("keys", 0),
                                       dead_since=self.clock(), draining=bool(info.get("draining", False)),
                                       disk_bytes=info.get("disk_bytes", 0),
                                       last_seen_wall=info.get("last_seen", 0.0))
        for sid, info in self.meta.load_slots().items():
            last = Pos(info["last"][1], info["last"][0])
            slot = Slot(sid, list(info["replicas"]), last=last, committed=info["committed"],
                        epochs=[(int(e), int(q)) for e, q in info.get("epochs", [])], recovering=True)
            self.slots[sid] = slot
            for wid in slot.replicas:
                if wid in self.workers:
                    self.workers[wid].slots.add(sid)
        for stream, info in self.meta.load_streams().items():
            self.streams[stream] = OpenStream(stream, int(info["slot"]), bytes(info["key"]), self.clock())
        log.info("broker_started", epoch=self.epoch, formed=bool(self.slots), workers=len(self.workers),
                 slots=self.cfg.slots, rf=self.cfg.rf, w=self.cfg.w)

    def persist(self) -> None:
        """Write what changed this turn. Called by the loop before it sends anything."""
        if not (self.dirty_slots or self.dirty_workers or self.dirty_dedup or self.dirty_streams):
            return
        slots = {s: {"replicas": self.slots[s].replicas,
                     "last": [self.slots[s].last.epoch, self.slots[s].last.seq],
                     "committed": self.slots[s].committed,
                     "epochs": self.slots[s].epochs} for s in self.dirty_slots}
        workers = {w: self.workers[w].record() for w in self.dirty_workers}
        self.meta.write(workers=workers, slots=slots, dedup=self.dirty_dedup, streams=self.dirty_streams)
        self.dirty_streams = {}
        self.dirty_slots.clear()
        self.dirty_workers.clear()
        self.dirty_dedup = []

    # -- output helpers -------------------------------------------------------------------------

    def _to_worker(self, w: Worker, frames: list[bytes]) -> None:
        if w.identity is None:
            return
        w.last_sent = self.clock()
        self.out_worker.append((w.identity, [MDPW, *frames]))

    def _reply(self, identity: bytes, header: dict[str, Any], values: list[bytes] | None = None,
               service: bytes = SERVICE) -> None:
        self.out_client.append((identity, [MDPC, C_FINAL, service, pack(header), *(values or [])]))

    def _error(self, identity: bytes, rid: Any, code: ErrorCode, message: str, service: bytes = SERVICE) -> None:
        self.stats["bad_requests" if code in INVALID_INPUT else "rejected_requests"] += 1
        self._reply(identity, {"id": rid, "ok": False, "code": code.value, "message": message}, service=service)

    # -- clients --------------------------------------------------------------------------------

    def on_client(self, identity: bytes, frames: list[bytes]) -> None:
        if len(frames) < 3 or frames[0] != MDPC or frames[1] != C_REQUEST:
            self._error(identity, None, ErrorCode.BAD_REQUEST,
                        "expected frames [MDPC02, 0x01, service, header, *values]",
                        service=frames[2] if len(frames) >= 3 and len(frames[2]) <= 64 else SERVICE)
            return
        service = frames[2]
        if service == MMI_SERVICE:
            name = frames[3] if len(frames) > 3 else b""
            code = b"200" if name == SERVICE and self.serving() else b"404" if name == SERVICE else b"404"
            self.out_client.append((identity, [MDPC, C_FINAL, MMI_SERVICE, code]))
            return
        if service == MMI_STATUS:
            self.out_client.append((identity, [MDPC, C_FINAL, MMI_STATUS, pack(self.status())]))
            return
        if service == MMI_ADMIN:
            try:
                cmd = unpack(frames[3])
                reply = self.admin(cmd) if isinstance(cmd, dict) else {"ok": False, "message": "expected a map"}
            except Exception as e:
                reply = {"ok": False, "message": f"bad admin request: {e}"}
            self.out_client.append((identity, [MDPC, C_FINAL, MMI_ADMIN, pack(reply)]))
            return
        if service.startswith(b"mmi."):
            self.out_client.append((identity, [MDPC, C_FINAL, service, b"501"]))
            return
        if service != SERVICE:
            self._error(identity, None, ErrorCode.BAD_REQUEST, f"unknown service {service[:64]!r}",
                        service=service[:64])
            return
        rid: Any = None
        try:
            if len(frames) < 4:
                raise BadRequest(ErrorCode.BAD_REQUEST, "missing header frame")
            try:
                header = unpack(frames[3])
            except Exception as e:
                raise BadRequest(ErrorCode.BAD_REQUEST, f"header is not msgpack: {e}") from None
            if not isinstance(header, dict):
                raise BadRequest(ErrorCode.BAD_REQUEST, "header must be a msgpack map")
            rid = header.get("id")
            if not isinstance(rid, int) or isinstance(rid, bool):
                rid = None
                raise BadRequest(ErrorCode.BAD_REQUEST, "header field 'id' must be an integer")
            self._handle(identity, rid, header, frames[4:])
        except BadRequest as e:
            self._error(identity, rid, e.code, str(e))

    def _key(self, k: Any) -> bytes:
        if isinstance(k, str):
            k = k.encode()
        if not isinstance(k, bytes):
            raise BadRequest(ErrorCode.BAD_REQUEST, "keys must be bytes (msgpack bin) or strings")
        if not k:
            raise BadRequest(ErrorCode.BAD_REQUEST, "empty key")
        if len(k) > self.cfg.max_key:
            raise BadRequest(ErrorCode.KEY_TOO_LARGE, f"key of {len(k)} bytes; the limit is {self.cfg.max_key}")
        return k

    def _keys(self, header: dict[str, Any]) -> list[bytes]:
        keys = header.get("keys")
        if not isinstance(keys, list) or not keys:
            raise BadRequest(ErrorCode.BAD_REQUEST, "field 'keys' must be a non-empty list")
        if len(keys) > MAX_KEYS_PER_REQUEST:
            raise BadRequest(ErrorCode.BAD_REQUEST, f"more than {MAX_KEYS_PER_REQUEST} keys")
        return [self._key(k) for k in keys]

    def _handle(self, identity: bytes, rid: int, header: dict[str, Any], values: list[bytes]) -> None:
        op = header.get("op")
        if op in SCAN_WATCH_OPS:  # see the "scan" and "watch" sections
            self._handle_scan_watch(identity, rid, header)
            return
        if op in ("get", "exists", "delete", "put", "ttl", "expire", "put_chunk", "put_commit", "put_abort",
                  "get_chunks"):
            keys = [self._key(header.get("key"))]
        elif op in ("mget", "mset"):
            keys = self._keys(header)
        else:
            raise BadRequest(ErrorCode.UNKNOWN_COMMAND, f"unknown op {op!r}")
        if op in ("put", "mset"):
            if len(values) != len(keys):
                raise BadRequest(ErrorCode.BAD_REQUEST,
                                 f"{op} needs one value frame per key ({len(keys)}), got {len(values)}")
            total = 0
            for v in values:
                if len(v) > self.cfg.max_value:
                    raise BadRequest(ErrorCode.VALUE_TOO_LARGE,
                                     f"value of {len(v)} bytes; the limit is {self.cfg.max_value}")
                total += len(v)
            if total > self.cfg.max_value:
                raise BadRequest(ErrorCode.VALUE_TOO_LARGE,
                                 f"values of {total} bytes in one request; the limit is {self.cfg.max_value}")
        stream, index, manifest = self._stream_fields(op, header, values, keys[0])
        ttl = header.get("ttl")
        if ttl is not None and (not isinstance(ttl, int) or isinstance(ttl, bool) or not 0 < ttl <= MAX_TTL_MS):
            raise BadRequest(ErrorCode.BAD_REQUEST, f"ttl must be an integer from 1 to {MAX_TTL_MS} (milliseconds)")
        cond, expected = self._condition(op, header)
        cid = header.get("cid", b"")
        if not isinstance(cid, bytes) or len(cid) > 64:
            raise BadRequest(ErrorCode.BAD_REQUEST, "cid must be bytes of at most 64")
        if not self.slots:
            raise BadRequest(ErrorCode.UNAVAILABLE,
                             f"cluster not formed: waiting for {self.cfg.rf} workers to register")
        now = self.clock()
        req = Request(rid, identity, cid, op, now + self.cfg.request_timeout, keys, [None] * len(keys),
                      maybe_retry=header.get("retry") is not False, cond=cond, expected=expected,
                      stream=stream, index=index, manifest=manifest)
        if op in READ_OPS:
            self._start_read(req)
        elif op == "get_chunks":
            self._start_chunk_read(req, int(header.get("count", 0)))
        else:
            self._start_write(req, values, ttl)
            if op == "put_chunk":
                self._stream_chunk_sequenced(req, len(values[0]))
            elif op in ("put_commit", "put_abort"):
                self._stream_closed(stream)

    @staticmethod
    def _int_field(header: dict[str, Any], name: str, low: int, high: int) -> int:
        v = header.get(name)
        if not isinstance(v, int) or isinstance(v, bool) or not low <= v <= high:
            raise BadRequest(ErrorCode.BAD_REQUEST, f"field '{name}' must be an integer from {low} to {high}")
        return v

    def _stream_fields(self, op: str, header: dict[str, Any], values: list[bytes],
                       key: bytes) -> tuple[bytes, int, bytes]:
        """Check the fields of the streamed-value ops; (stream id, chunk index, manifest)."""
        if op not in ("put_chunk", "put_commit", "put_abort", "get_chunks"):
            return b"", 0, b""
        stream = header.get("stream")
        if not isinstance(stream, bytes) or len(stream) != STREAM_ID_BYTES:
            raise BadRequest(ErrorCode.BAD_REQUEST, f"field 'stream' must be {STREAM_ID_BYTES} bytes (bin)")
        known = self.streams.get(stream)
        if known is not None and op != "get_chunks" and key != known.key:
            # Its chunks are staged in the first key's slot; sequenced elsewhere, an abort would
            # free nothing there and the stream would be forgotten with its chunks left behind.
            raise BadRequest(ErrorCode.BAD_REQUEST, "a stream's chunks, commit and abort must all name the same key")
        max_chunks = self.cfg.max_stream  # a chunk holds at least one byte
        if op == "put_chunk":
            index = self._int_field(header, "index", 0, max_chunks - 1)
            if len(values) != 1:
                raise BadRequest(ErrorCode.BAD_REQUEST, f"put_chunk needs one value frame, got {len(values)}")
            if not 0 < len(values[0]) <= MAX_CHUNK_BYTES:
                raise BadRequest(ErrorCode.VALUE_TOO_LARGE if values[0] else ErrorCode.BAD_REQUEST,
                                 f"a chunk must hold 1 to {MAX_CHUNK_BYTES} bytes, not {len(values[0])}")
            open_ = self.streams.get(stream)
            total = (open_.size - open_.sizes.get(index, 0) if open_ else 0) + len(values[0])
            if total > self.cfg.max_stream:
                if open_ is not None:
                    self._abort_stream(open_, "over the size limit")
                raise BadRequest(ErrorCode.VALUE_TOO_LARGE,
                                 f"streamed value over {self.cfg.max_stream} bytes (--max-stream); stream aborted")
            return stream, index, b""
        if op == "put_commit":
            size = header.get("size")
            if isinstance(size, int) and not isinstance(size, bool) and size > self.cfg.max_stream:
                raise BadRequest(ErrorCode.VALUE_TOO_LARGE,
                                 f"streamed value of {size} bytes; the limit is {self.cfg.max_stream} (--max-stream)")
            size = self._int_field(header, "size", 1, self.cfg.max_stream)
            chunks = self._int_field(header, "chunks", 1, max_chunks)
            return stream, 0, Manifest(stream, chunks, size).encode()
        if op == "get_chunks":
            return stream, self._int_field(header, "first", 0, max_chunks), b""
        return stream, 0, b""

    @staticmethod
    def _condition(op: str, header: dict[str, Any]) -> tuple[int, int]:
        """The compare-and-set condition of a put or delete: if_absent, or if_version=N."""
        if_version, if_absent = header.get("if_version"), header.get("if_absent", False)
        if if_version is None and not if_absent:
            return COND_NONE, 0
        if op not in ("put", "delete", "put_commit"):
            raise BadRequest(ErrorCode.BAD_REQUEST, f"{op} takes no condition")
        if if_absent is not False and if_absent is not True:
            raise BadRequest(ErrorCode.BAD_REQUEST, "if_absent must be a boolean")
        if if_absent:
            if if_version is not None or op not in ("put", "put_commit"):
                raise BadRequest(ErrorCode.BAD_REQUEST, "if_absent goes with put alone, without if_version")
            return COND_ABSENT, 0
        if not isinstance(if_version, int) or isinstance(if_version, bool) or if_version < 1:
            raise BadRequest(ErrorCode.BAD_REQUEST, "if_version must be a positive integer (a version)")
        return COND_VERSION, if_version

    # -- writes ---------------------------------------------------------------------------------

    def live_replicas(self, slot: Slot) -> int:
        return sum(1 for w in slot.replicas
                   if self.workers.get(w) is not None and self.workers[w].alive
                   and slot.applied.get(w) is not None)

    def _start_write(self, req: Request, values: list[bytes], ttl: int | None) -> None:
        if req.cid:
            key = (req.cid, req.id)
            prior = self.dedup.get(key)
            if prior is not None:
                if prior.committed:
                    self._send_reply(prior, req.identity)
                else:
                    # Still committing (perhaps after a TIMEOUT answer): answer this retry when it does.
                    prior.identity, prior.deadline, prior.done = req.identity, req.deadline, False
                    self.requests[id(prior)] = prior
                return
            req.dedup_key = key
        by_slot: dict[int, list[int]] = {}
        for i, k in enumerate(req.keys):
            by_slot.setdefault(slot_for_key(k, self.cfg.slots), []).append(i)
        if req.cid and req.maybe_retry:  # a first attempt cannot have been sequenced before
            found = self.meta.lookup_dedup(req.cid, req.id)
            if found is not None:
                parts, results = found
                by_slot = self._settle_from_before_restart(req, parts, results, by_slot)
                if not by_slot:
                    return
        for s in by_slot:  # check every slot first: an MSET is refused whole or sent whole
            slot = self.slots[s]
            if slot.recovering:
                raise BadRequest(ErrorCode.UNAVAILABLE, f"slot {s} is recovering after a broker restart")
            live = self.live_replicas(slot)
            if live < self.cfg.w:
                raise BadRequest(ErrorCode.NOT_ENOUGH_REPLICAS,
                                 f"slot {s} has {live} live replicas; writes need {self.cfg.w}")
            if slot.tail_bytes > MAX_UNCOMMITTED_BYTES:
                raise BadRequest(ErrorCode.UNAVAILABLE,
                                 f"slot {s} has {slot.tail_bytes >> 20} MiB of writes not yet committed; retry")
        now_ms = self.wall_ms()
        expire_at = now_ms + ttl if ttl else 0
        for s, idx in by_slot.items():
            slot = self.slots[s]
            ops, vals = self._write_ops(req, idx, values, expire_at)
            seq = self._publish(slot, ops, vals, now_ms)
            slot.pending[seq] = WriteBatch(req, idx)
            req.parts.append([s, self.epoch, seq])
            req.outstanding += 1
        if req.dedup_key:
            self.dedup[req.dedup_key] = req
            if len(self.dedup) > DEDUP_MEMORY:
                self.dedup.popitem(last=False)
            self.dirty_dedup.append((req.cid, req.id, req.parts, None))
        self.requests[id(req)] = req

    @staticmethod
    def _write_ops(req: Request, idx: list[int], values: list[bytes],
                   expire_at: int) -> tuple[list[WriteOp], list[bytes]]:
        """The replicated ops (and their value frames) of one slot's share of a write request."""
        if req.op == "put_chunk":
            return [WriteOp(OP_CHUNK, chunk_key(req.stream, req.index))], [values[0]]
        if req.op == "put_abort":
            return [WriteOp(OP_ABORT_STREAM, req.stream)], [b""]
        if req.op == "put_commit":
            return [WriteOp(OP_PUT_STREAM, req.keys[0], expire_at, req.cond, req.expected)], [req.manifest]
        if req.op == "delete":
            return [WriteOp(OP_DELETE, req.keys[i], 0, req.cond, req.expected) for i in idx], [b""] * len(idx)
        if req.op == "expire":
            return [WriteOp(OP_EXPIRE, req.keys[i], expire_at) for i in idx], [b""] * len(idx)
        return ([WriteOp(OP_PUT, req.keys[i], expire_at, req.cond, req.expected) for i in idx],
                [values[i] for i in idx])

    def _sequence_unanswered(self, slot: Slot, op: str, ops: list[WriteOp]) -> int:
        """A write the broker decides on its own (aborting a stream its client left, reaping
        expired keys): sequenced, replicated and committed like any other, answered to nobody.
        The caller has checked that the slot can take writes. Returns its seq."""
        req = Request(0, b"", b"", op, float("inf"), [o.key for o in ops], [None] * len(ops),
                      outstanding=1, done=True)
        seq = self._publish(slot, ops, [b""] * len(ops), self.wall_ms())
        slot.pending[seq] = WriteBatch(req, list(range(len(ops))))
        req.parts.append([slot.id, self.epoch, seq])
        return seq

    def _settle_from_before_restart(self, req: Request, parts: list[list[int]], results: list[Any] | None,
                                    by_slot: dict[int, list[int]]) -> dict[int, list[int]]:
        """A retried write that an earlier broker incarnation sequenced (found in the persisted
        de-duplication entries). Parts that are in the slot's committed history are done; parts
        that did not survive the restart (their seq is not in the history with their epoch) must
        be applied now: returns those slots' key indices, and answers the request if none is left."""
        todo: dict[int, list[int]] = {}
        survived: list[list[int]] = []
        for s, epoch, seq in parts:
            slot = self.slots.get(s)
            if slot is None or slot.recovering:
                raise BadRequest(ErrorCode.UNAVAILABLE, f"slot {s} is recovering after a broker restart")
            if seq <= slot.last.seq and self._epoch_of(slot, seq) == epoch:
                if seq > slot.committed:
                    raise BadRequest(ErrorCode.UNAVAILABLE, "an earlier attempt of this write is committing")
                survived.append([s, epoch, seq])
            elif s in by_slot:
                todo[s] = by_slot[s]
        req.parts = survived
        if todo:
            return todo
        if results is None and self._answer_depends_on_replicas(req):
            # The answer (did the key exist, did the condition hold) is stored when the write
            # commits; the broker died in between. Never guess: a plain delete says "applied,
            # existence unknown"; a conditional write or TTL change cannot even say whether it
            # took effect, which is what TIMEOUT means.
            if req.op != "delete" or req.cond != COND_NONE:
                raise BadRequest(ErrorCode.TIMEOUT, "the outcome of the earlier attempt was not recorded")
            results = [[None, 0]]
        req.done = req.committed = True
        req.results = results if results is not None else [True] * len(req.keys)
        self._send_reply(req, req.identity)
        return {}

    def _publish(self, slot: Slot, ops: list[WriteOp], values: list[bytes], now_ms: int) -> int:
        seq = slot.last.seq + 1
        if not slot.epochs or slot.epochs[-1][0] != self.epoch:
            slot.epochs.append((self.epoch, seq))
        rep = Replicate(slot.id, self.epoch, seq, slot.last.epoch, slot.committed, now_ms, ops, values)
        frames = rep.frames()
        entry = TailEntry(seq, self.epoch, slot.last.epoch, frames, sum(len(f) for f in frames))
        for wid in slot.replicas + slot.learners:
            w = self.workers.get(wid)
            if w is not None and w.alive:
                self.out_replication.setdefault(wid, []).append(frames)
        slot.tail.append(entry)
        slot.tail_bytes += entry.size
        # Trim only what is committed: an uncommitted write may be on no replica at all yet (a
        # PUB message lost to every subscriber), and then the tail is the only copy that can
        # repair them. _start_write bounds the uncommitted backlog instead.
        while (len(slot.tail) > 1 and slot.tail[0].seq <= slot.committed
               and (len(slot.tail) > TAIL_ENTRIES or slot.tail_bytes > TAIL_BYTES)):
            slot.tail_bytes -= slot.tail.popleft().size
        slot.last = Pos(seq, self.epoch)
        slot.last_write = self.clock()
        self.dirty_slots.add(slot.id)
        return seq

    def _advance_commit(self, slot: Slot) -> None:
        seqs = sorted((p.seq for w, p in slot.applied.items() if p is not None and w in slot.replicas),
                      reverse=True)
        if len(seqs) < self.cfg.w:
            return
        new = min(seqs[self.cfg.w - 1], slot.last.seq)
        if new <= slot.committed:
            return
        slot.committed = new
        self.dirty_slots.add(slot.id)
        self._after_commit(slot, new)
        while slot.pending:
            seq = next(iter(slot.pending))
            if seq > new:
                break
            batch = slot.pending.pop(seq)
            self.stats["writes_committed"] += 1
            req = batch.request
            if batch.found is not None:
                for i, f in zip(batch.indices, batch.found, strict=False):
                    req.results[i] = f
            else:
                for i in batch.indices:
                    req.results[i] = True
            req.outstanding -= 1
            if req.outstanding == 0:
                req.committed = True
                if req.dedup_key and self._answer_depends_on_replicas(req):
                    # What a retry after a broker restart must answer: what the replicas found.
                    self.dirty_dedup.append((req.cid, req.id, req.parts, req.results))
                if req.op == "put_chunk" and not req.done:
                    self.chunk_replies.setdefault(slot.id, []).append((seq, req))
                elif not req.done:
                    req.done = True
                    self._send_reply(req, req.identity)
        if slot.held_reads:
            ready = [p for p in slot.held_reads if p.need <= new]
            slot.held_reads = [p for p in slot.held_reads if p.need > new]
            for p in ready:
                self._read_part_done(p)

    def _release_chunk_replies(self, slot: Slot) -> None:
        """Answer committed chunk writes once every live, in-sync replica has applied them too.
        The client sends a new chunk only when an earlier one is answered, so this keeps a slow
        replica within the client's window of chunks: streamed data never piles up in the PUB
        queue of the broker or the receive queue of a worker. A replica that dies or falls out
        of sync (it is then repaired) stops holding the stream back."""
        waiting = self.chunk_replies.get(slot.id, [])
        in_sync = [p.seq for w, p in slot.applied.items()
                   if p is not None and w in slot.replicas and w not in slot.snapshot_pending
                   and w not in slot.repairs and self.workers.get(w) is not None and self.workers[w].alive]
        floor = min(in_sync, default=slot.committed)
        keep = []
        for seq, req in waiting:
            if req.done:
                continue
            if seq <= floor:
                req.done = True
                self._send_reply(req, req.identity)
            else:
                keep.append((seq, req))
        if keep:
            self.chunk_replies[slot.id] = keep
        else:
            self.chunk_replies.pop(slot.id, None)

    @staticmethod
    def _answer_depends_on_replicas(req: Request) -> bool:
        return req.op in ("delete", "expire", "put_commit") or req.cond != COND_NONE

    def _send_reply(self, req: Request, identity: bytes) -> None:
        self.requests.pop(id(req), None)
        if req.op == "put_commit" and req.results[0][0] == STREAM_INCOMPLETE:
            self._reply(identity, {"id": req.id, "ok": False, "code": ErrorCode.STREAM_INCOMPLETE.value,
                                   "message": "the stream's chunks are not all there (aborted after being idle "
                                              "or cut short?); nothing was written"})
        elif req.op in ("put", "delete", "put_commit") and req.cond != COND_NONE and not req.results[0][0]:
            version = req.results[0][1] or None
            self._reply(identity, {"id": req.id, "ok": False, "code": ErrorCode.CONDITION_FAILED.value,
                                   "message": "the condition did not hold; nothing was written",
                                   "version": version})
        elif req.op in ("put", "put_commit"):
            self._reply(identity, {"id": req.id, "ok": True, "version": req.parts[0][2]})
        elif req.op == "put_chunk":
            self._reply(identity, {"id": req.id, "ok": True, "index": req.index})
        elif req.op == "put_abort":
            self._reply(identity, {"id": req.id, "ok": True})
        elif req.op == "delete":
            existed = req.results[0][0]
            self._reply(identity, {"id": req.id, "ok": True, "deleted": None if existed is None else bool(existed)})
        elif req.op == "expire":
            self._reply(identity, {"id": req.id, "ok": True, "applied": bool(req.results[0][0]),
                                   "version": req.parts[0][2] if req.results[0][0] else None})
        elif req.op == "ttl":
            found, _version, _value, expire_at = req.results[0][:4]
            hdr = {"id": req.id, "ok": True, "found": found}
            if found:
                hdr["ttl"] = max(expire_at - self.wall_ms(), 0) if expire_at else None
            self._reply(identity, hdr)
        elif req.op == "mset":
            self._reply(identity, {"id": req.id, "ok": True, "count": len(req.keys)})
        elif req.op == "get":
            found, version, value, _ = req.results[0][:4]
            hdr = {"id": req.id, "ok": True, "found": found}
            if found:
                hdr["version"] = version
            if found and self._streamed(req.results[0]):
                hdr["stream"] = self._manifest_field(value)
                self._reply(identity, hdr)
            else:
                self._reply(identity, hdr, [value] if found else [])
        elif req.op == "exists":
            self._reply(identity, {"id": req.id, "ok": True, "exists": req.results[0][0]})
        elif req.op == "mget":
            hdr = {"id": req.id, "ok": True, "found": [r[0] for r in req.results],
                   "versions": [r[1] if r[0] else 0 for r in req.results]}
            streams = {i: self._manifest_field(r[2]) for i, r in enumerate(req.results) if r[0] and self._streamed(r)}
            if streams:
                hdr["streams"] = streams
            self._reply(identity, hdr, [r[2] if r[0] and i not in streams else b""
                                        for i, r in enumerate(req.results)])

    @staticmethod
    def _streamed(result: tuple[Any, ...]) -> bool:
        return len(result) > 4 and bool(result[4])

    @staticmethod
    def _manifest_field(value: bytes) -> dict[str, Any]:
        """How a reply describes a streamed value (read it with get_chunks)."""
        m = Manifest.decode(value)
        return {"stream": m.stream, "chunks": m.chunks, "size": m.size}

    # -- reads ----------------------------------------------------------------------------------

    def _start_read(self, req: Request) -> None:
        by_slot: dict[int, list[int]] = {}
        for i, k in enumerate(req.keys):
            by_slot.setdefault(slot_for_key(k, self.cfg.slots), []).append(i)
        for s in by_slot:
            if self.slots[s].recovering:
                raise BadRequest(ErrorCode.UNAVAILABLE, f"slot {s} is recovering after a broker restart")
        parts = [ReadPart(req, s, idx) for s, idx in by_slot.items()]
        req.outstanding = len(parts)
        self.requests[id(req)] = req
        # Dispatched at the end of the loop's turn (end_turn), together with every other read
        # of the turn: one REQUEST per worker carries them all, one LMDB transaction answers them.
        self.read_queue.extend(parts)

    def take_replication(self) -> list[list[bytes]]:
        """The replication messages to publish now: one per worker that has writes to apply."""
        out = [encode_replication(wid, batches) for wid, batches in self.out_replication.items()]
        self.out_replication = {}
        return out

    def end_turn(self) -> None:
        """The loop has handled every message it drained: send the reads gathered meanwhile."""
        if self.read_queue:
            parts, self.read_queue = self.read_queue, []
            self._dispatch_reads(parts)

    def _qualifies(self, slot: Slot, wid: str) -> bool:
        w = self.workers.get(wid)
        p = slot.applied.get(wid)
        return w is not None and w.alive and p is not None and p.seq >= slot.committed

    def _dispatch_reads(self, parts: list[ReadPart]) -> None:
        per_worker: dict[str, list[ReadPart]] = {}
        for part in parts:
            if part.request.done:
                continue
            slot = self.slots[part.slot]
            cands = [w for w in slot.replicas if self._qualifies(slot, w)]
            if not cands:
                if not any(self.workers.get(w) and self.workers[w].alive for w in slot.replicas):
                    self._fail(part.request, ErrorCode.UNAVAILABLE,
                               f"no live replica of slot {part.slot}")
                else:
                    slot.waiting_reads.append(part)
                continue
            wid = cands[next(self._rr) % len(cands)]
            part.floor = slot.committed
            per_worker.setdefault(wid, []).append(part)
        now_ms = self.wall_ms()
        for wid, wparts in per_worker.items():
            keys: list[tuple[int, int]] = []
            wire_keys = []
            for pi, part in enumerate(wparts):
                for i in part.indices:
                    keys.append((pi, i))
                    wire_keys.append([part.slot, part.request.keys[i]])
            token = next(self._ids).to_bytes(8, "big")
            self.worker_reads[token] = WorkerRead(wid, wparts, keys)
            op = "exists" if all(p.request.op in ("exists", "ttl") for p in wparts) else "get"
            self._to_worker(self.workers[wid], [W_REQUEST, token, b"",
                                                pack({"op": op, "keys": wire_keys, "now": now_ms})])

    def _on_read_reply(self, wid: str, token: bytes, body: list[bytes]) -> None:
        wr = self.worker_reads.get(token)
        if wr is None or wr.worker != wid:
            return  # (an answer from another worker must not cancel the outstanding read)
        del self.worker_reads[token]
        hdr = unpack(body[0])
        if not hdr.get("ok"):
            log.error("worker_read_failed", worker=wid, code=hdr.get("code"), message=hdr.get("message"))
            if len(wr.parts) > 1:
                # Reads of several requests shared this REQUEST: ask again for each on its own, so
                # that whatever failed fails only its own request.
                for part in wr.parts:
                    self._dispatch_reads([part])
                return
            self._fail(wr.parts[0].request, ErrorCode.INTERNAL, f"worker {wid}: {hdr.get('message')}")
            return
        values = body[1:]
        streamed = hdr.get("streamed") or [False] * len(wr.keys)
        applied = {int(s): int(q) for s, q in hdr.get("applied", [])}
        # A replica that holds less of a slot than was committed when it was asked has lost the
        # slot meanwhile (a move finished and it dropped it): its answer is void, ask another.
        lost = [p for p in wr.parts if p.slot in applied and applied[p.slot] < p.floor]
        void = {id(p) for p in lost}
        for n, (pi, i) in enumerate(wr.keys):
            part = wr.parts[pi]
            if id(part) in void:
                continue
            found, version = hdr["found"][n], hdr["versions"][n]
            part.request.results[i] = (found, version, values[n] if found else b"", hdr["expire"][n], streamed[n])
            part.need = max(part.need, version)
        if lost:
            log.info("read_redirected", worker=wid, slots=sorted({p.slot for p in lost}))
            self.read_queue.extend(lost)
        for part in wr.parts:
            if id(part) in void:
                continue
            slot = self.slots[part.slot]
            if part.need > slot.committed:
                slot.held_reads.append(part)  # seen on this replica, not yet committed
            else:
                self._read_part_done(part)

    def _read_part_done(self, part: ReadPart) -> None:
        req = part.request
        if req.done:
            return
        req.outstanding -= 1
        if req.outstanding == 0:
            req.done = True
            self.stats["reads_served"] += 1
            self._send_reply(req, req.identity)

    def _fail(self, req: Request, code: ErrorCode, message: str) -> None:
        if req.done:
            return
        req.done = True
        self.requests.pop(id(req), None)
        self._error(req.identity, req.id, code, message)

    # -- streamed values ------------------------------------------------------------------------

    def _stream_chunk_sequenced(self, req: Request, size: int) -> None:
        open_ = self.streams.get(req.stream)
        if open_ is None:
            slot = slot_for_key(req.keys[0], self.cfg.slots)
            open_ = self.streams[req.stream] = OpenStream(req.stream, slot, req.keys[0], self.clock())
            self.dirty_streams[req.stream] = {"slot": slot, "key": req.keys[0]}
        open_.chunk(req.index, size)
        open_.last_activity = self.clock()

    def _stream_closed(self, stream: bytes) -> None:
        if self.streams.pop(stream, None) is not None:
            self.dirty_streams[stream] = None

    def _abort_stream(self, open_: OpenStream, why: str) -> None:
        """Sequence the abort of a stream its client left (or that went over the limit): every
        replica frees its staged chunks. Retried on the next tick if the slot cannot take writes."""
        slot = self.slots[open_.slot]
        if slot.recovering or self.live_replicas(slot) < self.cfg.w:
            log.info("stream_abort_deferred", stream=open_.stream.hex(), slot=open_.slot)
            open_.last_activity = self.clock()
            return
        self._sequence_unanswered(slot, "put_abort", [WriteOp(OP_ABORT_STREAM, open_.stream)])
        log.info("stream_aborted", stream=open_.stream.hex(), slot=open_.slot, bytes=open_.size, why=why)
        self.stats["streams_aborted"] += 1
        self._stream_closed(open_.stream)

    def _start_chunk_read(self, req: Request, count: int) -> None:
        if not isinstance(count, int) or isinstance(count, bool) or not 0 < count <= MAX_CHUNKS_PER_READ:
            raise BadRequest(ErrorCode.BAD_REQUEST, f"field 'count' must be an integer from 1 to {MAX_CHUNKS_PER_READ}")
        s = slot_for_key(req.keys[0], self.cfg.slots)
        if self.slots[s].recovering:
            raise BadRequest(ErrorCode.UNAVAILABLE, f"slot {s} is recovering after a broker restart")
        self.requests[id(req)] = req
        self._dispatch_chunk_read(req, req.index, req.index + count)

    def _dispatch_chunk_read(self, req: Request, first: int, end: int) -> None:
        """Ask one replica for chunks [first, end). Any replica that applied everything committed
        has every chunk of a committed value, and chunks never change: no hold-back is needed."""
        if req.done:
            return
        s = slot_for_key(req.keys[0], self.cfg.slots)
        slot = self.slots[s]
        cands = [w for w in slot.replicas if self._qualifies(slot, w)]
        if not cands:
            self._fail(req, ErrorCode.UNAVAILABLE, f"no replica of slot {s} can serve reads now")
            return
        wid = cands[next(self._rr) % len(cands)]
        token = next(self._ids).to_bytes(8, "big")
        self.chunk_reads[token] = ChunkRead(wid, req, s, first, end)
        self._to_worker(self.workers[wid], [W_REQUEST, token, b"", pack(
            {"op": "chunks", "slot": s, "stream": req.stream, "first": first, "count": end - first})])

    def _on_chunk(self, wid: str, token: bytes, body: list[bytes]) -> None:
        cr = self.chunk_reads.get(token)
        if cr is None or cr.worker != wid or len(body) != 2:
            return
        index = int(unpack(body[0])["index"])
        if index != cr.next or cr.request.done:
            return
        cr.next += 1
        req = cr.request
        self.out_client.append((req.identity, [MDPC, C_PARTIAL, SERVICE, pack({"id": req.id, "index": index}),
                                               body[1]]))

    def _on_chunks_done(self, wid: str, token: bytes, body: list[bytes]) -> None:
        cr = self.chunk_reads.get(token)
        if cr is None or cr.worker != wid:
            return
        del self.chunk_reads[token]
        req = cr.request
        hdr = unpack(body[0])
        if not hdr.get("ok"):
            self._fail(req, ErrorCode.BAD_REQUEST, f"worker {wid}: {hdr.get('message')}")
            return
        if req.done:
            return
        req.done = True
        self.requests.pop(id(req), None)
        self.stats["reads_served"] += 1
        # Fewer chunks than asked: the value ends there, or it was replaced (the client knows
        # the chunk count from the manifest and tells the two apart).
        self._reply(req.identity, {"id": req.id, "ok": True, "next": cr.next})

    # -- workers --------------------------------------------------------------------------------

    def on_worker(self, identity: bytes, frames: list[bytes]) -> None:
        if len(frames) < 2 or frames[0] != MDPW:
            log.warning("bad_worker_message", frames=len(frames))
            return
        cmd, body = frames[1], frames[2:]
        if cmd == W_READY:
            try:
                self._on_ready(identity, body)
            except Exception as e:
                log.warning("bad_ready", error=str(e))
                self.out_worker.append((identity, [MDPW, W_DISCONNECT]))
            return
        wid = self.by_identity.get(identity)
        if wid is None:
            if cmd != W_DISCONNECT:
                # A worker we do not know (we restarted, or it was declared dead): make it re-register.
                self.out_worker.append((identity, [MDPW, W_DISCONNECT]))
            return
        w = self.workers[wid]
        w.last_seen = self.clock()
        w.last_seen_wall = time.time()
        try:
            if cmd == W_ACK:
                self._on_ack(w, unpack(body[0]))
            elif cmd == W_FINAL and body[0] in self.scan_tokens:
                self._on_scan_reply(wid, body[0], body[2:])
            elif cmd == W_FINAL:
                if body[0] in self.chunk_reads:
                    self._on_chunks_done(wid, body[0], body[2:])
                else:
                    self._on_read_reply(wid, body[0], body[2:])
            elif cmd == W_PARTIAL:
                self._on_chunk(wid, body[0], body[2:])
            elif cmd == W_HEARTBEAT:
                if body:
                    st = unpack(body[0])
                    w.keys, w.disk_bytes = int(st.get("keys", 0)), int(st.get("disk_bytes", 0))
                    w.applied, w.commits = int(st.get("applied", 0)), int(st.get("commits", 0))
                    if "clock_ms" in st:
                        w.clock_offset_ms = int(st["clock_ms"]) - self.wall_ms()
            elif cmd == W_NACK:
                info = unpack(body[0])
                self._on_nack(w, int(info["slot"]), Pos(int(info["seq"]), int(info["epoch"])))
            elif cmd == W_SNAPSHOT_PART:
                self._on_snapshot_part(w, body)
            elif cmd == W_EXPIRED:
                self._on_expired_report(w, unpack(body[0]))
            elif cmd == W_DISCONNECT:
                self._worker_lost(w, "disconnected")
            else:
                log.warning("unexpected_worker_command", worker=wid, command=cmd.hex())
                self._to_worker(w, [W_DISCONNECT])
                self._worker_lost(w, "protocol error")
        except Exception as e:
            log.warning("bad_worker_message", worker=wid, command=cmd.hex(), error=str(e))

    def _on_ready(self, identity: bytes, body: list[bytes]) -> None:
        if len(body) < 2 or body[0] != SERVICE:
            raise ValueError("READY must name service 'kv' and carry an info frame")
        info = unpack(body[1])
        wid = str(info["id"])
        data_id, process = bytes(info["data_id"]), bytes(info.get("process", b""))
        w = self.workers.get(wid)
        if w is not None and w.alive and w.identity != identity and w.data_id != data_id:
            log.error("duplicate_worker_id_refused", worker=wid,
                      detail="a live worker with this id holds other data")
            self.out_worker.append((identity, [MDPW, W_DISCONNECT]))
            return
        if w is None:
            w = self.workers[wid] = Worker(id=wid)
        if w.identity is not None and w.identity != identity:
            self.by_identity.pop(w.identity, None)
            self._worker_lost(w, "replaced by a new connection")
        if w.data_id and w.data_id != data_id:
            log.warning("worker_data_replaced", worker=wid,
                        detail="same id, different data directory: its slots are re-filled")
        w.data_id, w.process, w.identity, w.alive = data_id, process, identity, True
        w.last_seen, w.last_seen_wall = self.clock(), time.time()
        w.keys, w.disk_bytes = int(info.get("keys", 0)), int(info.get("disk_bytes", 0))
        self.by_identity[identity] = wid
        self.dirty_workers.add(wid)
        reported = {int(s): Pos(int(q), int(e)) for s, e, q in info.get("positions", [])}
        log.info("worker_ready", worker=wid, slots_with_data=len(reported))
        if not self.slots:
            self._maybe_form_cluster()
            return
        self._send_assign(w)
        for s in w.slots:
            self._take_position(self.slots[s], wid, reported.get(s, Pos()))

    def _maybe_form_cluster(self) -> None:
        alive = sorted(w.id for w in self.workers.values() if w.alive)
        need = max(self.cfg.rf, self.cfg.initial_workers)
        if len(alive) < need:
            log.info("waiting_for_workers", alive=len(alive), need=need)
            return
        placement = slot_map(self.cfg.slots, alive, self.cfg.rf)
        for s, reps in placement.items():
            slot = Slot(s, reps)
            for wid in reps:
                slot.applied[wid] = Pos()
                self.workers[wid].slots.add(s)
            self.slots[s] = slot
        self.meta.write(slots={s: {"replicas": sl.replicas, "last": [0, 0], "committed": 0}
                               for s, sl in self.slots.items()},
                        workers={w: self.workers[w].record() for w in alive}, durable=True)
        self.cluster_id = uuid.uuid4().bytes
        self.meta.save_cluster({"formed": True, "slots": self.cfg.slots, "rf": self.cfg.rf, "id": self.cluster_id})
        log.info("cluster_formed", workers=alive, slots=self.cfg.slots, rf=self.cfg.rf)
        for wid in alive:
            self._send_assign(self.workers[wid])

    def _send_assign(self, w: Worker) -> None:
        self._to_worker(w, [W_ASSIGN, pack({"slots": sorted(w.slots | w.learning), "epoch": self.epoch,
                                            "cluster": self.cluster_id})])

    @staticmethod
    def _epoch_of(slot: Slot, seq: int) -> int | None:
        """The epoch that wrote ``seq`` in the slot's history (None if unknown)."""
        found = None
        for epoch, first in slot.epochs:
            if first > seq:
                break
            found = epoch
        return found

    def _in_history(self, slot: Slot, pos: Pos) -> bool:
        """Is this replica position a prefix of the broker's history of the slot? Replicas apply a
        write only on top of the position it names, so equal (epoch, seq) means equal history."""
        if pos.seq == 0 or pos == slot.last:
            return True
        if pos.seq > slot.last.seq:
            return False
        return self._epoch_of(slot, pos.seq) == pos.epoch

    def _take_position(self, slot: Slot, wid: str, pos: Pos) -> None:
        """A replica told us where it is (READY after a restart or reconnect)."""
        if slot.recovering:
            slot.reported[wid] = pos
            self._try_recover(slot)
            return
        slot.applied[wid] = pos if self._in_history(slot, pos) else None
        slot.snapshot_pending.pop(wid, None)  # READY reports what is on its disk now
        slot.repairs.pop(wid, None)
        if slot.applied[wid] != slot.last:
            self._repair(slot, wid)

    def _try_recover(self, slot: Slot) -> None:
        """After a broker restart: serve the slot again once enough replicas have reported that
        every acknowledged write is among them (RF - W + 1 of them: any W overlap with those)."""
        need = max(1, len(slot.replicas) - self.cfg.w + 1)
        if len(slot.reported) < need:
            return
        everyone = len(slot.reported) >= len(slot.replicas)
        # Only positions on the persisted history count: a replica past it holds writes that an
        # earlier incarnation published but never committed and a later one already truncated (or
        # reused the seqs of). Adopting one would resurrect a refused write or drop acknowledged ones.
        valid = {w: p for w, p in slot.reported.items() if self._in_history(slot, p)}
        if not valid:
            if not everyone:
                return
            log.error("slot_history_unknown", slot=slot.id, detail="no replica matches the broker's "
                      "metadata (lost or restored from an old copy?): taking the most advanced replica",
                      last=[slot.last.epoch, slot.last.seq], epochs=slot.epochs,
                      reported={w: [p.epoch, p.seq] for w, p in slot.reported.items()})
            valid = dict(slot.reported)
        best = max(valid.values())
        if best.seq < slot.committed:
            if not everyone:
                return  # the replicas that hold the committed writes have not reported yet
            log.error("slot_lost_committed_writes", slot=slot.id, committed=slot.committed, best=best.seq)
            # The seqs above best.seq will be reused for other writes: no watch cursor past it
            # means anything any more.
            for w in list(self.watches.values()):
                self._watch_resync(w, f"slot {slot.id} lost committed writes (recovered at seq {best.seq})")
        slot.last = best
        slot.epochs = [(e, q) for e, q in slot.epochs if q <= best.seq]
        if best.seq and self._epoch_of(slot, best.seq) != best.epoch:
            # Only after a power loss ate the broker's unsynced metadata: trust the replicas.
            log.warning("slot_epoch_history_rebuilt", slot=slot.id, epoch=best.epoch, seq=best.seq)
            slot.epochs = [(best.epoch, 1)]
        slot.recovering = False
        log.debug("slot_recovered", slot=slot.id, last=[best.epoch, best.seq], committed=slot.committed,
                  reported={w: [p.epoch, p.seq] for w, p in slot.reported.items()}, valid=sorted(valid))
        for wid, pos in slot.reported.items():
            slot.applied[wid] = pos if wid in valid and pos.seq <= best.seq else None
        slot.reported.clear()
        self.dirty_slots.add(slot.id)
        self._advance_commit(slot)
        for wid, pos in list(slot.applied.items()):
            if pos != best and self.workers.get(wid) and self.workers[wid].alive:
                self._repair(slot, wid)

    def _on_ack(self, w: Worker, ack: dict[str, Any]) -> None:
        snap = bytes(ack.get("snap") or b"")
        for s, e, q in ack.get("pos", []):
            slot = self.slots.get(int(s))
            if slot is None or slot.recovering or (w.id not in slot.replicas and w.id not in slot.learners):
                continue
            pos = Pos(int(q), int(e))
            pending = slot.snapshot_pending.get(w.id)
            if pending is not None:
                if not snap or snap != pending:
                    continue  # an ACK about the copy the snapshot replaces
                del slot.snapshot_pending[w.id]
                slot.applied[w.id] = pos if self._in_history(slot, pos) else None  # may be lower
                continue
            if not (pos.epoch == self.epoch and pos.seq <= slot.last.seq) and not self._in_history(slot, pos):
                slot.applied[w.id] = None
                continue
            cur = slot.applied.get(w.id)
            if cur is None or pos.seq > cur.seq:
                slot.applied[w.id] = pos
            if pos == slot.last:
                slot.repairs.pop(w.id, None)
        for s, q, found in ack.get("res", []):
            slot = self.slots.get(int(s))
            if slot is not None:
                batch = slot.pending.get(int(q))
                if batch is not None and batch.found is None:
                    batch.found = [list(f) for f in found]
        for s, _e, _q in ack.get("pos", []):
            slot = self.slots.get(int(s))
            if slot is not None and not slot.recovering:
                self._advance_commit(slot)
                if slot.id in self.chunk_replies:
                    self._release_chunk_replies(slot)
                move = self.moves.get(slot.id)
                if move is not None and move.add == w.id:
                    self._maybe_finish_move(move)
                if slot.waiting_reads:
                    waiting, slot.waiting_reads = slot.waiting_reads, []
                    self._dispatch_reads(waiting)

    def _on_nack(self, w: Worker, s: int, pos: Pos) -> None:
        slot = self.slots.get(s)
        if slot is None or slot.recovering or (w.id not in slot.replicas and w.id not in slot.learners):
            return
        # A NACK says where the replica is stuck, not what it has on disk: it never raises `applied`.
        if w.id not in slot.snapshot_pending and not self._in_history(slot, pos):
            slot.applied[w.id] = None
        self._repair(slot, w.id, force=True)

    def _repair(self, slot: Slot, wid: str, force: bool = False) -> None:
        """Bring one replica up to the slot's last write: replay the tail if it reaches back far
        enough, otherwise a snapshot from an up-to-date replica."""
        now = self.clock()
        started = slot.repairs.get(wid)
        if started is not None and now - started < (REPAIR_RETRY / 4 if force else REPAIR_RETRY):
            return
        w = self.workers.get(wid)
        if w is None or not w.alive:
            return
        pos = slot.applied.get(wid)
        if pos is not None and pos.seq < slot.last.seq and slot.tail and slot.tail[0].seq <= pos.seq + 1:
            entries = [e for e in slot.tail if e.seq > pos.seq]
            if entries[0].seq == pos.seq + 1 and entries[0].prev_epoch == pos.epoch:
                slot.repairs[wid] = now
                for e in entries:
                    self._to_worker(w, [W_REPLAY, *e.frames])
                self.stats["replays_sent"] += len(entries)
                return
        if pos is not None and pos == slot.last:
            return
        if any(t.slot == slot.id and t.receiver == wid for t in self.transfers.values()):
            return  # a snapshot is on its way (a stalled one is abandoned by the tick)
        donors = [d for d in slot.replicas if d != wid and self.workers.get(d) and self.workers[d].alive
                  and slot.applied.get(d) is not None and slot.applied[d].seq >= slot.committed]
        if not donors:
            log.warning("no_snapshot_donor", slot=slot.id, worker=wid)
            slot.repairs[wid] = now
            return
        donor = max(donors, key=lambda d: slot.applied[d])
        token = next(self._ids).to_bytes(8, "big")
        t = Transfer(token, slot.id, donor, wid, started=now, last_activity=now)
        self.transfers[token] = t
        slot.repairs[wid] = now
        slot.applied[wid] = None  # its data is being replaced; it counts again once installed
        slot.snapshot_pending[wid] = token
        self.stats["snapshots_sent"] += 1
        log.info("snapshot_transfer", slot=slot.id, to=wid, donor=donor)
        if self.copy_budget >= 0:
            self._request_part(t)
        else:
            self.throttled.append(t)

    def _request_part(self, t: Transfer) -> None:
        self._to_worker(self.workers[t.donor], [W_SNAPSHOT_REQUEST,
                                                pack({"slot": t.slot, "token": t.token, "part": t.next_part})])

    def _on_snapshot_part(self, donor: Worker, body: list[bytes]) -> None:
        hdr = unpack(body[0])
        t = self.transfers.get(bytes(hdr["token"]))
        if t is None or t.donor != donor.id:
            return
        if hdr.get("error") or int(hdr.get("part", -1)) != t.next_part:
            log.warning("snapshot_transfer_failed", slot=t.slot, donor=t.donor, error=hdr.get("error"))
            self._end_transfer(t)
            return
        w = self.workers.get(t.receiver)
        if w is None or not w.alive:
            self._end_transfer(t)
            return
        self._to_worker(w, [W_SNAPSHOT_DELIVER, *body])
        now = self.clock()
        size = sum(len(f) for f in body)
        t.last_activity = now
        t.keys += (len(body) - 1) // 2
        t.bytes += size
        if t.next_part == 0:
            t.total_keys, t.total_bytes = int(hdr.get("total_keys", 0)), int(hdr.get("total_bytes", 0))
        t.next_part += 1
        self.copy_budget -= size
        if hdr.get("last"):
            del self.transfers[t.token]
            return
        if self.copy_budget >= 0:
            self._request_part(t)
        else:
            self.throttled.append(t)

    def _end_transfer(self, t: Transfer) -> None:
        self.transfers.pop(t.token, None)
        if t in self.throttled:
            self.throttled.remove(t)
        slot = self.slots.get(t.slot)
        if slot is not None:
            slot.repairs.pop(t.receiver, None)  # the tick starts another one

    def _worker_lost(self, w: Worker, why: str) -> None:
        if not w.alive:
            return
        log.warning("worker_lost", worker=w.id, reason=why)
        w.alive = False
        w.dead_since = self.clock()
        if w.identity is not None:
            self.by_identity.pop(w.identity, None)
        w.identity = None
        self.dirty_workers.add(w.id)
        redo: list[ReadPart] = []
        for token, wr in list(self.worker_reads.items()):
            if wr.worker == w.id:
                del self.worker_reads[token]
                redo.extend(wr.parts)
        for token, cr in list(self.chunk_reads.items()):
            if cr.worker == w.id:
                del self.chunk_reads[token]
                self._dispatch_chunk_read(cr.request, cr.next, cr.end)  # the rest, from another replica
        for slot_id in list(self.chunk_replies):
            self._release_chunk_replies(self.slots[slot_id])
        for t in list(self.transfers.values()):
            if w.id in (t.receiver, t.donor):
                self._end_transfer(t)
        for move in list(self.moves.values()):
            if move.add == w.id:
                self._abandon_move(move, f"target {w.id} lost")
        for s in w.slots:
            self.slots[s].repairs.pop(w.id, None) if s in self.slots else None
        if redo:
            self._dispatch_reads(redo)
        self._scan_worker_lost(w.id)

    # -- time -----------------------------------------------------------------------------------

    def _rereplicate(self, now: float) -> None:
        """Give the slots of workers dead for longer than the grace period new replicas: the best
        placed live worker not yet holding the slot, filled by snapshot from a healthy replica.
        The dead worker is told to drop those slots if it ever comes back."""
        alive = [w.id for w in self.workers.values() if w.alive]
        changed: set[str] = set()
        for dead in self.workers.values():
            if dead.alive or not dead.slots or now - dead.dead_since < self.cfg.grace:
                continue
            for s in sorted(dead.slots):
                slot = self.slots[s]
                if slot.recovering or s in self.moves:
                    continue
                spare = [w for w in replicas_for_slot(s, alive, len(alive))
                         if w not in slot.replicas and not self.workers[w].draining]
                if not spare:
                    continue
                new = spare[0]
                slot.replicas[slot.replicas.index(dead.id)] = new
                slot.applied.pop(dead.id, None)
                slot.applied[new] = None  # counts toward W once the snapshot is installed
                slot.snapshot_pending[new] = b""
                slot.repairs.pop(new, None)
                dead.slots.discard(s)
                self.workers[new].slots.add(s)
                self.dirty_slots.add(s)
                changed.add(new)
                self.stats["slots_rereplicated"] += 1
                log.info("slot_rereplicated", slot=s, dead=dead.id, to=new)
        if not changed:
            return
        self.persist()
        self.meta.sync()  # the new slot map is durable before any worker acts on it
        for wid in sorted(changed):
            w = self.workers[wid]
            self._send_assign(w)
            for s in w.slots:
                if self.slots[s].applied.get(wid) is None:
                    self._repair(self.slots[s], wid)

    # -- membership: moves, drain, remove, rebalance ---------------------------------------------

    def members(self, now: float) -> list[str]:
        """Workers the placement aims at: not draining, and alive or dead for less than the grace
        period (a brief death must not move data; re-replication handles a long one)."""
        return sorted(w.id for w in self.workers.values()
                      if not w.draining and (w.alive or now - w.dead_since < self.cfg.grace))

    def target(self, s: int, members: list[str]) -> list[str]:
        key = tuple(members)
        if self._targets[0] != key:  # placement only changes when membership does
            self._targets = (key, slot_map(self.cfg.slots, members, self.cfg.rf))
        return self._targets[1][s]

    def misplaced(self, now: float) -> list[int]:
        members = self.members(now)
        if len(members) < self.cfg.rf:
            return []
        return [s for s, slot in self.slots.items() if set(slot.replicas) != set(self.target(s, members))]

    def _plan_moves(self, now: float) -> None:
        """Start moves toward the target placement, a few at a time: always away from draining
        workers; toward other workers when auto-rebalance is on or a rebalance was asked for."""
        if not self.slots or any(sl.recovering for sl in self.slots.values()):
            return
        members = self.members(now)
        if len(members) < self.cfg.rf:
            return
        for s, slot in self.slots.items():
            if len(self.moves) >= self.cfg.move_concurrency:
                return
            if s in self.moves:
                continue
            target = self.target(s, members)
            removes = [w for w in slot.replicas if w not in target]
            adds = [w for w in target if w not in slot.replicas and self.workers[w].alive]
            if not removes or not adds:
                continue
            draining = [w for w in removes if self.workers[w].draining]
            if not (draining or self.cfg.auto_rebalance or self.rebalance_requested):
                continue
            remove = (draining or removes)[0]
            self._start_move(Move(s, adds[0], remove, "drain" if draining else "rebalance", now))
        if self.rebalance_requested and not self.moves and not self.misplaced(now):
            self.rebalance_requested = False

    def _start_move(self, move: Move) -> None:
        slot = self.slots[move.slot]
        self.moves[move.slot] = move
        slot.learners.append(move.add)
        slot.applied[move.add] = None
        slot.snapshot_pending[move.add] = b""  # it may still hold (and ACK) a copy it is dropping
        slot.repairs.pop(move.add, None)
        w = self.workers[move.add]
        w.learning.add(move.slot)
        self._send_assign(w)
        log.info("move_started", slot=move.slot, add=move.add, remove=move.remove, reason=move.reason)
        self._repair(slot, move.add)

    def _maybe_finish_move(self, move: Move) -> None:
        """Switch ownership once the new replica has everything committed: one metadata change,
        fsynced; no write waits for it (pending writes commit on the new replica set)."""
        slot = self.slots[move.slot]
        p = slot.applied.get(move.add)
        if p is None or p.seq < slot.committed or move.remove not in slot.replicas:
            if move.remove not in slot.replicas:
                self._abandon_move(move, "replica set changed")
            return
        slot.replicas[slot.replicas.index(move.remove)] = move.add
        slot.learners.remove(move.add)
        slot.applied.pop(move.remove, None)
        slot.snapshot_pending.pop(move.remove, None)
        add, remove = self.workers[move.add], self.workers[move.remove]
        add.learning.discard(move.slot)
        add.slots.add(move.slot)
        remove.slots.discard(move.slot)
        del self.moves[move.slot]
        self.dirty_slots.add(move.slot)
        self.persist()
        self.meta.sync()  # the new owner is durable before the old one drops its copy
        self.stats["slots_moved"] += 1
        log.info("move_finished", slot=move.slot, add=move.add, remove=move.remove,
                 seconds=round(self.clock() - move.started, 3))
        self._send_assign(add)
        self._send_assign(remove)
        self._plan_moves(self.clock())  # keep the pipeline of moves full

    def _abandon_move(self, move: Move, why: str) -> None:
        slot = self.slots[move.slot]
        if move.add in slot.learners:
            slot.learners.remove(move.add)
        slot.applied.pop(move.add, None)
        slot.snapshot_pending.pop(move.add, None)
        w = self.workers.get(move.add)
        if w is not None:
            w.learning.discard(move.slot)
            if w.alive:
                self._send_assign(w)
        for t in list(self.transfers.values()):
            if t.slot == move.slot and t.receiver == move.add:
                self._end_transfer(t)
        self.moves.pop(move.slot, None)
        self.stats["moves_abandoned"] += 1
        log.warning("move_abandoned", slot=move.slot, add=move.add, remove=move.remove, reason=why)

    def admin(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Operator commands (service mmi.admin): drain, undrain, remove, rebalance, move."""
        op, wid = cmd.get("cmd"), cmd.get("worker")
        now = self.clock()
        if op == "rebalance":
            if not self.slots:
                return {"ok": False, "message": "the cluster has not formed yet"}
            self.rebalance_requested = True
            self._plan_moves(now)
            return {"ok": True, "message": f"{len(self.misplaced(now))} slots to move"}
        if op == "move":
            return self._admin_move(cmd, now)
        w = self.workers.get(str(wid))
        if w is None:
            return {"ok": False, "message": f"no worker {wid!r}"}
        if op == "drain":
            others = [m for m in self.members(now) if m != w.id]
            if len(others) < self.cfg.rf:
                return {"ok": False, "message": f"draining {w.id} would leave {len(others)} workers; RF is "
                                                f"{self.cfg.rf}: add a worker first"}
            w.draining = True
            self.dirty_workers.add(w.id)
            self._plan_moves(now)
            return {"ok": True, "message": f"draining {w.id}: {len(w.slots)} slots to move"}
        if op == "undrain":
            w.draining = False
            self.dirty_workers.add(w.id)
            return {"ok": True, "message": f"{w.id} takes slots again"}
        if op == "remove":
            if w.slots or w.learning:
                return {"ok": False, "message": f"{w.id} still holds {len(w.slots)} slots: drain it first"}
            if w.alive:
                return {"ok": False, "message": f"{w.id} is still running: stop it first"}
            del self.workers[w.id]
            self.dirty_workers.discard(w.id)
            self.meta.delete_worker(w.id)
            log.info("worker_removed", worker=w.id)
            return {"ok": True, "message": f"{w.id} removed"}
        return {"ok": False, "message": f"unknown admin command {op!r}"}

    def _admin_move(self, cmd: dict[str, Any], now: float) -> dict[str, Any]:
        """Move one replica of one slot by hand (tests shuffle slots this way). With auto-rebalance
        on, the planner later moves it back where placement wants it."""
        s, src, dst = cmd.get("slot"), str(cmd.get("from")), str(cmd.get("to"))
        slot = self.slots.get(s) if isinstance(s, int) else None
        if slot is None or slot.recovering:
            return {"ok": False, "message": f"no serving slot {s!r}"}
        if s in self.moves:
            return {"ok": False, "message": f"slot {s} is already moving"}
        if src not in slot.replicas:
            return {"ok": False, "message": f"{src} does not hold slot {s}"}
        target = self.workers.get(dst)
        if target is None or not target.alive or dst in slot.replicas or target.draining:
            return {"ok": False, "message": f"{dst} cannot take slot {s} (unknown, dead, draining or holds it)"}
        self._start_move(Move(s, dst, src, "manual", now))
        return {"ok": True, "message": f"moving slot {s} from {src} to {dst}"}

    def moves_status(self) -> list[dict[str, Any]]:
        now = self.clock()
        out = []
        for m in sorted(self.moves.values(), key=lambda m: m.slot):
            t = next((t for t in self.transfers.values() if t.slot == m.slot and t.receiver == m.add), None)
            elapsed = max(now - m.started, 1e-6)
            copied = t.bytes if t else 0
            rate = copied / elapsed
            left = max((t.total_bytes if t else 0) - copied, 0)
            out.append({"slot": m.slot, "from": m.remove, "to": m.add, "reason": m.reason,
                        "keys_copied": t.keys if t else 0, "keys_total": t.total_keys if t else 0,
                        "bytes_copied": copied, "bytes_total": t.total_bytes if t else 0,
                        "rate_bytes_per_s": round(rate), "eta_s": round(left / rate, 1) if rate > 0 else None,
                        "state": "copying" if t else "catching up", "elapsed_s": round(elapsed, 3)})
        return out

    def tick(self) -> None:
        now = self.clock()
        if now - self.last_rereplication >= 1.0:
            self.last_rereplication = now
            self._rereplicate(now)
            self._plan_moves(now)
            for t in list(self.transfers.values()):
                if now - t.last_activity > STALLED_TRANSFER:
                    log.warning("snapshot_transfer_stalled", slot=t.slot, donor=t.donor, to=t.receiver)
                    self._end_transfer(t)
        self.copy_budget = min(self.copy_budget + self.cfg.copy_rate * TICK_SECONDS, float(self.cfg.copy_rate))
        while self.throttled and self.copy_budget >= 0:
            self._request_part(self.throttled.pop(0))
        for stream in [o for o in self.streams.values() if now - o.last_activity > self.cfg.stream_idle]:
            self._abort_stream(stream, f"no chunk for {self.cfg.stream_idle:.0f}s")
        for slot_id in list(self.chunk_replies):
            self._release_chunk_replies(self.slots[slot_id])
        expiry = self.cfg.heartbeat * self.cfg.liveness
        hb = [W_HEARTBEAT, pack({"now": self.wall_ms()})]
        for w in self.workers.values():
            if not w.alive:
                continue
            if now - w.last_seen > expiry:
                self._worker_lost(w, f"silent for {now - w.last_seen:.1f}s")
                continue
            if now - w.last_sent >= self.cfg.heartbeat:
                self._to_worker(w, hb)
        for req in list(self.requests.values()):
            if not req.done and now > req.deadline:
                what = "write not acknowledged by enough replicas in time; it may still be applied" \
                    if req.op in WRITE_OPS else "read not answered in time"
                self._fail(req, ErrorCode.TIMEOUT, what)
        for slot in self.slots.values():
            if slot.waiting_reads:
                slot.waiting_reads = [p for p in slot.waiting_reads if not p.request.done]
            if slot.held_reads:
                slot.held_reads = [p for p in slot.held_reads if not p.request.done]
            if slot.recovering:
                continue
            for wid in slot.replicas + slot.learners:
                p = slot.applied.get(wid)
                if (p is None or p.seq < slot.last.seq) and now - slot.last_write > LAG_GRACE:
                    self._repair(slot, wid)
            move = self.moves.get(slot.id)
            if move is not None:
                self._maybe_finish_move(move)
        self._scan_watch_tick(now)

    # -- status ---------------------------------------------------------------------------------

    def serving(self) -> bool:
        return bool(self.slots) and any(w.alive for w in self.workers.values())

    def _behind(self, w: Worker) -> int:
        """Slots of this worker that have not applied everything committed (or await a snapshot)."""
        n = 0
        for s in w.slots:
            slot = self.slots.get(s)
            if slot is not None:
                p = slot.applied.get(w.id)
                n += p is None or p.seq < slot.committed
        return n

    def status(self) -> dict[str, Any]:
        now_wall = time.time()
        under = [s.id for s in self.slots.values() if s.recovering or self.live_replicas(s) < len(s.replicas)]
        return {
            "epoch": self.epoch,
            "formed": bool(self.slots),
            "slots": self.cfg.slots,
            "rf": self.cfg.rf,
            "w": self.cfg.w,
            "max_value": self.cfg.max_value,
            "max_stream": self.cfg.max_stream,
            "workers": [
                {"id": w.id, "state": "alive" if w.alive else "dead",
                 "last_heartbeat_ago": round(now_wall - w.last_seen_wall, 3) if w.last_seen_wall else None,
                 "slots": len(w.slots), "keys": w.keys, "disk_bytes": w.disk_bytes,
                 "behind_slots": self._behind(w), "clock_offset_ms": w.clock_offset_ms,
                 "applied": w.applied, "commits": w.commits, "draining": w.draining,
                 "learning": len(w.learning)}
                for w in sorted(self.workers.values(), key=lambda w: w.id)
            ],
            "under_replicated_slots": under,
            "recovering_slots": sum(1 for s in self.slots.values() if s.recovering),
            "committed_writes": sum(s.committed for s in self.slots.values()),
            "moves": self.moves_status(),
            "misplaced_slots": len(self.misplaced(self.clock())),
            "open_streams": len(self.streams),
            **self.stats,
        }

    # -- scan and watch: shared -----------------------------------------------------------------

    def _init_scan_watch(self) -> None:
        self.scans: dict[int, Scan] = {}  # by id(scan)
        self.scan_tokens: dict[bytes, Scan] = {}  # worker request token -> its scan
        self.watches: dict[tuple[bytes, int], Watch] = {}  # by (client identity, request id)
        # Per slot, the committed seq up to which watches have been given events. Committed seqs are
        # never reused (a new epoch only reuses seqs that never committed), so a slot's seq names
        # one committed write for ever: a cursor of these survives broker restarts.
        self.watch_seq: dict[int, int] = {s: sl.committed for s, sl in self.slots.items()}
        # Per slot, seq -> what the replicas found, for committed batches whose effect depends on
        # it (conditional writes, deletes, TTL changes, reaps); kept as long as the tail has the batch.
        self.watch_results: dict[int, dict[int, list[list[Any]]]] = {}
        # Per slot, keys whose reaping is sequenced: key -> (seq, when), so repeated reports of
        # the same expired key are not sequenced again while the first reaping commits.
        self.reaping: dict[int, dict[bytes, tuple[int, float]]] = {}

    def _handle_scan_watch(self, identity: bytes, rid: int, header: dict[str, Any]) -> None:
        if header.get("op") == "scan":
            self._start_scan(identity, rid, header)
        else:
            self._on_watch(identity, rid, header)

    def _bytes_field(self, header: dict[str, Any], name: str, default: bytes | None) -> bytes | None:
        """A bin/str field of at most the key size (prefix, start_after); may be empty."""
        v = header.get(name, default)
        if v is None:
            return None
        if isinstance(v, str):
            v = v.encode()
        if not isinstance(v, bytes):
            raise BadRequest(ErrorCode.BAD_REQUEST, f"{name} must be bytes (msgpack bin) or a string")
        if len(v) > self.cfg.max_key:
            raise BadRequest(ErrorCode.KEY_TOO_LARGE, f"{name} of {len(v)} bytes; the limit is {self.cfg.max_key}")
        return v

    def _prefix_field(self, header: dict[str, Any]) -> bytes:
        """``prefix`` of a scan or watch: bin/str, empty if absent; nil is not a prefix."""
        prefix = self._bytes_field(header, "prefix", b"")
        if prefix is None:
            raise BadRequest(ErrorCode.BAD_REQUEST, "prefix must be bytes (msgpack bin) or a string, not nil")
        return prefix

    def _serving_all_slots(self) -> None:
        if not self.slots:
            raise BadRequest(ErrorCode.UNAVAILABLE,
                             f"cluster not formed: waiting for {self.cfg.rf} workers to register")
        recovering = [s for s, sl in self.slots.items() if sl.recovering]
        if recovering:
            raise BadRequest(ErrorCode.UNAVAILABLE,
                             f"{len(recovering)} slots recovering after a broker restart (slot {recovering[0]}, ...)")

    def _after_commit(self, slot: Slot, new: int) -> None:
        """Slot ``slot`` committed up to ``new`` (called before its pending writes are answered):
        keep what replicas found, end reapings, give watches their events, release held scans."""
        prev = self.watch_seq.get(slot.id, 0)
        if new <= prev:
            return
        self.watch_seq[slot.id] = new
        results = self.watch_results.setdefault(slot.id, {})
        for seq, batch in slot.pending.items():
            if seq > new:
                break
            if batch.found is not None:
                results[seq] = batch.found
        floor = slot.tail[0].seq if slot.tail else new + 1
        while results:  # seqs were added in increasing order: drop what left the tail
            q = next(iter(results))
            if q >= floor:
                break
            del results[q]
        reaping = self.reaping.get(slot.id)
        if reaping:
            for key in [k for k, (q, _) in reaping.items() if q <= new]:
                del reaping[key]
        if self.watches:
            self._watch_deliver(slot, prev, new)
        if self.scans:
            for scan in list(self.scans.values()):
                if slot.id in scan.unmet and slot.committed >= scan.need[slot.id]:
                    scan.unmet.discard(slot.id)
                    self._maybe_finish_scan(scan)

    def _scan_watch_tick(self, now: float) -> None:
        for scan in list(self.scans.values()):
            if now > scan.deadline:
                self._fail_scan(scan, ErrorCode.TIMEOUT, "scan not answered in time")
            elif scan.waiting:
                self._dispatch_scan(scan)
        cursor = None  # the same for every watch this turn: built once
        for key, w in list(self.watches.items()):
            if now - w.last_heard > WATCH_EXPIRY:
                del self.watches[key]
                log.info("watch_expired", watch=w.id, silent_s=round(now - w.last_heard, 1))
            elif now - w.last_sent >= WATCH_HEARTBEAT:
                cursor = cursor or self._cursor()
                self._watch_send(w, [], with_cursor=True, cursor=cursor)
        for reaping in self.reaping.values():
            for key in [k for k, (_, t) in reaping.items() if now - t > REAP_STALE]:
                del reaping[key]  # never committed (replicas lost): sequence it again when reported

    # -- scan -----------------------------------------------------------------------------------

    def _start_scan(self, identity: bytes, rid: int, header: dict[str, Any]) -> None:
        prefix = self._prefix_field(header)
        start_after = self._bytes_field(header, "start_after", None)
        limit = header.get("limit", DEFAULT_SCAN_LIMIT)
        if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= MAX_SCAN_LIMIT:
            raise BadRequest(ErrorCode.BAD_REQUEST, f"limit must be an integer from 1 to {MAX_SCAN_LIMIT}")
        values = header.get("values", True)
        if values is not True and values is not False:
            raise BadRequest(ErrorCode.BAD_REQUEST, "values must be a boolean")
        self._serving_all_slots()
        scan = Scan(rid, identity, self.clock() + self.cfg.request_timeout, prefix, start_after, limit, values,
                    self.wall_ms(), waiting=set(self.slots))
        self.scans[id(scan)] = scan
        self._dispatch_scan(scan)

    def _dispatch_scan(self, scan: Scan) -> None:
        """Ask, for every slot not asked yet, one replica that has applied everything committed
        (the read rule); one request per worker for all the slots it answers. A slot whose live
        replicas are all behind waits (the tick tries again); one with no live replica fails."""
        per_worker: dict[str, list[int]] = {}
        for s in sorted(scan.waiting):
            slot = self.slots[s]
            cands = [w for w in slot.replicas if self._qualifies(slot, w)]
            if cands:
                per_worker.setdefault(cands[next(self._rr) % len(cands)], []).append(s)
            elif not any(self.workers.get(w) and self.workers[w].alive for w in slot.replicas):
                self._fail_scan(scan, ErrorCode.UNAVAILABLE, f"no live replica of slot {s}")
                return
        for wid, slots in per_worker.items():
            scan.waiting.difference_update(slots)
            token = next(self._ids).to_bytes(8, "big")
            scan.asked[token] = (wid, slots)
            for s in slots:
                scan.floor[s] = self.slots[s].committed
            self.scan_tokens[token] = scan
            self._to_worker(self.workers[wid], [W_REQUEST, token, b"", pack(
                {"op": "scan", "slots": slots, "prefix": scan.prefix, "start_after": scan.start_after,
                 "limit": scan.limit, "now": scan.now_ms, "values": scan.values, "max_bytes": SCAN_MAX_BYTES})])

    def _on_scan_reply(self, wid: str, token: bytes, body: list[bytes]) -> None:
        scan = self.scan_tokens.get(token)
        try:
            self._take_scan_reply(wid, token, body)
        except Exception as e:  # a malformed answer fails the page now, not at its timeout
            if scan is not None and not scan.done:
                log.error("worker_scan_answer_malformed", worker=wid, error=str(e))
                self._fail_scan(scan, ErrorCode.INTERNAL, f"worker {wid}: malformed scan answer")

    def _take_scan_reply(self, wid: str, token: bytes, body: list[bytes]) -> None:
        scan = self.scan_tokens.pop(token)
        asked = scan.asked.pop(token, None)
        if asked is None or scan.done:
            return
        if asked[0] != wid:
            scan.asked[token], self.scan_tokens[token] = asked, scan
            return
        hdr = unpack(body[0])
        keys, values = [bytes(k) for k in hdr.get("keys", [])], body[1:]
        if not hdr.get("ok") or (scan.values and len(values) != len(keys)):
            log.error("worker_scan_failed", worker=wid, code=hdr.get("code"), message=hdr.get("message"))
            self._fail_scan(scan, ErrorCode.INTERNAL, f"worker {wid}: {hdr.get('message', 'bad scan answer')}")
            return
        applied = {int(s): int(q) for s, q in hdr["applied"]}
        # A replica that applied less than was committed when it was asked has lost the slot in
        # between (a move finished, a snapshot is replacing it): its part of the answer is void.
        lost = {s for s in asked[1] if applied.get(s, 0) < scan.floor.get(s, 0)}
        entries = zip(keys, hdr["versions"], values if scan.values else [b""] * len(keys),
                      hdr.get("streamed") or [False] * len(keys), strict=True)
        scan.entries.extend(e for e in entries if not lost or slot_for_key(e[0], self.cfg.slots) not in lost)
        if not hdr["complete"] and keys:
            scan.bound = keys[-1] if scan.bound is None else min(scan.bound, keys[-1])
        for s in asked[1]:
            if s not in lost:
                scan.need[s] = applied.get(s, 0)
        if lost:
            scan.waiting.update(lost)
            self._dispatch_scan(scan)
        self._maybe_finish_scan(scan)

    def _maybe_finish_scan(self, scan: Scan) -> None:
        """Answer once every slot is answered and committed up to the state it was read at, so a
        page shows no write that could still be lost and misses none that was acknowledged."""
        if scan.done or scan.asked or scan.waiting:
            return
        if not scan.held:
            scan.held = True
            scan.unmet = {s for s, q in scan.need.items() if self.slots[s].committed < q}
        if scan.unmet:
            return
        entries = sorted(scan.entries, key=lambda e: e[0])
        if scan.bound is not None:
            # Some worker stopped early: keys above the last one it sent may be missing from this page.
            entries = entries[:bisect.bisect_right([e[0] for e in entries], scan.bound)]
        page: list[tuple[bytes, int, bytes, bool]] = []
        size = 0
        for e in entries:
            if len(page) >= scan.limit or (page and size + len(e[0]) + len(e[2]) > SCAN_MAX_BYTES):
                break
            page.append(e)
            size += len(e[0]) + len(e[2])
        more = scan.bound is not None or len(page) < len(entries)
        self._end_scan(scan)
        self.stats["scans_served"] = self.stats.get("scans_served", 0) + 1
        hdr: dict[str, Any] = {"id": scan.id, "ok": True, "keys": [e[0] for e in page],
                               "versions": [e[1] for e in page], "more": more}
        streams = {i: self._manifest_field(e[2]) for i, e in enumerate(page) if e[3]}
        if streams:
            hdr["streams"] = streams  # as in mget: read those values with get_chunks
        self._reply(scan.identity, hdr,
                    [b"" if e[3] else e[2] for e in page] if scan.values else [])

    def _end_scan(self, scan: Scan) -> None:
        scan.done = True
        self.scans.pop(id(scan), None)
        for token in scan.asked:
            self.scan_tokens.pop(token, None)

    def _fail_scan(self, scan: Scan, code: ErrorCode, message: str) -> None:
        if not scan.done:
            self._end_scan(scan)
            self._error(scan.identity, scan.id, code, message)

    def _scan_worker_lost(self, wid: str) -> None:
        """Slots asked of a worker that died are asked again of another replica (as reads are)."""
        redo: list[Scan] = []
        for token, scan in list(self.scan_tokens.items()):
            asked = scan.asked.get(token)
            if asked is not None and asked[0] == wid:
                del scan.asked[token], self.scan_tokens[token]
                scan.waiting.update(asked[1])
                redo.append(scan)
        for scan in redo:
            if not scan.done:
                self._dispatch_scan(scan)

    # -- watch ----------------------------------------------------------------------------------

    def _cursor(self) -> dict[str, Any]:
        return {"c": self.cluster_id, "s": [self.watch_seq.get(s, 0) for s in range(self.cfg.slots)]}

    def _on_watch(self, identity: bytes, rid: int, header: dict[str, Any]) -> None:
        key = (identity, rid)
        now = self.clock()
        if header.get("cancel") is True:
            w = self.watches.pop(key, None)
            self._reply(identity, {"id": rid, "ok": True, "cancelled": w is not None})
            return
        if header.get("keepalive") is True:
            w = self.watches.get(key)
            if w is None:
                raise BadRequest(ErrorCode.UNAVAILABLE,
                                 "no such watch (it expired or the broker restarted): open it again with since")
            w.last_heard = now
            return
        prefix = self._prefix_field(header)
        since = header.get("since")
        if since is not None:
            seqs = since.get("s") if isinstance(since, dict) else None
            if not (isinstance(since, dict) and isinstance(since.get("c"), bytes) and isinstance(seqs, list)
                    and all(isinstance(q, int) and not isinstance(q, bool) and q >= 0 for q in seqs)):
                raise BadRequest(ErrorCode.BAD_REQUEST, "since must be a cursor {c: bin, s: [int, ...]} from a watch")
        self._serving_all_slots()
        if key not in self.watches and len(self.watches) >= MAX_WATCHES:
            raise BadRequest(ErrorCode.UNAVAILABLE, f"too many watches ({MAX_WATCHES}); try again later")
        w = Watch(identity, rid, prefix, last_heard=now)
        self.watches[key] = w
        if since is None:
            self._watch_send(w, [], with_cursor=True)
            return
        if since["c"] != self.cluster_id or len(since["s"]) != self.cfg.slots:
            self._watch_resync(w, "the cursor is from another cluster")
            return
        events: list[WatchEventOut] = []
        for s, after in enumerate(since["s"]):
            upto = self.watch_seq.get(s, 0)
            if after == upto:
                continue
            got = self._slot_events(self.slots[s], after, upto) if after < upto else None
            if got is None:
                self._watch_resync(w, f"slot {s}: the broker no longer holds the changes after seq {after}")
                return
            events += [ev for ev in got[0] if ev.event[1].startswith(prefix)]
            if any(k.startswith(prefix) for k in got[1]):
                self._watch_resync(w, f"slot {s}: the outcome of a change is unknown")
                return
        for i in range(0, len(events), WATCH_BATCH):
            self._watch_send(w, events[i:i + WATCH_BATCH], with_cursor=False)
        self._watch_send(w, [], with_cursor=True)

    def _slot_events(self, slot: Slot, after: int, upto: int) -> tuple[list[WatchEventOut], list[bytes]] | None:
        """The committed changes of ``slot`` with seq in (after, upto], from the tail: events
        ``[kind, key, slot, seq, expire_at]`` with their value frames (and, for a streamed value,
        its manifest field instead), and the keys whose outcome is unknown (what the replicas
        found was not kept). None if the tail does not reach back."""
        entries = [e for e in slot.tail if after < e.seq <= upto]
        if len(entries) != upto - after or (entries and entries[0].seq != after + 1):
            return None
        results = self.watch_results.get(slot.id, {})
        out: list[WatchEventOut] = []
        unknown: list[bytes] = []
        for e in entries:
            ops = unpack(e.frames[0])[6]
            found = results.get(e.seq)
            for i, (code, key, expire_at, cond, _expected) in enumerate(ops):
                if code in (OP_CHUNK, OP_ABORT_STREAM):
                    continue  # a streamed value's parts: its commit (OP_PUT_STREAM) is the change
                if code in (OP_PUT, OP_DELETE) and cond == COND_NONE:
                    happened = True  # a delete of a missing key is reported too: the key is gone
                elif found is None or code not in WATCH_KINDS:  # (an op this code does not describe)
                    unknown.append(bytes(key))
                    continue
                elif code == OP_PUT_STREAM:
                    flag = found[i][0]  # STREAM_INCOMPLETE: nothing written; else as for a put
                    happened = flag != STREAM_INCOMPLETE and (cond == COND_NONE or flag is True)
                else:
                    happened = bool(found[i][0])
                if happened:
                    value = e.frames[1 + i]
                    streamed = code == OP_PUT_STREAM
                    out.append(WatchEventOut([WATCH_KINDS[code], bytes(key), slot.id, e.seq, expire_at],
                                             value if code == OP_PUT else b"",
                                             self._manifest_field(value) if streamed else None))
        return out, unknown

    def _watch_deliver(self, slot: Slot, prev: int, new: int) -> None:
        got = self._slot_events(slot, prev, new)
        for w in list(self.watches.values()):
            if got is None:
                self._watch_resync(w, f"slot {slot.id}: changes left the broker's tail before they committed")
                continue
            if any(k.startswith(w.prefix) for k in got[1]):
                self._watch_resync(w, f"slot {slot.id}: the outcome of a change is unknown")
                continue
            mine = [ev for ev in got[0] if ev.event[1].startswith(w.prefix)]
            if mine:
                self._watch_send(w, mine, with_cursor=False)

    def _watch_send(self, w: Watch, events: list[WatchEventOut], with_cursor: bool,
                    cursor: dict[str, Any] | None = None) -> None:
        w.n += 1
        w.last_sent = self.clock()
        hdr: dict[str, Any] = {"id": w.id, "ok": True, "n": w.n, "events": [ev.event for ev in events]}
        streams = {i: ev.stream for i, ev in enumerate(events) if ev.stream is not None}
        if streams:
            hdr["streams"] = streams
        if with_cursor:
            hdr["cursor"] = cursor or self._cursor()
        self.out_client.append((w.identity, [MDPC, C_PARTIAL, SERVICE, pack(hdr), *(ev.value for ev in events)]))

    def _watch_resync(self, w: Watch, why: str) -> None:
        """End the watch with the resync signal: the client re-reads (scan) and watches again from
        the cursor given here."""
        self.watches.pop((w.identity, w.id), None)
        log.info("watch_resync", watch=w.id, reason=why)
        self._reply(w.identity, {"id": w.id, "ok": True, "resync": True, "message": why, "cursor": self._cursor()})

    # -- expiry through the log -----------------------------------------------------------------

    def _on_expired_report(self, w: Worker, info: dict[str, Any]) -> None:
        """A replica found keys whose TTL ran out. Sequence their deletion (OP_REAP, only if the
        key still has that version and expire_at), so every replica deletes them at the same
        place in the slot's order and watches report them."""
        now_ms, now = self.wall_ms(), self.clock()
        by_slot: dict[int, list[WriteOp]] = {}
        pending = sum(len(r) for r in self.reaping.values())
        for s, key, version, expire_at in info.get("keys", []):
            slot = self.slots.get(int(s))
            # Only a replica that applied everything committed: one that lags (slow, repaired,
            # restarted from an old copy) may still hold keys whose reap already committed, and
            # its reports would sequence the same reaps again and again.
            if (slot is None or slot.recovering or not self._qualifies(slot, w.id) or w.id not in slot.replicas
                    or not 0 < int(expire_at) <= now_ms):
                continue
            key = bytes(key)
            if key in self.reaping.get(slot.id, {}) or pending >= MAX_REAPING:
                continue
            pending += 1
            by_slot.setdefault(slot.id, []).append(WriteOp(OP_REAP, key, int(expire_at), COND_VERSION, int(version)))
        for s, ops in by_slot.items():
            slot = self.slots[s]
            if self.live_replicas(slot) < self.cfg.w:
                continue
            seq = self._sequence_unanswered(slot, "reap", ops)
            reaping = self.reaping.setdefault(s, {})
            for o in ops:
                reaping[o.key] = (seq, now)
