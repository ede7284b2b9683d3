"""Per-replica progress: ACKs and NACKs, and bringing a replica that is behind up to date, by
replaying the broker's tail or, when the tail does not reach back, by a snapshot relayed from a
healthy replica (pulled one part at a time, throttled to ``copy_rate``)."""

from __future__ import annotations

import structlog

from broker.events import MoveAbandoned, PositionReported, RepairNeeded, ReplicaAdvanced, WorkerLost
from broker.history import in_history
from broker.quorum import advance
from broker.state import TICK_SECONDS, BrokerState, Pos, Slot, Transfer, Worker
from broker.worker_messages import Ack, Nack, SnapshotPart
from protocol.frames import W_REPLAY, W_SNAPSHOT_DELIVER, W_SNAPSHOT_REQUEST, pack

log = structlog.get_logger("zkv.broker")

REPAIR_RETRY = 2.0  # s before a repair that has not finished is started again
STALLED_TRANSFER = 10.0  # s without a snapshot part before a transfer is abandoned
LAG_GRACE = 1.0  # s a replica may trail the slot's last write before the broker repairs it


class Replicas:
    def __init__(self, state: BrokerState) -> None:
        self.state = state
        self.transfers: dict[bytes, Transfer] = {}  # by token
        self.copied: dict[tuple[int, str], Transfer] = {}  # the last finished one per (slot, receiver)
        self.copy_budget = float(state.cfg.copy_rate)  # token bucket for relayed snapshot bytes
        self.throttled: list[Transfer] = []  # transfers waiting for budget before their next part

    # -- what replicas say -----------------------------------------------------------------------

    def on_ack(self, w: Worker, ack: Ack) -> None:
        state = self.state
        taken: list[Slot] = []  # every slot of the ACK that is serving: the commit rule runs for each
        for s, e, q in ack.positions:
            slot = state.slots.get(s)
            if slot is None or slot.recovering:
                continue
            taken.append(slot)
            if w.id not in slot.replicas and w.id not in slot.learners:
                continue
            pos = Pos(q, e)
            pending = slot.snapshot_pending.get(w.id)
            if pending is not None:
                if not ack.snap or ack.snap != pending:
                    continue  # an ACK about the copy the snapshot replaces
                del slot.snapshot_pending[w.id]
                slot.applied[w.id] = pos if in_history(slot, pos) else None  # may be lower
                continue
            if not (pos.epoch == state.epoch and pos.seq <= slot.last.seq) and not in_history(slot, pos):
                slot.applied[w.id] = None
                continue
            cur = slot.applied.get(w.id)
            if cur is None or pos.seq > cur.seq:
                slot.applied[w.id] = pos
            if pos == slot.last:
                slot.repairs.pop(w.id, None)
        for s, q, found, earlier in ack.results:
            slot = state.slots.get(s)
            if slot is not None:
                batch = slot.pending.get(q)
                if batch is not None and batch.found is None and batch.duplicate_of is None:
                    batch.found = [list(f) for f in found] if found else None
                    batch.duplicate_of = earlier
        for slot in taken:
            advance(state, slot)
        state.emit(ReplicaAdvanced(taken, w))

    def on_nack(self, w: Worker, nack: Nack) -> None:
        slot = self.state.slots.get(nack.slot)
        if slot is None or slot.recovering or (w.id not in slot.replicas and w.id not in slot.learners):
            return
        # A NACK says where the replica is stuck, not what it has on disk: it never raises `applied`.
        if w.id not in slot.snapshot_pending and not in_history(slot, Pos(nack.seq, nack.epoch)):
            slot.applied[w.id] = None
        self.repair(slot, w.id, force=True)

    def on_position(self, ev: PositionReported) -> None:
        """A replica of a serving slot told us where it is (READY after a restart or reconnect)."""
        slot, wid, pos = ev.slot, ev.wid, ev.pos
        if slot.recovering:
            return  # broker/recovery.py takes it
        slot.applied[wid] = pos if in_history(slot, pos) else None
        slot.snapshot_pending.pop(wid, None)  # READY reports what is on its disk now
        slot.repairs.pop(wid, None)
        if slot.applied[wid] != slot.last:
            self.repair(slot, wid)
        # What READY reports is on the replica's disk (fsynced), so it counts for the commit rule
        # as an ACK would. It must: a worker declared lost (a stalled disk, a paused process) has
        # the ACKs it sent meanwhile refused with DISCONNECT. If every replica applied the slot's
        # last writes that way, none of them will ever ACK those writes again, and without this
        # the committed seq stays below them until the next write to the slot: every read of a
        # key they changed is held until it times out, for as long as the slot gets no writes.
        advance(self.state, slot)
        self.state.emit(ReplicaAdvanced([slot], self.state.workers[wid]))

    # -- repair ----------------------------------------------------------------------------------

    def on_repair_needed(self, ev: RepairNeeded) -> None:
        self.repair(ev.slot, ev.wid, ev.force)

    def repair(self, slot: Slot, wid: str, force: bool = False) -> None:
        """Bring one replica up to the slot's last write: replay the tail if it reaches back far
        enough, otherwise a snapshot from an up-to-date replica."""
        state = self.state
        now = state.clock()
        started = slot.repairs.get(wid)
        if started is not None and now - started < (REPAIR_RETRY / 4 if force else REPAIR_RETRY):
            return
        if not state.alive(wid):
            return
        w = state.workers[wid]
        pos = slot.applied.get(wid)
        if pos is not None and pos.seq < slot.last.seq and slot.tail and slot.tail[0].seq <= pos.seq + 1:
            entries = [e for e in slot.tail if e.seq > pos.seq]
            if entries[0].seq == pos.seq + 1 and entries[0].prev_epoch == pos.epoch:
                slot.repairs[wid] = now
                for e in entries:
                    state.to_worker(w, [W_REPLAY, *e.frames])
                state.stats["replays_sent"] += len(entries)
                return
        if pos is not None and pos == slot.last:
            return
        if any(t.slot == slot.id and t.receiver == wid for t in self.transfers.values()):
            return  # a snapshot is on its way (a stalled one is abandoned by the tick)
        donors = [d for d in slot.replicas if d != wid and state.alive(d)
                  and (p := slot.applied.get(d)) is not None and p.seq >= slot.committed]
        if not donors:
            log.warning("no_snapshot_donor", slot=slot.id, worker=wid)
            slot.repairs[wid] = now
            return
        donor = max(donors, key=lambda d: slot.applied[d])  # type: ignore[arg-type, return-value]
        t = Transfer(state.token(), slot.id, donor, wid, started=now, last_activity=now)
        self.transfers[t.token] = t
        self.copied.pop((slot.id, wid), None)
        slot.repairs[wid] = now
        slot.applied[wid] = None  # its data is being replaced; it counts again once installed
        slot.snapshot_pending[wid] = t.token
        state.stats["snapshots_sent"] += 1
        log.debug("snapshot_transfer", slot=slot.id, to=wid, donor=donor)
        if self.copy_budget >= 0:
            self._request_part(t)
        else:
            self.throttled.append(t)

    def _request_part(self, t: Transfer) -> None:
        self.state.to_worker(self.state.workers[t.donor], [W_SNAPSHOT_REQUEST,
                                                           pack({"slot": t.slot, "token": t.token,
                                                                 "part": t.next_part})])

    def on_snapshot_part(self, donor: Worker, msg: SnapshotPart) -> None:
        hdr = msg.header
        t = self.transfers.get(bytes(hdr["token"]))
        if t is None or t.donor != donor.id:
            return
        if hdr.get("error") or int(hdr.get("part", -1)) != t.next_part:
            log.warning("snapshot_transfer_failed", slot=t.slot, donor=t.donor, error=hdr.get("error"))
            self._end_transfer(t)
            return
        state = self.state
        if not state.alive(t.receiver):
            self._end_transfer(t)
            return
        state.to_worker(state.workers[t.receiver], [W_SNAPSHOT_DELIVER, *msg.frames])
        size = sum(len(f) for f in msg.frames)
        t.last_activity = state.clock()
        t.keys += int(hdr.get("keys", 0))  # the donor counts as it counted the totals of part 0
        t.bytes += int(hdr.get("bytes", 0))
        if t.next_part == 0:
            t.total_keys, t.total_bytes = int(hdr.get("total_keys", 0)), int(hdr.get("total_bytes", 0))
        t.next_part += 1
        self.copy_budget -= size
        if hdr.get("last"):
            del self.transfers[t.token]
            t.done = True
            self.copied[(t.slot, t.receiver)] = t  # status shows what was copied while the move catches up
            return
        if self.copy_budget >= 0:
            self._request_part(t)
        else:
            self.throttled.append(t)

    def _end_transfer(self, t: Transfer) -> None:
        self.transfers.pop(t.token, None)
        if t in self.throttled:
            self.throttled.remove(t)
        slot = self.state.slots.get(t.slot)
        if slot is not None:
            slot.repairs.pop(t.receiver, None)  # the tick starts another one

    def transfer_to(self, slot: int, receiver: str) -> Transfer | None:
        """The snapshot transfer filling ``receiver`` with ``slot``: the one under way, else the
        last one finished (``done``), if any."""
        return next((t for t in self.transfers.values() if t.slot == slot and t.receiver == receiver),
                    self.copied.get((slot, receiver)))

    # -- events and time -------------------------------------------------------------------------

    def on_move_abandoned(self, ev: MoveAbandoned) -> None:
        self.copied.pop((ev.slot, ev.receiver), None)
        for t in list(self.transfers.values()):
            if t.slot == ev.slot and t.receiver == ev.receiver:
                self._end_transfer(t)

    def on_worker_lost(self, ev: WorkerLost) -> None:
        w = ev.worker
        for t in list(self.transfers.values()):
            if w.id in (t.receiver, t.donor):
                self._end_transfer(t)
        for s in w.slots:
            if s in self.state.slots:
                self.state.slots[s].repairs.pop(w.id, None)

    def abandon_stalled(self, now: float) -> None:
        for t in list(self.transfers.values()):
            if now - t.last_activity > STALLED_TRANSFER:
                log.warning("snapshot_transfer_stalled", slot=t.slot, donor=t.donor, to=t.receiver)
                self._end_transfer(t)

    def refill(self) -> None:
        """The copy throttle's token bucket gains one tick's worth; waiting transfers go on."""
        rate = self.state.cfg.copy_rate
        self.copy_budget = min(self.copy_budget + rate * TICK_SECONDS, float(rate))
        while self.throttled and self.copy_budget >= 0:
            self._request_part(self.throttled.pop(0))

    def repair_laggards(self, now: float) -> None:
        """Replicas that trail a slot's last write for longer than LAG_GRACE (lost PUB messages
        and nothing after them to show the gap) are repaired."""
        for slot in self.state.slots.values():
            if slot.recovering:
                continue
            for wid in slot.replicas + slot.learners:
                p = slot.applied.get(wid)
                if (p is None or p.seq < slot.last.seq) and now - slot.last_write > LAG_GRACE:
                    self.repair(slot, wid)
