"""bench/worker_apply.py measures what it says: its MSETs are split by slot as the broker splits
them, and the two timings differ only in the exactly-once records (with origins, one per slot
batch; without, none), the data they write being the same."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import pytest

from protocol.replication import slot_for_key
from worker import writes
from worker.tables import Tables

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import worker_apply  # noqa: E402

pytestmark = pytest.mark.timeout(60)


def counts(t: Tables) -> dict[str, int]:
    with t.env.begin() as txn:
        return {name: txn.stat(db)["entries"] for name, db in (("data", t.data), ("dedup", t.dedup),
                                                               ("dedup_age", t.dedup_age))}


def test_an_mset_is_one_batch_per_slot_and_only_origins_write_dedup_entries() -> None:
    maker = worker_apply.MsetMaker(keys=200, slots=64)
    with tempfile.TemporaryDirectory() as d:
        t = Tables.open(d, 1 << 26, sync=False)
        with_origin = maker.mset(with_origin=True)
        keys = [op.key for rep in with_origin for op in rep.ops]
        assert len(set(keys)) == 200
        assert all(slot_for_key(op.key, 64) == rep.slot for rep in with_origin for op in rep.ops)
        assert len({rep.slot for rep in with_origin}) == len(with_origin)
        writes.apply_batch(t, with_origin)
        assert counts(t) == {"data": 200, "dedup": len(with_origin), "dedup_age": len(with_origin)}
        without = maker.mset(with_origin=False)
        assert all(rep.origin is None for rep in without)
        writes.apply_batch(t, without)
        assert counts(t) == {"data": 400, "dedup": len(with_origin), "dedup_age": len(with_origin)}
        t.env.close()


def test_sim_mset_commits_every_slot_batch_of_its_msets() -> None:
    """bench/sim_mset.py counts the whole write path: every MSET was answered ok (it exits
    otherwise), one batch per slot each MSET touched was committed, and nothing is left pending."""
    import sim_mset

    sim = sim_mset.main(["--mset", "2", "--keys", "100", "--slots", "16"])
    broker = sim.broker
    assert broker.stats["writes_committed"] == 2 * 16  # 100 keys over 16 slots touch all of them
    assert all(slot.committed == slot.last.seq == 2 and not slot.pending for slot in broker.slots.values())
