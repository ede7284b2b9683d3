"""Watches (docs/protocol.md §1.10): committed changes of a key prefix, in commit order per key,
resumable from a cursor of one committed seq per slot; an explicit ``resync`` when the broker can
no longer say what changed, never a silent gap."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import structlog

from broker.events import Committed, HistoryRewritten
from broker.messages import Unavailable, WatchRequest
from broker.replies import manifest_field, partial, reply
from broker.state import BrokerState, Slot
from protocol.errors import ErrorCode
from protocol.frames import unpack
from protocol.limits import STREAM_INCOMPLETE
from protocol.replication import (
    COND_NONE,
    OP_ABORT_STREAM,
    OP_CHUNK,
    OP_DELETE,
    OP_EXPIRE,
    OP_PUT,
    OP_PUT_STREAM,
    OP_REAP,
)

log = structlog.get_logger("zkv.broker")

MAX_WATCHES = 1024
WATCH_HEARTBEAT = 1.0  # s between progress messages (events: [], with the cursor) to a watch
WATCH_EXPIRY = 10.0  # s without a keepalive before a watch is dropped
WATCH_BATCH = 1000  # events in one PARTIAL of a replay
WATCH_KINDS = {OP_PUT: "put", OP_DELETE: "delete", OP_EXPIRE: "ttl", OP_REAP: "expired", OP_PUT_STREAM: "put"}


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


# What the replicas found for a batch that was a retry of an earlier write (applied as a no-op);
# compared by identity.
NO_CHANGE: list[list[Any]] = []


class Watches:
    def __init__(self, state: BrokerState) -> None:
        self.state = state
        self.watches: dict[tuple[bytes, int], Watch] = {}  # by (client identity, request id)
        # Per slot, the committed seq up to which watches have been given events. Committed seqs are
        # never reused (a new epoch only reuses seqs that never committed), so a slot's seq names
        # one committed write for ever: a cursor of these survives broker restarts.
        self.seq: dict[int, int] = {s: sl.committed for s, sl in state.slots.items()}
        # Per slot, seq -> what the replicas found, for committed batches whose effect depends on
        # it (conditional writes, deletes, TTL changes, reaps); kept as long as the tail has the batch.
        self.results: dict[int, dict[int, list[list[Any]]]] = {}

    def cursor(self) -> dict[str, Any]:
        return {"c": self.state.cluster_id, "s": [self.seq.get(s, 0) for s in range(self.state.cfg.slots)]}

    def on_request(self, identity: bytes, msg: WatchRequest) -> None:
        state = self.state
        key = (identity, msg.rid)
        now = state.clock()
        if msg.cancel:
            w = self.watches.pop(key, None)
            reply(state, identity, {"id": msg.rid, "ok": True, "cancelled": w is not None})
            return
        if msg.keepalive:
            w = self.watches.get(key)
            if w is None:
                raise Unavailable(ErrorCode.UNAVAILABLE,
                                  "no such watch (it expired or the broker restarted): open it again with since")
            w.last_heard = now
            return
        state.require_all_slots()
        if key not in self.watches and len(self.watches) >= MAX_WATCHES:
            raise Unavailable(ErrorCode.UNAVAILABLE, f"too many watches ({MAX_WATCHES}); try again later")
        w = Watch(identity, msg.rid, msg.prefix, last_heard=now)
        self.watches[key] = w
        since = msg.since
        if since is None:
            self._send(w, [], with_cursor=True)
            return
        if since["c"] != state.cluster_id or len(since["s"]) != state.cfg.slots:
            self._resync(w, "the cursor is from another cluster")
            return
        events: list[WatchEventOut] = []
        for s, after in enumerate(since["s"]):
            if s not in state.slots:
                continue  # another group's slot (active brokers): its leader replays it
            upto = self.seq.get(s, 0)
            if after == upto:
                continue
            got = self._slot_events(state.slots[s], after, upto) if after < upto else None
            if got is None:
                self._resync(w, f"slot {s}: the broker no longer holds the changes after seq {after}")
                return
            events += [ev for ev in got[0] if ev.event[1].startswith(w.prefix)]
            if any(k.startswith(w.prefix) for k in got[1]):
                self._resync(w, f"slot {s}: the outcome of a change is unknown")
                return
        for i in range(0, len(events), WATCH_BATCH):
            self._send(w, events[i:i + WATCH_BATCH], with_cursor=False)
        self._send(w, [], with_cursor=True)

    def _slot_events(self, slot: Slot, after: int, upto: int) -> tuple[list[WatchEventOut], list[bytes]] | None:
        """The committed changes of ``slot`` with seq in (after, upto], from the tail: events
        ``[kind, key, slot, seq, expire_at]`` with their value frames (and, for a streamed value,
        its manifest field instead), and the keys whose outcome is unknown (what the replicas
        found was not kept). None if the tail does not reach back."""
        entries = [e for e in slot.tail if after < e.seq <= upto]
        if len(entries) != upto - after or (entries and entries[0].seq != after + 1):
            return None
        results = self.results.get(slot.id, {})
        out: list[WatchEventOut] = []
        unknown: list[bytes] = []
        for e in entries:
            ops = unpack(e.frames[0])[6]
            found = results.get(e.seq)
            if found is NO_CHANGE:
                continue  # a retry the replicas had applied before: nothing changed
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
                                             manifest_field(value) if streamed else None))
        return out, unknown

    def on_committed(self, ev: Committed) -> None:
        """Keep what replicas found for the newly committed batches, and give watches their events.
        Runs before the writes are answered (the order of the entry's table)."""
        slot, new = ev.slot, ev.upto
        prev = self.seq.get(slot.id, 0)
        if new <= prev:
            return
        self.seq[slot.id] = new
        results = self.results.setdefault(slot.id, {})
        for seq, batch in slot.pending.items():
            if seq > new:
                break
            if batch.duplicate_of is not None:
                results[seq] = NO_CHANGE
            elif batch.found is not None:
                results[seq] = batch.found
        floor = slot.tail[0].seq if slot.tail else new + 1
        while results:  # seqs were added in increasing order: drop what left the tail
            q = next(iter(results))
            if q >= floor:
                break
            del results[q]
        if self.watches:
            self._deliver(slot, prev, new)

    def _deliver(self, slot: Slot, prev: int, new: int) -> None:
        got = self._slot_events(slot, prev, new)
        for w in list(self.watches.values()):
            if got is None:
                self._resync(w, f"slot {slot.id}: changes left the broker's tail before they committed")
                continue
            if any(k.startswith(w.prefix) for k in got[1]):
                self._resync(w, f"slot {slot.id}: the outcome of a change is unknown")
                continue
            mine = [ev for ev in got[0] if ev.event[1].startswith(w.prefix)]
            if mine:
                self._send(w, mine, with_cursor=False)

    def _send(self, w: Watch, events: list[WatchEventOut], with_cursor: bool,
              cursor: dict[str, Any] | None = None) -> None:
        w.n += 1
        w.last_sent = self.state.clock()
        hdr: dict[str, Any] = {"id": w.id, "ok": True, "n": w.n, "events": [ev.event for ev in events]}
        streams = {i: ev.stream for i, ev in enumerate(events) if ev.stream is not None}
        if streams:
            hdr["streams"] = streams
        if with_cursor:
            hdr["cursor"] = cursor or self.cursor()
        partial(self.state, w.identity, hdr, [ev.value for ev in events])

    def _resync(self, w: Watch, why: str) -> None:
        """End the watch with the resync signal: the client re-reads (scan) and watches again from
        the cursor given here."""
        self.watches.pop((w.identity, w.id), None)
        log.info("watch_resync", watch=w.id, reason=why)
        reply(self.state, w.identity, {"id": w.id, "ok": True, "resync": True, "message": why,
                                       "cursor": self.cursor()})

    def on_history_rewritten(self, ev: HistoryRewritten) -> None:
        # The seqs above the surviving position will be reused for other writes: no watch cursor
        # past it means anything any more.
        self.seq[ev.slot.id] = ev.slot.committed  # changes are delivered again from what survived
        for w in list(self.watches.values()):
            self._resync(w, ev.reason)

    def tick(self, now: float) -> None:
        cursor = None  # the same for every watch this turn: built once
        for key, w in list(self.watches.items()):
            if now - w.last_heard > WATCH_EXPIRY:
                del self.watches[key]
                log.info("watch_expired", watch=w.id, silent_s=round(now - w.last_heard, 1))
            elif now - w.last_sent >= WATCH_HEARTBEAT:
                cursor = cursor or self.cursor()
                self._send(w, [], with_cursor=True, cursor=cursor)
