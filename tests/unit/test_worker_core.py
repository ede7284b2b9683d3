"""The worker core on a real LMDB without any network: a snapshot install cut short, then the slot
repaired by replaying the tail, must survive a restart."""

from __future__ import annotations

from pathlib import Path

import pytest

from protocol.frames import W_ACK
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
