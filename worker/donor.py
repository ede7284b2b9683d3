"""The donor side of snapshot transfers: the snapshots this worker is sending, by transfer token.

Part 0 opens a read transaction that the later parts continue, so every part comes from one cut
of the slot however long the transfer takes (the broker throttles it). A transfer the broker
abandons is closed after DONATION_IDLE, ending its read transaction. Backup dumps (``Dumps``) are
read the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

from protocol.frames import W_SNAPSHOT_PART, pack
from worker.records import Position
from worker.snapshots import SNAP_RECORD, DumpEntries, SnapshotEntries
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


@dataclass
class Dump:
    slot: int
    pos: Position
    entries: DumpEntries
    next_part: int
    last_used: float
    last_answer: list[bytes]  # the part sent last, sent again if the same part is asked twice (a retry)


class Dumps:
    """Backup dumps being read (docs/protocol.md §1.11), by dump id: like a donation, part 0 opens
    one read transaction that the later parts continue, so the whole slot comes from one cut; but
    the parts carry live records as a client sees them (``snapshots.live_cut``), not the raw
    storage layout. An abandoned dump is closed after DONATION_IDLE."""

    def __init__(self, store: SlotStore) -> None:
        self.store = store
        self.by_id: dict[bytes, Dump] = {}

    def part(self, req: dict, now: float) -> list[bytes]:
        """The answer body (header, one frame per item) to ``{op: dump, slot, dump, part, now}``."""
        slot, dump_id, part = int(req["slot"]), bytes(req["dump"]), int(req["part"])
        if part == 0:
            self.close(dump_id)
            pos, entries = self.store.live_cut(slot, int(req["now"]))
            self.by_id[dump_id] = Dump(slot, pos, entries, 0, now, [])
        d = self.by_id.get(dump_id)
        if d is not None and d.slot == slot and part == d.next_part - 1 and d.last_answer:
            d.last_used = now
            return d.last_answer
        if d is None or d.slot != slot or part != d.next_part:
            raise ValueError("unknown dump or part out of order: start the slot's dump again")
        items: list[list] = []
        frames: list[bytes] = []
        size = 0
        last = True
        for item, frame in d.entries:
            items.append(item)
            frames.append(frame)
            size += len(frame) + (len(item[1]) if len(item) > 1 else 0)
            if size >= SNAPSHOT_PART_BYTES:
                last = False
                break
        d.next_part += 1
        d.last_used = now
        if last:
            self.close(dump_id)
        d.last_answer = [pack({"ok": True, "epoch": d.pos.epoch, "seq": d.pos.seq, "part": part, "last": last,
                               "items": items}), *frames]
        if last:
            self.by_id[dump_id] = d  # kept (closed) only to answer a retry of the last part
        return d.last_answer

    def close(self, dump_id: bytes) -> None:
        d = self.by_id.pop(dump_id, None)
        if d is not None:
            d.entries.close()  # ends the read transaction

    def close_idle(self, now: float) -> None:
        for dump_id, d in list(self.by_id.items()):
            if now - d.last_used > DONATION_IDLE:
                self.close(dump_id)
