"""The whole write path of 1,000-key MSETs with no sockets: the seeded simulator's broker and three
workers (tests/support/sim.py: real BrokerCore and WorkerCores, real LMDB without fsync), for
instruction counts that repeat on a noisy machine (valgrind counts instructions, not seconds).

    PY=$(python -c 'import sys; print(sys.executable)')   # the interpreter itself, not a shim
    for n in 2 12; do valgrind --tool=callgrind --callgrind-out-file=/dev/null \\
        $PY bench/sim_mset.py --mset $n; done

The difference of the two counts, divided by 10, is one MSET's cost over the broker, the three
workers and the simulator's own delivery (the same on both sides of a comparison). 1,024 slots,
RF=3, W=2, 256-byte keys and 100-byte values, as bench/hotspots.py's MSET load.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

import structlog

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.support.sim import SimCluster  # noqa: E402


def main(argv: list[str] | None = None) -> SimCluster:
    """Runs the MSETs; returns the (closed) simulated cluster, for a test to inspect."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mset", type=int, default=10, metavar="N", help="MSETs to send, one after the other")
    ap.add_argument("--keys", type=int, default=1000)
    ap.add_argument("--slots", type=int, default=1024)
    args = ap.parse_args(argv)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    with tempfile.TemporaryDirectory(prefix="zkv-sim-mset-") as d:
        sim = SimCluster(Path(d), slots=args.slots, checks=False)
        try:
            for n in range(args.mset):
                keys = [b"key:%0252d" % (n * args.keys + i) for i in range(args.keys)]
                rid = sim.send(b"c1", "mset", [b"v" * 100] * args.keys, keys=keys)
                sim.settle()
                got = sim.reply(b"c1", rid)
                if got is None or not got[0].get("ok"):
                    raise SystemExit(f"MSET {n} failed: {got}")
        finally:
            sim.close()
    return sim


if __name__ == "__main__":
    main()
