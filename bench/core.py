"""Reproduce docs/benchmarks.md: a local cluster, ``zkv bench`` over the standard configurations.

    python bench/core.py                 # 3 runs of every configuration, medians as a markdown table
    python bench/core.py --runs 1 --scale 0.2 --only put   # a quick look
    python bench/core.py --serve         # just start a cluster and wait (for profiling by hand)

Each run starts a fresh cluster in a temporary directory on free loopback ports: one broker
(1024 slots, RF=3, W=2) and three workers (LMDB with fsync on every commit, which is not
configurable), runs every configuration against it with ``zkv bench --json``, and stops it.
The processes are stopped on success, on failure and on Ctrl-C / SIGTERM.

The cluster is the tests' launcher, ``tests.support.cluster.Cluster``, with the product's
defaults for heartbeats, request timeout and map size (``bench_cluster``); the other bench
scripts start theirs through ``bench_cluster`` or ``local_cluster`` too.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.support.cluster import ZKV, Cluster  # noqa: E402


@dataclass(frozen=True)
class Config:
    """One row of the table: a ``zkv bench`` invocation."""

    name: str
    test: str
    clients: int
    requests: int
    data_size: int
    key_size: int = 256
    batch: int = 1
    procs: int = 1

    def args(self, url: str, scale: float) -> list[str]:
        args = ["bench", "--url", url, "-t", self.test, "-c", str(self.clients),
                "-n", str(max(self.clients, int(self.requests * scale))), "-d", str(self.data_size),
                "--key-size", str(self.key_size), "-P", str(self.procs), "--json"]
        if self.batch > 1:
            args += ["-b", str(self.batch)]
        return args


CONFIGS: tuple[Config, ...] = (
    Config("put c=1", "put", 1, 2_000, 1024),
    Config("put c=50", "put", 50, 20_000, 1024),
    Config("put c=200", "put", 200, 30_000, 1024),
    Config("get 100B c=1", "get", 1, 5_000, 100),
    Config("get 100B c=50", "get", 50, 30_000, 100),
    Config("get 100B c=200", "get", 200, 30_000, 100),
    Config("get 1KiB c=1", "get", 1, 5_000, 1024),
    Config("get 1KiB c=50", "get", 50, 30_000, 1024),
    Config("get 1KiB c=200", "get", 200, 30_000, 1024),
    Config("mset x10 c=50", "mset", 50, 5_000, 1024, batch=10),
    Config("mget x10 c=50", "mget", 50, 5_000, 1024, batch=10),
    Config("mset x100 c=10", "mset", 10, 500, 1024, batch=100),
    Config("mget x100 c=10", "mget", 10, 500, 1024, batch=100),
)


def bench_cluster(root: Path, **kw: Any) -> Cluster:
    """A cluster as the benchmarks run it (not started): 1024 slots, RF=3, W=2, three workers, and
    the product's defaults where the tests shorten them (heartbeats, request timeout, map size);
    its processes run in the repository. ``kw`` overrides any of these."""
    settings: dict[str, Any] = {"workers": 3, "rf": 3, "w": 2, "slots": 1024, "heartbeat": None,
                                "request_timeout": None, "map_size": None, "cwd": REPO}
    return Cluster(root, **{**settings, **kw})


@contextmanager
def local_cluster(keep: bool = False, broker_args: list[str] | None = None) -> Iterator[Cluster]:
    """A started ``bench_cluster`` in a temporary directory, stopped (and the directory deleted
    unless ``keep``) on leaving."""
    root = Path(tempfile.mkdtemp(prefix="zkv-bench-"))
    cluster = bench_cluster(root, broker_args=broker_args or [])
    try:
        cluster.start(timeout=60.0)
        yield cluster
    finally:
        cluster.stop()
        if keep:
            print(f"data and logs kept in {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)


def machine_jiffies() -> tuple[int, int]:
    """(busy, total) CPU time of the whole machine so far, in clock ticks (/proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def process_jiffies(pids: list[int]) -> int:
    """utime + stime of these processes so far, in clock ticks."""
    total = 0
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total


def children_jiffies() -> int:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return round((usage.ru_utime + usage.ru_stime) * os.sysconf("SC_CLK_TCK"))


def wait_quiet(limit: float, idle_share: float = 0.85) -> float:
    """Wait (at most ``limit`` s) until the machine is idle >= ``idle_share`` over one second.

    Other programs on the machine (test suites, other clusters) take CPU from the cluster and
    lower its figures; returns the idle share last seen."""
    deadline = time.monotonic() + limit
    while True:
        busy0, total0 = machine_jiffies()
        time.sleep(1.0)
        busy1, total1 = machine_jiffies()
        idle = 1 - (busy1 - busy0) / max(1, total1 - total0)
        if idle >= idle_share or time.monotonic() >= deadline:
            return idle


def run_config(cfg: Config, cluster: Cluster, scale: float) -> dict[str, Any]:
    """One ``zkv bench`` run; returns the op's figures (the JSON of ``zkv bench``) plus
    ``background_cpu``: the share of the machine's CPU that other programs used meanwhile."""
    pids = list(cluster.pids().values())
    busy0, total0 = machine_jiffies()
    ours0 = process_jiffies(pids) + children_jiffies()
    proc = subprocess.run([*ZKV, *cfg.args(cluster.frontend, scale)], cwd=REPO, capture_output=True,
                          text=True, timeout=900)
    busy1, total1 = machine_jiffies()
    ours1 = process_jiffies(pids) + children_jiffies()
    if proc.returncode not in (0, 1) or not proc.stdout.strip():
        raise RuntimeError(f"{cfg.name}: zkv bench failed ({proc.returncode}): {proc.stderr.strip()}")
    figures = dict(json.loads(proc.stdout)["ops"][cfg.test])
    others = (busy1 - busy0) - (ours1 - ours0)
    figures["background_cpu"] = max(0.0, others / max(1, total1 - total0))
    return figures


def machine_facts() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"nproc {os.cpu_count()}, {cpu}, Python {platform.python_version()}, {platform.platform()}"


def median_row(cfg: Config, runs: list[dict[str, Any]]) -> str:
    def med(key: str) -> float:
        return statistics.median(r[key] for r in runs)

    per_run = " / ".join(f"{r['ops_per_sec']:.0f}" for r in runs)
    background = max(r["background_cpu"] for r in runs)
    keys = f"{med('keys_per_sec'):,.0f}" if cfg.batch > 1 else "-"
    errors = sum(r["errors"] for r in runs)
    return (f"| {cfg.name} | {cfg.key_size} | {cfg.data_size} | {cfg.clients} | {runs[0]['requests']} "
            f"| **{med('ops_per_sec'):,.0f}** | {keys} | {med('p50_ms'):.2f} | {med('p99_ms'):.2f} "
            f"| {med('max_ms'):.1f} | {errors} | {per_run} | {background:.0%} |")


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM stops the run like Ctrl-C does: the clusters are stopped on the way out."""
    raise KeyboardInterrupt


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="fresh clusters, each running every configuration")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every -n by this")
    parser.add_argument("--only", default="", help="run the configurations whose name contains this")
    parser.add_argument("--procs", type=int, default=0, help="override -P of every configuration")
    parser.add_argument("--quiet-wait", type=float, default=60.0,
                        help="seconds to wait for an idle machine before each configuration")
    parser.add_argument("--keep", action="store_true", help="keep the cluster's data and logs")
    parser.add_argument("--serve", action="store_true", help="start a cluster, print its URL, wait for Ctrl-C")
    opts = parser.parse_args()
    signal.signal(signal.SIGTERM, _interrupt)
    load = os.getloadavg()[0]
    if load > 0.5:
        print(f"warning: load average {load:.2f} before the run; other processes will skew the figures",
              file=sys.stderr)

    configs = [c for c in CONFIGS if opts.only in c.name]
    if opts.procs:
        configs = [Config(**{**c.__dict__, "procs": opts.procs}) for c in configs]
    try:
        if opts.serve:
            with local_cluster(keep=opts.keep) as cluster:
                print(json.dumps({"url": cluster.frontend, "pids": cluster.pids(), "dir": str(cluster.root)}),
                      flush=True)
                while True:
                    time.sleep(3600)
        results: dict[str, list[dict[str, Any]]] = {c.name: [] for c in configs}
        for run in range(1, opts.runs + 1):
            with local_cluster(keep=opts.keep) as cluster:
                for cfg in configs:
                    idle = wait_quiet(opts.quiet_wait)
                    if idle < 0.85:
                        print(f"warning: machine only {idle:.0%} idle before {cfg.name}", file=sys.stderr)
                    res = run_config(cfg, cluster, opts.scale)
                    results[cfg.name].append(res)
                    print(f"run {run}/{opts.runs} {cfg.name:<16} {res['ops_per_sec']:>9.0f} ops/s  "
                          f"p50 {res['p50_ms']:.2f} ms  p99 {res['p99_ms']:.2f} ms  errors {res['errors']}  "
                          f"background CPU {res['background_cpu']:.0%}",
                          file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        print("interrupted; cluster stopped", file=sys.stderr)
        return 130
    print(f"machine: {machine_facts()}")
    print(f"medians of {opts.runs} run(s); fsync on every worker commit; RF=3, W=2, 1024 slots; "
          "background CPU = share of both cores used by other programs during the run\n")
    print("| config | key B | value B | -c | -n | ops/s | keys/s | p50 ms | p99 ms | max ms | errors "
          "| ops/s per run | background CPU (max) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|")
    for cfg in configs:
        print(median_row(cfg, results[cfg.name]))
    return 1 if any(r["errors"] for rs in results.values() for r in rs) else 0


if __name__ == "__main__":
    sys.exit(main())
