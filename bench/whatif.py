"""What-if measurements: estimate the gain of two cheap changes suggested by the profiles without
changing product code, by starting the broker and workers through a boot wrapper that patches
the interpreter before ``zkv`` runs.

    python bench/whatif.py [--rounds 2] [--variants base,gc,flags,gc+flags] [--n 30000]

Variants (applied to the broker and every worker; the client, ``zkv bench``, is never patched):

- ``gc``: ``gc.set_threshold(100_000, 50, 100)`` at start-up: Python's cyclic collector runs
  about 140 times less often than with the default threshold (700 allocations);
- ``flags``: ``Socket.send_multipart`` replaced by a loop that passes plain ``int`` flags (pyzmq 27
  computes ``zmq.SNDMORE | flags`` per frame with ``enum.Flag``, three Python calls per frame);
- ``gc+flags``: both.

Each round starts a fresh cluster per variant (in the order given) and runs ``zkv bench -t put
-c 200`` and ``zkv bench -t get -c 200 -d 100`` (256-byte keys); prints medians per variant.
This file is a measuring aid, not a proposal of how to implement the change.
"""

from __future__ import annotations

import argparse
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
import peers  # noqa: E402

BOOT = """
import sys
patches = set(sys.argv[1].split(",")) - {"base"}
del sys.argv[1]
if "gc" in patches:
    import gc
    gc.set_threshold(100_000, 50, 100)
if "flags" in patches:
    import zmq
    from zmq.sugar.socket import Socket
    _MORE = int(zmq.SNDMORE)
    def send_multipart(self, msg_parts, flags=0, copy=True, track=False, **kwargs):
        flags = int(flags)
        more = flags | _MORE
        send = self.send
        for m in msg_parts[:-1]:
            send(m, more, copy=copy, track=track)
        return send(msg_parts[-1], flags, copy=copy, track=track)
    Socket.send_multipart = send_multipart
sys.argv[0] = "zkv"
from client.cli import main
main()
"""


class PatchedCluster(core.LocalCluster):
    variant: str = "base"

    def _spawn(self, name: str, args: list[str]) -> None:
        with open(self.root / "logs" / f"{name}.log", "ab") as log:
            self.procs[name] = subprocess.Popen(
                [sys.executable, "-c", BOOT, self.variant, *args], cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)


def run_variant(variant: str, n: int) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="zkv-whatif-"))
    cluster = PatchedCluster(root)
    cluster.variant = variant
    try:
        cluster.start()
        put = peers.zkv_bench(cluster, "put", 200, n, 1024)["put"]
        get = peers.zkv_bench(cluster, "get", 200, n, 100)["get"]
        return {"put": put, "get": get}
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--variants", default="base,gc,flags,gc+flags")
    parser.add_argument("--n", type=int, default=30_000)
    opts = parser.parse_args()
    variants = opts.variants.split(",")
    results: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    for r in range(opts.rounds):
        for v in variants:
            res = run_variant(v.replace("+", ","), opts.n)
            results[v].append(res)
            print(f"round {r + 1} {v:<9} put {res['put']['ops_per_sec']:>7,.0f}/s p99 {res['put']['p99_ms']:6.1f} ms"
                  f"   get {res['get']['ops_per_sec']:>7,.0f}/s p99 {res['get']['p99_ms']:6.1f} ms",
                  file=sys.stderr, flush=True)
    base = results.get("base")
    print("| variant | PUT c=200 ops/s (median) | vs base | GET 100 B c=200 ops/s (median) | vs base "
          "| runs (PUT / GET) |")
    print("|---|---:|---:|---:|---:|---|")
    for v in variants:
        put = statistics.median(x["put"]["ops_per_sec"] for x in results[v])
        get = statistics.median(x["get"]["ops_per_sec"] for x in results[v])
        bp = statistics.median(x["put"]["ops_per_sec"] for x in base) if base else put
        bg = statistics.median(x["get"]["ops_per_sec"] for x in base) if base else get
        runs = "; ".join(f"{x['put']['ops_per_sec']:,.0f} / {x['get']['ops_per_sec']:,.0f}" for x in results[v])
        print(f"| {v} | {put:,.0f} | {put / bp - 1:+.0%} | {get:,.0f} | {get / bg - 1:+.0%} | {runs} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
