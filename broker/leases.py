"""Read leases: one replica of each slot answers the slot's reads without the broker.

The rule ("Paxos Quorum Leases", Moraru et al., SoCC 2014; TiKV's lease reads): while a worker
holds a lease on a slot, no write of the slot counts as committed until that worker has applied
it (``broker/quorum.py`` ``leased_seq``). A lease is granted only to a replica that has applied
everything committed, so for as long as it holds, the holder has every committed write of the
slot, and can answer a read of it alone. It holds back a value it cannot show yet: one whose
version is above the committed seq it knows (this part tells it, ``W_COMMITTED``).

Time: a lease is granted for ``read_lease`` seconds from when this broker handled the request;
the worker counts a shorter time (worker/leases.py) from before it sent the request, by its own
monotonic clock, so it stops answering before this broker stops counting it. A broker that starts
(a restart, a standby elected) commits nothing for ``read_lease`` seconds
(``BrokerState.commit_hold_until``): its predecessor's leases are unknown to it, and run out by then.

Only one replica per slot holds a lease (so a write waits for at most one particular replica),
the first of the slot's replicas, rotated by slot, that may hold one. A lease ends when it runs
out: this broker never takes one back, it only stops renewing it (a worker that lost the slot, a
move under way, a copy being replaced, a holder that has held the slot's writes back for
``LAG_GRACE``), and a dead worker's lease still counts until its end. A lease belongs to the worker
*process* it was granted to: a new process under the same id (a restart, a new data directory)
holds nothing of it, and the old one's lease still holds commits back until it runs out.

The longest lease the cluster may grant is in its metadata record (``read_lease``), made durable
before the first grant: a successor holds commits for that long even if it was given a shorter
``--read-lease`` (or none); once it has, it writes its own.
The safety argument is in docs/architecture.md ("Read leases").
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import structlog

from broker.events import Committed
from broker.history import in_history
from broker.quorum import advance
from broker.state import BrokerState, Lease, Slot, Worker
from broker.worker_messages import LeaseRequest
from protocol.frames import W_COMMITTED, W_LEASE_GRANT, pack

log = structlog.get_logger("zkv.broker")

LAG_GRACE = 1.0  # s a holder may hold its slot's writes back before its lease is not renewed


class Leases:
    def __init__(self, state: BrokerState) -> None:
        self.state = state
        # Holder -> {slot: committed seq} to tell it at the end of this turn.
        self.notices: dict[str, dict[int, int]] = defaultdict(dict)

    @property
    def enabled(self) -> bool:
        return self.state.cfg.read_lease > 0

    # -- granting ----------------------------------------------------------------------------------

    def may_hold(self, slot: Slot, wid: str) -> bool:
        """Could ``wid`` hold the slot's lease now? A replica with a reads endpoint that has applied
        everything committed, on the slot's history, with nothing about the slot in flux."""
        state = self.state
        w = state.workers.get(wid)
        p = slot.applied.get(wid)
        return (w is not None and w.alive and bool(w.reads) and bool(w.process) and p is not None
                and wid in slot.replicas
                and not slot.recovering and not slot.learners and wid not in slot.snapshot_pending
                and state.qualifies(slot, wid) and in_history(slot, p))

    def lagging(self, slot: Slot, now: float) -> bool:
        """Has the slot's holder held its writes back for LAG_GRACE (a disk it cannot write, a
        slow or stuck process)? Then it is not renewed: the writes commit once its lease is out."""
        return bool(slot.lease_lag_since) and now - slot.lease_lag_since >= LAG_GRACE

    def expire(self, slot: Slot, now: float) -> None:
        """Drop the slot's leases that have run out, and commit what they held back: before a new
        holder is chosen, so that a holder that held writes back is not qualified again by them."""
        ran_out = [wid for wid, lease in slot.leases.items() if lease.until <= now]
        if ran_out:
            for wid in ran_out:
                del slot.leases[wid]
            advance(self.state, slot)

    def holder_for(self, slot: Slot, now: float) -> str | None:
        """Who may have the slot's lease: its current holder while it holds and may, else the first
        replica (in an order rotated by slot, to spread the reads) that may."""
        for wid, lease in slot.leases.items():
            if lease.until > now:  # one holder at a time: renewed only for the same process
                w = self.state.workers.get(wid)
                ok = w is not None and w.process == lease.process and self.may_hold(slot, wid)
                return wid if ok and not self.lagging(slot, now) else None
        n = len(slot.replicas)
        for i in range(n):
            wid = slot.replicas[(slot.id + i) % n]
            if self.may_hold(slot, wid):
                return wid
        return None

    def on_request(self, w: Worker, msg: LeaseRequest) -> None:
        """Grant (or renew) every lease the worker may hold, in one answer that names the request."""
        state = self.state
        now = state.clock()
        granted: list[int] = []
        committed: list[int] = []
        if self.enabled and now >= state.commit_hold_until and w.reads:
            until = now + state.cfg.read_lease
            for s in sorted(w.slots):
                slot = state.slots.get(s)
                if slot is None:
                    continue
                self.expire(slot, now)
                if self.holder_for(slot, now) == w.id:
                    if w.id not in slot.leases:
                        slot.lease_lag_since = 0.0  # a new holder: nothing held back by it yet
                    slot.leases[w.id] = Lease(until, w.process)
                    granted.append(s)
                    committed.append(slot.committed)
            if granted and state.cfg.read_lease > state.lease_recorded:
                self._record(state.cfg.read_lease)  # durable before the grant is sent (ready.execute)
        state.to_worker(w, [W_LEASE_GRANT, pack({"id": msg.id, "epoch": state.epoch, "lease": state.cfg.read_lease,
                                                 "slot_count": state.cfg.slots, "slots": granted,
                                                 "committed": committed})])

    def _record(self, lease: float) -> None:
        state = self.state
        state.lease_recorded = lease
        state.ready.metadata.cluster = state.cluster_record(read_lease=lease)
        state.ready.must_sync = True

    # -- what holders are told ---------------------------------------------------------------------

    def on_committed(self, ev: Committed) -> None:
        if ev.slot.leases:
            for wid in ev.slot.leases:
                self.notices[wid][ev.slot.id] = ev.upto

    def end_turn(self) -> None:
        """One W_COMMITTED per holder for everything committed this turn (an MSET's hundreds of slots
        in one message)."""
        if not self.notices:
            return
        state = self.state
        for wid, slots in self.notices.items():
            w = state.workers.get(wid)
            if w is not None and w.alive:
                state.to_worker(w, [W_COMMITTED, pack([x for s, q in slots.items() for x in (s, q)])])
        self.notices.clear()

    # -- time --------------------------------------------------------------------------------------

    def tick(self, now: float) -> None:
        """Writes held back by a lease that ran out (its holder died, paused, lost the slot) or by
        the start of this term commit now."""
        state = self.state
        if state.commit_hold_until:
            if now < state.commit_hold_until:
                return
            state.commit_hold_until = 0.0
            log.info("commit_hold_ended", lease_s=max(state.cfg.read_lease, state.lease_recorded))
            if state.lease_recorded > state.cfg.read_lease and state.slots:
                # Every lease of the longer kind has run out: from now on the cluster grants ours.
                self._record(state.cfg.read_lease)
            for slot in state.slots.values():
                advance(state, slot)
            return
        for slot in state.slots.values():
            if slot.leases:
                self.expire(slot, now)

    def leased_slots(self) -> int:
        """Slots with a lease that holds now (status, metrics)."""
        now = self.state.clock()
        return sum(1 for slot in self.state.slots.values() if any(x.until > now for x in slot.leases.values()))

    # -- the map clients read by -------------------------------------------------------------------

    def lease_map(self) -> dict[str, Any]:
        """``mmi.leases``: which reads endpoint answers each slot now (-1: ask the broker)."""
        state = self.state
        now = state.clock()
        urls: list[str] = []
        index: dict[str, int] = {}
        holders = []
        if self.enabled:
            for s in range(state.cfg.slots):
                slot = state.slots.get(s)
                holder = next((wid for wid, lease in slot.leases.items() if lease.until > now
                               and (h := state.workers.get(wid)) is not None and h.process == lease.process),
                              None) if slot else None
                w = state.workers.get(holder) if holder else None
                if w is None or not w.reads or not w.alive:
                    holders.append(-1)
                    continue
                if w.reads not in index:
                    index[w.reads] = len(urls)
                    urls.append(w.reads)
                holders.append(index[w.reads])
        return {"slots": state.cfg.slots, "lease": state.cfg.read_lease, "urls": urls, "holders": holders}
