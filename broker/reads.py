"""Point reads (get, exists, mget, ttl): one replica per slot, chosen by ``BrokerState.choose_replica``,
and an answer held back until what it shows is committed.

A read goes to a live replica whose applied position is at or past the slot's committed seq; the
replica answers with the version it read, and an answer newer than the committed seq is held until
that version commits. So a read never misses an acknowledged write and never shows one that could
still be lost. All reads of one turn of the loop to one worker travel in one request.

A slot's share of a read whose keys are all in the leader's cache of committed values
(broker/read_cache.py) is answered from it, without a replica; a replica's answer to a read sent
while its slot had no write pending fills the cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import structlog

from broker.answers import answer
from broker.events import Committed, HistoryRewritten, ReplicaAdvanced, WorkerLost
from broker.history import answer_is_void, applied_of
from broker.messages import KvRequest, Unavailable
from broker.read_cache import NOT_FILLABLE
from broker.requests import Request, RequestTable
from broker.sequencer import cannot_commit, uncommitted_change
from broker.state import BrokerState
from broker.worker_messages import Answer
from protocol.errors import ErrorCode
from protocol.frames import W_REQUEST, pack, unpack, unpack_values
from protocol.replication import slot_for_key

log = structlog.get_logger("zkv.broker")


@dataclass
class ReadPart:
    request: Request
    slot: int
    indices: list[int]
    need: int = 0  # highest version in the answer; released once committed >= need
    floor: int = 0  # the slot's committed seq when the part was sent: a replica below it lost the slot
    generation: int = NOT_FILLABLE  # what the read cache gave when it was sent (its answer may fill it)


@dataclass
class WorkerRead:
    worker: str
    parts: list[ReadPart]
    keys: list[tuple[int, int]]  # (part index, key index in request)


class Reads:
    def __init__(self, state: BrokerState, requests: RequestTable) -> None:
        self.state = state
        self.requests = requests
        self.queue: list[ReadPart] = []  # reads of this turn of the loop, not yet sent
        self.worker_reads: dict[bytes, WorkerRead] = {}  # by request token
        self.waiting: dict[int, list[ReadPart]] = {}  # slot -> parts no replica qualifies for yet
        self.held: dict[int, list[ReadPart]] = {}  # slot -> answered parts waiting for commit

    def start(self, identity: bytes, msg: KvRequest) -> None:
        state = self.state
        req = Request.of(identity, msg, state.clock() + state.cfg.request_timeout)
        by_slot: dict[int, list[int]] = {}
        for i, k in enumerate(req.keys):
            by_slot.setdefault(slot_for_key(k, state.cfg.slots), []).append(i)
        for s in by_slot:
            if state.slots[s].recovering:
                raise Unavailable(ErrorCode.UNAVAILABLE, f"slot {s} is recovering after a broker restart")
        if state.read_cache.entries:
            parts = self._from_cache(req, by_slot)
            if not parts:
                state.stats["reads_cached"] += 1
                self._answer(req)
                return
        else:
            parts = [ReadPart(req, s, idx) for s, idx in by_slot.items()]
        req.outstanding = len(parts)
        self.requests.add(req)
        # Dispatched at the end of the loop's turn (end_turn), together with every other read of
        # the turn: one REQUEST per worker carries them all, one LMDB transaction answers them.
        self.queue.extend(parts)

    def _from_cache(self, req: Request, by_slot: dict[int, list[int]]) -> list[ReadPart]:
        """Fill the results of every slot whose keys are all cached; the parts left to ask a
        replica for. (A slot's keys come from one place, so that they show one moment.)"""
        cache, now_ms = self.state.read_cache, self.state.wall_ms()
        parts = []
        for s, idx in by_slot.items():
            hits = [cache.lookup(req.keys[i], now_ms) for i in idx]
            if None in hits:
                parts.append(ReadPart(req, s, idx))
                continue
            for i, (version, value, expire_at) in zip(idx, hits, strict=True):  # type: ignore[misc]
                req.results[i] = (True, version, value, expire_at, False)
        return parts

    def end_turn(self) -> None:
        if self.queue:
            parts, self.queue = self.queue, []
            self.dispatch(parts)

    def dispatch(self, parts: list[ReadPart]) -> None:
        state = self.state
        per_worker: dict[str, list[ReadPart]] = {}
        for part in parts:
            if part.request.done:
                continue
            slot = state.slots[part.slot]
            wid = state.choose_replica(slot)
            if wid is None:
                if not state.any_replica_alive(slot):
                    self.requests.fail(part.request, ErrorCode.UNAVAILABLE, f"no live replica of slot {part.slot}")
                else:
                    self.waiting.setdefault(part.slot, []).append(part)
                continue
            part.floor = slot.committed
            per_worker.setdefault(wid, []).append(part)
        now_ms = state.wall_ms()
        for wid, wparts in per_worker.items():
            keys: list[tuple[int, int]] = []
            wire_keys = []
            for pi, part in enumerate(wparts):
                for i in part.indices:
                    keys.append((pi, i))
                    wire_keys.append([part.slot, part.request.keys[i]])
            token = state.token()
            self.worker_reads[token] = WorkerRead(wid, wparts, keys)
            op = "exists" if all(p.request.op in ("exists", "ttl") for p in wparts) else "get"
            for part in wparts:  # taken anew at every dispatch: an answer without values cannot fill
                slot = state.slots[part.slot]
                part.generation = (state.read_cache.generation(pending=slot.last.seq > slot.committed)
                                   if op == "get" else NOT_FILLABLE)
            req = {"op": op, "keys": wire_keys, "now": now_ms}
            if len(wire_keys) > 1:
                req["packed"] = True  # (a worker packs only the values of several keys)
            state.to_worker(state.workers[wid], [W_REQUEST, token, b"", pack(req)])

    def on_answer(self, wid: str, msg: Answer) -> None:
        wr = self.worker_reads.get(msg.token)
        if wr is None or wr.worker != wid:
            return  # (an answer from another worker must not cancel the outstanding read)
        del self.worker_reads[msg.token]
        hdr = unpack(msg.body[0])
        values = msg.body[1:]
        if hdr.get("ok") and hdr.get("packed"):
            try:
                values = unpack_values(values)
            except ValueError as e:
                hdr = {"ok": False, "code": "INTERNAL", "message": f"malformed answer: {e}"}
        if hdr.get("ok") and len(values) != len(wr.keys):
            hdr = {"ok": False, "code": "INTERNAL",
                   "message": f"malformed answer: {len(values)} values for {len(wr.keys)} keys"}
        if not hdr.get("ok"):
            log.error("worker_read_failed", worker=wid, code=hdr.get("code"), message=hdr.get("message"))
            if len(wr.parts) > 1:
                # Reads of several requests shared this REQUEST: ask again for each on its own, so
                # that whatever failed fails only its own request.
                for part in wr.parts:
                    self.dispatch([part])
                return
            self.requests.fail(wr.parts[0].request, ErrorCode.INTERNAL, f"worker {wid}: {hdr.get('message')}")
            return
        streamed = hdr.get("streamed") or [False] * len(wr.keys)
        applied = applied_of(hdr.get("applied", []))
        slots = self.state.slots
        # A replica that lost a slot since it was asked, or holds writes off its history: its
        # answer about it is void, ask another (broker/history.py).
        lost = [p for p in wr.parts if answer_is_void(self.state, wid, slots[p.slot], p.floor, applied.get(p.slot))]
        void = {id(p) for p in lost}
        for n, (pi, i) in enumerate(wr.keys):
            part = wr.parts[pi]
            if id(part) in void:
                continue
            found, version = hdr["found"][n], hdr["versions"][n]
            part.request.results[i] = (found, version, values[n] if found else b"", hdr["expire"][n], streamed[n])
            if not found:
                # A miss reports the replica's applied seq: what it shows is committed once no write
                # above the committed seq touched the key (a delete of it, say), whatever else is pending.
                key = part.request.keys[i]
                change = uncommitted_change(slots[part.slot], lambda k, key=key: k == key)  # type: ignore[misc]
                version = version if change is None else min(version, change)
            part.need = max(part.need, version)
        if lost:
            log.info("read_redirected", worker=wid, slots=sorted({p.slot for p in lost}))
            self.queue.extend(lost)
        for part in wr.parts:
            if id(part) in void:
                continue
            if part.need > self.state.slots[part.slot].committed:
                self._hold(part)  # seen on this replica, not yet committed
            else:
                if part.generation != NOT_FILLABLE and len(applied.get(part.slot, ())) > 1:
                    self._fill(part)  # (only a worker that names its epoch is known to be on the history)
                self._part_done(part)

    def _fill(self, part: ReadPart) -> None:
        results, keys = part.request.results, part.request.keys
        self.state.read_cache.fill(part.slot, part.generation, (
            (keys[i], r[1], r[2], r[3]) for i in part.indices for r in (results[i],) if r[0] and not r[4]))

    def _hold(self, part: ReadPart) -> None:
        """Wait for the write the answer shows to commit, unless it cannot commit now: then the
        read fails at once, naming the slot, rather than at its timeout."""
        why = cannot_commit(self.state, self.state.slots[part.slot])
        if why is not None:
            self.requests.fail(part.request, ErrorCode.UNAVAILABLE, why)
        else:
            self.held.setdefault(part.slot, []).append(part)

    def _part_done(self, part: ReadPart) -> None:
        req = part.request
        if req.done:
            return
        req.outstanding -= 1
        if req.outstanding == 0:
            self.requests.remove(req)
            self._answer(req)

    def _answer(self, req: Request) -> None:
        req.done = True
        self.state.stats["reads_served"] += 1
        answer(self.state, req, req.identity)

    # -- events ----------------------------------------------------------------------------------

    def on_committed(self, ev: Committed) -> None:
        held = self.held.get(ev.slot.id)
        if held:
            ready = [p for p in held if p.need <= ev.upto]
            self.held[ev.slot.id] = [p for p in held if p.need > ev.upto]
            for p in ready:
                self._part_done(p)

    def on_replica_advanced(self, ev: ReplicaAdvanced) -> None:
        if not self.waiting:
            return
        for slot in ev.slots:
            waiting = self.waiting.pop(slot.id, None)
            if waiting:
                self.dispatch(waiting)

    def on_worker_lost(self, ev: WorkerLost) -> None:
        for s, held in list(self.held.items()):  # writes that could commit may no longer
            why = cannot_commit(self.state, self.state.slots[s]) if held else None
            if why is not None:
                del self.held[s]
                for part in held:
                    self.requests.fail(part.request, ErrorCode.UNAVAILABLE, why)
        redo: list[ReadPart] = []
        for token, wr in list(self.worker_reads.items()):
            if wr.worker == ev.worker.id:
                del self.worker_reads[token]
                redo.extend(wr.parts)
        if redo:
            self.dispatch(redo)

    def on_history_rewritten(self, ev: HistoryRewritten) -> None:
        self.state.read_cache.clear()  # (rare: more replicas lost than the fault model allows)

    def tick(self) -> None:
        """Forget parts of requests that were answered meanwhile (timed out, failed)."""
        for table in (self.waiting, self.held):
            for s in [s for s, parts in table.items() if not parts]:
                del table[s]
            for s, parts in table.items():
                table[s] = [p for p in parts if not p.request.done]
