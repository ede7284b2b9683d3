"""After a broker restart, each slot serves again once enough of its replicas have said where
they are: its history is then taken from the most advanced replica on the persisted history.

In etcd mode a new leader knows each slot's epoch history but not its positions. RF - W + 1
replicas suffice: every acknowledged write is on W replicas, so on one of them. The most
advanced of them on the epoch history is adopted, a new epoch entry starts just after it (written
to etcd before anything of the new epoch is published), and reads wait until it is committed
(``Slot.read_floor``): the adopted tail may hold writes the old leader acknowledged."""

from __future__ import annotations

import structlog

from broker.events import HistoryRewritten, PositionReported, RepairNeeded
from broker.history import epoch_of, in_history
from broker.quorum import advance
from broker.state import BrokerState, Pos, Slot

log = structlog.get_logger("zkv.broker")


class Recovery:
    def __init__(self, state: BrokerState) -> None:
        self.state = state
        self.reported: dict[int, dict[str, Pos]] = {}  # recovering slot -> replica -> position

    def on_position(self, ev: PositionReported) -> None:
        if not ev.slot.recovering:
            return  # broker/replicas.py takes it
        self.reported.setdefault(ev.slot.id, {})[ev.wid] = ev.pos
        self._try_recover(ev.slot)

    def _try_recover(self, slot: Slot) -> None:
        """Serve the slot again once enough replicas have reported that every acknowledged write
        is among them (RF - W + 1 of them: any W overlap with those)."""
        state = self.state
        reported = self.reported.get(slot.id, {})
        need = max(1, len(slot.replicas) - state.cfg.w + 1)
        if len(reported) < need:
            return
        everyone = len(reported) >= len(slot.replicas)
        # Only positions on the persisted history count: a replica past it holds writes that an
        # earlier incarnation published but never committed and a later one already truncated (or
        # reused the seqs of). Adopting one would resurrect a refused write or drop acknowledged ones.
        known = state.positions_known
        valid = {w: p for w, p in reported.items() if in_history(slot, p, last_known=known)}
        if not valid:
            if not everyone:
                return
            log.error("slot_history_unknown", slot=slot.id, detail="no replica matches the broker's "
                      "metadata (lost or restored from an old copy?): taking the most advanced replica",
                      last=[slot.last.epoch, slot.last.seq], epochs=slot.epochs,
                      reported={w: [p.epoch, p.seq] for w, p in reported.items()})
            valid = dict(reported)
        best = max(valid.values())
        if best.seq < slot.committed:
            if not everyone:
                return  # the replicas that hold the committed writes have not reported yet
            log.error("slot_lost_committed_writes", slot=slot.id, committed=slot.committed, best=best.seq)
            state.lost[slot.id] = {"slot": slot.id, "committed": slot.committed, "recovered_at": best.seq,
                                   "at": state.wall_ms() / 1000}
            # The slot serves again from what survived: its committed seq is the survivor's (the
            # writes above it are gone), else no replica would qualify for reads and no new write
            # would count as committed until the seqs passed the old mark.
            slot.committed = best.seq
            state.emit(HistoryRewritten(slot, f"slot {slot.id} lost committed writes (recovered at seq {best.seq})"))
        slot.last = best
        slot.epochs = [(e, q) for e, q in slot.epochs if q <= best.seq]
        if best.seq and epoch_of(slot, best.seq) != best.epoch:
            # Only after a power loss ate the broker's unsynced metadata: trust the replicas.
            log.warning("slot_epoch_history_rebuilt", slot=slot.id, epoch=best.epoch, seq=best.seq)
            slot.epochs = [(best.epoch, 1)]
        if not known:
            # This epoch's writes start after what was adopted: a replica holding more of an older
            # epoch's (never committed) writes is off the history from here on, even before the
            # first new write (broker/history.py).
            start = (state.epoch, best.seq + 1)
            slot.epochs = [e for e in slot.epochs if e[1] < start[1]] + [start]
            slot.read_floor = best.seq
        slot.recovering = False
        log.debug("slot_recovered", slot=slot.id, last=[best.epoch, best.seq], committed=slot.committed,
                  reported={w: [p.epoch, p.seq] for w, p in reported.items()}, valid=sorted(valid))
        for wid, pos in reported.items():
            slot.applied[wid] = pos if wid in valid and pos.seq <= best.seq else None
        del self.reported[slot.id]
        state.slot_changed(slot)
        advance(state, slot)
        for wid, pos in list(slot.applied.items()):
            if pos != best and state.alive(wid):
                state.emit(RepairNeeded(slot, wid))
