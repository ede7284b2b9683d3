"""Sequencing: a slot's next seq, its epoch history, the in-memory tail, the replication batch.

Every write the broker publishes goes through ``sequence``: client writes (broker/writes.py) and
the writes the broker decides on its own (``sequence_unanswered``: stream aborts, reaps)."""

from __future__ import annotations

from collections.abc import Callable

from broker.requests import Request, WriteBatch
from broker.state import BrokerState, Pos, Slot, TailEntry
from protocol.replication import Origin, Replicate, WriteOp

TAIL_ENTRIES = 512  # per slot, kept in memory for gap repair
TAIL_BYTES = 256 * 1024  # per slot (committed entries; uncommitted ones are all kept)


def sequence(state: BrokerState, slot: Slot, ops: list[WriteOp], values: list[bytes], now_ms: int,
             origin: Origin | None = None) -> int:
    """Stamp one write batch (slot, epoch, seq), keep it in the tail, publish it to the slot's
    replicas and learners. Returns its seq. ``origin`` names the client request, which replicas
    record with the write so that a retry sequenced again later changes nothing (worker/dedup.py)."""
    seq = slot.last.seq + 1
    epoch = state.epoch
    state.read_cache.written(slot.id, ops)
    if not slot.epochs or slot.epochs[-1][0] != epoch:
        slot.epochs.append((epoch, seq))
    rep = Replicate(slot.id, epoch, seq, slot.last.epoch, slot.committed, now_ms, ops, values, origin)
    frames = rep.frames()
    entry = TailEntry(seq, epoch, slot.last.epoch, frames, sum(len(f) for f in frames))
    for wid in slot.replicas + slot.learners:
        if state.alive(wid):
            state.ready.publish(wid, frames)
    slot.tail.append(entry)
    slot.tail_bytes += entry.size
    # Trim only what is committed: an uncommitted write may be on no replica at all yet (a PUB
    # message lost to every subscriber), and then the tail is the only copy that can repair it.
    # broker/writes.py bounds the uncommitted backlog instead.
    while (len(slot.tail) > 1 and slot.tail[0].seq <= slot.committed
           and (len(slot.tail) > TAIL_ENTRIES or slot.tail_bytes > TAIL_BYTES)):
        slot.tail_bytes -= slot.tail.popleft().size
    slot.last = Pos(seq, epoch)
    slot.last_write = state.clock()
    state.slot_changed(slot)
    return seq


def sequence_unanswered(state: BrokerState, slot: Slot, op: str, ops: list[WriteOp]) -> int:
    """A write the broker decides on its own (aborting a stream its client left, reaping expired
    keys): sequenced, replicated and committed like any other, answered to nobody. The caller has
    checked that the slot can take writes. Returns its seq."""
    req = Request(0, b"", b"", op, float("inf"), [o.key for o in ops], [None] * len(ops),
                  outstanding=1, done=True)
    seq = sequence(state, slot, ops, [b""] * len(ops), state.wall_ms())
    slot.pending[seq] = WriteBatch(req, list(range(len(ops))))
    req.parts.append([slot.id, state.epoch, seq])
    return seq


def uncommitted_change(slot: Slot, touches: Callable[[bytes], bool]) -> int | None:
    """The seq of the latest write not yet committed whose keys ``touches`` selects (0: none), or
    None when the broker does not know every write above the committed seq (it inherited some
    from an earlier incarnation, after a restart): then any of them may touch any key.

    A replica that has applied everything committed answers a key from the committed state
    unless a later write changed it; so a read of a key need only wait for that write, not for
    every write of its slot (a slot whose writes cannot commit would hold every read otherwise)."""
    if len(slot.pending) < slot.last.seq - slot.committed:
        return None
    latest = 0
    for seq, batch in slot.pending.items():
        keys = batch.request.keys
        if any(touches(keys[i]) for i in batch.indices):
            latest = seq
    return latest


def cannot_commit(state: BrokerState, slot: Slot) -> str | None:
    """Why the slot's pending writes cannot commit now (fewer than W live replicas), or None."""
    live = state.live_replicas(slot)
    if live >= state.cfg.w:
        return None
    return (f"slot {slot.id} has writes that cannot commit now ({live} live replicas, {state.cfg.w} needed); "
            "what was asked for depends on them")
