"""Where slots should live and getting them there: the placement target, slot moves (a learner
filled by snapshot and log tail while the slot keeps serving, then one switch of ownership),
re-replication of a dead worker's slots, and the operator's commands (service mmi.admin)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import structlog

from broker.events import MoveAbandoned, RepairNeeded, ReplicaAdvanced, WorkerLost
from broker.placement import replicas_for_slot, slot_map
from broker.state import BrokerState, Move, Transfer

log = structlog.get_logger("zkv.broker")


class Moves:
    def __init__(self, state: BrokerState, transfer_to: Callable[[int, str], Transfer | None]) -> None:
        self.state = state
        self.transfer_to = transfer_to  # the snapshot filling (slot, receiver), for progress
        self.moves: dict[int, Move] = {}  # by slot
        self.rebalance_requested = False
        self._targets: tuple[tuple[str, ...], dict[int, list[str]]] = ((), {})
        # The run of moves under way (from the first move started while none was in flight to the
        # moment none is left): its start, and how many moves finished and were abandoned in it.
        self._run: dict[str, float] | None = None

    # -- the target ------------------------------------------------------------------------------

    def members(self, now: float) -> list[str]:
        """Workers the placement aims at: not draining, and alive or dead for less than the grace
        period (a brief death must not move data; re-replication handles a long one)."""
        grace = self.state.cfg.grace
        return sorted(w.id for w in self.state.workers.values()
                      if not w.draining and (w.alive or now - w.dead_since < grace))

    def target(self, s: int, members: list[str]) -> list[str]:
        key = tuple(members)
        if self._targets[0] != key:  # placement only changes when membership does
            self._targets = (key, slot_map(self.state.cfg.owned_slots(), members, self.state.cfg.rf))
        return self._targets[1][s]

    def misplaced(self, now: float) -> list[int]:
        members = self.members(now)
        if len(members) < self.state.cfg.rf:
            return []
        return [s for s, slot in self.state.slots.items() if set(slot.replicas) != set(self.target(s, members))]

    # -- moves -----------------------------------------------------------------------------------

    def plan(self, now: float) -> None:
        """Start moves toward the target placement, a few at a time: always away from draining
        workers; toward other workers when auto-rebalance is on or a rebalance was asked for."""
        state, cfg = self.state, self.state.cfg
        if not state.slots or any(sl.recovering for sl in state.slots.values()):
            return
        members = self.members(now)
        if len(members) < cfg.rf:
            return
        for s, slot in state.slots.items():
            if len(self.moves) >= cfg.move_concurrency:
                return
            if s in self.moves:
                continue
            target = self.target(s, members)
            removes = [w for w in slot.replicas if w not in target]
            adds = [w for w in target if w not in slot.replicas and state.workers[w].alive]
            if not removes or not adds:
                continue
            draining = [w for w in removes if state.workers[w].draining]
            if not (draining or cfg.auto_rebalance or self.rebalance_requested):
                continue
            remove = (draining or removes)[0]
            self._start(Move(s, adds[0], remove, "drain" if draining else "rebalance", now))
        if self.rebalance_requested and not self.moves and not self.misplaced(now):
            self.rebalance_requested = False

    def _start(self, move: Move) -> None:
        state = self.state
        if self._run is None:
            self._run = {"started": state.clock(), "finished": 0, "abandoned": 0}
            log.info("moves_started", reason=move.reason, misplaced=len(self.misplaced(state.clock())))
        slot = state.slots[move.slot]
        self.moves[move.slot] = move
        slot.learners.append(move.add)
        slot.applied[move.add] = None
        slot.snapshot_pending[move.add] = b""  # it may still hold (and ACK) a copy it is dropping
        slot.repairs.pop(move.add, None)
        w = state.workers[move.add]
        w.learning.add(move.slot)
        state.send_assign(w)
        log.debug("move_started", slot=move.slot, add=move.add, remove=move.remove, reason=move.reason)
        state.emit(RepairNeeded(slot, move.add))

    def maybe_finish(self, move: Move) -> None:
        """Switch ownership once the new replica has everything committed: one metadata change,
        fsynced; no write waits for it (pending writes commit on the new replica set)."""
        state = self.state
        slot = state.slots[move.slot]
        p = slot.applied.get(move.add)
        if p is None or p.seq < slot.committed or move.remove not in slot.replicas:
            if move.remove not in slot.replicas:
                self._abandon(move, "replica set changed")
            return
        lease = slot.leases.get(move.remove)
        if lease is not None and lease.until > state.clock():
            # The leaving replica holds the slot's read lease (not renewed while the move runs):
            # it keeps applying until the lease is out, or the slot's writes would wait for it.
            return
        slot.replicas[slot.replicas.index(move.remove)] = move.add
        slot.learners.remove(move.add)
        slot.applied.pop(move.remove, None)
        slot.snapshot_pending.pop(move.remove, None)
        add, remove = state.workers[move.add], state.workers[move.remove]
        add.learning.discard(move.slot)
        add.slots.add(move.slot)
        remove.slots.discard(move.slot)
        del self.moves[move.slot]
        state.slot_changed(slot)
        state.ready.must_sync = True  # the new owner is durable before the old one drops its copy
        state.stats["slots_moved"] += 1
        log.debug("move_finished", slot=move.slot, add=move.add, remove=move.remove,
                 seconds=round(state.clock() - move.started, 3))
        state.send_assign(add)
        state.send_assign(remove)
        if self._run is not None:
            self._run["finished"] += 1
        self.plan(state.clock())  # keep the pipeline of moves full
        self._end_run()

    def _end_run(self) -> None:
        """One summary line when the last move of a run ends."""
        if self._run is None or self.moves:
            return
        run, self._run = self._run, None
        now = self.state.clock()
        log.info("moves_finished", moves=int(run["finished"]), abandoned=int(run["abandoned"]),
                 seconds=round(now - run["started"], 1), misplaced=len(self.misplaced(now)))

    def _abandon(self, move: Move, why: str) -> None:
        state = self.state
        slot = state.slots[move.slot]
        if move.add in slot.learners:
            slot.learners.remove(move.add)
        slot.applied.pop(move.add, None)
        slot.snapshot_pending.pop(move.add, None)
        w = state.workers.get(move.add)
        if w is not None:
            w.learning.discard(move.slot)
            if w.alive:
                state.send_assign(w)
        state.emit(MoveAbandoned(move.slot, move.add))
        self.moves.pop(move.slot, None)
        state.stats["moves_abandoned"] += 1
        log.warning("move_abandoned", slot=move.slot, add=move.add, remove=move.remove, reason=why)
        if self._run is not None:
            self._run["abandoned"] += 1
        self._end_run()

    def finish_ready(self) -> None:
        for move in list(self.moves.values()):
            if move.slot in self.moves:
                self.maybe_finish(move)

    def on_replica_advanced(self, ev: ReplicaAdvanced) -> None:
        if not self.moves:
            return
        for slot in ev.slots:
            move = self.moves.get(slot.id)
            if move is not None and move.add == ev.worker.id:
                self.maybe_finish(move)

    def on_worker_lost(self, ev: WorkerLost) -> None:
        for move in list(self.moves.values()):
            if move.add == ev.worker.id:
                self._abandon(move, f"target {ev.worker.id} lost")

    # -- re-replication --------------------------------------------------------------------------

    def rereplicate(self, now: float) -> None:
        """Give the slots of workers dead for longer than the grace period new replicas: the best
        placed live worker not yet holding the slot, filled by snapshot from a healthy replica.
        The dead worker is told to drop those slots if it ever comes back."""
        state = self.state
        alive = [w.id for w in state.workers.values() if w.alive]
        changed: set[str] = set()
        given: dict[str, list[int]] = {}  # dead worker -> its slots given new replicas
        for dead in state.workers.values():
            if dead.alive or not dead.slots or now - dead.dead_since < state.cfg.grace:
                continue
            for s in sorted(dead.slots):
                slot = state.slots[s]
                if slot.recovering or s in self.moves:
                    continue
                spare = [w for w in replicas_for_slot(s, alive, len(alive))
                         if w not in slot.replicas and not state.workers[w].draining]
                if not spare:
                    continue
                new = spare[0]
                slot.replicas[slot.replicas.index(dead.id)] = new
                slot.applied.pop(dead.id, None)
                slot.applied[new] = None  # counts toward W once the snapshot is installed
                slot.snapshot_pending[new] = b""
                slot.repairs.pop(new, None)
                dead.slots.discard(s)
                state.workers[new].slots.add(s)
                state.slot_changed(slot)
                changed.add(new)
                state.stats["slots_rereplicated"] += 1
                log.debug("slot_rereplicated", slot=s, dead=dead.id, to=new)
                given.setdefault(dead.id, []).append(s)
        if not changed:
            return
        for dead_id, slots in given.items():
            log.info("slots_rereplicated", dead=dead_id, slots=len(slots), to=sorted(changed))
        state.ready.must_sync = True  # the new slot map is durable before any worker acts on it
        for wid in sorted(changed):
            w = state.workers[wid]
            state.send_assign(w)
            for s in w.slots:
                if state.slots[s].applied.get(wid) is None:
                    state.emit(RepairNeeded(state.slots[s], wid))

    # -- the operator ----------------------------------------------------------------------------

    def admin(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Operator commands (service mmi.admin): drain, undrain, remove, rebalance, move."""
        state = self.state
        op, wid = cmd.get("cmd"), cmd.get("worker")
        now = state.clock()
        if op == "rebalance":
            if not state.slots:
                return {"ok": False, "message": "the cluster has not formed yet"}
            self.rebalance_requested = True
            self.plan(now)
            return {"ok": True, "message": f"{len(self.misplaced(now))} slots to move"}
        if op == "move":
            return self._admin_move(cmd, now)
        w = state.workers.get(str(wid))
        if w is None:
            return {"ok": False, "message": f"no worker {wid!r}"}
        if op == "drain":
            others = [m for m in self.members(now) if m != w.id]
            if len(others) < state.cfg.rf:
                return {"ok": False, "message": f"draining {w.id} would leave {len(others)} workers; RF is "
                                                f"{state.cfg.rf}: add a worker first"}
            w.draining = True
            state.worker_changed(w)
            self.plan(now)
            return {"ok": True, "message": f"draining {w.id}: {len(w.slots)} slots to move"}
        if op == "undrain":
            w.draining = False
            state.worker_changed(w)
            return {"ok": True, "message": f"{w.id} takes slots again"}
        if op == "remove":
            if w.slots or w.learning:
                return {"ok": False, "message": f"{w.id} still holds {len(w.slots)} slots: drain it first"}
            if w.alive:
                return {"ok": False, "message": f"{w.id} is still running: stop it first"}
            del state.workers[w.id]
            state.ready.metadata.workers.pop(w.id, None)
            state.ready.metadata.removed_workers.append(w.id)
            state.ready.must_sync = True
            log.info("worker_removed", worker=w.id)
            return {"ok": True, "message": f"{w.id} removed"}
        return {"ok": False, "message": f"unknown admin command {op!r}"}

    def _admin_move(self, cmd: dict[str, Any], now: float) -> dict[str, Any]:
        """Move one replica of one slot by hand (tests shuffle slots this way). With auto-rebalance
        on, the planner later moves it back where placement wants it."""
        state = self.state
        s, src, dst = cmd.get("slot"), str(cmd.get("from")), str(cmd.get("to"))
        slot = state.slots.get(s) if isinstance(s, int) else None
        if slot is None or slot.recovering:
            return {"ok": False, "message": f"no serving slot {s!r}"}
        if s in self.moves:
            return {"ok": False, "message": f"slot {s} is already moving"}
        if src not in slot.replicas:
            return {"ok": False, "message": f"{src} does not hold slot {s}"}
        target = state.workers.get(dst)
        if target is None or not target.alive or dst in slot.replicas or target.draining:
            return {"ok": False, "message": f"{dst} cannot take slot {s} (unknown, dead, draining or holds it)"}
        self._start(Move(slot.id, dst, src, "manual", now))
        return {"ok": True, "message": f"moving slot {s} from {src} to {dst}"}

    def report(self) -> list[dict[str, Any]]:
        """Each move in flight with its copy progress (for status): ``starting`` until the donor's
        first part gives the totals, ``copying``, then ``catching up`` (the copy done, its figures
        kept) until the new replica has applied the writes made since its snapshot."""
        now = self.state.clock()
        out = []
        for m in sorted(self.moves.values(), key=lambda m: m.slot):
            t = self.transfer_to(m.slot, m.add)
            elapsed = max(now - m.started, 1e-6)
            started = t is not None and t.next_part > 0
            keys, total_keys = (t.keys, t.total_keys) if started else (0, 0)  # type: ignore[union-attr]
            copied, total = (t.bytes, t.total_bytes) if started else (0, 0)  # type: ignore[union-attr]
            rate = copied / elapsed
            left = total - copied
            state = "catching up" if t is None or t.done else "copying" if started else "starting"
            out.append({"slot": m.slot, "from": m.remove, "to": m.add, "reason": m.reason,
                        "keys_copied": keys, "keys_total": total_keys, "bytes_copied": copied, "bytes_total": total,
                        "rate_bytes_per_s": round(rate),
                        "eta_s": round(left / rate, 1) if rate > 0 and state == "copying" else None,
                        "state": state, "elapsed_s": round(elapsed, 3)})
        return out
