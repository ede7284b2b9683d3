"""The write path: de-duplication, the checks that make a slot writable, sequencing each slot's
share of a request, and answering it once every share is committed.

A client write is split by slot; each share becomes one write batch stamped (slot, epoch, seq)
by broker/sequencer.py and published. It is acknowledged when W replicas of the slot have
applied a position at or past its seq (the ``Committed`` event, from broker/quorum.py).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from broker.answers import answer, answer_depends_on_replicas
from broker.events import ChunkCommitted, Committed
from broker.history import epoch_of
from broker.messages import Invalid, KvRequest, Unavailable
from broker.replies import error
from broker.requests import Request, RequestTable, WriteBatch
from broker.sequencer import sequence
from broker.state import BrokerState
from protocol.errors import ErrorCode
from protocol.replication import (
    COND_NONE,
    OP_ABORT_STREAM,
    OP_CHUNK,
    OP_DELETE,
    OP_EXPIRE,
    OP_PUT,
    OP_PUT_STREAM,
    Origin,
    WriteOp,
    chunk_key,
    slot_for_key,
)

MAX_UNCOMMITTED_BYTES = 64 * 1024 * 1024  # per slot: writes past this backlog get UNAVAILABLE
DEDUP_MEMORY = 100_000  # writes remembered in memory (the broker's metadata keeps more)

# (client id, request number) -> (parts [slot, epoch, seq], results or None) of a write that an
# earlier broker incarnation sequenced; None if it has none.
DedupLookup = Callable[[bytes, int], tuple[list[list[int]], list[Any] | None] | None]


class Writes:
    def __init__(self, state: BrokerState, requests: RequestTable, lookup_dedup: DedupLookup) -> None:
        self.state = state
        self.requests = requests
        self.lookup_dedup = lookup_dedup
        self.dedup: OrderedDict[tuple[bytes, int], Request] = OrderedDict()

    def start(self, identity: bytes, msg: KvRequest) -> Request | None:
        """Sequence a client write (or attach a retry to its first attempt). Returns the request,
        or None when it was a retry of one this broker already holds."""
        state = self.state
        req = Request.of(identity, msg, state.clock() + state.cfg.request_timeout)
        if req.cid:
            key = (req.cid, req.id)
            prior = self.dedup.get(key)
            if prior is not None:
                if prior.committed:
                    # (A put_chunk's answer may still be held for flow control: this one is final.)
                    self.requests.remove(prior)
                    answer(state, prior, req.identity)
                else:
                    # Still committing (perhaps after a TIMEOUT answer): answer this retry when it does.
                    prior.identity, prior.deadline, prior.done = req.identity, req.deadline, False
                    self.requests.add(prior)
                return None
            req.dedup_key = key
        by_slot: dict[int, list[int]] = {}
        for i, k in enumerate(req.keys):
            by_slot.setdefault(slot_for_key(k, state.cfg.slots), []).append(i)
        if req.cid and req.maybe_retry:  # (a late first attempt is caught by the replicas' look-up)
            found = self.lookup_dedup(req.cid, req.id)
            if found is not None:
                parts, results = found
                by_slot = self._settle_from_before_restart(req, parts, results, by_slot)
                if not by_slot:
                    return req
        for s in by_slot:  # check every slot first: an MSET is refused whole or sent whole
            slot = state.slots[s]
            if slot.recovering:
                raise Unavailable(ErrorCode.UNAVAILABLE, f"slot {s} is recovering after a broker restart")
            live = state.live_replicas(slot)
            if live < state.cfg.w:
                raise Unavailable(ErrorCode.NOT_ENOUGH_REPLICAS,
                                  f"slot {s} has {live} live replicas; writes need {state.cfg.w}")
            if slot.tail_bytes > MAX_UNCOMMITTED_BYTES:
                raise Unavailable(ErrorCode.UNAVAILABLE,
                                  f"slot {s} has {slot.tail_bytes >> 20} MiB of writes not yet committed; retry")
        now_ms = state.wall_ms()
        expire_at = now_ms + msg.ttl if msg.ttl else 0
        # The replicas always look the origin up, even for a request the client marked as its
        # first attempt: a first attempt can arrive after its own retry was applied (it sat in a
        # connection to a broker that was cut off, and TCP delivered it once the partition healed,
        # to that broker leading again); applied again, it would undo the writes made since.
        origin = Origin(req.cid, req.id, True) if req.cid else None
        for s, idx in by_slot.items():
            slot = state.slots[s]
            ops, vals = write_ops(req, idx, msg.values, expire_at)
            seq = sequence(state, slot, ops, vals, now_ms, origin)
            slot.pending[seq] = WriteBatch(req, idx)
            req.parts.append([s, state.epoch, seq])
            req.outstanding += 1
        if req.dedup_key:
            self.dedup[req.dedup_key] = req
            if len(self.dedup) > DEDUP_MEMORY:
                self.dedup.popitem(last=False)
            state.ready.metadata.dedup.append((req.cid, req.id, req.parts, None))
        self.requests.add(req)
        return req

    def _settle_from_before_restart(self, req: Request, parts: list[list[int]], results: list[Any] | None,
                                    by_slot: dict[int, list[int]]) -> dict[int, list[int]]:
        """A retried write that an earlier broker incarnation sequenced (found in the persisted
        de-duplication entries). Parts that are in the slot's committed history are done; parts
        that did not survive the restart (their seq is not in the history with their epoch) must
        be applied now: returns those slots' key indices, and answers the request if none is left."""
        todo: dict[int, list[int]] = {}
        survived: list[list[int]] = []
        for s, epoch, seq in parts:
            slot = self.state.slots.get(s)
            if slot is None or slot.recovering:
                raise Unavailable(ErrorCode.UNAVAILABLE, f"slot {s} is recovering after a broker restart")
            if seq <= slot.last.seq and epoch_of(slot, seq) == epoch:
                if seq > slot.committed:
                    raise Unavailable(ErrorCode.UNAVAILABLE, "an earlier attempt of this write is committing")
                survived.append([s, epoch, seq])
            elif s in by_slot:
                todo[s] = by_slot[s]
        req.parts = survived
        if todo:
            return todo
        if results is None and answer_depends_on_replicas(req):
            # The answer (did the key exist, did the condition hold) is stored when the write
            # commits; the broker died in between. Never guess: a plain delete says "applied,
            # existence unknown"; a conditional write or TTL change cannot even say whether it
            # took effect, which is what TIMEOUT means.
            if req.op != "delete" or req.cond != COND_NONE:
                raise Unavailable(ErrorCode.TIMEOUT, "the outcome of the earlier attempt was not recorded")
            results = [[None, 0]]
        req.done = req.committed = True
        req.results = results if results is not None else [True] * len(req.keys)
        answer(self.state, req, req.identity)
        return {}

    def on_committed(self, ev: Committed) -> None:
        """Answer the requests whose every share is now committed."""
        slot, new = ev.slot, ev.upto
        state = self.state
        while slot.pending:
            seq = next(iter(slot.pending))
            if seq > new:
                break
            batch = slot.pending.pop(seq)
            state.stats["writes_committed"] += 1
            req = batch.request
            if batch.duplicate_of is not None:
                # A retry of a write an earlier leader sequenced: the replicas applied it as a
                # no-op; the answer is the first write's (its version, what it found).
                state.stats["writes_deduplicated"] += 1
                req.deduplicated = True
                req.parts = [[p, *batch.duplicate_of] if p == slot.id and q == seq else [p, e, q]
                             for p, e, q in req.parts]
            if batch.found is not None:
                for i, f in zip(batch.indices, batch.found, strict=False):
                    req.results[i] = f
            elif batch.duplicate_of is None and answer_depends_on_replicas(req):
                # Committed by the positions its replicas reported on registering again, after
                # their ACKs (which carry what they found) were refused: never make the answer up.
                req.results_lost = True
                for i in batch.indices:
                    req.results[i] = [None, 0]
            else:
                for i in batch.indices:
                    req.results[i] = True
            req.outstanding -= 1
            if req.outstanding:
                continue
            req.committed = True
            if req.results_lost:
                self._answer_lost_results(req)
                continue
            if req.dedup_key and (answer_depends_on_replicas(req) or req.deduplicated):
                # What a retry after a broker restart must answer: what the replicas found.
                state.ready.metadata.dedup.append((req.cid, req.id, req.parts, req.results))
            if req.op == "put_chunk" and not req.done:
                state.emit(ChunkCommitted(slot, seq, req))
            elif not req.done:
                req.done = True
                self.requests.remove(req)
                answer(state, req, req.identity)


    def _answer_lost_results(self, req: Request) -> None:
        """A committed write whose answer the replicas' refused ACKs carried. As after a broker
        restart (``lookup``): a plain delete is "applied, existence unknown"; anything else is
        TIMEOUT, and its retry is answered by the replicas' own record (worker/dedup.py). No
        dedup entry is kept here: it would hold no answer, and a retry answered from it would be
        wrong (a CAS would read as refused). A retry finds the entry persisted at sequencing, with
        no answer, and gets the same TIMEOUT (or "existence unknown") as after a restart."""
        if req.dedup_key:
            self.dedup.pop(req.dedup_key, None)
        if req.done:
            return
        req.done = True
        self.requests.remove(req)
        if req.op == "delete" and req.cond == COND_NONE:
            answer(self.state, req, req.identity)
        else:
            error(self.state, req.identity, req.id, ErrorCode.TIMEOUT,
                  "the write was applied, but what the replicas found was lost with their "
                  "acknowledgements: retry it (the retry gets their recorded answer)")


def write_ops(req: Request, idx: list[int], values: list[bytes], expire_at: int) -> tuple[list[WriteOp], list[bytes]]:
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
    if req.op in ("put", "mset"):
        return ([WriteOp(OP_PUT, req.keys[i], expire_at, req.cond, req.expected) for i in idx],
                [values[i] for i in idx])
    raise Invalid(ErrorCode.UNKNOWN_COMMAND, f"{req.op} is not a write")
