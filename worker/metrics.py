"""A worker's Prometheus metrics (protocol/metrics.py): its commits (how long each took, and of
that the fsync: LMDB's commit call alone), how many write batches each carried (group commit at
work), what it holds, and the counters it also reports in its heartbeats."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import Histogram
from prometheus_client.core import Metric

from protocol.metrics import Snapshot, counter, gauge, serve

COMMIT_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)


def families(st: dict[str, Any]) -> Iterator[Metric]:
    yield gauge("zkv_worker_keys", "keys this worker holds", st.get("keys", 0))
    yield gauge("zkv_worker_disk_bytes", "bytes of the data file on disk", st.get("disk_bytes", 0))
    yield gauge("zkv_worker_slots", "slots this worker holds", st.get("slots", 0))
    yield gauge("zkv_worker_registered", "1 while registered with a broker", 1 if st.get("registered") else 0)
    yield counter("zkv_worker_batches_applied_total", "write batches applied", st.get("applied", 0))
    yield counter("zkv_worker_commits_total", "LMDB write transactions (each one fsync)", st.get("commits", 0))
    yield counter("zkv_worker_retries_absorbed_total", "write batches found to be retries of earlier writes",
                  st.get("retries_absorbed", 0))
    yield counter("zkv_worker_direct_reads_total", "reads answered at the reads endpoint under a read lease",
                  st.get("direct_reads", 0))
    yield gauge("zkv_worker_leased_slots", "slots this worker holds a read lease on now", st.get("leased_slots", 0))


class WorkerMetrics:
    def __init__(self, listen: str) -> None:
        self.snapshot = Snapshot(families)
        self.commit_seconds = Histogram("zkv_worker_commit_seconds", "time of one commit, fsync included",
                                        buckets=COMMIT_BUCKETS, registry=None)
        self.fsync_seconds = Histogram("zkv_worker_fsync_seconds",
                                       "time of LMDB's commit call alone: writing the dirty pages and fsyncing them",
                                       buckets=COMMIT_BUCKETS, registry=None)
        self.commit_batches = Histogram("zkv_worker_commit_batches", "write batches in one commit",
                                        buckets=BATCH_BUCKETS, registry=None)
        serve(listen, self.snapshot, self.commit_seconds, self.fsync_seconds, self.commit_batches)

    def committed(self, seconds: float, batches: int, fsync_seconds: float) -> None:
        self.commit_seconds.observe(seconds)
        self.fsync_seconds.observe(fsync_seconds)
        self.commit_batches.observe(batches)
