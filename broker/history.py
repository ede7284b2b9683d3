"""Which broker incarnation wrote which part of a slot's history: pure questions about positions.

Replicas apply a write only on top of the position it names (Raft's log matching rule), so an
equal (epoch, seq) means an equal history up to there.
"""

from __future__ import annotations

from broker.state import Pos, Slot


def epoch_of(slot: Slot, seq: int) -> int | None:
    """The epoch that wrote ``seq`` in the slot's history (None if unknown)."""
    found = None
    for epoch, first in slot.epochs:
        if first > seq:
            break
        found = epoch
    return found


def in_history(slot: Slot, pos: Pos, last_known: bool = True) -> bool:
    """Is this replica position a prefix of the broker's history of the slot? Without
    ``last_known`` (a new leader in etcd mode, before recovery), the history's end is unknown:
    any position the epoch history attributes to the epoch that holds it is on it."""
    if pos.seq == 0 or pos == slot.last:
        return True
    if last_known and pos.seq > slot.last.seq:
        return False
    return epoch_of(slot, pos.seq) == pos.epoch
