"""Test hooks for the worker loop, switched on only by the hidden ``zkv worker --test-*`` options
(or their ``ZKV_WORKER_TEST_*`` environment variables), which only tests set. With none set,
``hooks`` returns no hook at all and the loop runs exactly as in production.

- ``--test-drop-replication every=N`` / ``prob=P``: lose chosen replication messages, as a PUB at
  its high-water mark would, so that gap repair is exercised (tests/test_faults.py).
- ``--test-clock-skew-ms MS``: offset the wall clock the worker reports to the broker.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass


class ReplicationDropper:
    """Drops chosen replication messages (``every=N`` or ``prob=P``). Called with each message's
    frames; returns whether to keep it."""

    def __init__(self, spec: str) -> None:
        self.every = 0
        self.prob = 0.0
        self.count = 0
        self.dropped = 0
        self.rng = random.Random(os.getpid())
        for part in filter(None, spec.split(",")):
            name, _, val = part.partition("=")
            if name == "every":
                self.every = int(val)
            elif name == "prob":
                self.prob = float(val)
            else:
                raise ValueError(f"unknown drop spec {part!r}")

    def drop(self) -> bool:
        self.count += 1
        hit = (self.every and self.count % self.every == 0) or (self.prob and self.rng.random() < self.prob)
        if hit:
            self.dropped += 1
        return bool(hit)

    def __call__(self, frames: list[bytes]) -> bool:
        return not self.drop()


@dataclass(frozen=True)
class Hooks:
    replication_filter: Callable[[list[bytes]], bool] | None = None
    wall_ms: Callable[[], int] | None = None


def hooks(drop_replication: str, clock_skew_ms: int) -> Hooks:
    """The hooks the test options ask for (none when they are empty)."""
    wall_ms = None
    if clock_skew_ms:
        def wall_ms() -> int:
            return int(time.time() * 1000) + clock_skew_ms

    return Hooks(replication_filter=ReplicationDropper(drop_replication) if drop_replication else None,
                 wall_ms=wall_ms)
