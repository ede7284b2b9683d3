"""Which broker incarnation wrote which part of a slot's history: questions about positions, and
what follows when a replica is found off the history (``distrust``).

Replicas apply a write only on top of the position it names (Raft's log matching rule), so an
equal (epoch, seq) means an equal history up to there.
"""

from __future__ import annotations

import structlog

from broker.events import RepairNeeded
from broker.state import BrokerState, Pos, Slot

log = structlog.get_logger("zkv.broker")


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


def void_answer(slot: Slot, floor: int, applied: list[int] | None) -> str | None:
    """Why a replica's answer about ``slot`` is void, or None if it is not. ``applied``: the
    [seq, epoch] it said it had applied when it read (epoch absent from older workers; None: not
    said). "lost": it held less than ``floor`` (committed when it was asked), so it lost the slot
    meanwhile (a move finished). "off_history": it held writes of an earlier leader that were
    never committed and that this term's recovery did not adopt, and has not been rolled back
    from them yet (an ACK of an older position can make the broker count it as caught up)."""
    if applied is None:
        return None
    if applied[0] < floor:
        return "lost"
    if len(applied) > 1 and not in_history(slot, Pos(applied[0], applied[1])):
        return "off_history"
    return None


def answer_is_void(state: BrokerState, wid: str, slot: Slot, floor: int, applied: list[int] | None) -> bool:
    """``void_answer``, and a replica found off the history is distrusted: asked nothing of the
    slot again until repaired."""
    why = void_answer(slot, floor, applied)
    if why == "off_history":
        distrust(state, slot, wid)
    return why is not None


def applied_of(entries: list[list[int]]) -> dict[int, list[int]]:
    """A read or scan answer's ``applied`` field: slot -> [seq, epoch] (epoch from newer workers)."""
    return {int(e[0]): [int(x) for x in e[1:3]] for e in entries}


def distrust(state: BrokerState, slot: Slot, wid: str) -> None:
    """A replica's answer showed it off the slot's history (``void_answer``): it counts as
    holding nothing of the slot until a repair replaces its copy. (Once: it is then not counted.)"""
    counted = slot.applied.get(wid)
    if counted is not None:
        log.warning("replica_off_history", slot=slot.id, worker=wid, counted=[counted.epoch, counted.seq])
        slot.applied[wid] = None
        state.emit(RepairNeeded(slot, wid, force=True))
