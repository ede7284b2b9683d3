"""Streamed values (docs/protocol.md §1.8): open streams, the chunk credit of uploads, chunk reads
of downloads, and aborting streams their clients left.

A chunk is an ordinary write (broker/writes.py sequences it); this part keeps what is particular
to streams: which streams are open (persisted, so a broker restart still aborts an abandoned one),
when a committed chunk may be answered, and which replica sends which chunks of a download.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import structlog

from broker.events import ChunkCommitted, ReplicaAdvanced, WorkerLost
from broker.messages import Invalid, KvRequest, Unavailable
from broker.replies import partial, reply
from broker.requests import Request, RequestTable
from broker.sequencer import sequence_unanswered
from broker.state import BrokerState, Slot
from broker.worker_messages import Answer
from protocol.errors import ErrorCode
from protocol.frames import W_REQUEST, pack, unpack
from protocol.replication import OP_ABORT_STREAM, WriteOp, slot_for_key

log = structlog.get_logger("zkv.broker")

ABORTED_MEMORY = 10_000  # aborted stream ids remembered, so that a late chunk cannot re-open one


@dataclass
class OpenStream:
    """A streamed put whose chunks are being written."""

    stream: bytes
    slot: int
    key: bytes
    last_activity: float
    identity: bytes = b""  # the client connection that opened it (b"": restored after a restart)
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


class Streams:
    def __init__(self, state: BrokerState, requests: RequestTable, restored: dict[bytes, dict[str, Any]]) -> None:
        self.state = state
        self.requests = requests
        self.open: dict[bytes, OpenStream] = {
            stream: OpenStream(stream, int(info["slot"]), bytes(info["key"]), state.clock())
            for stream, info in restored.items()}
        # put_chunk answers waiting for every in-sync replica, per slot: [(seq, request)]
        self.chunk_replies: dict[int, list[tuple[int, Request]]] = {}
        self.chunk_reads: dict[bytes, ChunkRead] = {}  # by request token
        # Aborted streams -> the refusal of a later chunk. A client streams with several chunks
        # in flight: those sent before it learnt of an abort (over the limit, idle) would open
        # the stream again, and their chunks would stay staged until the next idle abort.
        self.aborted: OrderedDict[bytes, tuple[ErrorCode, str]] = OrderedDict()

    # -- uploads ---------------------------------------------------------------------------------

    def check(self, identity: bytes, msg: KvRequest) -> None:
        """The checks of put_chunk / put_commit / put_abort that need the open streams."""
        known = self.open.get(msg.stream)
        if known is not None and msg.keys[0] != known.key:
            # Its chunks are staged in the first key's slot; sequenced elsewhere, an abort would
            # free nothing there and the stream would be forgotten with its chunks left behind.
            raise Invalid(ErrorCode.BAD_REQUEST, "a stream's chunks, commit and abort must all name the same key")
        if msg.op == "put_chunk":
            refusal = self.aborted.get(msg.stream)
            if refusal is not None:
                raise Invalid(*refusal)
            if known is None:
                self._check_room(identity)
            total = (known.size - known.sizes.get(msg.index, 0) if known else 0) + len(msg.values[0])
            if total > self.state.cfg.max_stream:
                refusal = (ErrorCode.VALUE_TOO_LARGE,
                           f"streamed value over {self.state.cfg.max_stream} bytes (--max-stream); stream aborted")
                if known is not None:
                    self._abort(known, "over the size limit", refusal)
                else:
                    self._remember_aborted(msg.stream, refusal)
                raise Invalid(*refusal)

    def _check_room(self, identity: bytes) -> None:
        """A new stream needs room under both caps (checked before its first chunk is written)."""
        cfg = self.state.cfg
        if len(self.open) >= cfg.max_streams:
            raise Unavailable(ErrorCode.UNAVAILABLE, f"{len(self.open)} streams are open, the broker's limit "
                                                     f"(--max-streams {cfg.max_streams}): retry when some end")
        mine = sum(1 for o in self.open.values() if o.identity == identity)
        if mine >= cfg.max_client_streams:
            raise Unavailable(ErrorCode.UNAVAILABLE, f"this client has {mine} streams open, the limit per client "
                                                     f"(--max-client-streams {cfg.max_client_streams}): "
                                                     "commit or abort one first")

    def chunk_sequenced(self, identity: bytes, msg: KvRequest) -> None:
        open_ = self.open.get(msg.stream)
        now = self.state.clock()
        if open_ is None:
            slot = slot_for_key(msg.keys[0], self.state.cfg.slots)
            open_ = self.open[msg.stream] = OpenStream(msg.stream, slot, msg.keys[0], now, identity)
            self.state.ready.metadata.streams[msg.stream] = {"slot": slot, "key": msg.keys[0]}
        open_.chunk(msg.index, len(msg.values[0]))
        open_.last_activity = now

    def closed(self, identity: bytes, msg: KvRequest) -> None:
        """put_commit / put_abort was sequenced: the stream is no longer open."""
        if msg.op == "put_abort":
            if msg.stream in self.open:
                self.state.stats["streams_aborted"] += 1  # by its client: counted as the broker's are
            self._remember_aborted(msg.stream, (ErrorCode.STREAM_INCOMPLETE,
                                                "the stream was aborted by its client: send the value again"))
        self._close(msg.stream)

    def _remember_aborted(self, stream: bytes, refusal: tuple[ErrorCode, str]) -> None:
        self.aborted[stream] = refusal
        self.aborted.move_to_end(stream)
        if len(self.aborted) > ABORTED_MEMORY:
            self.aborted.popitem(last=False)

    def _close(self, stream: bytes) -> None:
        if self.open.pop(stream, None) is not None:
            self.state.ready.metadata.streams[stream] = None

    def _abort(self, open_: OpenStream, why: str, refusal: tuple[ErrorCode, str] | None = None) -> None:
        """Sequence the abort of a stream its client left (or that went over the limit): every
        replica frees its staged chunks. Retried on the next tick if the slot cannot take writes."""
        state = self.state
        slot = state.slots[open_.slot]
        if slot.recovering or state.live_replicas(slot) < state.cfg.w:
            log.info("stream_abort_deferred", stream=open_.stream.hex(), slot=open_.slot)
            open_.last_activity = state.clock()
            return
        sequence_unanswered(state, slot, "put_abort", [WriteOp(OP_ABORT_STREAM, open_.stream)])
        log.info("stream_aborted", stream=open_.stream.hex(), slot=open_.slot, bytes=open_.size, why=why)
        state.stats["streams_aborted"] += 1
        self._remember_aborted(open_.stream, refusal or (
            ErrorCode.STREAM_INCOMPLETE, f"the stream was aborted ({why}): send the value again"))
        self._close(open_.stream)

    def on_chunk_committed(self, ev: ChunkCommitted) -> None:
        self.chunk_replies.setdefault(ev.slot.id, []).append((ev.seq, ev.request))

    def on_replica_advanced(self, ev: ReplicaAdvanced) -> None:
        if not self.chunk_replies:
            return
        for slot in ev.slots:
            self.release(slot)

    def release(self, slot: Slot) -> None:
        """Answer committed chunk writes once every live, in-sync replica has applied them too.
        The client sends a new chunk only when an earlier one is answered, so this keeps a slow
        replica within the client's window of chunks: streamed data never piles up in the PUB
        queue of the broker or the receive queue of a worker. A replica that dies or falls out
        of sync (it is then repaired) stops holding the stream back."""
        waiting = self.chunk_replies.get(slot.id)
        if waiting is None:
            return
        state = self.state
        in_sync = [p.seq for w, p in slot.applied.items()
                   if p is not None and w in slot.replicas and w not in slot.snapshot_pending
                   and w not in slot.repairs and state.alive(w)]
        floor = min(in_sync, default=slot.committed)
        keep = []
        for seq, req in waiting:
            if req.done:
                continue
            if seq <= floor:
                req.done = True
                self.requests.remove(req)
                reply(state, req.identity, {"id": req.id, "ok": True, "index": req.index})
            else:
                keep.append((seq, req))
        if keep:
            self.chunk_replies[slot.id] = keep
        else:
            self.chunk_replies.pop(slot.id, None)

    def release_all(self) -> None:
        for slot_id in list(self.chunk_replies):
            self.release(self.state.slots[slot_id])

    # -- downloads -------------------------------------------------------------------------------

    def start_read(self, identity: bytes, msg: KvRequest) -> None:
        state = self.state
        req = Request.of(identity, msg, state.clock() + state.cfg.request_timeout)
        s = slot_for_key(req.keys[0], state.cfg.slots)
        if state.slots[s].recovering:
            raise Unavailable(ErrorCode.UNAVAILABLE, f"slot {s} is recovering after a broker restart")
        self.requests.add(req)
        self._dispatch_read(req, req.index, req.index + msg.count)

    def _dispatch_read(self, req: Request, first: int, end: int) -> None:
        """Ask one replica for chunks [first, end). Any replica that applied everything committed
        has every chunk of a committed value, and chunks never change: no hold-back is needed."""
        if req.done:
            return
        state = self.state
        s = slot_for_key(req.keys[0], state.cfg.slots)
        wid = state.choose_replica(state.slots[s])
        if wid is None:
            self.requests.fail(req, ErrorCode.UNAVAILABLE, f"no replica of slot {s} can serve reads now")
            return
        token = state.token()
        self.chunk_reads[token] = ChunkRead(wid, req, s, first, end)
        state.to_worker(state.workers[wid], [W_REQUEST, token, b"", pack(
            {"op": "chunks", "slot": s, "stream": req.stream, "first": first, "count": end - first})])

    def on_answer(self, wid: str, msg: Answer) -> None:
        cr = self.chunk_reads.get(msg.token)
        if cr is None or cr.worker != wid:
            return
        if not msg.final:
            self._on_chunk(cr, msg.body)
            return
        del self.chunk_reads[msg.token]
        req = cr.request
        hdr = unpack(msg.body[0])
        if not hdr.get("ok"):
            self.requests.fail(req, ErrorCode.BAD_REQUEST, f"worker {wid}: {hdr.get('message')}")
            return
        if req.done:
            return
        req.done = True
        self.requests.remove(req)
        self.state.stats["reads_served"] += 1
        # Fewer chunks than asked: the value ends there, or it was replaced (the client knows
        # the chunk count from the manifest and tells the two apart).
        reply(self.state, req.identity, {"id": req.id, "ok": True, "next": cr.next})

    def _on_chunk(self, cr: ChunkRead, body: list[bytes]) -> None:
        if len(body) != 2:
            return
        index = int(unpack(body[0])["index"])
        if index != cr.next or cr.request.done:
            return
        cr.next += 1
        req = cr.request
        partial(self.state, req.identity, {"id": req.id, "index": index}, [body[1]])

    # -- events and time -------------------------------------------------------------------------

    def on_worker_lost(self, ev: WorkerLost) -> None:
        for token, cr in list(self.chunk_reads.items()):
            if cr.worker == ev.worker.id:
                del self.chunk_reads[token]
                self._dispatch_read(cr.request, cr.next, cr.end)  # the rest, from another replica
        self.release_all()

    def tick(self, now: float) -> None:
        idle = self.state.cfg.stream_idle
        for open_ in [o for o in self.open.values() if now - o.last_activity > idle]:
            self._abort(open_, f"no chunk for {idle:.0f}s")
        self.release_all()
