"""The live cluster page's data (``/``, ``/v1/cluster``, ``/v1/cluster/events``): the broker's
status each second, with the request and apply rates it does not keep (counters turned into
per-second rates between two readings).

``ClusterView.update`` is sans-I/O (a status and a time in, the page's view out); ``ClusterFeed``
polls the cluster for it, once a second and only while some page is open, and hands every view
to each open page, so a hundred open pages cost the cluster one status request a second.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

from protocol.errors import ZkvError

log = structlog.get_logger("zkv.gateway")

POLL_INTERVAL_S = 1.0
RATES = ("writes_committed", "reads_served", "scans_served", "rejected_requests", "bad_requests")
PAGE_QUEUE = 4  # views queued for a slow page; older ones are dropped (each view is complete)


@dataclass
class ClusterView:
    """Status readings in, the page's view out: the reading as it is, plus ``rates`` (cluster
    counters per second) and each worker's ``applied_per_s``, from the difference with the
    previous reading. A counter that went down (a new leader counts from 0) gives no rate."""

    previous: tuple[float, dict[str, Any]] | None = None

    def update(self, status: dict[str, Any], now: float) -> dict[str, Any]:
        view = dict(status)
        rates: dict[str, float | None] = {name: None for name in RATES}
        per_worker: dict[str, float | None] = {}
        if self.previous is not None:
            then, before = self.previous
            dt = now - then
            if dt > 0:
                for name in RATES:  # a counter the broker has not started yet is 0
                    rates[name] = _rate(before.get(name, 0), status.get(name, 0), dt)
                applied_before = {w["id"]: w.get("applied") for w in before.get("workers", [])}
                for w in status.get("workers", []):
                    per_worker[w["id"]] = _rate(applied_before.get(w["id"]), w.get("applied"), dt)
        view["rates"] = rates
        view["workers"] = [{**w, "applied_per_s": per_worker.get(w["id"])} for w in status.get("workers", [])]
        view["error"] = None
        self.previous = (now, status)
        return view


def _rate(before: Any, after: Any, dt: float) -> float | None:
    if not isinstance(before, int) or not isinstance(after, int) or after < before:
        return None
    return round((after - before) / dt, 1)


def unreachable(message: str) -> dict[str, Any]:
    """The view while the cluster does not answer: the page says so instead of going stale."""
    return {"error": message, "workers": [], "moves": [], "rates": {}}


@dataclass
class ClusterFeed:
    """Polls ``status`` once a second while at least one page listens; every view goes to every
    listener's queue. ``latest`` is the last view: ``/v1/cluster`` answers it while pages keep it
    fresh (so a JSON reader does not shift the pages' rate readings), and a new page gets it
    first."""

    status: Callable[[], Awaitable[dict[str, Any]]]
    clock: Callable[[], float]
    interval: float = POLL_INTERVAL_S
    view: ClusterView = field(default_factory=ClusterView)
    listeners: set[asyncio.Queue[dict[str, Any]]] = field(default_factory=set)
    latest: dict[str, Any] | None = None
    task: asyncio.Task[None] | None = None

    async def read(self) -> dict[str, Any]:
        """One fresh view (the poller's timing and rates are kept)."""
        try:
            st = await self.status()
        except ZkvError as e:
            self.latest = unreachable(f"the cluster does not answer: {e}")
        else:
            self.latest = self.view.update(st, self.clock())
        return self.latest

    def polling(self) -> bool:
        return self.task is not None and not self.task.done()

    async def current(self) -> dict[str, Any]:
        """The latest view while pages keep it fresh; else one read now."""
        if self.polling() and self.latest is not None:
            return self.latest
        return await self.read()

    def subscribe(self) -> asyncio.Queue[dict[str, Any]]:
        """A new page's queue; it starts with the latest view, if any (its first paint)."""
        q: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=PAGE_QUEUE)
        if self.polling() and self.latest is not None:
            q.put_nowait(self.latest)
        self.listeners.add(q)
        if not self.polling():
            self.task = asyncio.ensure_future(self._poll())
        return q

    def unsubscribe(self, q: asyncio.Queue[dict[str, Any]]) -> None:
        self.listeners.discard(q)

    async def close(self) -> None:
        self.listeners.clear()
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task

    async def _poll(self) -> None:
        while self.listeners:
            try:
                view = await self.read()
            except Exception as e:  # noqa: BLE001 - a bug here must not end the page's updates
                log.exception("cluster_view_failed")
                view = self.latest = unreachable(f"the gateway could not read the status: {type(e).__name__}")
            for q in list(self.listeners):
                if q.full():  # a page that does not keep up misses views, never the latest
                    q.get_nowait()
                q.put_nowait(view)
            await asyncio.sleep(self.interval)
