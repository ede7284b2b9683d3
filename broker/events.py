"""What one part tells the others. A part emits an event (``BrokerState.emit``); the entry
(broker/core.py) hands it, at once and in the order of its table, to every part that handles
it. Parts never call each other: these are the only paths between them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from broker.state import Pos, Slot, Worker


@dataclass(frozen=True, slots=True)
class Committed:
    """The slot's committed seq rose from ``prev`` to ``upto``."""

    slot: Slot
    prev: int
    upto: int


@dataclass(frozen=True, slots=True)
class ChunkCommitted:
    """A put_chunk committed; its answer waits for every in-sync replica (flow control)."""

    slot: Slot
    seq: int
    request: Any  # broker.requests.Request


@dataclass(frozen=True, slots=True)
class ReplicaAdvanced:
    """An ACK from ``worker`` about these slots was taken (its positions may have risen). One
    event per ACK, not per slot: an MSET's ACK names hundreds of slots."""

    slots: list[Slot]
    worker: Worker


@dataclass(frozen=True, slots=True)
class PositionReported:
    """A replica told the broker where it is in the slot (READY after a (re)connect)."""

    slot: Slot
    wid: str
    pos: Pos


@dataclass(frozen=True, slots=True)
class RepairNeeded:
    """Bring this replica up to the slot's last write (replay or snapshot)."""

    slot: Slot
    wid: str
    force: bool = False


@dataclass(frozen=True, slots=True)
class WorkerLost:
    worker: Worker


@dataclass(frozen=True, slots=True)
class MoveAbandoned:
    slot: int
    receiver: str


@dataclass(frozen=True, slots=True)
class HistoryRewritten:
    """Committed writes of a slot are gone (more replicas lost than the fault model allows): its
    seqs after the surviving position will name other writes."""

    slot: Slot
    reason: str


Event = Committed | ChunkCommitted | ReplicaAdvanced | PositionReported | RepairNeeded | WorkerLost \
    | MoveAbandoned | HistoryRewritten
