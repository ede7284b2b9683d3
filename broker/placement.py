"""Which workers hold which slot: rendezvous (highest random weight) hashing.

A pure function, stable in the worker ids (not their order): adding a worker moves only the slots
it wins, about 1/(N+1) of them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable


def _score(worker_id: str, slot: int) -> int:
    h = hashlib.blake2b(f"{worker_id}/{slot}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "big")


def replicas_for_slot(slot: int, workers: list[str], rf: int) -> list[str]:
    """The ``rf`` workers with the highest score for this slot, best first."""
    return sorted(workers, key=lambda w: _score(w, slot), reverse=True)[:rf]


def slot_map(slots: int | Iterable[int], workers: list[str], rf: int) -> dict[int, list[str]]:
    """The replicas of ``slots`` (a count: all of them; or the slot ids of one group)."""
    return {s: replicas_for_slot(s, workers, rf) for s in (range(slots) if isinstance(slots, int) else slots)}
