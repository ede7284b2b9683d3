"""Replication messages that arrived before the worker could apply them (past a gap, or while a
snapshot of their slot is installed), kept per slot until the repair fills in what precedes them.

Bounded in count per slot and in bytes overall: a learner far behind a stream of large chunks must
not hold gigabytes in memory. A message not kept is not lost: the repair sends it again (a replay
of the broker's tail, or a snapshot).
"""

from __future__ import annotations

from protocol.replication import Replicate
from worker.records import Position

MAX_HELD_PER_SLOT = 10_000  # out-of-order messages kept while a gap is repaired
MAX_HELD_BYTES = 64 << 20  # and their values in all (a learner behind a stream of large chunks)


def _value_bytes(rep: Replicate) -> int:
    return sum(len(v) for v in rep.values)


class HeldMessages:
    def __init__(self) -> None:
        # slot -> seq -> message. A slot stays listed (perhaps with no message kept) until it is
        # drained: while it is, the worker keeps asking for its repair.
        self.by_slot: dict[int, dict[int, Replicate]] = {}
        self.bytes = 0  # value bytes of every held message (kept as they come and go)

    def slots(self) -> list[int]:
        return list(self.by_slot)

    def has_messages(self, slot: int) -> bool:
        return bool(self.by_slot.get(slot))

    def hold(self, rep: Replicate) -> None:
        held = self.by_slot.setdefault(rep.slot, {})
        old = held.pop(rep.seq, None)  # a later copy of a seq replaces the earlier (another epoch's)
        if old is not None:
            self.bytes -= _value_bytes(old)
        size = _value_bytes(rep)
        if len(held) < MAX_HELD_PER_SLOT and self.bytes + size <= MAX_HELD_BYTES:
            held[rep.seq] = rep  # else dropped: the repair sends it again (tail or snapshot)
            self.bytes += size

    def take_next(self, slot: int, cur: Position) -> Replicate | None:
        """Forget what the slot already has (at or below ``cur``), and take out the message that
        follows ``cur`` if one is held (next seq, written on top of ``cur``'s epoch)."""
        held = self.by_slot.get(slot)
        if held is None:
            return None
        for seq in [s for s in held if s <= cur.seq]:
            self.bytes -= _value_bytes(held.pop(seq))
        nxt = held.get(cur.seq + 1)
        if nxt is not None and nxt.prev_epoch == cur.epoch:
            self.bytes -= _value_bytes(held.pop(nxt.seq))
        else:
            nxt = None
        if not held:
            del self.by_slot[slot]
        return nxt

    def discard(self, slot: int) -> None:
        self.bytes -= sum(_value_bytes(r) for r in self.by_slot.pop(slot, {}).values())
