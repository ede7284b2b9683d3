"""Workers joining, living and leaving: READY, heartbeats both ways, liveness, the loss of a
worker, and forming the cluster once enough workers have registered."""

from __future__ import annotations

from typing import Any

import structlog

from broker.events import PositionReported, WorkerLost
from broker.placement import slot_map
from broker.state import BrokerState, Pos, Slot, Worker
from broker.worker_messages import Heartbeat, decode_ready
from protocol.frames import W_DISCONNECT, W_HEARTBEAT, pack

log = structlog.get_logger("zkv.broker")


class Membership:
    def __init__(self, state: BrokerState) -> None:
        self.state = state
        self.last_tick = state.clock()  # monotonic; the previous tick (``tick``'s stall rule)

    def on_ready(self, identity: bytes, body: list[bytes], key_name: str | None = None) -> None:
        """READY: a worker (re)registers, saying which data it holds and where each slot stands.
        ``key_name``: the worker id its CURVE key is registered for (None: no keys in use)."""
        try:
            self._register(identity, body, key_name)
        except Exception as e:
            log.warning("bad_ready", error=str(e))
            self._refuse_ready(identity)

    def _refuse_ready(self, identity: bytes) -> None:
        """DISCONNECT tells the sender to register again: a worker this connection belonged to is
        lost from now on, not left alive on a connection the broker has just refused."""
        state = self.state
        state.ready.to_worker(identity, [W_DISCONNECT])
        wid = state.by_identity.get(identity)
        if wid is not None:
            self.lose(state.workers[wid], "its READY was refused")

    def _register(self, identity: bytes, body: list[bytes], key_name: str | None) -> None:
        """Everything is checked (decode_ready) before anything changes: a refused READY leaves
        no trace."""
        state = self.state
        reg = decode_ready(body)
        wid, data_id, process = reg.wid, reg.data_id, reg.process
        if key_name is not None and key_name != wid:
            log.error("worker_id_not_its_key_refused", worker=wid, key_of=key_name or "(revoked)")
            state.ready.to_worker(identity, [W_DISCONNECT])
            return
        w = state.workers.get(wid)
        if w is not None and w.alive and w.identity != identity and w.data_id != data_id:
            log.error("duplicate_worker_id_refused", worker=wid, detail="a live worker with this id holds other data")
            self._refuse_ready(identity)
            return
        if w is None:
            w = state.workers[wid] = Worker(id=wid)
        if w.identity is not None and w.identity != identity:
            state.by_identity.pop(w.identity, None)
            self.lose(w, "replaced by a new connection")
        if w.data_id and w.data_id != data_id:
            log.warning("worker_data_replaced", worker=wid,
                        detail="same id, different data directory: its slots are re-filled")
        w.data_id, w.process, w.identity, w.alive = data_id, process, identity, True
        w.last_seen, w.last_seen_wall = state.clock(), state.wall_ms() / 1000
        w.keys, w.disk_bytes, w.reads = reg.keys, reg.disk_bytes, reg.reads
        state.by_identity[identity] = wid
        state.worker_changed(w)
        reported = {s: Pos(q, e) for s, (e, q) in reg.positions.items()}
        log.info("worker_ready", worker=wid, slots_with_data=len(reported))
        if not state.slots:
            self._maybe_form_cluster()
            return
        state.send_assign(w)
        for s in w.slots:
            state.emit(PositionReported(state.slots[s], wid, reported.get(s, Pos())))

    def _maybe_form_cluster(self) -> None:
        state, cfg = self.state, self.state.cfg
        alive = sorted(w.id for w in state.workers.values() if w.alive)
        need = max(cfg.rf, cfg.initial_workers)
        if len(alive) < need:
            log.info("waiting_for_workers", alive=len(alive), need=need)
            return
        for s, reps in slot_map(cfg.owned_slots(), alive, cfg.rf).items():
            slot = Slot(s, reps)
            for wid in reps:
                slot.applied[wid] = Pos()
                state.workers[wid].slots.add(s)
            state.slots[s] = slot
            state.slot_changed(slot)
        for wid in alive:
            state.worker_changed(state.workers[wid])
        state.cluster_id = state.new_id()
        state.ready.metadata.cluster = state.cluster_record()
        state.ready.must_sync = True  # the slot map is durable before any worker acts on it
        log.info("cluster_formed", workers=alive, slots=cfg.slots, rf=cfg.rf,
                 **({"group": cfg.group, "groups": cfg.groups} if cfg.groups > 1 else {}))
        for wid in alive:
            state.send_assign(state.workers[wid])

    def seen(self, w: Worker) -> None:
        w.last_seen = self.state.clock()
        w.last_seen_wall = self.state.wall_ms() / 1000

    def on_heartbeat(self, w: Worker, msg: Heartbeat) -> None:
        st: dict[str, Any] | None = msg.stats
        if st is not None:
            w.keys, w.disk_bytes = int(st.get("keys", 0)), int(st.get("disk_bytes", 0))
            w.applied, w.commits = int(st.get("applied", 0)), int(st.get("commits", 0))
            w.retries_absorbed = int(st.get("retries_absorbed", 0))
            w.direct_reads = int(st.get("direct_reads", 0))
            if "clock_ms" in st:
                w.clock_offset_ms = int(st["clock_ms"]) - self.state.wall_ms()

    def refuse(self, w: Worker, why: str) -> None:
        """A protocol error: the worker is told to reconnect and counts as lost meanwhile."""
        self.state.to_worker(w, [W_DISCONNECT])
        self.lose(w, why)

    def lose(self, w: Worker, why: str, clean: bool = False) -> None:
        """``clean``: the worker said goodbye (DISCONNECT on SIGTERM): not a fault."""
        if not w.alive:
            return
        if clean:
            log.info("worker_left", worker=w.id, reason=why)
        else:
            log.warning("worker_lost", worker=w.id, reason=why)
        w.alive = False
        w.dead_since = self.state.clock()
        if w.identity is not None:
            self.state.by_identity.pop(w.identity, None)
        w.identity = None
        self.state.worker_changed(w)
        self.state.emit(WorkerLost(w))

    def tick(self, now: float) -> None:
        """Declare silent workers lost; heartbeat the others when nothing else was sent to them."""
        state = self.state
        self._forgive_own_stall(now)
        expiry = state.cfg.heartbeat * state.cfg.liveness
        hb = [W_HEARTBEAT, pack({"now": state.wall_ms()})]
        for w in list(state.workers.values()):
            if not w.alive:
                continue
            if now - w.last_seen > expiry:
                self.lose(w, f"silent for {now - w.last_seen:.1f}s")
                continue
            if now - w.last_sent >= state.cfg.heartbeat:
                state.to_worker(w, hb)

    def _forgive_own_stall(self, now: float) -> None:
        """A broker that did not tick for a while (SIGSTOP, a CPU starved by other processes, a
        long turn) has not heard its workers meanwhile: their heartbeats of that time are still
        in its kernel's buffers when it wakes, not yet read (libzmq's I/O thread wakes with the
        loop, and the loop's first drain may find nothing). Counting that time as the workers'
        silence declared every worker lost at once after a pause of a second (tests, 0.3 s
        heartbeats) and dropped their ACKs. Of the time between two ticks, at most one heartbeat
        interval counts: the rest moves each live worker's last_seen on. A worker that really
        died is still declared lost, ``liveness`` heartbeats of the broker's waking time after
        its last message; a broker that is slow on every turn only finds it later."""
        last, self.last_tick = self.last_tick, now
        stalled = now - last - self.state.cfg.heartbeat
        if stalled <= 0:
            return
        log.warning("broker_stalled", stalled_s=round(now - last, 2),
                    detail="the workers' silence during the stall is not counted")
        for w in self.state.workers.values():
            if w.alive:  # never past now: one heard in the drain just before this tick is heard now
                w.last_seen = min(now, w.last_seen + stalled)
