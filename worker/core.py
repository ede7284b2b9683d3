"""The worker's decision logic, free of sockets: which replication messages to apply, when a gap
needs repair, how snapshots are installed, what to acknowledge, and how it registers.

The I/O loop (worker/server.py, or tests/support/sim.py) feeds messages in and sends what ``outbox``
collects. Rule: the store commits a batch (fsync) *before* the ACK for it is queued; an ACK never
runs ahead of the disk. Reads are answered by worker/serve.py, snapshots sent by worker/donor.py;
messages that cannot be applied yet wait in worker/held.py.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import lmdb
import structlog

from protocol.frames import (
    SERVICE,
    W_ACK,
    W_ASSIGN,
    W_COMMITTED,
    W_DISCONNECT,
    W_EXPIRED,
    W_HEARTBEAT,
    W_LEASE_GRANT,
    W_NACK,
    W_READY,
    W_REPLAY,
    W_REQUEST,
    W_SNAPSHOT_DELIVER,
    W_SNAPSHOT_REQUEST,
    pack,
    unpack,
)
from protocol.replication import Replicate
from worker import serve
from worker.donor import Donations, Dumps
from worker.held import HeldMessages
from worker.leases import ReadLeases
from worker.records import NOTHING_APPLIED
from worker.store import Position, SlotStore

log = structlog.get_logger("zkv.worker")

NACK_INTERVAL = 0.5  # s between repair requests for one slot
EXPIRED_REPORT_MAX = 5000  # expired keys reported to the broker per reclaim interval (1 s)


@dataclass
class SnapshotInProgress:
    """A snapshot being received: each part is written to disk as it arrives (a slot can hold
    gigabytes of streamed values); the position is written with the last part."""

    token: bytes
    pos: Position
    next_part: int = 0
    entries: int = 0


class WorkerCore:
    def __init__(self, worker_id: str, store: SlotStore, process_id: bytes | None = None,
                 group: int | None = None, reads: str = "") -> None:
        """``group``: the slot group this core registers for (active brokers: one core per group,
        all on one store, each with its group's leader); None: every slot, one broker at a time.
        ``reads``: the endpoint where this worker answers reads under read leases ("": none)."""
        self.worker_id = worker_id
        self.reads = reads
        self.leases = ReadLeases(store)
        self.group = group
        self.groups = 0  # with a group: how many the cluster has (ASSIGN, DISCONNECT say it)
        self.store = store
        # New for every process: READY tells the broker a restart from a reconnect of the same one.
        self.process_id = process_id or uuid.uuid4().bytes
        # Positions including messages accepted into the batch that is not yet committed.
        self.pos: dict[int, Position] = dict(store.positions)
        self.assigned: set[int] = set()
        self.batch: list[Replicate] = []
        self.held = HeldMessages()
        self.last_nack: dict[int, float] = {}
        self.snapshots: dict[int, SnapshotInProgress] = {}  # receiving, by slot
        self.donations = Donations(store)  # sending
        self.dumps = Dumps(store)  # backups being read
        self.outbox: list[list[bytes]] = []  # frames after the MDPW02 header
        self.broker_now = 0  # latest broker wall clock seen (ms); decides reclaiming of TTLs
        self.applied_total = 0  # replication batches applied (for status: group commit at work)
        self.commits = 0  # LMDB write transactions (each one fsync)
        self.retries_absorbed = 0  # batches that were retries of writes applied before (no-ops)
        self.expiry_cursor: bytes | None = None  # where the next expiry report continues
        self.broker_epoch: int | None = None  # the incarnation this worker is registered with
        self.stale_dropped = 0  # replication messages of another incarnation, dropped
        self.reconnect_requested = False  # the broker sent DISCONNECT: the loop re-registers
        self.disconnect_info: dict = {}  # that DISCONNECT's body ({} when it had none)
        # Fencing: the highest broker epoch this worker has taken an assignment from (kept in the
        # store), or that sequenced a write it holds. An ASSIGN below it comes from a deposed
        # leader: refused, and the loop leaves that broker (deposed_broker).
        self.highest_epoch = self._highest_on_disk()
        self.deposed_broker = False

    def owns(self, slot: int) -> bool:
        """Is ``slot`` this core's? Every slot without a group; with one, only its group's slots,
        and none while the number of groups is not known."""
        if self.group is None:
            return True
        return self.groups > 0 and slot % self.groups == self.group

    def _highest_on_disk(self) -> int:
        """The highest epoch recorded, or that sequenced a write held, for this core's slots."""
        return max([self.store.highest_epoch_of(self.group),
                    *(p.epoch for s, p in self.store.positions.items() if self.owns(s))])

    def _learn_groups(self, info: dict) -> None:
        groups = info.get("groups")
        if self.group is None or self.groups or not isinstance(groups, int) or isinstance(groups, bool) \
                or groups <= self.group:
            return
        self.groups = groups
        self.highest_epoch = self._highest_on_disk()
    # -- commands from the broker ---------------------------------------------------------------

    def on_broker(self, cmd: bytes, body: list[bytes], now: float) -> None:
        """One command from the broker's DEALER conversation (after the MDPW02 frame)."""
        if self.deposed_broker:
            return  # the rest of a deposed broker's conversation, until the loop has left it
        if cmd == W_REQUEST:
            self.outbox.extend(serve.answer(self.store, body, self.dumps, now))
        elif cmd == W_REPLAY:
            self.on_replicate(Replicate.decode(body[0], body[1:]), now)
        elif cmd == W_HEARTBEAT:
            if body:
                self.broker_now = max(self.broker_now, int(unpack(body[0]).get("now", 0)))
        elif cmd == W_COMMITTED:
            self.leases.on_committed(unpack(body[0]))
        elif cmd == W_LEASE_GRANT:
            self.leases.on_grant(unpack(body[0]), self.broker_epoch,
                                 lambda s: s in self.assigned and s not in self.snapshots)
        elif cmd == W_ASSIGN:
            self.on_assign_message(unpack(body[0]))
        elif cmd == W_SNAPSHOT_REQUEST:
            info = unpack(body[0])
            self.outbox.append(self.donations.part(int(info["slot"]), bytes(info["token"]),
                                                   int(info.get("part", 0)), now))
        elif cmd == W_SNAPSHOT_DELIVER:
            self.on_snapshot_part(unpack(body[0]), body[1:], now)
        elif cmd == W_DISCONNECT:
            self.reconnect_requested = True
            self.disconnect_info = disconnect_body(body)
            self._learn_groups(self.disconnect_info)
        else:
            log.warning("unknown_broker_command", command=cmd.hex())

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

    def request_leases(self, now: float) -> None:
        """Ask for (or renew) read leases: only with a reads endpoint, only while registered."""
        if self.reads and self.broker_epoch is not None:
            self.outbox.append(self.leases.request(now))

    def position(self, slot: int) -> Position:
        return self.pos.get(slot, NOTHING_APPLIED)

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
        if self.reads:
            self.leases.learn(rep.slot, rep.committed)
        cur = self.position(rep.slot)
        if rep.seq <= cur.seq:
            return  # already have it (a replay crossing the live stream)
        if rep.seq == cur.seq + 1 and rep.prev_epoch == cur.epoch and rep.slot not in self.snapshots:
            self._accept(rep)
            self._drain_held(rep.slot)
            return
        # A gap, a diverged history, or a snapshot being installed: hold it and ask for repair.
        self.held.hold(rep)
        if rep.slot not in self.snapshots:
            self._request_repair(rep.slot, now)

    def _accept(self, rep: Replicate) -> None:
        self.batch.append(rep)
        self.pos[rep.slot] = Position(rep.epoch, rep.seq)

    def _drain_held(self, slot: int) -> None:
        while (nxt := self.held.take_next(slot, self.position(slot))) is not None:
            self._accept(nxt)

    def _request_repair(self, slot: int, now: float) -> None:
        if now - self.last_nack.get(slot, -1e9) < NACK_INTERVAL:
            return
        self.last_nack[slot] = now
        cur = self.store.position(slot)  # what is on disk: the broker must never count more
        self.outbox.append([W_NACK, pack({"slot": slot, "epoch": cur.epoch, "seq": cur.seq})])

    def retry_stalled_repairs(self, now: float) -> None:
        """Ask again for slots still holding messages past a gap (a lost NACK or replay)."""
        self.donations.close_idle(now)
        self.dumps.close_idle(now)
        for slot in self.held.slots():
            if slot not in self.snapshots:
                self._request_repair(slot, now)

    def flush(self) -> int:
        """Commit the waiting batch (one transaction, one fsync) and queue one cumulative ACK."""
        return flush_together([self])

    def _acknowledge(self, batch: list[Replicate], results: list) -> None:
        """``batch`` is on disk: one cumulative ACK for it."""
        touched = {rep.slot for rep in batch}
        self.applied_total += len(batch)
        self.commits += 1
        self.retries_absorbed += sum(len(r) == 4 for r in results)
        position = self.store.position
        ack = {
            "pos": [[s, p.epoch, p.seq] for s in touched for p in (position(s),)],
            "res": results,
        }
        self.outbox.append([W_ACK, pack(ack)])

    # -- assignment -----------------------------------------------------------------------------

    def on_assign_message(self, info: dict) -> None:
        if self.group is not None:
            self._learn_groups(info)
            if info.get("group") != self.group or not self.groups:
                log.warning("assignment_for_another_group_refused", group=info.get("group"), ours=self.group)
                return
        cluster = bytes(info.get("cluster", b""))
        mine = self.store.cluster_id
        if mine and cluster != mine:
            # A broker that does not know this worker's cluster (its metadata was lost or it is
            # another cluster): taking its slot map would drop this worker's data. Refuse.
            log.error("assignment_from_another_cluster_refused", ours=mine.hex(), theirs=cluster.hex())
            return
        epoch = int(info["epoch"])
        if epoch < self.highest_epoch:
            # A broker that has been replaced by a leader of a higher epoch and does not know it yet
            # (paused, partitioned): its slot map and its writes are out of date. Apply nothing of it.
            log.warning("assignment_from_deposed_broker_refused", epoch=epoch, highest=self.highest_epoch)
            self.deposed_broker = True
            return
        if not mine and cluster:
            self.store.set_cluster_id(cluster)
        if epoch > self.highest_epoch:
            self.store.set_highest_epoch_of(self.group, epoch)  # on disk first: a restart must refuse the older one too
            self.highest_epoch = epoch
        first = epoch != self.broker_epoch  # the first assignment from this broker incarnation
        self.broker_epoch = epoch
        added, removed = self.on_assign(list(info["slots"]))
        # Slots given to other workers while this one was away: its copies are stale, drop them.
        # Only this core's slots: another group's are another core's business.
        stale = {s for s in removed | set(self.store.positions) if self.owns(s)} - self.assigned
        if stale:
            self.flush()
            for s in stale:
                self.store.drop_slot(s)
                self.pos.pop(s, None)
        # Every slot move re-sends the assignment to both of its workers, one slot changed each time:
        # the broker logs the run of moves (moves_started / moves_finished); here, the first
        # assignment of a broker and changes of more than one slot.
        (log.info if first or len(added | removed | stale) > 1 else log.debug)(
            "slots_assigned", slots=len(self.assigned), added=len(added), removed=len(removed), dropped=len(stale))

    def on_assign(self, slots: list[int]) -> tuple[set[int], set[int]]:
        """New slot set; returns (added, removed) so the loop can change its subscriptions."""
        new = set(slots)
        added, removed = new - self.assigned, self.assigned - new
        self.assigned = new
        for s in removed:
            self.held.discard(s)
            self.leases.drop(s)
            self._abandon_snapshot(s)
        return added, removed

    # -- snapshots received ------------------------------------------------------------------------------

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
            self.leases.drop(slot)  # its data is replaced from here on: no read of it until a new lease
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
        log.debug("snapshot_installed", slot=slot, epoch=snap.pos.epoch, seq=snap.pos.seq,
                 entries=snap.entries)
        self.outbox.append([W_ACK, pack({"pos": [[slot, snap.pos.epoch, snap.pos.seq]], "res": [], "snap": token})])
        self._drain_held(slot)
        if self.held.has_messages(slot):
            self._request_repair(slot, now)

    def _abandon_snapshot(self, slot: int) -> None:
        """Forget a snapshot cut short. Its slot is half written: empty it, so that whatever
        repairs it next (a snapshot or a replay from the start) starts from nothing. Dropped, not
        marked half-installed: a replay may fill it from seq 1, and a marker left behind would
        empty it again at the next start, acknowledged writes and all."""
        if self.snapshots.pop(slot, None) is not None:
            self.store.drop_slot(slot)
            self.pos[slot] = Position()

    # -- registration ---------------------------------------------------------------------------

    def reconnect(self) -> list[bytes]:
        """Start a new registration with the broker, on a new connection (the first one, after a
        silent broker, after DISCONNECT, after a broker restart). Returns READY's frames (after
        the MDPW02 header), to be sent on that connection before anything in ``outbox``.

        The accepted batch is committed first, so the positions READY reports are on disk."""
        self.reconnect_requested = False
        self.disconnect_info = {}
        self.deposed_broker = False
        self.flush()
        self.on_reconnect()
        return self.ready_frames()

    def on_reconnect(self) -> None:
        """A new registration (READY) is under way: until its ASSIGN arrives, apply nothing."""
        self.broker_epoch = None
        self.leases.reset("the worker is registering with the broker again")
        for slot in list(self.snapshots):
            self._abandon_snapshot(slot)

    def ready_frames(self) -> list[bytes]:
        """READY: who this worker is (id, data directory, process) and the committed position of
        every slot it has data for, with its store's stats."""
        st = self.store
        info = {
            "id": self.worker_id,
            "data_id": st.data_id,
            "process": self.process_id,
            "positions": [[s, p.epoch, p.seq] for s, p in st.positions.items() if self.owns(s)],
            **st.stats(),
            **({} if self.group is None else {"group": self.group}),
            **({"reads": self.reads} if self.reads else {}),
        }
        return [W_READY, SERVICE, pack(info)]


def flush_together(cores: list[WorkerCore]) -> int:
    """Commit the waiting batches of ``cores`` (sessions of one store: with active brokers, one per
    slot group) in one transaction, one fsync, and queue each core's ACK for its own share.
    Returns the batches committed."""
    shares = [(core, core.batch) for core in cores if core.batch]
    if not shares:
        return 0
    for core, _ in shares:
        core.batch = []
    # One share (no groups, or one group's writes this turn): the hot path, nothing to sort out.
    batch = shares[0][1] if len(shares) == 1 else [rep for _, b in shares for rep in b]
    store = shares[0][0].store
    try:
        results = store.apply_batch(batch)
    except lmdb.Error as e:
        # Nothing of the batch is on disk (the transaction aborted) and nothing is acknowledged:
        # forget it, so the broker's repair sends it again, and keep serving reads meanwhile.
        # A write this worker can never store (a full disk) then stays visible as a lagging
        # replica in `zkv status` and in these logs, not as a crash loop.
        for core, b in shares:
            for rep in b:
                core.pos[rep.slot] = store.position(rep.slot)
        log.error("apply_failed", error=str(e), batches=len(batch))
        return 0
    if len(shares) == 1:
        shares[0][0]._acknowledge(batch, results)
        return len(batch)
    # Results exist only for batches whose answer depends on what was found; each starts with its
    # slot, and the cores' slots are disjoint (one group each), so the slot says whose it is.
    owner = {rep.slot: i for i, (_, b) in enumerate(shares) for rep in b}
    per_core: list[list] = [[] for _ in shares]
    for r in results:
        per_core[owner[r[0]]].append(r)
    for (core, b), mine in zip(shares, per_core, strict=True):
        core._acknowledge(b, mine)
    return len(batch)


def disconnect_body(body: list[bytes]) -> dict:
    """A broker's DISCONNECT body: none (``{}``: "register again"), or a standby's
    ``{reason: "standby", leader, replication}`` (docs/protocol.md §2). A malformed one counts as none."""
    if not body or not body[0]:
        return {}
    try:
        info = unpack(body[0])
    except ValueError:
        info = None
    if not isinstance(info, dict):
        log.warning("bad_disconnect_body", size=len(body[0]))
        return {}
    return info
