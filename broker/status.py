"""What ``zkv status`` shows (service mmi.status): the cluster, each worker, slots that lack
replicas, moves in flight, counters."""

from __future__ import annotations

from typing import Any

from broker.state import BrokerState, Worker


def behind(state: BrokerState, w: Worker) -> int:
    """Slots of this worker that have not applied everything committed (or await a snapshot)."""
    n = 0
    for s in w.slots:
        slot = state.slots.get(s)
        if slot is not None:
            p = slot.applied.get(w.id)
            n += p is None or p.seq < slot.committed
    return n


def stalled(state: BrokerState) -> list[dict[str, Any]]:
    """Slots with writes that cannot commit now (fewer than W live replicas), and why."""
    out = []
    now = state.clock()
    for slot in state.slots.values():
        if slot.pending and not slot.recovering:
            live = state.live_replicas(slot)
            if live < state.cfg.w:
                out.append({"slot": slot.id, "pending_writes": len(slot.pending), "live_replicas": live,
                            "w": state.cfg.w, "replicas": slot.replicas,
                            "since_last_write_s": round(now - slot.last_write, 1)})
    return out


def worker_state(state: BrokerState, w: Worker) -> str:
    """alive, dead, or recovering: known from the metadata and not heard from since this broker
    started, less than the liveness timeout ago (it has not had the time to register again)."""
    if w.alive:
        return "alive"
    silent_since_start = w.dead_since == state.started and w.identity is None
    if silent_since_start and state.clock() - state.started < state.cfg.heartbeat * state.cfg.liveness:
        return "recovering"
    return "dead"


def report(state: BrokerState, moves: list[dict[str, Any]], misplaced: int, open_streams: int) -> dict[str, Any]:
    now_wall = state.wall_ms() / 1000
    cfg = state.cfg
    # A recovering slot is counted apart (recovering_slots): right after a restart every slot is.
    under = [s.id for s in state.slots.values()
             if not s.recovering and state.live_replicas(s) < len(s.replicas)]
    return {
        "epoch": state.epoch,
        "formed": bool(state.slots),
        "now_ms": state.wall_ms(),  # the broker's clock, which TTLs are absolute on (zkv restore)
        "slots": cfg.slots,
        "rf": cfg.rf,
        "w": cfg.w,
        "max_value": cfg.max_value,
        "max_stream": cfg.max_stream,
        "workers": [
            {"id": w.id, "state": worker_state(state, w),
             "last_heartbeat_ago": round(now_wall - w.last_seen_wall, 3) if w.last_seen_wall else None,
             "slots": len(w.slots), "keys": w.keys, "disk_bytes": w.disk_bytes,
             "behind_slots": behind(state, w), "clock_offset_ms": w.clock_offset_ms,
             "applied": w.applied, "commits": w.commits, "retries_absorbed": w.retries_absorbed,
             "direct_reads": w.direct_reads,
             "draining": w.draining,
             "learning": len(w.learning)}
            for w in sorted(state.workers.values(), key=lambda w: w.id)
        ],
        "under_replicated_slots": under,
        "recovering_slots": sum(1 for s in state.slots.values() if s.recovering),
        "stalled_slots": stalled(state),
        "lost_writes": sorted(state.lost.values(), key=lambda x: x["slot"]),
        "committed_writes": sum(s.committed for s in state.slots.values()),
        "moves": moves,
        "misplaced_slots": misplaced,
        "open_streams": open_streams,
        "read_cache_bytes": state.read_cache.size,
        **state.stats,
    }
