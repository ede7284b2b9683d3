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

Each round starts a fresh cluster per variant (the order rotates from round to round) and measures, for the PUT and
the GET load of bench/hotspots.py (``-c 200``, 256-byte keys; 1 KiB PUT values, 100 B GET values),
the CPU time per request of the broker, each worker and the client (the difference of two runs of
different lengths, from /proc): on a shared machine CPU per request is far steadier than
requests/s. Prints medians per variant.
This file is a measuring aid, not a proposal of how to implement the change.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
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


def run_variant(variant: str) -> dict[str, Any]:
    """CPU us per request of each process and the rate, for the PUT and the GET load."""
    root = Path(tempfile.mkdtemp(prefix="zkv-whatif-"))
    # The broker and the workers start through BOOT, which patches the interpreter, then runs zkv.
    cluster = core.bench_cluster(root, command=[sys.executable, "-c", BOOT, variant])
    try:
        cluster.start(timeout=60.0)
        out: dict[str, Any] = {}
        for load in ("put", "get"):
            per_req, rate = hotspots.cpu_per_request(cluster, load, *hotspots.CPU_RUNS[load])
            out[load] = {"rate": rate, "broker": per_req["broker"],
                         "worker": statistics.mean(per_req[w] for w in ("w1", "w2", "w3")),
                         "client": per_req["client"], "all": sum(per_req.values())}
        return out
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--variants", default="base,gc,flags,gc+flags")
    opts = parser.parse_args()
    variants = opts.variants.split(",")
    results: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    for r in range(opts.rounds):
        for v in variants[r % len(variants):] + variants[:r % len(variants)]:  # rotate the order each round
            res = run_variant(v.replace("+", ","))
            results[v].append(res)
            print(f"round {r + 1} {v:<9} " + "   ".join(
                f"{load} {res[load]['rate']:>7,.0f}/s broker {res[load]['broker']:5.1f} us worker "
                f"{res[load]['worker']:5.1f} us all {res[load]['all']:6.1f} us" for load in ("put", "get")),
                file=sys.stderr, flush=True)

    def med(v: str, load: str, key: str) -> float:
        return statistics.median(x[load][key] for x in results[v])

    print("| variant | load | broker us/req | vs base | worker us/req (each) | vs base | all processes us/req "
          "| vs base | req/s (median, noisy) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for load in ("put", "get"):
        for v in variants:
            cells = []
            for key in ("broker", "worker", "all"):
                x = med(v, load, key)
                b = med(variants[0], load, key)
                cells += [f"{x:.1f}", f"{x / b - 1:+.0%}"]
            print(f"| {v} | {load.upper()} | " + " | ".join(cells) + f" | {med(v, load, 'rate'):,.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
