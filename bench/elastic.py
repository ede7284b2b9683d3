"""Measure a slot move beside foreground traffic (issue 4's figures).

    python bench/elastic.py                 # 3 workers + 30,000 keys of 1 KiB; then a 4th joins

It starts a fresh cluster (1024 slots, RF=3, W=2) in a temporary directory, fills it, and
measures, with ``zkv bench`` (PUT, 1 KiB values, c=50) running in short rounds:

* foreground throughput without a move, then while the fourth worker receives its slots
  (medians of the rounds; the ratio is the figure);
* the longest write pause on a moving slot: a probe writes one key after another to slots that
  move to the new worker and records the slowest acknowledgement;
* the fraction of the data moved (key copies now on the new worker over all key copies) against
  the ideal 1/(N+1);
* how long the whole rebalance took.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core import REPO, ZKV, local_cluster  # noqa: E402

from broker.placement import slot_map  # noqa: E402
from client.client import Client  # noqa: E402
from protocol.replication import slot_for_key  # noqa: E402


def bench_round(url: str, n: int) -> float:
    out = subprocess.run([*ZKV, "bench", "--url", url, "-t", "put", "-c", "50", "-n", str(n), "-d", "1024",
                          "--key-size", "64", "-r", "100000", "--json"], cwd=REPO, capture_output=True,
                         timeout=300, check=True)
    return float(json.loads(out.stdout)["ops"]["put"]["ops_per_sec"])


class Probe(threading.Thread):
    """Writes to keys of slots that will move, one after another, timing each acknowledgement."""

    def __init__(self, url: str, keys: list[bytes]) -> None:
        super().__init__(daemon=True)
        self.url, self.keys = url, keys
        self.latencies: list[float] = []
        self.errors = 0
        self.stop = threading.Event()

    def run(self) -> None:
        with Client(self.url, timeout=30.0) as c:
            i = 0
            while not self.stop.is_set():
                t = time.monotonic()
                try:
                    c.put(self.keys[i % len(self.keys)], b"p" * 1024)
                except Exception:  # counted, the figure is about pauses
                    self.errors += 1
                self.latencies.append(time.monotonic() - t)
                i += 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keys", type=int, default=30_000)
    ap.add_argument("--round", type=int, default=3000, help="requests per zkv bench round")
    ap.add_argument("--copy-rate", type=int, default=0, help="broker --copy-rate (MiB/s); 0 = its default")
    ap.add_argument("--json", action="store_true")
    opts = ap.parse_args()
    with local_cluster(broker_args=["--copy-rate", str(opts.copy_rate)] if opts.copy_rate else []) as cluster:
        url = cluster.frontend
        with Client(url, timeout=60.0) as c:
            batch: dict[bytes, bytes] = {}
            for i in range(opts.keys):
                batch[b"fill%08d" % i] = b"f" * 1024
                if len(batch) == 500:
                    c.mset(batch)
                    batch = {}
            if batch:
                c.mset(batch)
        before = [bench_round(url, opts.round) for _ in range(3)]

        old = slot_map(1024, ["w1", "w2", "w3"], 3)
        new = slot_map(1024, ["w1", "w2", "w3", "w4"], 3)
        moving = {s for s in range(1024) if set(old[s]) != set(new[s])}
        probe_keys = [k for k in (b"probe%d" % i for i in range(20_000)) if slot_for_key(k, 1024) in moving][:200]
        probe = Probe(url, probe_keys)
        probe.start()
        time.sleep(1.0)
        probe_before = len(probe.latencies)

        started = time.monotonic()
        cluster.start_worker("w4")
        during: list[float] = []
        done = threading.Event()

        def watch() -> None:
            with Client(url, timeout=10.0) as wc:
                while True:
                    st = wc.status()
                    if any(w["id"] == "w4" and w["slots"] for w in st["workers"]) and \
                            st["misplaced_slots"] == 0 and not st["moves"]:
                        done.set()
                        return
                    time.sleep(0.1)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        while not done.is_set():
            during.append(bench_round(url, opts.round))
        elapsed = time.monotonic() - started
        probe.stop.set()
        probe.join()
        with Client(url, timeout=10.0) as c:
            st = c.status()
        keys = {w["id"]: w["keys"] for w in st["workers"]}
        total_copies = sum(keys.values())
        result: dict[str, Any] = {
            "keys": opts.keys,
            "put_ops_per_s_without_move": round(statistics.median(before)),
            "put_ops_per_s_during_move": round(statistics.median(during)),
            "throughput_ratio": round(statistics.median(during) / statistics.median(before), 3),
            "rounds_during_move": len(during),
            "rebalance_seconds": round(elapsed, 2),
            "slots_moved": st["slots_moved"],
            "fraction_of_copies_moved": round(keys.get("w4", 0) / max(total_copies, 1), 4),
            "ideal_fraction": 0.25,
            "probe_writes_during_move": len(probe.latencies) - probe_before,
            "longest_write_on_moving_slots_ms": round(max(probe.latencies[probe_before:]) * 1000, 1),
            "median_write_on_moving_slots_ms": round(statistics.median(probe.latencies[probe_before:]) * 1000, 2),
            "probe_errors": probe.errors,
        }
    if opts.json:
        print(json.dumps(result, indent=2))
    else:
        for k, v in result.items():
            print(f"{k:40} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
