"""The cost of CURVE: PUT and GET with and without it, side by side in one run.

    python bench/curve.py [--rounds 3] [--scale 1]

Starts two clusters at once (bench/core.py's ``bench_cluster``: 1024 slots, RF=3, W=2, three
workers, fsync), one plain and one with ``--keys`` (every socket CURVE: the client's, the
workers' DEALERs and their replication SUBs), and runs the same ``zkv bench`` configurations
against each in turn, alternating which goes first each round, so that both see the same
machine. Prints the median rate, p50 latency and broker CPU per request of each, the ratios, and
the share of the machine other programs used meanwhile; then the CPU time per request of each
process for bench/hotspots.py's PUT and GET loads (c=200; the difference of two runs, so start-up
and prefill cancel), the figure that stays put on a shared machine. Only one cluster is loaded at
a time; the idle one costs a few heartbeats.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

import core  # noqa: E402  (bench/core.py)
import hotspots  # noqa: E402  (bench/hotspots.py)

from tests.support.cluster import ZKV, Cluster  # noqa: E402

CONFIGS = (
    core.Config("put 1KiB c=1", "put", 1, 2_000, 1024),
    core.Config("put 1KiB c=50", "put", 50, 20_000, 1024),
    core.Config("get 1KiB c=1", "get", 1, 5_000, 1024),
    core.Config("get 1KiB c=50", "get", 50, 30_000, 1024),
)


def run(cfg: core.Config, cluster: Cluster, scale: float) -> dict[str, float]:
    """One ``zkv bench`` run against ``cluster`` (its credentials, if any, through its env)."""
    broker_pid = cluster.pids()["broker"]
    pids = list(cluster.pids().values())
    busy0, total0 = core.machine_jiffies()
    ours0 = core.process_jiffies(pids) + core.children_jiffies()
    cpu0 = core.process_jiffies([broker_pid])
    proc = subprocess.run([*ZKV, *cfg.args(cluster.frontend, scale)], cwd=REPO, capture_output=True, text=True,
                          timeout=900, env=cluster.env)
    cpu1 = core.process_jiffies([broker_pid])
    busy1, total1 = core.machine_jiffies()
    ours1 = core.process_jiffies(pids) + core.children_jiffies()
    if proc.returncode not in (0, 1) or not proc.stdout.strip():
        raise RuntimeError(f"{cfg.name}: zkv bench failed ({proc.returncode}): {proc.stderr.strip()}")
    op = json.loads(proc.stdout)["ops"][cfg.test]
    tick_us = 1e6 / os.sysconf("SC_CLK_TCK")
    # Broker CPU over the whole run: a GET run's (untimed) prefill writes are in it, alike in both.
    others = max(0.0, ((busy1 - busy0) - (ours1 - ours0)) / max(1, total1 - total0))
    return {"rate": op["ops_per_sec"], "p50": op["p50_ms"],
            "broker_us": (cpu1 - cpu0) * tick_us / max(1, op["requests"]), "background": others}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every request count")
    opts = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="zkv-bench-curve-"))
    clusters = {"plain": core.bench_cluster(root / "plain"), "curve": core.bench_cluster(root / "curve", keys=True)}
    results: dict[tuple[str, str], list[dict[str, float]]] = {}
    cpu: dict[tuple[str, str], list[dict[str, float]]] = {}
    try:
        for c in clusters.values():
            c.start(timeout=60.0)
        for r in range(opts.rounds):
            for cfg in CONFIGS:
                order = ["plain", "curve"] if r % 2 == 0 else ["curve", "plain"]
                for name in order:
                    results.setdefault((cfg.name, name), []).append(run(cfg, clusters[name], opts.scale))
            for load in ("put", "get"):
                for name in (["plain", "curve"] if r % 2 == 0 else ["curve", "plain"]):
                    per_req, _rate = hotspots.cpu_per_request(clusters[name], load, *hotspots.CPU_RUNS[load])
                    workers = [v for k, v in per_req.items() if k.startswith("w")]
                    cpu.setdefault((load, name), []).append(
                        {"broker": per_req["broker"], "worker": statistics.mean(workers),
                         "client": per_req["client"], "all": sum(per_req.values())})
    finally:
        for c in clusters.values():
            c.stop()
        shutil.rmtree(root, ignore_errors=True)
    print(table(results, opts.rounds))
    print()
    print(cpu_table(cpu))
    return 0


def cpu_table(cpu: dict[tuple[str, str], list[dict[str, float]]]) -> str:
    lines = ["CPU us per request (PUT: -c 200 -d 1024 --key-size 256; GET: -c 200 -d 100 -r 20000)", "",
             "| load | process | plain | CURVE | CURVE/plain |", "|---|---|---:|---:|---:|"]
    for load in ("put", "get"):
        for proc in ("broker", "worker", "client", "all"):
            p = statistics.median(x[proc] for x in cpu[(load, "plain")])
            c = statistics.median(x[proc] for x in cpu[(load, "curve")])
            label = "worker (each)" if proc == "worker" else proc
            lines.append(f"| {load.upper()} | {label} | {p:.1f} | {c:.1f} | {c / p:.2f} |")
    return "\n".join(lines)


def table(results: dict[tuple[str, str], list[dict[str, float]]], rounds: int) -> str:
    def med(cfg: str, name: str, key: str) -> float:
        return statistics.median(x[key] for x in results[(cfg, name)])

    lines = [f"medians of {rounds} round(s); fsync on every worker commit; RF=3, W=2, 1024 slots; "
             f"{core.machine_facts()}", "",
             "| load | req/s plain | req/s CURVE | CURVE/plain | p50 ms plain | p50 ms CURVE "
             "| broker CPU us/req plain | broker CPU us/req CURVE | CURVE/plain | background CPU |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for cfg in CONFIGS:
        p = {k: med(cfg.name, "plain", k) for k in ("rate", "p50", "broker_us", "background")}
        c = {k: med(cfg.name, "curve", k) for k in ("rate", "p50", "broker_us", "background")}
        lines.append(f"| {cfg.name} | {p['rate']:,.0f} | {c['rate']:,.0f} | {c['rate'] / p['rate']:.2f} "
                     f"| {p['p50']:.2f} | {c['p50']:.2f} | {p['broker_us']:.0f} | {c['broker_us']:.0f} "
                     f"| {c['broker_us'] / p['broker_us']:.2f} | {(p['background'] + c['background']) / 2:.0%} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
