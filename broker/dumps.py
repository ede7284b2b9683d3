"""Backup dumps (docs/protocol.md §1.11): one slot read from one replica's read transaction, a
part at a time, so that the whole slot is one consistent cut at one position of its history.

Part 0 goes to a replica that has applied everything committed (the read rule), which opens the
cut; every later part names that worker and dump. Each part is answered only once the cut's
position is committed and in the slot's history: a backup shows no write that could still be
lost and misses none acknowledged before its slot's dump began.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import structlog

from broker.events import Committed, WorkerLost
from broker.history import in_history
from broker.messages import DumpRequest, Unavailable
from broker.replies import error, reply
from broker.state import BrokerState, Pos
from protocol.errors import ErrorCode
from protocol.frames import W_REQUEST, pack, unpack

log = structlog.get_logger("zkv.broker")


@dataclass
class DumpPart:
    """One part asked of a worker, or answered and held until its cut commits."""

    msg: DumpRequest
    identity: bytes
    deadline: float
    dump: bytes = b""
    worker: str = ""
    floor: int = 0  # part 0: the slot's committed seq when asked; the cut must reach it
    answer: list[bytes] = field(default_factory=list)  # the worker's answer (header, frames), once it came
    pos: Pos = Pos()


class Dumps:
    def __init__(self, state: BrokerState) -> None:
        self.state = state
        self.tokens: dict[bytes, DumpPart] = {}  # worker request token -> the part asked
        self.waiting: list[DumpPart] = []  # part 0 of slots whose live replicas are all behind
        self.held: dict[int, list[DumpPart]] = {}  # slot -> answered parts waiting for their cut to commit

    def start(self, identity: bytes, msg: DumpRequest) -> None:
        state = self.state
        slot = state.slots.get(msg.slot)
        if slot is None:
            raise Unavailable(ErrorCode.BAD_REQUEST if state.slots else ErrorCode.UNAVAILABLE,
                              f"no slot {msg.slot}" if state.slots else "cluster not formed")
        if slot.recovering:
            raise Unavailable(ErrorCode.UNAVAILABLE, f"slot {msg.slot} is recovering after a broker restart")
        part = DumpPart(msg, identity, state.clock() + state.cfg.request_timeout)
        if msg.part == 0:
            part.dump = state.epoch.to_bytes(8, "big") + state.token()  # unique across broker restarts
            self._dispatch_first(part)
            return
        if not state.alive(msg.worker):
            raise Unavailable(ErrorCode.UNAVAILABLE,
                              f"worker {msg.worker}, which holds this dump, is gone: dump slot {msg.slot} again")
        part.dump, part.worker = msg.dump, msg.worker
        self._ask(part)

    def _dispatch_first(self, part: DumpPart) -> None:
        state = self.state
        slot = state.slots[part.msg.slot]
        wid = state.choose_replica(slot)
        if wid is None:
            if not state.any_replica_alive(slot):
                error(state, part.identity, part.msg.rid, ErrorCode.UNAVAILABLE, f"no live replica of slot {slot.id}")
            else:
                self.waiting.append(part)  # the tick tries again
            return
        part.worker, part.floor = wid, slot.committed
        self._ask(part)

    def _ask(self, part: DumpPart) -> None:
        state = self.state
        token = state.token()
        self.tokens[token] = part
        state.to_worker(state.workers[part.worker], [W_REQUEST, token, b"", pack(
            {"op": "dump", "slot": part.msg.slot, "dump": part.dump, "part": part.msg.part, "now": state.wall_ms()})])

    def on_answer(self, wid: str, token: bytes, body: list[bytes]) -> None:
        part = self.tokens.get(token)
        if part is None or part.worker != wid:
            return
        del self.tokens[token]
        try:
            hdr = unpack(body[0])
            if not hdr.get("ok"):
                self._fail(part, ErrorCode.UNAVAILABLE, f"worker {wid}: {hdr.get('message')}")
                return
            part.pos = Pos(int(hdr["seq"]), int(hdr["epoch"]))
        except Exception as e:  # a malformed answer fails the part now, not at its timeout
            log.error("worker_dump_answer_malformed", worker=wid, error=str(e))
            self._fail(part, ErrorCode.INTERNAL, f"worker {wid}: malformed dump answer")
            return
        if part.pos.seq < part.floor:
            # The replica lost the slot after it was chosen (a move finished, a snapshot replaced it).
            self._fail(part, ErrorCode.UNAVAILABLE, f"slot {part.msg.slot} moved while its dump began: dump it again")
            return
        part.answer = body
        self.held.setdefault(part.msg.slot, []).append(part)
        self._release(part.msg.slot)

    def _release(self, s: int) -> None:
        slot = self.state.slots[s]
        keep: list[DumpPart] = []
        for part in self.held.pop(s, []):
            if slot.committed < part.pos.seq:
                keep.append(part)
            elif not in_history(slot, part.pos):
                self._fail(part, ErrorCode.UNAVAILABLE, f"the cut of slot {s} was not committed: dump it again")
            else:
                hdr = unpack(part.answer[0])
                hdr.update({"id": part.msg.rid, "slot": s, "dump": part.dump, "worker": part.worker})
                reply(self.state, part.identity, hdr, part.answer[1:])
        if keep:
            self.held[s] = keep

    def _fail(self, part: DumpPart, code: ErrorCode, message: str) -> None:
        error(self.state, part.identity, part.msg.rid, code, message)

    # -- events and time -------------------------------------------------------------------------

    def on_committed(self, ev: Committed) -> None:
        if ev.slot.id in self.held:
            self._release(ev.slot.id)

    def on_worker_lost(self, ev: WorkerLost) -> None:
        for token, part in list(self.tokens.items()):
            if part.worker == ev.worker.id:
                del self.tokens[token]
                self._fail(part, ErrorCode.UNAVAILABLE, f"worker {ev.worker.id} was lost during the dump of "
                                                        f"slot {part.msg.slot}: dump it again")

    def tick(self, now: float) -> None:
        for token, part in list(self.tokens.items()):
            if now > part.deadline:
                del self.tokens[token]
                self._fail(part, ErrorCode.TIMEOUT, "dump part not answered in time")
        for s, parts in list(self.held.items()):
            late = [p for p in parts if now > p.deadline]
            for p in late:
                self._fail(p, ErrorCode.TIMEOUT, f"the cut of slot {s} did not commit in time: dump it again")
            if late:
                self.held[s] = [p for p in parts if now <= p.deadline]
        waiting, self.waiting = self.waiting, []
        for part in waiting:
            if now > part.deadline:
                self._fail(part, ErrorCode.TIMEOUT, "no replica of the slot caught up in time")
            else:
                self._dispatch_first(part)
