"""What a worker's apply of one MSET costs, and how much of it the de-duplication table takes.

    python bench/worker_apply.py [--requests 30] [--keys 1000] [--slots 1024] [--rounds 3]

No cluster, no sockets: ``worker.writes.apply_batch`` (the worker's whole write transaction, as
``SlotStore.apply_batch`` calls it) on a temporary LMDB environment opened as the worker opens it
but with ``sync=False``, so that the figures are the CPU of the apply and not the disk's fsync.
An MSET of ``--keys`` keys (256-byte keys, 100-byte values, as bench/hotspots.py's MSET load) is
split by slot as the broker splits it (``slot_for_key``): one ``Replicate`` per slot it touches,
all in one transaction, as a worker gets them in one turn.

Each round times ``--requests`` such transactions twice, interleaved: once as the broker sends
them (every batch carries its client request's ``Origin``, which the replica looks up and records
in the slot's de-duplication table, worker/dedup.py) and once with no origin (what the apply costs
without exactly-once). Prints the best of the rounds per MSET and the share the origins take.

On a noisy machine, count instructions instead (valgrind's counts repeat whatever else runs):
``--apply N`` applies N MSETs with origins and times nothing; the difference of the counts of two
such runs is the cost of the extra MSETs::

    PY=$(python -c 'import sys; print(sys.executable)')   # the interpreter itself, not a shim
    for n in 2 12; do valgrind --tool=callgrind --callgrind-out-file=/dev/null \
        $PY bench/worker_apply.py --apply $n; done
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from protocol.replication import OP_PUT, Origin, Replicate, WriteOp, slot_for_key  # noqa: E402
from worker import writes  # noqa: E402
from worker.tables import Tables  # noqa: E402

CLIENT_ID = b"c" * 16


class MsetMaker:
    """Consecutive MSETs of new keys, each as the slot batches a worker receives for it."""

    def __init__(self, keys: int, slots: int) -> None:
        self.keys, self.slots = keys, slots
        self.seqs: dict[int, int] = {}
        self.next_key = 0
        self.next_request = 0

    def mset(self, with_origin: bool) -> list[Replicate]:
        by_slot: dict[int, list[bytes]] = {}
        for _ in range(self.keys):
            key = b"key:%0252d" % self.next_key
            self.next_key += 1
            by_slot.setdefault(slot_for_key(key, self.slots), []).append(key)
        self.next_request += 1
        origin = Origin(CLIENT_ID, self.next_request, True) if with_origin else None
        batch = []
        for slot, keys in by_slot.items():
            seq = self.seqs.get(slot, 0) + 1
            self.seqs[slot] = seq
            batch.append(Replicate(slot, 1, seq, 1 if seq > 1 else 0, 0, 1_000_000,
                                   [WriteOp(OP_PUT, k) for k in keys], [b"v" * 100] * len(keys), origin))
        return batch


@contextmanager
def scratch_tables() -> Iterator[Tables]:
    """A worker's tables in a temporary directory, opened as a worker opens them but without fsync."""
    with tempfile.TemporaryDirectory(prefix="zkv-apply-") as d:
        t = Tables.open(d, 1 << 33, sync=False)
        try:
            yield t
        finally:
            t.env.close()


def timed(t: Tables, batches: list[list[Replicate]]) -> float:
    began = time.perf_counter()
    for batch in batches:
        writes.apply_batch(t, batch)
    return (time.perf_counter() - began) / len(batches)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=30, help="MSETs per timing")
    ap.add_argument("--keys", type=int, default=1000, help="keys per MSET")
    ap.add_argument("--slots", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--apply", type=int, metavar="N", help="only apply N MSETs with origins (for valgrind)")
    args = ap.parse_args()
    maker = MsetMaker(args.keys, args.slots)
    if args.apply is not None:
        with scratch_tables() as t:
            for batch in [maker.mset(with_origin=True) for _ in range(args.apply)]:
                writes.apply_batch(t, batch)
        return
    with scratch_tables() as t:
        for _ in range(20):  # a table that is not empty, pages allocated
            writes.apply_batch(t, maker.mset(with_origin=True))
        best = {True: float("inf"), False: float("inf")}
        for _ in range(args.rounds):
            for with_origin in (True, False):
                batches = [maker.mset(with_origin) for _ in range(args.requests)]
                best[with_origin] = min(best[with_origin], timed(t, batches))
    batches_per = len(maker.mset(True))
    print(f"MSET of {args.keys} keys = about {batches_per} slot batches ({args.slots} slots); best of {args.rounds} "
          f"rounds of {args.requests}")
    for with_origin, label in ((True, "with origins:   "), (False, "without origins:")):
        print(f"apply per MSET, {label} {best[with_origin] * 1e6:9,.1f} us "
              f"({best[with_origin] * 1e6 / args.keys:.2f} us per key)")
    print(f"the origins' share (look-up and record in the de-duplication table): "
          f"{(best[True] - best[False]) / best[True]:.0%}")


if __name__ == "__main__":
    main()
