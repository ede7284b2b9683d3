"""The broker's Prometheus metrics, from its status (broker/status.py) as published each second
(protocol/metrics.py). What an operator graphs and alerts on: workers by state and their
heartbeat age and lag, slots under-replicated / recovering / stalled, moves and the bytes they
have left, open streams and watches, leadership, the counters of served requests, and how long
requests take by op and outcome (broker/latency.py)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric

from broker.latency import BUCKETS
from protocol.metrics import counter, gauge

COUNTERS = {  # status field -> (metric, help)
    "writes_committed": ("zkv_broker_writes_committed_total", "write batches committed on W replicas"),
    "writes_deduplicated": ("zkv_broker_writes_deduplicated_total",
                            "retried writes the replicas had applied before (answered from the first)"),
    "reads_served": ("zkv_broker_reads_served_total", "reads answered"),
    "reads_cached": ("zkv_broker_reads_cached_total",
                     "reads answered from the leader's cache of committed values, without a replica"),
    "bad_requests": ("zkv_broker_bad_requests_total", "malformed requests answered with an error"),
    "rejected_requests": ("zkv_broker_rejected_requests_total", "requests refused (unavailable, not enough replicas)"),
    "snapshots_sent": ("zkv_broker_snapshots_total", "slot snapshots started to repair or fill a replica"),
    "replays_sent": ("zkv_broker_replays_total", "replays of the log tail to a lagging replica"),
    "slots_moved": ("zkv_broker_slots_moved_total", "slot moves finished"),
    "moves_abandoned": ("zkv_broker_moves_abandoned_total", "slot moves given up"),
    "streams_aborted": ("zkv_broker_streams_aborted_total",
                        "streamed puts aborted (idle, over the limit, by their client)"),
}


def families(st: dict[str, Any]) -> Iterator[Metric]:
    leading = st.get("role", "leader") != "standby"
    yield gauge("zkv_broker_leader", "1 if this broker leads (or runs alone), 0 on a standby", 1 if leading else 0)
    if not leading:
        return
    yield gauge("zkv_broker_epoch", "this broker's epoch (incarnation or etcd term)", st.get("epoch", 0))
    yield gauge("zkv_broker_formed", "1 once the cluster has formed", 1 if st.get("formed") else 0)
    states = GaugeMetricFamily("zkv_broker_workers", "workers known, by state", labels=["state"])
    workers = st.get("workers", [])
    for state in ("alive", "dead", "recovering"):
        states.add_metric([state], sum(1 for w in workers if w["state"] == state))
    yield states
    per = {
        "zkv_broker_worker_heartbeat_age_seconds": ("seconds since the worker's last heartbeat", "last_heartbeat_ago"),
        "zkv_broker_worker_behind_slots": ("the worker's slots that lag what is committed (replication lag)",
                                           "behind_slots"),
        "zkv_broker_worker_slots": ("slots the worker holds", "slots"),
        "zkv_broker_worker_keys": ("keys the worker holds, as it last reported", "keys"),
        "zkv_broker_worker_disk_bytes": ("the worker's data file on disk, as it last reported", "disk_bytes"),
        "zkv_broker_worker_direct_reads": ("reads the worker answered under read leases since it started, as it "
                                           "last reported", "direct_reads"),
    }
    for name, (doc, field) in per.items():
        g = GaugeMetricFamily(name, doc, labels=["worker"])
        for w in workers:
            if w.get(field) is not None:
                g.add_metric([w["id"]], w[field])
        yield g
    yield gauge("zkv_broker_slots_under_replicated", "slots with fewer live replicas than RF",
                len(st.get("under_replicated_slots", [])))
    yield gauge("zkv_broker_slots_recovering", "slots recovering after a restart or failover",
                st.get("recovering_slots", 0))
    yield gauge("zkv_broker_slots_stalled", "slots with writes that cannot commit now (fewer than W live replicas)",
                len(st.get("stalled_slots", [])))
    moves = st.get("moves", [])
    yield gauge("zkv_broker_moves_in_progress", "slot moves in flight", len(moves))
    yield gauge("zkv_broker_move_bytes_left", "bytes the moves in flight still have to copy",
                sum(max(0, int(m.get("bytes_total") or 0) - int(m.get("bytes_copied") or 0)) for m in moves))
    yield gauge("zkv_broker_open_streams", "streamed puts open", st.get("open_streams", 0))
    yield gauge("zkv_broker_read_cache_bytes", "bytes of committed values cached to answer reads without a replica",
                st.get("read_cache_bytes", 0))
    yield gauge("zkv_broker_leased_slots", "slots whose reads a worker answers under a read lease now",
                st.get("leased_slots", 0))
    yield gauge("zkv_broker_watches", "watches open", st.get("watches", 0))
    yield gauge("zkv_broker_connected_clients", "client connections with a request or watch in flight",
                st.get("clients", 0))
    for field, (name, doc) in COUNTERS.items():
        if field in st:
            yield counter(name, doc, st[field])
    yield request_durations(st.get("request_latency", []))


def request_durations(histograms: list[dict[str, Any]]) -> HistogramMetricFamily:
    h = HistogramMetricFamily("zkv_broker_request_duration_seconds",
                              "from a request's arrival at the broker to its answer, by op and outcome "
                              "(ok, or the error code)", labels=["op", "outcome"])
    bounds = [str(b) for b in BUCKETS] + ["+Inf"]
    for x in histograms:
        h.add_metric([x["op"], x["outcome"]], list(zip(bounds, x["buckets"], strict=True)), x["sum"])
    return h
