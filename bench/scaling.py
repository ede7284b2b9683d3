"""zkv throughput and p99 latency against concurrency and against value size, as plots.

    python bench/scaling.py                 # both sweeps (a few minutes), PNGs + a section in docs/benchmarks.md
    python bench/scaling.py --quick         # fewer requests per point, no doc update
    python bench/scaling.py --only size     # one sweep ("concurrency" or "size")

One fresh zkv cluster (bench/core.py's bench_cluster: 1024 slots, RF=3, W=2, three workers, fsync on
every commit). Each point is one ``zkv bench -t put,get`` (one client process): the PUT phase writes
``-n`` new keys (256 bytes) and the GET phase reads the same keys back (so there is no untimed
prefill, which for 1 MiB values would send 100 MiB MSETs). ``-n`` is chosen per point so that the
PUT phase lasts a few seconds; the GET phase is shorter. Before each point it waits (``--quiet-wait``)
for an idle machine; a point during which other programs took more than ``--max-background`` of
the CPU is measured again (``--retries``), keeping the least disturbed measurement.

- concurrency sweep: 1 KiB values, ``-c`` 1, 10, 100, 300, 1000;
- value size sweep: ``-c 50``, values of 100 B, 1 KiB, 10 KiB, 100 KiB, 1 MiB.

Writes ``docs/img/scaling-concurrency.png`` and ``docs/img/scaling-size.png`` and a section between
``<!-- scaling:begin -->`` and ``<!-- scaling:end -->`` in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

import core  # noqa: E402
import peers  # noqa: E402

from tests.support.cluster import Cluster  # noqa: E402

BEGIN, END = "<!-- scaling:begin -->", "<!-- scaling:end -->"

# (concurrency, requests) at 1 KiB values
CONCURRENCY: list[tuple[int, int]] = [(1, 1_500), (10, 8_000), (100, 20_000), (300, 25_000), (1000, 30_000)]
# (value bytes, requests) at c=50
SIZES: list[tuple[int, int]] = [(100, 20_000), (1024, 20_000), (10 * 1024, 10_000), (100 * 1024, 4_000),
                                (1024 * 1024, 600)]
SIZE_C = 50


def human(n: int) -> str:
    for unit, f in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= f:
            return f"{n // f} {unit}"
    return f"{n} B"


def sweep(cluster: Cluster, kind: str, scale: float, log: Any, quiet_wait: float = 0.0,
          retries: int = 0, max_background: float = 1.0) -> list[dict[str, Any]]:
    """Each point once; with ``retries``, measured again (up to that many times) while other programs
    took more than ``max_background`` of the CPU, keeping the measurement with the least."""
    points = []
    todo = [(c, n, 1024) for c, n in CONCURRENCY] if kind == "concurrency" else [(SIZE_C, n, d) for d, n in SIZES]
    watch = peers.CpuWatch(lambda: list(cluster.pids().values()), quiet_wait)
    for c, n, d in todo:
        n = max(c, int(n * scale))
        p: dict[str, Any] = {}
        for _attempt in range(1 + retries):
            with watch.measure() as cpu:
                ops = peers.zkv_bench(cluster, "put,get", c, n, d)
            if not p or cpu["background"] < p["background"]:
                p = {"kind": kind, "c": c, "n": n, "value": d, "background": cpu["background"],
                     "put": ops["put"], "get": ops["get"]}
            if cpu["background"] <= max_background:
                break
            log(f"{kind} c={c} d={d}: background {cpu['background']:.0%}, measuring again")
        ops = {"put": p["put"], "get": p["get"]}
        points.append(p)
        log(f"{kind} c={c} d={d} n={n}: put {ops['put']['ops_per_sec']:,.0f}/s p99 {ops['put']['p99_ms']:.1f} ms; "
            f"get {ops['get']['ops_per_sec']:,.0f}/s p99 {ops['get']['p99_ms']:.1f} ms; "
            f"errors {ops['put']['errors'] + ops['get']['errors']}; background {p['background']:.0%}")
    return points


def table(points: list[dict[str, Any]]) -> str:
    lines = ["| sweep | -c | value | -n | PUT ops/s | PUT MB/s | PUT p50 ms | PUT p99 ms | PUT max ms | GET ops/s "
             "| GET MB/s | GET p50 ms | GET p99 ms | GET max ms | errors | background CPU |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for p in points:
        cells = []
        for op in ("put", "get"):
            f = p[op]
            cells += [f"{f['ops_per_sec']:,.0f}", f"{f['ops_per_sec'] * p['value'] / 1e6:,.1f}",
                      f"{f['p50_ms']:.2f}", f"{f['p99_ms']:.2f}", f"{f['max_ms']:.1f}"]
        errors = p["put"]["errors"] + p["get"]["errors"]
        lines.append(f"| {p['kind']} | {p['c']} | {human(p['value'])} | {p['n']} | " + " | ".join(cells)
                     + f" | {errors} | {p['background']:.0%} |")
    return "\n".join(lines)


def plot(points: list[dict[str, Any]], kind: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [p for p in points if p["kind"] == kind]
    if not pts:
        return
    xs = [p["c"] if kind == "concurrency" else p["value"] for p in pts]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for op, color in (("put", "tab:blue"), ("get", "tab:green")):
        label = "PUT (RF=3, W=2, fsync)" if op == "put" else "GET"
        a1.plot(xs, [p[op]["ops_per_sec"] for p in pts], "o-", color=color, label=label)
        a2.plot(xs, [p[op]["p99_ms"] for p in pts], "o-", color=color, label=f"{label} p99")
        a2.plot(xs, [p[op]["p50_ms"] for p in pts], "o:", color=color, alpha=0.6, label=f"{label} p50")
    for ax in (a1, a2):
        ax.set_xscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        if kind == "concurrency":
            ax.set_xlabel("requests in flight (-c), 1 KiB values")
        else:
            ax.set_xlabel(f"value size, bytes (-c {SIZE_C})")
            ax.set_xticks(xs, [human(x) for x in xs])
    a1.set_ylabel("requests/s")
    a1.set_yscale("log")
    a2.set_ylabel("latency, ms")
    a2.set_yscale("log")
    a1.set_title("throughput")
    a2.set_title("latency (client side)")
    if kind == "size":
        ax3 = a1.twinx()
        ax3.plot(xs, [p["put"]["ops_per_sec"] * p["value"] / 1e6 for p in pts], "s--", color="tab:blue", alpha=0.4)
        ax3.plot(xs, [p["get"]["ops_per_sec"] * p["value"] / 1e6 for p in pts], "s--", color="tab:green", alpha=0.4)
        ax3.set_ylabel("MB/s of values (dashed)")
    fig.suptitle(f"zkv, one client process, 3 workers + broker on 2 shared cores: {kind} sweep", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", choices=["concurrency", "size"])
    parser.add_argument("--out", default=str(REPO / "docs" / "benchmarks.md"))
    parser.add_argument("--plots", default=str(REPO / "docs" / "img"))
    parser.add_argument("--json", help="also write the points to this file")
    parser.add_argument("--retries", type=int, default=2,
                        help="measure a point again (up to this many times) when the machine was busy")
    parser.add_argument("--max-background", type=float, default=0.15,
                        help="background CPU share above which a point is measured again")
    parser.add_argument("--quiet-wait", type=float, default=20.0,
                        help="seconds to wait for an idle machine before each point (0: do not wait)")
    opts = parser.parse_args()
    signal.signal(signal.SIGTERM, peers._interrupt)
    scale = 0.15 if opts.quick else 1.0
    started = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - started:6.1f}s] {msg}", file=sys.stderr, flush=True)

    kinds = [opts.only] if opts.only else ["concurrency", "size"]
    root = Path(tempfile.mkdtemp(prefix="zkv-scaling-"))
    points: list[dict[str, Any]] = []
    try:
        with core.local_cluster() as cluster:
            for kind in kinds:
                points += sweep(cluster, kind, scale, log, 0.0 if opts.quick else opts.quiet_wait,
                                0 if opts.quick else opts.retries, opts.max_background)
    except KeyboardInterrupt:
        print("interrupted; cluster stopped", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(table(points))
    if opts.json:
        Path(opts.json).write_text(json.dumps(points, indent=2))
    if opts.quick:
        return 0
    out = Path(opts.out)
    imgs = []
    for kind in kinds:
        png = Path(opts.plots) / f"scaling-{kind}.png"
        plot(points, kind, png)
        imgs.append(os.path.relpath(png, out.parent))
    section = "\n".join([
        BEGIN,
        f"Measured {dt.date.today().isoformat()} with `python bench/scaling.py"
        + (f" --only {opts.only}" if opts.only else "") + f"` ({core.machine_facts()}). One fresh cluster, "
        "one point after another, one `zkv bench -t put,get --key-size 256` per point (the GET phase reads "
        "the keys the PUT phase wrote); a few seconds per point, one run, on a shared machine.",
        "",
        table(points),
        "",
        *[f"![{Path(i).stem}]({i})" for i in imgs],
        END,
    ])
    text = out.read_text() if out.exists() else "# Benchmarks\n"
    out.write_text(peers.replace_section(text, section, BEGIN, END,
                                         heading="## Scaling: concurrency and value size (`bench/scaling.py`)"))
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
