"""Expiry through the log: workers report keys whose TTL ran out by the broker's clock, and the
broker sequences their deletion (OP_REAP, only if the key still has that version and expire_at),
so every replica deletes them at the same place in the slot's order and watches report them."""

from __future__ import annotations

from broker.events import Committed
from broker.sequencer import sequence_unanswered
from broker.state import BrokerState, Worker
from broker.worker_messages import Expired
from protocol.replication import COND_VERSION, OP_REAP, WriteOp

MAX_REAPING = 100_000  # expired keys whose reaping is sequenced and not yet committed
REAP_STALE = 30.0  # s before a reaping that never committed may be sequenced again


class Expiry:
    def __init__(self, state: BrokerState) -> None:
        self.state = state
        # Per slot, keys whose reaping is sequenced: key -> (seq, when), so repeated reports of
        # the same expired key are not sequenced again while the first reaping commits.
        self.reaping: dict[int, dict[bytes, tuple[int, float]]] = {}

    def on_report(self, w: Worker, msg: Expired) -> None:
        state = self.state
        now_ms, now = state.wall_ms(), state.clock()
        by_slot: dict[int, list[WriteOp]] = {}
        pending = sum(len(r) for r in self.reaping.values())
        for s, key, version, expire_at in msg.keys:
            slot = state.slots.get(int(s))
            # Only a replica that applied everything committed: one that lags (slow, repaired,
            # restarted from an old copy) may still hold keys whose reap already committed, and
            # its reports would sequence the same reaps again and again.
            if (slot is None or slot.recovering or not state.qualifies(slot, w.id) or w.id not in slot.replicas
                    or not 0 < int(expire_at) <= now_ms):
                continue
            key = bytes(key)
            if key in self.reaping.get(slot.id, {}) or pending >= MAX_REAPING:
                continue
            pending += 1
            by_slot.setdefault(slot.id, []).append(WriteOp(OP_REAP, key, int(expire_at), COND_VERSION, int(version)))
        for s, ops in by_slot.items():
            slot = state.slots[s]
            if state.live_replicas(slot) < state.cfg.w:
                continue
            seq = sequence_unanswered(state, slot, "reap", ops)
            reaping = self.reaping.setdefault(s, {})
            for o in ops:
                reaping[o.key] = (seq, now)

    def on_committed(self, ev: Committed) -> None:
        reaping = self.reaping.get(ev.slot.id)
        if reaping:
            for key in [k for k, (q, _) in reaping.items() if q <= ev.upto]:
                del reaping[key]

    def tick(self, now: float) -> None:
        for reaping in self.reaping.values():
            for key in [k for k, (_, t) in reaping.items() if now - t > REAP_STALE]:
                del reaping[key]  # never committed (replicas lost): sequence it again when reported
