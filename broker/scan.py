"""Scan pages across all slots (docs/protocol.md §1.10): every slot is asked of one replica that
may serve reads, one request per worker; the answers are merged in key order and the page is held
until the state it was read at is committed."""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import structlog

from broker.events import Committed, WorkerLost
from broker.history import answer_is_void, applied_of
from broker.messages import ScanRequest
from broker.replies import error, manifest_field, reply
from broker.sequencer import cannot_commit, uncommitted_change
from broker.state import BrokerState, Slot
from protocol.errors import ErrorCode
from protocol.frames import W_REQUEST, pack, unpack
from protocol.limits import SCAN_MAX_BYTES
from protocol.replication import slot_for_key

log = structlog.get_logger("zkv.broker")


@dataclass
class Scan:
    """One scan page being gathered."""

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


class Scans:
    def __init__(self, state: BrokerState) -> None:
        self.state = state
        self.scans: dict[int, Scan] = {}  # by id(scan)
        self.tokens: dict[bytes, Scan] = {}  # worker request token -> its scan

    def start(self, identity: bytes, msg: ScanRequest) -> None:
        state = self.state
        state.require_all_slots()
        scan = Scan(msg.rid, identity, state.clock() + state.cfg.request_timeout, msg.prefix, msg.start_after,
                    msg.limit, msg.values, state.wall_ms(), waiting=set(state.slots))
        self.scans[id(scan)] = scan
        self._dispatch(scan)

    def _dispatch(self, scan: Scan) -> None:
        """Ask, for every slot not asked yet, one replica that has applied everything committed
        (the read rule); one request per worker for all the slots it answers. A slot whose live
        replicas are all behind waits (the tick tries again); one with no live replica fails."""
        state = self.state
        per_worker: dict[str, list[int]] = {}
        for s in sorted(scan.waiting):
            slot = state.slots[s]
            wid = state.choose_replica(slot)
            if wid is not None:
                per_worker.setdefault(wid, []).append(s)
            elif not state.any_replica_alive(slot):
                self._fail(scan, ErrorCode.UNAVAILABLE, f"no live replica of slot {s}")
                return
        for wid, slots in per_worker.items():
            scan.waiting.difference_update(slots)
            token = state.token()
            scan.asked[token] = (wid, slots)
            for s in slots:
                scan.floor[s] = state.slots[s].committed
            self.tokens[token] = scan
            state.to_worker(state.workers[wid], [W_REQUEST, token, b"", pack(
                {"op": "scan", "slots": slots, "prefix": scan.prefix, "start_after": scan.start_after,
                 "limit": scan.limit, "now": scan.now_ms, "values": scan.values, "max_bytes": SCAN_MAX_BYTES})])

    def on_answer(self, wid: str, token: bytes, body: list[bytes]) -> None:
        scan = self.tokens.get(token)
        try:
            self._take_answer(wid, token, body)
        except Exception as e:  # a malformed answer fails the page now, not at its timeout
            if scan is not None and not scan.done:
                log.error("worker_scan_answer_malformed", worker=wid, error=str(e))
                self._fail(scan, ErrorCode.INTERNAL, f"worker {wid}: malformed scan answer")

    def _take_answer(self, wid: str, token: bytes, body: list[bytes]) -> None:
        scan = self.tokens.pop(token)
        asked = scan.asked.pop(token, None)
        if asked is None or scan.done:
            return
        if asked[0] != wid:
            scan.asked[token], self.tokens[token] = asked, scan
            return
        hdr = unpack(body[0])
        keys, values = hdr.get("keys", []) if isinstance(hdr, dict) else None, body[1:]
        if not isinstance(keys, list) or not all(isinstance(k, bytes) for k in keys):  # never bytes(int)
            keys, hdr = [], {"ok": False, "message": "malformed scan answer: keys must be a list of bin"}
        if not hdr.get("ok") or (scan.values and len(values) != len(keys)):
            log.error("worker_scan_failed", worker=wid, code=hdr.get("code"), message=hdr.get("message"))
            self._fail(scan, ErrorCode.INTERNAL, f"worker {wid}: {hdr.get('message', 'bad scan answer')}")
            return
        positions = applied_of(hdr["applied"])
        applied = {s: p[0] for s, p in positions.items()}
        # A replica that lost a slot since it was asked (a move finished, a snapshot is replacing
        # it) or holds writes off its history: its part of the answer is void (broker/history.py).
        lost = {s for s in asked[1]
                if answer_is_void(self.state, wid, self.state.slots[s], scan.floor.get(s, 0), positions.get(s, [0]))}
        entries = zip(keys, hdr["versions"], values if scan.values else [b""] * len(keys),
                      hdr.get("streamed") or [False] * len(keys), strict=True)
        slots = self.state.cfg.slots
        read: dict[int, int] = {}  # slot -> highest version of its entries in this answer
        for e in entries:
            s = slot_for_key(e[0], slots)
            if s not in lost:
                scan.entries.append(e)
                read[s] = max(read.get(s, 0), e[1])
        if not hdr["complete"] and keys:
            scan.bound = keys[-1] if scan.bound is None else min(scan.bound, keys[-1])
        for s in asked[1]:
            if s not in lost:
                scan.need[s] = self._need(scan, self.state.slots[s], applied.get(s, 0), read.get(s, 0))
        if lost:
            scan.waiting.update(lost)
            self._dispatch(scan)
        self._maybe_finish(scan)

    def _need(self, scan: Scan, slot: Slot, applied: int, read: int) -> int:
        """The seq the slot must commit before the page may show what was read of it: the latest
        write above the committed seq to a key in the scanned range (its effect, a key added or
        removed, may be in the answer), or the applied seq when the broker does not know every such
        write; not every pending write of the slot (a stalled one would hold every page)."""
        prefix, after = scan.prefix, scan.start_after
        change = uncommitted_change(slot, lambda k: k.startswith(prefix) and (after is None or k > after))
        return applied if change is None else max(min(change, applied), read)

    def _maybe_finish(self, scan: Scan) -> None:
        """Answer once every slot is answered and committed up to the state it was read at, so a
        page shows no write that could still be lost and misses none that was acknowledged."""
        if scan.done or scan.asked or scan.waiting:
            return
        if not scan.held:
            scan.held = True
            scan.unmet = {s for s, q in scan.need.items() if self.state.slots[s].committed < q}
        for s in sorted(scan.unmet):
            why = cannot_commit(self.state, self.state.slots[s])
            if why is not None:  # it would wait for its timeout: fail now, naming the slot
                self._fail(scan, ErrorCode.UNAVAILABLE, why)
                return
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
        self._end(scan)
        stats = self.state.stats
        stats["scans_served"] = stats.get("scans_served", 0) + 1
        hdr = {"id": scan.id, "ok": True, "keys": [e[0] for e in page], "versions": [e[1] for e in page],
               "more": more}
        streams = {i: manifest_field(e[2]) for i, e in enumerate(page) if e[3]}
        if streams:
            hdr["streams"] = streams  # as in mget: read those values with get_chunks
        reply(self.state, scan.identity, hdr, [b"" if e[3] else e[2] for e in page] if scan.values else [])

    def _end(self, scan: Scan) -> None:
        scan.done = True
        self.scans.pop(id(scan), None)
        for token in scan.asked:
            self.tokens.pop(token, None)

    def _fail(self, scan: Scan, code: ErrorCode, message: str) -> None:
        if not scan.done:
            self._end(scan)
            error(self.state, scan.identity, scan.id, code, message)

    # -- events and time -------------------------------------------------------------------------

    def on_committed(self, ev: Committed) -> None:
        slot = ev.slot
        for scan in list(self.scans.values()):
            if slot.id in scan.unmet and slot.committed >= scan.need[slot.id]:
                scan.unmet.discard(slot.id)
                self._maybe_finish(scan)

    def on_worker_lost(self, ev: WorkerLost) -> None:
        """Slots asked of a worker that died are asked again of another replica (as reads are)."""
        redo: list[Scan] = []
        for token, scan in list(self.tokens.items()):
            asked = scan.asked.get(token)
            if asked is not None and asked[0] == ev.worker.id:
                del scan.asked[token], self.tokens[token]
                scan.waiting.update(asked[1])
                redo.append(scan)
        for scan in redo:
            if not scan.done:
                self._dispatch(scan)
        for scan in [s for s in self.scans.values() if s.held and s.unmet]:
            self._maybe_finish(scan)  # a held page whose slot can no longer commit fails now

    def tick(self, now: float) -> None:
        for scan in list(self.scans.values()):
            if now > scan.deadline:
                self._fail(scan, ErrorCode.TIMEOUT, "scan not answered in time")
            elif scan.waiting:
                self._dispatch(scan)
