"""The commit rule, as a pure function (etcd-io/raft's ``quorum.MajorityConfig.CommittedIndex``).

A write at seq q of a slot is committed when W of the slot's replicas have applied (fsynced) a
position at or past q. So the committed seq is the W-th highest applied seq among the replicas
that count, capped by the last seq the broker sequenced.
"""

from __future__ import annotations

from collections.abc import Iterable

from broker.events import Committed
from broker.state import BrokerState, Slot


def committed_seq(applied: Iterable[int], w: int, last: int) -> int | None:
    """The highest seq that ``w`` of these applied seqs reach, at most ``last``; None when fewer
    than ``w`` replicas count (nothing can be said to be committed by them)."""
    seqs = sorted(applied, reverse=True)
    if len(seqs) < w:
        return None
    return min(seqs[w - 1], last)


def leased_seq(state: BrokerState, slot: Slot, now: float) -> int | None:
    """The highest seq every live read lease holder of the slot has applied (None: no lease
    holds): a write above it must not commit, or a holder could answer a read without it. A
    holder's position counts only while the process it was granted to is the one registered (a
    new one under the same id has not got its data). Leases that have run out are dropped here."""
    cap = None
    for wid, lease in list(slot.leases.items()):
        if lease.until <= now:
            del slot.leases[wid]
            continue
        w = state.workers.get(wid)
        p = slot.applied.get(wid)
        ok = p is not None and wid not in slot.snapshot_pending and w is not None and w.process == lease.process
        seq = p.seq if ok and p is not None else 0
        cap = seq if cap is None else min(cap, seq)
    return cap


def advance(state: BrokerState, slot: Slot) -> None:
    """Apply the commit rule to the slot's replicas; emit ``Committed`` if its committed seq rose."""
    if slot.committed >= slot.last.seq:
        slot.lease_lag_since = 0.0
        return  # nothing is left to commit (committed_seq is capped by the last seq)
    new = committed_seq((p.seq for w, p in slot.applied.items() if p is not None and w in slot.replicas),
                        state.cfg.w, slot.last.seq)
    if new is None or new <= slot.committed:
        return
    if slot.leases or state.commit_hold_until:
        now = state.clock()
        if now < state.commit_hold_until:
            return  # a predecessor's leases may still hold (broker/leases.py runs this again)
        cap = leased_seq(state, slot, now)
        if cap is not None and cap < new:
            new = cap
            if new <= slot.committed:
                if not slot.lease_lag_since:
                    slot.lease_lag_since = now  # the holder holds writes back and makes no progress
                return
            slot.lease_lag_since = now  # it holds some back, but progresses: the timer starts again
        else:
            slot.lease_lag_since = 0.0
    prev, slot.committed = slot.committed, new
    state.slot_changed(slot)
    state.emit(Committed(slot, prev, new))
