"""The worker's LMDB engine: the records of every slot it holds, their applied positions, the
expiry index and the chunks of streamed values, in one LMDB environment.

``SlotStore`` owns the environment, this data directory's ids and the positions in memory; each
of its methods is one transaction, carried out by the unit that knows that job: worker/writes.py
(replication batches), worker/reads.py (gets and scans), worker/chunks.py (streamed values),
worker/expiry.py (TTLs), worker/snapshots.py (slot transfer), worker/slots.py (whole slots).
Their keys and values are described in worker/records.py.
"""

from __future__ import annotations

import os
import uuid

from protocol.replication import Replicate
from worker import chunks, expiry, reads, snapshots, writes
from worker.expiry import ExpiredKey
from worker.reads import ReadResult, ScanResult
from worker.records import EPOCH, META_CLUSTER, META_DATA_ID, META_EPOCH, NOTHING_APPLIED, Position
from worker.slots import forget_slot, half_installed, load_positions
from worker.snapshots import SnapshotEntries
from worker.tables import Tables
from worker.writes import BatchResults


class SlotStore:
    """Records of every slot a worker holds, in one LMDB environment."""

    def __init__(self, path: str, map_size: int = 1 << 36, sync: bool = True) -> None:
        self.path = path
        self.tables = Tables.open(path, map_size, sync)
        t = self.tables
        # Kept as attributes: tests and tools inspect the databases directly.
        self.env, self.data, self.meta, self.expiry, self.blobs, self.staged = (
            t.env, t.data, t.meta, t.expiry, t.blobs, t.staged)
        with self.env.begin(write=True) as txn:
            # A snapshot install cut short (a crash between its parts): its slot is half written
            # and has no position. Empty it; the broker sees the slot as empty and repairs it.
            for slot in half_installed(txn, t):
                forget_slot(txn, t, slot)
            data_id = txn.get(META_DATA_ID, db=t.meta)
            if data_id is None:
                data_id = uuid.uuid4().bytes
                txn.put(META_DATA_ID, data_id, db=t.meta)
            self.data_id: bytes = data_id
            self.last_commit_seconds = 0.0  # of the last apply_batch: LMDB's page writes and fsync (metrics)
            self.positions: dict[int, Position] = load_positions(txn, t)

    def close(self) -> None:
        self.env.sync(True)
        self.env.close()

    def position(self, slot: int) -> Position:
        return self.positions.get(slot, NOTHING_APPLIED)

    @property
    def cluster_id(self) -> bytes:
        with self.env.begin() as txn:
            return bytes(txn.get(META_CLUSTER, b"", db=self.meta))

    def set_cluster_id(self, cluster_id: bytes) -> None:
        with self.env.begin(write=True) as txn:
            txn.put(META_CLUSTER, cluster_id, db=self.meta)

    @property
    def highest_epoch(self) -> int:
        """The highest broker epoch recorded by ``set_highest_epoch`` (0: none yet)."""
        return self.highest_epoch_of(None)

    def set_highest_epoch(self, epoch: int) -> None:
        self.set_highest_epoch_of(None, epoch)

    def highest_epoch_of(self, group: int | None) -> int:
        """The same for one slot group (active brokers: each group's leader has epochs of its own)."""
        with self.env.begin() as txn:
            raw = txn.get(_epoch_key(group), db=self.meta)
        return EPOCH.unpack(raw)[0] if raw else 0

    def set_highest_epoch_of(self, group: int | None, epoch: int) -> None:
        with self.env.begin(write=True) as txn:
            txn.put(_epoch_key(group), EPOCH.pack(epoch), db=self.meta)

    def stats(self) -> dict[str, int]:
        with self.env.begin() as txn:
            keys = txn.stat(self.data)["entries"]
        info = self.env.info()
        disk = 0
        for name in ("data.mdb",):
            try:
                disk += os.stat(os.path.join(self.path, name)).st_blocks * 512
            except OSError:
                pass
        return {"keys": keys, "disk_bytes": disk, "map_used": info["last_pgno"] * self.env.stat()["psize"]}

    # -- writes ---------------------------------------------------------------------------------

    def apply_batch(self, batch: list[Replicate]) -> BatchResults:
        """Apply sequenced writes in one transaction (one fsync); see ``writes.apply_batch``. The
        positions in memory change only once the transaction has committed."""
        results, positions, self.last_commit_seconds = writes.apply_batch(self.tables, batch)
        self.positions.update(positions)
        return results

    def drop_slot(self, slot: int) -> None:
        """Forget a slot this worker no longer holds: its records and its position."""
        with self.env.begin(write=True) as txn:
            forget_slot(txn, self.tables, slot)
        self.positions.pop(slot, None)

    def reclaim_expired(self, broker_now: int, limit: int = 10_000) -> int:
        with self.env.begin(write=True) as txn:
            return expiry.reclaim_expired(txn, self.tables, broker_now, limit)

    # -- reads ----------------------------------------------------------------------------------

    def read(self, slots_keys: list[tuple[int, bytes]], now: int, with_values: bool = True) -> list[ReadResult]:
        with self.env.begin(buffers=False) as txn:
            return reads.read(txn, self.tables, slots_keys, now, with_values, self.positions)

    def read_chunks(self, slot: int, stream: bytes, first: int, count: int) -> list[bytes]:
        with self.env.begin() as txn:
            return chunks.read_chunks(txn, self.tables, slot, stream, first, count)

    def scan(self, slots: list[int], prefix: bytes, start_after: bytes | None, limit: int, now: int,
             with_values: bool, max_bytes: int) -> ScanResult:
        with self.env.begin(buffers=False) as txn:
            return reads.scan(txn, self.tables, slots, prefix, start_after, limit, now, with_values, max_bytes)

    def expired_keys(self, broker_now: int, limit: int = 1000, after: bytes | None = None,
                     slots: set[int] | None = None) -> list[ExpiredKey]:
        with self.env.begin(buffers=False) as txn:
            return expiry.expired_keys(txn, self.tables, broker_now, limit, after, slots)

    # -- snapshots ------------------------------------------------------------------------------

    def snapshot(self, slot: int) -> tuple[Position, tuple[int, int], SnapshotEntries]:
        """A consistent snapshot of one slot (``snapshots.cut``). Its read transaction stays open
        until the entries are exhausted or closed."""
        return snapshots.cut(self.env.begin(buffers=True), self.tables, slot)

    def live_cut(self, slot: int, now: int) -> tuple[Position, snapshots.DumpEntries]:
        """A backup's consistent cut of one slot (``snapshots.live_cut``); its read transaction
        stays open until the entries are exhausted or closed."""
        return snapshots.live_cut(self.env.begin(buffers=True), self.tables, slot, now)

    def begin_snapshot_install(self, slot: int) -> None:
        """Empty a slot that a snapshot is about to replace. Until finish_snapshot_install, the
        slot has no position and is marked half written (emptied again if the worker restarts)."""
        with self.env.begin(write=True) as txn:
            snapshots.begin_install(txn, self.tables, slot)
        self.positions.pop(slot, None)

    def install_snapshot_part(self, slot: int, entries: list[tuple[bytes, bytes]]) -> None:
        with self.env.begin(write=True) as txn:
            snapshots.install_part(txn, self.tables, slot, entries)

    def finish_snapshot_install(self, slot: int, pos: Position) -> None:
        with self.env.begin(write=True) as txn:
            snapshots.finish_install(txn, self.tables, slot, pos)
        self.positions[slot] = pos

    def install_snapshot(self, slot: int, pos: Position, entries: list[tuple[bytes, bytes]]) -> None:
        """Replace a slot's content with a whole snapshot taken at ``pos``."""
        self.begin_snapshot_install(slot)
        self.install_snapshot_part(slot, entries)
        self.finish_snapshot_install(slot, pos)


def _epoch_key(group: int | None) -> bytes:
    return META_EPOCH if group is None else META_EPOCH + b"/%d" % group
