"""How long the broker takes to answer each request, by op and outcome (the
``zkv_broker_request_duration_seconds`` histogram, broker/metrics.py).

A request is timed from the moment the broker decodes it to its final reply (``replies.reply``,
which every answer passes through), by the broker's own clock: so the figure includes waiting
for the replicas' acknowledgements and reads, not the client's network. Plain integers kept by
the loop and copied into the metrics snapshot, like every other counter (protocol/metrics.py)."""

from __future__ import annotations

import bisect
from collections.abc import Callable
from typing import Any

BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
MAX_IN_FLIGHT = 200_000  # requests timed at once; past it new ones go untimed (never unbounded)


class RequestTimes:
    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.started: dict[tuple[bytes, Any], tuple[str, float]] = {}
        # (op, outcome) -> [count per bucket (the last one: over the largest bound), sum of seconds]
        self.histograms: dict[tuple[str, str], list[float]] = {}

    def begin(self, identity: bytes, rid: Any, op: str) -> None:
        if len(self.started) < MAX_IN_FLIGHT:
            self.started[(identity, rid)] = (op, self.clock())

    def end(self, identity: bytes, header: dict[str, Any]) -> None:
        """A final reply: its request's time, with the outcome ``ok`` or the error code."""
        began = self.started.pop((identity, header.get("id")), None)
        if began is None:
            return  # not a timed request (a watch, mmi, an undecodable message)
        op, at = began
        outcome = "ok" if header.get("ok") else str(header.get("code", "error"))
        seconds = max(0.0, self.clock() - at)
        h = self.histograms.get((op, outcome))
        if h is None:
            h = self.histograms[(op, outcome)] = [0] * (len(BUCKETS) + 2)
        h[bisect.bisect_left(BUCKETS, seconds)] += 1
        h[-1] += seconds

    def export(self) -> list[dict[str, Any]]:
        """For the metrics snapshot: cumulative bucket counts as Prometheus wants them."""
        out = []
        for (op, outcome), h in sorted(self.histograms.items()):
            cumulative, total = [], 0
            for n in h[:-1]:
                total += int(n)
                cumulative.append(total)
            out.append({"op": op, "outcome": outcome, "buckets": cumulative, "sum": h[-1]})
        return out
