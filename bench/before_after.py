"""CPU per request of two source trees, side by side in one run: this tree and an earlier commit.

    python bench/before_after.py --before REV [--rounds 3] [--loads put,get,mset] [--scale 1]
                                 [--before-args "--read-cache 0"] [--after-args ...]
                                 [--before-lease S] [--after-lease S]

Checks REV out into a temporary git worktree, then, round after round (the order of the two trees
alternates), starts a fresh cluster from each tree (bench/core.py's ``bench_cluster`` with
``cwd`` = that tree: 1024 slots, RF=3, W=2, three workers, fsync) and measures, for each load of
bench/hotspots.py, the CPU time per request of the broker, each worker and the client (the
difference of two runs of different lengths, from /proc), the client being the tree's own
``zkv bench``. Prints the median of the rounds per tree and the ratio after/before. On a shared
machine CPU per request is far steadier than requests/s; still, compare within one run.

``--before-args`` / ``--after-args`` add broker options to one side: with ``--before HEAD`` they
compare two settings of the same code (``--before-args "--read-cache 0"``: the read cache off).
``--before-lease`` / ``--after-lease`` run one side with read leases of S seconds (the broker's
``--read-lease``, every worker with ``--reads``): its GETs are then answered by the lease holders.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

import core  # noqa: E402
import hotspots  # noqa: E402  (bench/hotspots.py)

PROCESSES = ("broker", "worker", "client", "all")


def measure(tree: Path, loads: list[str], scale: int = 1,
            broker_args: list[str] | None = None, read_lease: float = 0.0) -> dict[str, dict[str, float]]:
    """CPU us per request of each process (workers: their mean) and the rate, per load."""
    root = Path(tempfile.mkdtemp(prefix="zkv-before-after-"))
    cluster = core.bench_cluster(root, cwd=tree, broker_args=broker_args or [], read_lease=read_lease)
    try:
        cluster.start(timeout=60.0)
        out: dict[str, dict[str, float]] = {}
        for load in loads:
            n1, n2 = (n * scale for n in hotspots.CPU_RUNS[load])
            per_req, rate = hotspots.cpu_per_request(cluster, load, n1, n2, cwd=tree)
            workers = [v for k, v in per_req.items() if k.startswith("w")]
            out[load] = {"rate": rate, "broker": per_req["broker"], "worker": statistics.mean(workers),
                         "client": per_req["client"], "all": sum(per_req.values())}
        return out
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", required=True, help="the commit to compare with (e.g. a merge base)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--loads", default="put,get,mset")
    parser.add_argument("--scale", type=int, default=1,
                        help="multiply both run lengths (MSET's default 10/60 requests is coarse for the client)")
    parser.add_argument("--before-args", default="", help="broker options of the before side, e.g. \"--read-cache 0\"")
    parser.add_argument("--after-args", default="", help="broker options of the after side")
    parser.add_argument("--before-lease", type=float, default=0.0, help="read leases of S seconds on the before side")
    parser.add_argument("--after-lease", type=float, default=0.0, help="read leases of S seconds on the after side")
    opts = parser.parse_args()
    args = {"before": shlex.split(opts.before_args), "after": shlex.split(opts.after_args)}
    lease = {"before": opts.before_lease, "after": opts.after_lease}
    loads = opts.loads.split(",")
    before = Path(tempfile.mkdtemp(prefix="zkv-before-tree-")) / "tree"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(before), opts.before], check=True,
                   capture_output=True)
    trees = {"before": before, "after": REPO}
    results: dict[str, list[dict[str, Any]]] = {"before": [], "after": []}
    try:
        for r in range(opts.rounds):
            for name in (("before", "after") if r % 2 == 0 else ("after", "before")):
                res = measure(trees[name], loads, opts.scale, args[name], lease[name])
                results[name].append(res)
                print(f"round {r + 1} {name:<6} " + "  ".join(
                    f"{load} {res[load]['rate']:,.0f}/s broker {res[load]['broker']:.1f} worker "
                    f"{res[load]['worker']:.1f} client {res[load]['client']:.1f} us" for load in loads),
                    file=sys.stderr, flush=True)
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(before)], capture_output=True)

    def med(name: str, load: str, key: str) -> float:
        return statistics.median(x[load][key] for x in results[name])

    sides = f"before = {opts.before} {opts.before_args}".rstrip()
    if opts.before_lease:
        sides += f" --read-lease {opts.before_lease:g}"
    if opts.after_args or opts.after_lease:
        sides += f", after: {opts.after_args} {f'--read-lease {opts.after_lease:g}' if opts.after_lease else ''}"
    print(f"CPU us per request, median of {opts.rounds} rounds ({sides}); workers: each\n")
    print("| load | process | before | after | after / before |")
    print("|---|---|---:|---:|---:|")
    for load in loads:
        for key in PROCESSES:
            b, a = med("before", load, key), med("after", load, key)
            print(f"| {load.upper()} | {key} | {b:.1f} | {a:.1f} | {a / b:.2f} |")
        b, a = med("before", load, "rate"), med("after", load, "rate")
        print(f"| {load.upper()} | req/s (noisy) | {b:,.0f} | {a:,.0f} | {a / b:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
