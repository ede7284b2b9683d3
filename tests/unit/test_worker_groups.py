"""Active brokers, the worker side (sans-I/O): one WorkerCore per slot group ("a session"), all on
one SlotStore. Each session owns the slots ``slot % groups == group``, reports only those in
READY, takes only its group's ASSIGN, fences with its group's own epochs, never drops another
group's slots; ``flush_together`` commits every session's batch in one transaction."""

from __future__ import annotations

from pathlib import Path

import pytest

from protocol.frames import W_ACK, unpack
from protocol.replication import OP_DELETE, OP_PUT, Replicate, WriteOp
from worker.core import WorkerCore, flush_together
from worker.store import Position, SlotStore

pytestmark = pytest.mark.timeout(60)


def rep(slot: int, seq: int, op: WriteOp, value: bytes = b"", epoch: int = 1) -> Replicate:
    return Replicate(slot, epoch, seq, epoch if seq > 1 else 0, 0, 1_000, [op], [value])


def open_store(path: Path) -> SlotStore:
    return SlotStore(str(path), map_size=1 << 26, sync=False)


def assign(core: WorkerCore, slots: list[int], epoch: int, group: int | None = None) -> None:
    info = {"slots": slots, "epoch": epoch, "cluster": b"c", "groups": 2}
    info["group"] = core.group if group is None else group
    core.on_assign_message(info)


def fill(path: Path) -> None:
    """A store holding slots 0..3, slot s written by epoch 10 + s."""
    store = open_store(path)
    core = WorkerCore("w1", store)
    core.on_assign_message({"slots": [0, 1, 2, 3], "epoch": 1, "cluster": b"c"})
    for s in range(4):
        core.broker_epoch = 10 + s
        core.on_replicate(rep(s, 1, WriteOp(OP_PUT, b"k"), b"v%d" % s, epoch=10 + s), now=1.0)
    core.flush()
    store.close()


def ready_info(core: WorkerCore) -> dict:
    return unpack(core.ready_frames()[2])


def test_ready_reports_only_the_owned_slots_and_the_group(tmp_path: Path) -> None:
    fill(tmp_path / "w")
    store = open_store(tmp_path / "w")
    try:
        g0, g1 = WorkerCore("w1", store, group=0), WorkerCore("w1", store, group=1)
        assert ready_info(g0)["group"] == 0 and ready_info(g0)["positions"] == []  # groups unknown yet
        assert not g0.owns(0)
        assign(g0, [0, 2], 12)
        assign(g1, [1, 3], 13)
        assert g0.groups == 2 and g0.owns(2) and not g0.owns(1)
        assert sorted(s for s, _, _ in ready_info(g0)["positions"]) == [0, 2]
        assert sorted(s for s, _, _ in ready_info(g1)["positions"]) == [1, 3]
        assert ready_info(g1)["group"] == 1
        plain = WorkerCore("w1", store)
        assert "group" not in ready_info(plain)
        assert sorted(s for s, _, _ in ready_info(plain)["positions"]) == [0, 1, 2, 3]
    finally:
        store.close()


def test_an_assignment_for_another_group_is_refused(tmp_path: Path) -> None:
    store = open_store(tmp_path / "w")
    try:
        g0 = WorkerCore("w1", store, group=0)
        assign(g0, [1, 3], 5, group=1)
        assert g0.assigned == set() and g0.broker_epoch is None and not g0.deposed_broker
        assert store.highest_epoch_of(0) == 0 and store.highest_epoch_of(1) == 0
        assign(g0, [0], 5)
        assert g0.assigned == {0} and g0.broker_epoch == 5
    finally:
        store.close()


def test_epochs_are_per_group(tmp_path: Path) -> None:
    """Slot 2 (group 0) was written at epoch 12, slot 3 (group 1) at epoch 13."""
    fill(tmp_path / "w")
    store = open_store(tmp_path / "w")
    try:
        g0, g1 = WorkerCore("w1", store, group=0), WorkerCore("w1", store, group=1)
        assign(g0, [0, 2], 30)
        assert g0.highest_epoch == 30 and not g0.deposed_broker
        # Group 1's leader has a lower number than group 0's: unrelated numbers, accepted.
        assign(g1, [1, 3], 13)
        assert not g1.deposed_broker and g1.assigned == {1, 3} and g1.highest_epoch == 13
        # Below group 1's highest (13, from slot 3's position): a deposed leader of group 1.
        g1b = WorkerCore("w1", store, group=1)
        assign(g1b, [1, 3], 12)
        assert g1b.deposed_broker and g1b.assigned == set()
        # Below group 0's stored highest (30).
        g0b = WorkerCore("w1", store, group=0)
        assign(g0b, [0, 2], 29)
        assert g0b.deposed_broker
        assert store.highest_epoch == 1  # the ungrouped value (fill's assignment) is left alone
    finally:
        store.close()


def test_the_highest_epoch_of_each_group_survives_a_restart(tmp_path: Path) -> None:
    store = open_store(tmp_path / "w")
    assign(WorkerCore("w1", store, group=0), [0], 40)
    assign(WorkerCore("w1", store, group=1), [1], 7)
    store.close()
    store = open_store(tmp_path / "w")
    try:
        assert store.highest_epoch_of(0) == 40 and store.highest_epoch_of(1) == 7
        g0, g1 = WorkerCore("w1", store, group=0), WorkerCore("w1", store, group=1)
        assign(g0, [0], 39)
        assign(g1, [1], 8)
        assert g0.deposed_broker and not g1.deposed_broker
    finally:
        store.close()


def test_an_assignment_never_drops_another_groups_slots(tmp_path: Path) -> None:
    fill(tmp_path / "w")
    store = open_store(tmp_path / "w")
    try:
        g0 = WorkerCore("w1", store, group=0)
        assign(g0, [0], 50)  # slot 2 went to another worker: dropped; slots 1 and 3 are group 1's
        assert set(store.positions) == {0, 1, 3}
        assert store.read([(3, b"k")], now=1_000)[0].found and store.read([(1, b"k")], now=1_000)[0].found
        assert not store.read([(2, b"k")], now=1_000)[0].found
    finally:
        store.close()


def test_flush_together_commits_both_sessions_once_and_acks_each_its_own(tmp_path: Path) -> None:
    store = open_store(tmp_path / "w")
    try:
        g0, g1 = WorkerCore("w1", store, group=0), WorkerCore("w1", store, group=1)
        assign(g0, [0, 2], 5)
        assign(g1, [1, 3], 9)
        g0.on_replicate(rep(0, 1, WriteOp(OP_PUT, b"a"), b"1", epoch=5), now=1.0)
        g0.on_replicate(rep(2, 1, WriteOp(OP_DELETE, b"x"), epoch=5), now=1.0)  # needs a result
        g1.on_replicate(rep(1, 1, WriteOp(OP_DELETE, b"y"), epoch=9), now=1.0)
        g1.on_replicate(rep(1, 2, WriteOp(OP_PUT, b"b"), b"2", epoch=9), now=1.0)
        g1.on_replicate(rep(3, 1, WriteOp(OP_DELETE, b"z"), epoch=9), now=1.0)
        txid = store.env.info()["last_txnid"]
        assert flush_together([g0, g1]) == 5
        assert store.env.info()["last_txnid"] == txid + 1  # one write transaction
        assert g0.commits == g1.commits == 1 and g0.applied_total == 2 and g1.applied_total == 3
        assert g0.batch == g1.batch == []
        (a0,), (a1,) = ([unpack(f[1]) for f in c.outbox if f[0] == W_ACK] for c in (g0, g1))
        assert sorted(map(tuple, a0["pos"])) == [(0, 5, 1), (2, 5, 1)]
        assert sorted(map(tuple, a1["pos"])) == [(1, 9, 2), (3, 9, 1)]
        assert [(r[0], r[1]) for r in a0["res"]] == [(2, 1)]
        assert [(r[0], r[1]) for r in a1["res"]] == [(1, 1), (3, 1)]
        assert store.position(1) == Position(9, 2)
        assert flush_together([g0, g1]) == 0
    finally:
        store.close()


def test_flush_together_fails_for_every_session(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import lmdb

    store = open_store(tmp_path / "w")
    try:
        g0, g1 = WorkerCore("w1", store, group=0), WorkerCore("w1", store, group=1)
        assign(g0, [0], 5)
        assign(g1, [1], 9)
        g0.on_replicate(rep(0, 1, WriteOp(OP_PUT, b"a"), b"1", epoch=5), now=1.0)
        g1.on_replicate(rep(1, 1, WriteOp(OP_PUT, b"b"), b"2", epoch=9), now=1.0)

        def fail(batch: list[Replicate]) -> None:
            raise lmdb.MapFullError("full")

        monkeypatch.setattr(store, "apply_batch", fail)
        assert flush_together([g0, g1]) == 0
        assert g0.outbox == g1.outbox == [] and g0.batch == g1.batch == []
        assert g0.position(0) == Position() and g1.position(1) == Position()
    finally:
        store.close()
