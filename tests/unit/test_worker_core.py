"""The worker core on a real LMDB without any network: a snapshot install cut short, then the slot
repaired by replaying the tail, must survive a restart; an assignment from a deposed broker (an
epoch below the highest accepted) is refused; DISCONNECT with and without a body."""

from __future__ import annotations

from pathlib import Path

import pytest

from protocol.frames import W_ACK, W_ASSIGN, W_DISCONNECT, pack
from protocol.replication import OP_PUT, Replicate, WriteOp, chunk_key
from worker.core import WorkerCore
from worker.store import Position, SlotStore

pytestmark = pytest.mark.timeout(60)


SLOT = 3


def rep(seq: int, op: WriteOp, value: bytes = b"", epoch: int = 1) -> Replicate:
    return Replicate(SLOT, epoch, seq, epoch if seq > 1 else 0, 0, 1_000, [op], [value])


def test_an_abandoned_snapshot_leaves_no_marker_to_wipe_a_replayed_slot_at_restart(tmp_path: Path) -> None:
    """A snapshot install cut short (the worker re-registers mid-transfer) leaves the slot empty,
    without a position, and marked half-installed ("i" in meta). If the broker then repairs the
    slot by replaying its tail from seq 1 (a young slot: the tail reaches back that far), the
    replica applies and ACKs those writes, but the half-install marker is never cleared: at the
    next restart the store empties the slot again, losing writes the broker counted towards W."""
    store = SlotStore(str(tmp_path / "w"), map_size=1 << 26, sync=False)
    core = WorkerCore("w1", store)
    core.on_assign_message({"slots": [SLOT], "epoch": 1, "cluster": b"c"})
    # A snapshot arrives in several parts; only part 0 gets here before the worker re-registers.
    core.on_snapshot_part({"slot": SLOT, "token": b"t1", "part": 0, "last": False, "epoch": 1, "seq": 5},
                          [b"b" + chunk_key(b"S" * 16, 0), b"chunk"], now=0.0)
    core.on_reconnect()  # abandons the snapshot: the slot is emptied, marker set
    core.on_assign_message({"slots": [SLOT], "epoch": 1, "cluster": b"c"})
    # READY said "no position": the broker replays its tail from seq 1.
    for seq in (1, 2, 3):
        core.on_replicate(rep(seq, WriteOp(OP_PUT, b"k%d" % seq), b"v%d" % seq), now=1.0)
    core.flush()
    assert store.position(SLOT) == Position(1, 3)
    assert any(f[0] == W_ACK for f in core.outbox)  # seq 3 acknowledged to the broker
    store.close()
    reopened = SlotStore(str(tmp_path / "w"), map_size=1 << 26, sync=False)
    try:
        # Fails on main: the slot is wiped at open (position (0, 0), records gone).
        assert reopened.position(SLOT) == Position(1, 3)
        assert reopened.read([(SLOT, b"k3")], now=1_000)[0].found
    finally:
        reopened.close()


# -- fencing: an assignment from a deposed broker (etcd mode) ---------------------------------------


def _store_at_epoch(path: Path, epoch: int) -> SlotStore:
    """A worker store holding SLOT with writes sequenced by broker epoch ``epoch``, reopened."""
    store = SlotStore(str(path), map_size=1 << 26, sync=False)
    core = WorkerCore("w1", store)
    core.on_assign_message({"slots": [SLOT], "epoch": epoch, "cluster": b"c"})
    core.on_replicate(rep(1, WriteOp(OP_PUT, b"k1"), b"v1", epoch=epoch), now=1.0)
    core.flush()
    store.close()
    return SlotStore(str(path), map_size=1 << 26, sync=False)


def test_an_assignment_with_a_lower_epoch_than_any_accepted_is_refused_and_nothing_applied(tmp_path: Path) -> None:
    store = _store_at_epoch(tmp_path / "w", 5)
    core = WorkerCore("w1", store)
    assert core.highest_epoch == 5  # from the stored positions
    core.reconnect()
    core.on_assign_message({"slots": [SLOT, SLOT + 1], "epoch": 4, "cluster": b"c"})
    assert core.deposed_broker
    assert core.broker_epoch is None and core.assigned == set()
    # Nothing of the deposed broker is applied: neither its replication stream nor other commands.
    core.on_replicate(rep(2, WriteOp(OP_PUT, b"k2"), b"v2", epoch=4), now=2.0)
    core.on_broker(W_ASSIGN, [pack({"slots": [SLOT], "epoch": 5, "cluster": b"c"})], now=2.0)
    core.flush()
    assert core.assigned == set() and store.position(SLOT) == Position(5, 1)
    # The next registration starts clean; the leader's assignment (same or higher epoch) is taken.
    core.reconnect()
    assert not core.deposed_broker
    core.on_assign_message({"slots": [SLOT], "epoch": 5, "cluster": b"c"})
    assert core.broker_epoch == 5 and core.assigned == {SLOT}
    store.close()


def test_the_highest_epoch_accepted_is_kept_across_restarts(tmp_path: Path) -> None:
    store = _store_at_epoch(tmp_path / "w", 5)
    core = WorkerCore("w1", store)
    core.on_assign_message({"slots": [SLOT], "epoch": 7, "cluster": b"c"})  # a new leader, no write yet
    assert core.highest_epoch == 7
    store.close()
    store = SlotStore(str(tmp_path / "w"), map_size=1 << 26, sync=False)
    try:
        assert store.position(SLOT) == Position(5, 1) and store.highest_epoch == 7
        core = WorkerCore("w1", store)
        assert core.highest_epoch == 7
        core.on_assign_message({"slots": [SLOT], "epoch": 6, "cluster": b"c"})  # epoch 7 deposed it
        assert core.deposed_broker and core.assigned == set()
    finally:
        store.close()


def test_a_new_worker_accepts_any_epoch(tmp_path: Path) -> None:
    store = SlotStore(str(tmp_path / "w"), map_size=1 << 26, sync=False)
    try:
        core = WorkerCore("w1", store)
        assert core.highest_epoch == 0
        core.on_assign_message({"slots": [SLOT], "epoch": 1, "cluster": b"c"})
        assert not core.deposed_broker and core.broker_epoch == 1
    finally:
        store.close()


@pytest.mark.parametrize(("body", "info"), [
    ([], {}),
    ([b""], {}),
    ([b"\xc1garbage"], {}),
    ([pack([1, 2])], {}),
    ([pack({"reason": "standby", "leader": "tcp://b:1", "replication": "tcp://b:2"})],
     {"reason": "standby", "leader": "tcp://b:1", "replication": "tcp://b:2"}),
])
def test_disconnect_with_or_without_a_body_asks_to_register_again(tmp_path: Path, body: list[bytes],
                                                                   info: dict) -> None:
    store = SlotStore(str(tmp_path / "w"), map_size=1 << 26, sync=False)
    try:
        core = WorkerCore("w1", store)
        core.on_broker(W_DISCONNECT, body, now=0.0)
        assert core.reconnect_requested and core.disconnect_info == info
        core.reconnect()
        assert not core.reconnect_requested and core.disconnect_info == {}
    finally:
        store.close()
