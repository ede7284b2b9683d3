"""The broker's own LMDB: epoch, workers, slot map, per-slot positions, write de-duplication.

The epoch and the slot map are written with fsync before anything depends on them. Positions,
worker states and de-duplication entries change on every turn of the loop; they are written
without fsync (they survive a crash of the process, which is what a broker restart is) and synced
every second.
"""

from __future__ import annotations

import os
import struct
import time
from typing import Any

import lmdb

from broker.ready import Metadata
from broker.state import Restored
from protocol.frames import pack, unpack

SLOT = struct.Struct(">H")
DEDUP_WINDOW = 4096  # remembered writes per client id (request numbers modulo this)
DEDUP_MAX_AGE = 3600.0  # s; entries older than this are pruned


class MetaStore:
    def __init__(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)
        self.env = lmdb.open(path, map_size=1 << 32, max_dbs=8, sync=False, metasync=False)
        self.cluster = self.env.open_db(b"cluster")
        self.workers = self.env.open_db(b"workers")
        self.slots = self.env.open_db(b"slots")
        self.dedup = self.env.open_db(b"dedup")
        self.streams = self.env.open_db(b"streams")  # open streamed puts: stream id -> {slot, key}

    def close(self) -> None:
        self.env.sync(True)
        self.env.close()

    def sync(self) -> None:
        self.env.sync(True)

    # -- cluster-wide ---------------------------------------------------------------------------

    def load_cluster(self) -> dict[str, Any]:
        with self.env.begin() as txn:
            raw = txn.get(b"cluster", db=self.cluster)
        return unpack(raw) if raw else {}

    def next_epoch(self) -> int:
        """Increment and durably store the broker incarnation number."""
        with self.env.begin(write=True) as txn:
            raw = txn.get(b"epoch", db=self.cluster)
            epoch = (int(raw) if raw else 0) + 1
            txn.put(b"epoch", str(epoch).encode(), db=self.cluster)
        self.env.sync(True)
        return epoch

    def load(self) -> Restored:
        return Restored(self.load_cluster(), self.load_workers(), self.load_slots(), self.load_streams())

    def apply(self, md: Metadata, sync: bool) -> None:
        """Persist what one step of the broker changed (broker/ready.py); fsync if ``sync``."""
        self.write(workers=md.workers, slots=md.slots, dedup=md.dedup, streams=md.streams,
                   removed_workers=md.removed_workers, cluster=md.cluster, durable=sync)

    # -- workers and slots ----------------------------------------------------------------------

    def load_workers(self) -> dict[str, dict[str, Any]]:
        with self.env.begin() as txn:
            return {k.decode(): unpack(v) for k, v in txn.cursor(db=self.workers)}

    def load_slots(self) -> dict[int, dict[str, Any]]:
        with self.env.begin() as txn:
            return {SLOT.unpack(k)[0]: unpack(v) for k, v in txn.cursor(db=self.slots)}

    def write(
        self,
        workers: dict[str, dict[str, Any]] | None = None,
        slots: dict[int, dict[str, Any]] | None = None,
        dedup: list[tuple[bytes, int, list[list[int]], list[Any] | None]] | None = None,
        streams: dict[bytes, dict[str, Any] | None] | None = None,
        removed_workers: list[str] | None = None,
        cluster: dict[str, Any] | None = None,
        durable: bool = False,
    ) -> None:
        with self.env.begin(write=True) as txn:
            if cluster is not None:
                txn.put(b"cluster", pack(cluster), db=self.cluster)
            for stream, info in (streams or {}).items():
                if info is None:
                    txn.delete(stream, db=self.streams)
                else:
                    txn.put(stream, pack(info), db=self.streams)
            for wid, info in (workers or {}).items():
                txn.put(wid.encode(), pack(info), db=self.workers)
            for wid in removed_workers or []:
                txn.delete(wid.encode(), db=self.workers)
            for slot, info in (slots or {}).items():
                txn.put(SLOT.pack(slot), pack(info), db=self.slots)
            now = time.time()
            for cid, rid, parts, results in dedup or []:
                txn.put(cid + struct.pack(">H", rid % DEDUP_WINDOW), pack([rid, parts, now, results]),
                        db=self.dedup)
        if durable:
            self.env.sync(True)

    def load_streams(self) -> dict[bytes, dict[str, Any]]:
        with self.env.begin() as txn:
            return {bytes(k): unpack(v) for k, v in txn.cursor(db=self.streams)}

    def lookup_dedup(self, cid: bytes, rid: int) -> tuple[list[list[int]], list[Any] | None] | None:
        """(parts [slot, epoch, seq], results or None) of a write sequenced earlier, if remembered."""
        with self.env.begin() as txn:
            raw = txn.get(cid + struct.pack(">H", rid % DEDUP_WINDOW), db=self.dedup)
        if raw is None:
            return None
        stored_rid, parts, _, results = unpack(raw)
        return (parts, results) if stored_rid == rid else None

    def prune_dedup(self) -> int:
        cutoff = time.time() - DEDUP_MAX_AGE
        removed = 0
        with self.env.begin(write=True) as txn:
            cur = txn.cursor(db=self.dedup)
            ok = cur.first()
            while ok:
                if unpack(cur.value())[2] < cutoff:
                    ok = cur.delete()
                    removed += 1
                else:
                    ok = cur.next()
        return removed
