"""The donor side of snapshot transfers: the snapshots this worker is sending, by transfer token.

Part 0 opens a read transaction that the later parts continue, so every part comes from one cut
of the slot however long the transfer takes (the broker throttles it). A transfer the broker
abandons is closed after DONATION_IDLE, ending its read transaction.
"""

from __future__ import annotations

from dataclasses import dataclass

from protocol.frames import W_SNAPSHOT_PART, pack
from worker.records import Position
from worker.snapshots import SNAP_RECORD, SnapshotEntries
from worker.store import SlotStore

SNAPSHOT_PART_BYTES = 1 << 20
DONATION_IDLE = 30.0  # s before an abandoned snapshot's read transaction is closed


@dataclass
class Donation:
    slot: int
    pos: Position
    records: SnapshotEntries
    next_part: int
    last_used: float


class Donations:
    def __init__(self, store: SlotStore) -> None:
        self.store = store
        self.by_token: dict[bytes, Donation] = {}

    def part(self, slot: int, token: bytes, part: int, now: float) -> list[bytes]:
        """SNAPSHOT_PART (after the MDPW02 header): part ``part`` (about 1 MiB) of a consistent
        snapshot of ``slot``, or an error if the transfer is unknown or the part out of order."""
        hdr: dict = {"slot": slot, "token": token, "part": part}
        if part == 0:
            self.close(token)
            pos, totals, records = self.store.snapshot(slot)
            self.by_token[token] = Donation(slot, pos, records, 0, now)
            hdr["total_keys"], hdr["total_bytes"] = totals
        d = self.by_token.get(token)
        if d is None or d.slot != slot or d.next_part != part:
            hdr["error"] = "unknown snapshot or part out of order"
            return [W_SNAPSHOT_PART, pack(hdr)]
        frames: list[bytes] = []
        size = keys = data = 0
        last = True
        for key, record in d.records:
            frames += [key, record]
            size += len(key) + len(record)
            # What this part adds to the totals of part 0, counted as snapshots.cut counts them:
            # records are keys (chunks are not); bytes are entries less their tag.
            keys += key[:1] == SNAP_RECORD
            data += len(key) - 1 + len(record)
            if size >= SNAPSHOT_PART_BYTES:
                last = False
                break
        d.next_part += 1
        d.last_used = now
        if last:
            self.close(token)
        hdr.update({"last": last, "epoch": d.pos.epoch, "seq": d.pos.seq, "keys": keys, "bytes": data})
        return [W_SNAPSHOT_PART, pack(hdr), *frames]

    def close(self, token: bytes) -> None:
        d = self.by_token.pop(token, None)
        if d is not None:
            d.records.close()  # ends the read transaction

    def close_idle(self, now: float) -> None:
        for token, d in list(self.by_token.items()):
            if now - d.last_used > DONATION_IDLE:
                self.close(token)
