"""The worker's decision logic, free of sockets: which replication messages to apply, when a gap
needs repair, how snapshots are installed, what to acknowledge.

The I/O loop (worker/server.py) feeds messages in and sends what ``outbox`` collects. Rule: the
store commits a batch (fsync) *before* the ACK for it is queued; an ACK never runs ahead of the disk.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass

import lmdb
import structlog

from protocol.frames import (
    W_ACK,
    W_ASSIGN,
    W_DISCONNECT,
    W_EXPIRED,
    W_FINAL,
    W_HEARTBEAT,
    W_NACK,
    W_PARTIAL,
    W_REPLAY,
    W_REQUEST,
    W_SNAPSHOT_DELIVER,
    W_SNAPSHOT_PART,
    W_SNAPSHOT_REQUEST,
    pack,
    unpack,
)
from protocol.limits import MAX_CHUNKS_PER_READ, SCAN_MAX_BYTES
from protocol.replication import Replicate
from worker.store import Position, SlotStore

log = structlog.get_logger("zkv.worker")

NACK_INTERVAL = 0.5  # s between repair requests for one slot
MAX_HELD_PER_SLOT = 10_000  # out-of-order messages kept while a gap is repaired
MAX_HELD_BYTES = 64 << 20  # and their values in all (a learner behind a stream of large chunks)
SNAPSHOT_PART_BYTES = 1 << 20
DONATION_IDLE = 30.0  # s before an abandoned snapshot's read transaction is closed
EXPIRED_REPORT_MAX = 5000  # expired keys reported to the broker per reclaim interval (1 s)


def _value_bytes(rep: Replicate) -> int:
    return sum(len(v) for v in rep.values)


@dataclass
class Donation:
    slot: int
    pos: Position
    records: Generator[tuple[bytes, bytes], None, None]
    next_part: int
    last_used: float


@dataclass
class SnapshotInProgress:
    """A snapshot being received: each part is written to disk as it arrives (a slot can hold
    gigabytes of streamed values); the position is written with the last part."""

    token: bytes
    pos: Position
    next_part: int = 0
    entries: int = 0


class WorkerCore:
    def __init__(self, worker_id: str, store: SlotStore) -> None:
        self.worker_id = worker_id
        self.store = store
        # Positions including messages accepted into the batch that is not yet committed.
        self.pos: dict[int, Position] = dict(store.positions)
        self.assigned: set[int] = set()
        self.batch: list[Replicate] = []
        self.held: dict[int, dict[int, Replicate]] = {}
        self.held_bytes = 0  # value bytes of every held message (kept as they come and go)
        self.last_nack: dict[int, float] = {}
        self.snapshots: dict[int, SnapshotInProgress] = {}  # receiving, by slot
        self.donations: dict[bytes, Donation] = {}  # sending, by transfer token
        self.outbox: list[list[bytes]] = []  # frames after the MDPW02 header
        self.broker_now = 0  # latest broker wall clock seen (ms); decides reclaiming of TTLs
        self.applied_total = 0  # replication batches applied (for status: group commit at work)
        self.commits = 0  # LMDB write transactions (each one fsync)
        self.expiry_cursor: bytes | None = None  # where the next expiry report continues
        self.broker_epoch: int | None = None  # the incarnation this worker is registered with
        self.stale_dropped = 0  # replication messages of another incarnation, dropped
        self.reconnect_requested = False  # the broker sent DISCONNECT: the loop re-registers

    # -- commands from the broker ---------------------------------------------------------------

    def on_broker(self, cmd: bytes, body: list[bytes], now: float) -> None:
        """One command from the broker's DEALER conversation (after the MDPW02 frame)."""
        if cmd == W_REQUEST:
            token = body[0]
            try:
                req = unpack(body[2])
                if req.get("op") == "chunks":
                    partials, reply = self.serve_chunks(token, req)
                    self.outbox.extend(partials)
                else:
                    reply = self.serve_read(req)
            except Exception as e:  # a malformed read request gets an error answer, nothing else
                reply = [pack({"ok": False, "code": "BAD_REQUEST", "message": str(e)})]
            self.outbox.append([W_FINAL, token, b"", *reply])
        elif cmd == W_REPLAY:
            self.on_replicate(Replicate.decode(body[0], body[1:]), now)
        elif cmd == W_HEARTBEAT:
            if body:
                self.broker_now = max(self.broker_now, int(unpack(body[0]).get("now", 0)))
        elif cmd == W_ASSIGN:
            self.on_assign_message(unpack(body[0]))
        elif cmd == W_SNAPSHOT_REQUEST:
            info = unpack(body[0])
            self.outbox.append(self.snapshot_part(int(info["slot"]), bytes(info["token"]),
                                                  int(info.get("part", 0)), now))
        elif cmd == W_SNAPSHOT_DELIVER:
            self.on_snapshot_part(unpack(body[0]), body[1:], now)
        elif cmd == W_DISCONNECT:
            self.reconnect_requested = True
        else:
            log.warning("unknown_broker_command", command=cmd.hex())

    def serve_read(self, req: dict) -> list[bytes]:
        """Answer a read from committed state. A miss reports the slot's applied seq as its version,
        so the broker can hold the answer back until that position is committed."""
        if req.get("op") == "scan":
            return self.serve_scan(req)
        slots_keys = [(int(s), bytes(k)) for s, k in req["keys"]]
        results = self.store.read(slots_keys, int(req["now"]), with_values=req.get("op") != "exists")
        hdr = {
            "ok": True,
            "found": [r.found for r in results],
            "versions": [r.version for r in results],
            "expire": [r.expire_at for r in results],
            # What this replica holds of each slot asked about: a slot it lost since the broker
            # chose it (dropped after a move) shows a position below what the broker counted.
            "applied": [[s, self.store.position(s).seq] for s in {s for s, _ in slots_keys}],
        }
        if any(r.streamed for r in results):
            hdr["streamed"] = [r.streamed for r in results]  # their value frame is the manifest
        return [pack(hdr), *[r.value for r in results]]

    def serve_chunks(self, token: bytes, req: dict) -> tuple[list[list[bytes]], list[bytes]]:
        """Chunks of a streamed value, one PARTIAL each, as many as the request's credit allows,
        then the FINAL's body: how many were sent (fewer than asked: the end, or the value is gone)."""
        slot, first, count = int(req["slot"]), int(req["first"]), int(req["count"])
        stream = bytes(req["stream"])
        if first < 0 or not 0 < count <= MAX_CHUNKS_PER_READ:
            raise ValueError(f"first must be >= 0 and count 1..{MAX_CHUNKS_PER_READ}")
        chunks = self.store.read_chunks(slot, stream, first, count)
        partials = [[W_PARTIAL, token, b"", pack({"index": first + i}), c] for i, c in enumerate(chunks)]
        return partials, [pack({"ok": True, "sent": len(chunks)})]

    # -- scan -----------------------------------------------------------------------------------

    def serve_scan(self, req: dict) -> list[bytes]:
        """One worker's share of a scan page: its slots' matching entries merged in key order,
        and each slot's applied seq (the broker holds the page until those are committed)."""
        prefix, start_after = bytes(req["prefix"]), req.get("start_after")
        with_values = bool(req.get("values", True))
        res = self.store.scan([int(s) for s in req["slots"]], prefix,
                              None if start_after is None else bytes(start_after), int(req["limit"]),
                              int(req["now"]), with_values, int(req.get("max_bytes", SCAN_MAX_BYTES)))
        hdr = {"ok": True, "keys": [e.key for e in res.entries], "versions": [e.version for e in res.entries],
               "complete": res.complete, "applied": [[s, q] for s, q in res.applied.items()]}
        if with_values and any(e.streamed for e in res.entries):
            hdr["streamed"] = [e.streamed for e in res.entries]  # their value frame is the manifest
        return [pack(hdr), *([e.value for e in res.entries] if with_values else [])]

    # -- expiry ---------------------------------------------------------------------------------

    def report_expired(self) -> int:
        """Tell the broker which of this worker's keys have expired by its clock; it sequences
        their deletion (OP_REAP) so that expiries happen in the committed order on every replica
        and watches see them. Returns how many were reported."""
        if not self.broker_now or self.broker_epoch is None:
            return 0
        keys = self.store.expired_keys(self.broker_now, EXPIRED_REPORT_MAX, self.expiry_cursor, self.assigned)
        # The next report continues after this one and wraps around at the end: keys the broker
        # cannot reap now (their slot lacks W live replicas) must not hold back other slots' keys.
        self.expiry_cursor = keys[-1].index_key if len(keys) >= EXPIRED_REPORT_MAX else None
        if keys:
            self.outbox.append([W_EXPIRED, pack({"keys": [[k.slot, k.key, k.version, k.expire_at] for k in keys]})])
        return len(keys)

    def position(self, slot: int) -> Position:
        return self.pos.get(slot, Position())

    # -- replication ----------------------------------------------------------------------------

    def on_replicate(self, rep: Replicate, now: float) -> None:
        if rep.epoch != self.broker_epoch:
            # Sent by another broker incarnation than the one this worker registered with: an old
            # one's message still queued (a pause, a partition, a restart) may sit at a seq the new
            # one truncated. Positions reported in READY must stay true until ASSIGN names the epoch.
            self.stale_dropped += 1
            return
        if rep.now > self.broker_now:
            self.broker_now = rep.now
        if rep.slot not in self.assigned:
            return
        cur = self.position(rep.slot)
        if rep.seq <= cur.seq:
            return  # already have it (a replay crossing the live stream)
        if rep.seq == cur.seq + 1 and rep.prev_epoch == cur.epoch and rep.slot not in self.snapshots:
            self._accept(rep)
            self._drain_held(rep.slot)
            return
        # A gap, a diverged history, or a snapshot being installed: hold it and ask for repair.
        held = self.held.setdefault(rep.slot, {})
        old = held.pop(rep.seq, None)  # a later copy of a seq replaces the earlier (another epoch's)
        if old is not None:
            self.held_bytes -= _value_bytes(old)
        size = _value_bytes(rep)
        if len(held) < MAX_HELD_PER_SLOT and self.held_bytes + size <= MAX_HELD_BYTES:
            held[rep.seq] = rep  # else dropped: the repair sends it again (tail or snapshot)
            self.held_bytes += size
        if rep.slot not in self.snapshots:
            self._request_repair(rep.slot, now)

    def _accept(self, rep: Replicate) -> None:
        self.batch.append(rep)
        self.pos[rep.slot] = Position(rep.epoch, rep.seq)

    def _drain_held(self, slot: int) -> None:
        held = self.held.get(slot)
        while held:
            cur = self.position(slot)
            for seq in [s for s in held if s <= cur.seq]:
                self.held_bytes -= _value_bytes(held.pop(seq))
            nxt = held.get(cur.seq + 1)
            if nxt is None or nxt.prev_epoch != cur.epoch:
                break
            self.held_bytes -= _value_bytes(held.pop(nxt.seq))
            self._accept(nxt)
        if held is not None and not held:
            del self.held[slot]

    def _request_repair(self, slot: int, now: float) -> None:
        if now - self.last_nack.get(slot, -1e9) < NACK_INTERVAL:
            return
        self.last_nack[slot] = now
        cur = self.store.position(slot)  # what is on disk: the broker must never count more
        self.outbox.append([W_NACK, pack({"slot": slot, "epoch": cur.epoch, "seq": cur.seq})])

    def retry_stalled_repairs(self, now: float) -> None:
        """Ask again for slots still holding messages past a gap (a lost NACK or replay)."""
        self.close_idle_donations(now)
        for slot in list(self.held):
            if slot not in self.snapshots:
                self._request_repair(slot, now)

    def flush(self) -> int:
        """Commit the waiting batch (one transaction, one fsync) and queue one cumulative ACK."""
        if not self.batch:
            return 0
        batch, self.batch = self.batch, []
        try:
            results = self.store.apply_batch(batch)
        except lmdb.Error as e:
            # Nothing of the batch is on disk (the transaction aborted) and nothing is acknowledged:
            # forget it, so the broker's repair sends it again, and keep serving reads meanwhile.
            # A write this worker can never store (a full disk) then stays visible as a lagging
            # replica in `zkv status` and in these logs, not as a crash loop.
            for rep in batch:
                self.pos[rep.slot] = self.store.position(rep.slot)
            log.error("apply_failed", error=str(e), batches=len(batch))
            return 0
        touched = {rep.slot for rep in batch}
        self.applied_total += len(batch)
        self.commits += 1
        ack = {
            "pos": [[s, self.store.position(s).epoch, self.store.position(s).seq] for s in touched],
            "res": [[s, q, r] for s, q, r in results],
        }
        self.outbox.append([W_ACK, pack(ack)])
        return len(batch)

    # -- assignment -----------------------------------------------------------------------------

    def on_assign_message(self, info: dict) -> None:
        cluster = bytes(info.get("cluster", b""))
        mine = self.store.cluster_id
        if mine and cluster != mine:
            # A broker that does not know this worker's cluster (its metadata was lost or it is
            # another cluster): taking its slot map would drop this worker's data. Refuse.
            log.error("assignment_from_another_cluster_refused", ours=mine.hex(), theirs=cluster.hex())
            return
        if not mine and cluster:
            self.store.set_cluster_id(cluster)
        self.broker_epoch = int(info["epoch"])
        added, removed = self.on_assign(list(info["slots"]))
        # Slots given to other workers while this one was away: its copies are stale, drop them.
        stale = (removed | set(self.store.positions)) - self.assigned
        if stale:
            self.flush()
            for s in stale:
                self.store.drop_slot(s)
                self.pos.pop(s, None)
        log.info("slots_assigned", slots=len(self.assigned), added=len(added), removed=len(removed),
                 dropped=len(stale))

    def on_assign(self, slots: list[int]) -> tuple[set[int], set[int]]:
        """New slot set; returns (added, removed) so the loop can change its subscriptions."""
        new = set(slots)
        added, removed = new - self.assigned, self.assigned - new
        self.assigned = new
        for s in removed:
            self.held_bytes -= sum(_value_bytes(r) for r in self.held.pop(s, {}).values())
            self._abandon_snapshot(s)
        return added, removed

    # -- snapshots ------------------------------------------------------------------------------

    def snapshot_part(self, slot: int, token: bytes, part: int, now: float) -> list[bytes]:
        """Donor side: part ``part`` (about 1 MiB) of a consistent snapshot of ``slot``. Part 0
        opens a read transaction that later parts continue, so all parts come from one cut."""
        hdr: dict = {"slot": slot, "token": token, "part": part}
        if part == 0:
            self._close_donation(token)
            pos, totals, records = self.store.snapshot(slot)
            self.donations[token] = Donation(slot, pos, records, 0, now)
            hdr["total_keys"], hdr["total_bytes"] = totals
        d = self.donations.get(token)
        if d is None or d.slot != slot or d.next_part != part:
            hdr["error"] = "unknown snapshot or part out of order"
            return [W_SNAPSHOT_PART, pack(hdr)]
        frames: list[bytes] = []
        size = 0
        last = True
        for key, record in d.records:
            frames += [key, record]
            size += len(key) + len(record)
            if size >= SNAPSHOT_PART_BYTES:
                last = False
                break
        d.next_part += 1
        d.last_used = now
        if last:
            self._close_donation(token)
        hdr.update({"last": last, "epoch": d.pos.epoch, "seq": d.pos.seq})
        return [W_SNAPSHOT_PART, pack(hdr), *frames]

    def _close_donation(self, token: bytes) -> None:
        d = self.donations.pop(token, None)
        if d is not None:
            d.records.close()  # ends the read transaction

    def close_idle_donations(self, now: float) -> None:
        for token, d in list(self.donations.items()):
            if now - d.last_used > DONATION_IDLE:
                self._close_donation(token)

    def on_snapshot_part(self, hdr: dict, frames: list[bytes], now: float) -> None:
        slot = int(hdr["slot"])
        if slot not in self.assigned:
            return
        token = bytes(hdr["token"])
        part = int(hdr["part"])
        snap = self.snapshots.get(slot)
        if part == 0:
            # Writes accepted into the current batch for this slot are older than or part of the
            # snapshot's history; commit everything first so the snapshot replaces a settled state.
            self.flush()
            snap = SnapshotInProgress(token, Position(int(hdr["epoch"]), int(hdr["seq"])))
            self.snapshots[slot] = snap
            self.store.begin_snapshot_install(slot)
            self.pos[slot] = Position()
        if snap is None or snap.token != token or snap.next_part != part or len(frames) % 2:
            # A part of an abandoned or broken transfer: drop it; the repair is asked for again.
            self._abandon_snapshot(slot)
            self._request_repair(slot, now)
            return
        self.store.install_snapshot_part(slot, list(zip(frames[0::2], frames[1::2], strict=True)))
        snap.entries += len(frames) // 2
        snap.next_part += 1
        if not hdr["last"]:
            return
        del self.snapshots[slot]
        self.store.finish_snapshot_install(slot, snap.pos)
        self.pos[slot] = snap.pos
        log.info("snapshot_installed", slot=slot, epoch=snap.pos.epoch, seq=snap.pos.seq,
                 entries=snap.entries)
        self.outbox.append([W_ACK, pack({"pos": [[slot, snap.pos.epoch, snap.pos.seq]], "res": [], "snap": token})])
        self._drain_held(slot)
        if self.held.get(slot):
            self._request_repair(slot, now)

    def _abandon_snapshot(self, slot: int) -> None:
        """Forget a snapshot cut short. Its slot is half written: empty it, so that whatever
        repairs it next (a snapshot or a replay from the start) starts from nothing. Dropped, not
        marked half-installed: a replay may fill it from seq 1, and a marker left behind would
        empty it again at the next start, acknowledged writes and all."""
        if self.snapshots.pop(slot, None) is not None:
            self.store.drop_slot(slot)
            self.pos[slot] = Position()

    def on_reconnect(self) -> None:
        """A new registration (READY) is under way: until its ASSIGN arrives, apply nothing."""
        self.broker_epoch = None
        for slot in list(self.snapshots):
            self._abandon_snapshot(slot)
