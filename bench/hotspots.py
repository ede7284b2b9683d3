"""Profile the broker and one worker under a PUT load and under a GET load (py-spy).

    python bench/hotspots.py [--seconds 8] [--rate 200] [--native] [--out bench/profiles]

Starts a fresh cluster (bench/core.py's bench_cluster: 1024 slots, RF=3, W=2, three workers, fsync),
runs ``zkv bench`` in the background (PUT: ``-t put -c 200 -d 1024 --key-size 256``; GET: ``-t get
-c 200 -d 100 --key-size 256``, after its untimed prefill), and while the load runs records the
broker and worker ``w1`` with ``py-spy record --format raw`` (collapsed stacks; idle samples
excluded, so shares are of the time the process was running Python or, with ``--native``, C code).

Also measures the CPU time (utime + stime from /proc) of the broker, each worker and the client over
the same window and divides it by the requests completed in it (from the bench's rate): CPU
microseconds per request, per process.

Prints, per process and load, the top functions by self time and by total (inclusive) time, as
markdown, and saves the collapsed stacks under ``--out`` (``{load}-{process}.txt``) if small.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

import core  # noqa: E402

from tests.support.cluster import Cluster  # noqa: E402

PY_SPY = shutil.which("py-spy") or "/root/.pyenv/shims/py-spy"

LOADS = {
    "put": ["-t", "put", "-c", "200", "-d", "1024", "--key-size", "256", "-n", "400000"],
    "get": ["-t", "get", "-c", "200", "-d", "100", "--key-size", "256", "-n", "150000", "-r", "20000"],
    # GETs of 1,000 keys: after the first read of each, the leader's read cache answers (broker/read_cache.py)
    "gethot": ["-t", "get", "-c", "200", "-d", "100", "--key-size", "256", "-n", "150000", "-r", "1000"],
    "mset": ["-t", "mset", "-b", "1000", "-c", "4", "-d", "100", "--key-size", "256", "-n", "2000"],
    "mget": ["-t", "mget", "-b", "1000", "-c", "4", "-d", "100", "--key-size", "256", "-n", "4000", "-r", "20000"],
    # every key read once (the prefill writes them): what the read cache costs when it never hits
    "mgetcold": ["-t", "mget", "-b", "1000", "-c", "4", "-d", "100", "--key-size", "256", "-n", "4000"],
}
# the two run lengths whose difference gives the CPU per request (start-up and prefill cancel)
CPU_RUNS = {"put": (5_000, 35_000), "get": (5_000, 35_000), "gethot": (5_000, 35_000), "mset": (10, 60),
            "mget": (30, 180), "mgetcold": (30, 180)}


def frame_name(frame: str) -> str:
    """``_drain (broker/server.py:102)`` -> ``_drain (broker/server.py)``; native frames stay."""
    frame = re.sub(r":\d+\)$", ")", frame.strip())
    frame = re.sub(r"\(/[^)]*/(site-packages|lib/python3\.\d+)/", r"(", frame)
    frame = frame.replace(str(REPO) + "/", "")
    return frame


def summarize_collapsed(text: str) -> tuple[Counter[str], Counter[str], int]:
    """Self and total sample counts per function from py-spy's raw (collapsed) output."""
    self_c: Counter[str] = Counter()
    total_c: Counter[str] = Counter()
    n = 0
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        k = int(count)
        frames = [frame_name(f) for f in stack.split(";") if f]
        frames = [f for f in frames if not f.startswith(("process ", "thread "))] or frames
        n += k
        self_c[frames[-1]] += k
        for f in set(frames):
            total_c[f] += k
    return self_c, total_c, n


def top_table(c: Counter[str], n: int, k: int) -> str:
    lines = ["| function | share |", "|---|---:|"]
    for f, v in c.most_common(k):
        lines.append(f"| `{f}` | {v / n:.1%} |")
    return "\n".join(lines)


def cpu_ticks(pid: int) -> int:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12])


def profile_load(cluster: Cluster, load: str, seconds: float, rate: int, native: bool,
                 outdir: Path) -> dict[str, Any]:
    pids = cluster.pids()
    bench = subprocess.Popen([*core.ZKV, "bench", "--url", cluster.frontend, *LOADS[load], "-P", "1", "--json"],
                             cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    result: dict[str, Any] = {"load": load, "command": "zkv bench " + " ".join(LOADS[load])}
    try:
        # Let it get past connection (and, for GET, the untimed prefill) into the timed phase.
        time.sleep(6.0 if load == "get" else 2.0)
        targets = {"broker": pids["broker"], "w1": pids["w1"]}
        procs = {}
        files = {}
        for name, pid in targets.items():
            files[name] = outdir / f"{load}-{name}.txt"
            args = [PY_SPY, "record", "-p", str(pid), "-d", str(int(seconds)), "-r", str(rate), "-f", "raw",
                    "-o", str(files[name])]
            if native:
                args.append("--native")
            procs[name] = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        watched = {**pids, "client": bench.pid}
        t0 = time.monotonic()
        ticks0 = {k: cpu_ticks(p) for k, p in watched.items()}
        time.sleep(seconds)
        ticks1 = {k: cpu_ticks(p) for k, p in watched.items()}
        elapsed = time.monotonic() - t0
        for name, p in procs.items():
            out, err = p.communicate(timeout=60)
            if p.returncode != 0:
                result[f"{name}_error"] = err.decode(errors="replace")[-500:]
        result["cpu_share"] = {k: (ticks1[k] - ticks0[k]) / os.sysconf("SC_CLK_TCK") / elapsed for k in watched}
    finally:
        if bench.poll() is None:
            os.killpg(bench.pid, signal.SIGINT)
        try:
            out_b, err_b = bench.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(bench.pid, signal.SIGKILL)
            out_b, err_b = bench.communicate()
    result["files"] = {k: str(v) for k, v in files.items()}
    return result


@functools.cache
def _bench_has_keep(cwd: Path) -> bool:
    out = subprocess.run([*core.ZKV, "bench", "--help"], cwd=cwd, capture_output=True, text=True, timeout=60)
    return "--keep" in out.stdout


def _bench(cluster: Cluster, load: str, n: int, cwd: Path = REPO) -> tuple[dict[str, int], float]:
    """One unprofiled run of ``load`` with ``-n n`` (``zkv bench`` of the tree ``cwd``): CPU ticks per
    process, and the timed rate."""
    args = list(LOADS[load])
    args[args.index("-n") + 1] = str(n)
    pids = cluster.pids()
    t0 = {k: cpu_ticks(p) for k, p in pids.items()}
    c0 = core.children_jiffies()
    # zkv bench deletes its keys when it ends (since issue 13) unless --keep: that work is not the
    # load's, so it is left out (a tree from before has no --keep, and no clean-up)
    keep = ["--keep"] if _bench_has_keep(cwd) else []
    proc = subprocess.run([*core.ZKV, "bench", "--url", cluster.frontend, *args, *keep, "-P", "1", "--json"], cwd=cwd,
                          capture_output=True, text=True, timeout=600, env=cluster.env)  # (its credentials)
    ticks = {k: cpu_ticks(p) - t0[k] for k, p in pids.items()}
    ticks["client"] = core.children_jiffies() - c0
    test = args[args.index("-t") + 1]  # (the op the load runs: "gethot" runs get)
    return ticks, float(json.loads(proc.stdout)["ops"][test]["ops_per_sec"])


def cpu_per_request(cluster: Cluster, load: str, n1: int = 5_000, n2: int = 35_000, cwd: Path = REPO
                    ) -> tuple[dict[str, float], float]:
    """CPU microseconds per request of each process, without the profiler: the difference of two
    runs of ``n1`` and ``n2`` requests (so start-up and the GET prefill, the same in both, cancel),
    divided by ``n2 - n1``. Also the rate of the longer run."""
    a, _ = _bench(cluster, load, n1, cwd)
    b, rate = _bench(cluster, load, n2, cwd)
    tick = 1e6 / os.sysconf("SC_CLK_TCK")
    return {k: max(0.0, (b[k] - a[k]) * tick / (n2 - n1)) for k in b}, rate


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    parser.add_argument("--native", action="store_true", help="include C frames (libzmq, LMDB, msgpack)")
    parser.add_argument("--top", type=int, default=18)
    parser.add_argument("--out", default=str(HERE / "profiles"))
    parser.add_argument("--loads", default="put,get")
    opts = parser.parse_args()
    outdir = Path(opts.out)
    outdir.mkdir(parents=True, exist_ok=True)
    report: list[str] = []
    with core.local_cluster() as cluster:
        for load in opts.loads.split(","):
            per_req, rate = cpu_per_request(cluster, load, *CPU_RUNS[load])
            r = profile_load(cluster, load, opts.seconds, opts.rate, opts.native, outdir)
            report.append(f"### {load.upper()} load: `{r['command']}`\n")
            report.append(f"Without the profiler: {rate:,.0f} req/s; CPU time per request of each process "
                          "(difference of a "
                          f"{CPU_RUNS[load][0]:,}- and a {CPU_RUNS[load][1]:,}-request run, from /proc). "
                          "While profiled: share of one core.\n")
            cpu = r.get("cpu_share", {})
            report.append("| process | us CPU per request | CPU while profiled |\n|---|---:|---:|")
            for k, v in per_req.items():
                report.append(f"| {k} | {v:.0f} | {cpu.get(k, 0):.0%} |")
            report.append(f"| all | {sum(per_req.values()):.0f} | {sum(cpu.values()):.0%} |\n")
            for name, path in r["files"].items():
                if f"{name}_error" in r:
                    report.append(f"{name}: py-spy failed: {r[name + '_error']}\n")
                    continue
                text = Path(path).read_text()
                self_c, total_c, n = summarize_collapsed(text)
                report.append(f"#### {name}, {load.upper()} ({n} samples)\n")
                report.append("By self time:\n\n" + top_table(self_c, n, opts.top) + "\n")
                spine = Counter({f: v for f, v in total_c.items() if v < 0.97 * n})  # drop main() and callers
                report.append("By total (inclusive) time, below the main loop:\n\n" + top_table(spine, n, opts.top)
                              + "\n")
                if Path(path).stat().st_size > 1_000_000:
                    Path(path).unlink()
                    report.append(f"(raw profile {path} was over 1 MB and was not kept)\n")
            print(f"{load} done", file=sys.stderr, flush=True)
    print("\n".join(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
