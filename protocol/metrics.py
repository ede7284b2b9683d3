"""Prometheus metrics (prometheus_client) of every zkv process: where they are served, and the
collector that turns a process's latest status into metric families.

Each process publishes a plain dict of its state (``Snapshot.publish``) from its own loop, about
once a second; the HTTP server's thread only reads the last published dict when scraped. So a
scrape never touches a loop's live structures (no locks on the hot path, no "changed size during
iteration"), and a value is at most a second old. Counters that must not miss an event are kept
by the loop as plain integers and published the same way. Names follow Prometheus's rules: a
``zkv_`` prefix, ``_total`` for counters, base units (seconds, bytes).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector


def host_port(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:9100`` too); ValueError says what is wrong."""
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r}: give HOST:PORT, for example 127.0.0.1:9100")
    return host.strip("[]"), int(port)


class Snapshot(Collector):
    """The latest published state, turned into metric families by ``describe`` when scraped."""

    def __init__(self, families: Callable[[dict[str, Any]], Iterable[Metric]]) -> None:
        self.families = families
        self.state: dict[str, Any] | None = None

    def publish(self, state: dict[str, Any]) -> None:
        self.state = state  # one reference assignment: the scraping thread sees the old or the new

    def collect(self) -> Iterator[Metric]:
        state = self.state
        if state is not None:
            yield from self.families(state)


def serve(listen: str, *collectors: Collector) -> CollectorRegistry:
    """Serve ``collectors`` at http://listen/metrics from a daemon thread; returns the registry."""
    host, port = host_port(listen)
    registry = CollectorRegistry(auto_describe=False)
    for c in collectors:
        registry.register(c)
    start_http_server(port, addr=host, registry=registry)
    return registry


def gauge(name: str, doc: str, value: float, labels: dict[str, str] | None = None) -> GaugeMetricFamily:
    g = GaugeMetricFamily(name, doc, labels=list(labels) if labels else None)
    g.add_metric(list(labels.values()) if labels else [], value)
    return g


def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)
