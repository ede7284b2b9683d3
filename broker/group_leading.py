"""Leading slot groups (etcd mode, ``--groups N``, issue 15, active brokers): the cores of the
groups this broker leads, their metadata, and the handover of each to the election.

broker/server.py owns the sockets and the loop and calls in here, once per turn:

- ``lead(now)`` makes a core for each group the election (broker/group_election.py, its own
  thread) won at a new epoch, with the group's metadata in etcd under ``groups/G/``, and drops
  the core of each group this broker may no longer act for (handed over, or its lease deadline
  passed). A group is never led again at an epoch this process led it in.
- ``execute(carry_out)`` carries out each group core's Ready with its group's metadata, checked
  against the seats just before (a turn may run past the deadline); a failed metadata write drops
  that group's core alone.

The messages are routed to the cores by ``ActiveCores`` (broker/active.py, ``active``). The
election's thread hands a group over through ``hand_over``: it returns once the loop has dropped
the group's core, so nothing more of it is sent.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import structlog

from broker.active import ActiveCores, GroupMap
from broker.core import BrokerCore
from broker.etcd import Deposed, Etcd, EtcdMeta, EtcdUnavailable
from broker.group_election import GroupElection
from broker.leadership import GIVE_WAY_AFTER, LeaderInfo, LeaseRules, WorkerReach
from broker.messages import Limits
from broker.ready import Ready
from broker.state import BrokerConfig
from protocol.frames import pack, unpack

log = structlog.get_logger("zkv.broker")

MAX_HOLD_OFF = 60.0  # s: the longest a broker that reaches no workers stays out of the groups

# Makes a core on the process's clock and keys: (metadata, restored, epoch, config, new_id).
MakeCore = Callable[[EtcdMeta, Any, int, BrokerConfig, Callable[[], bytes]], BrokerCore]


class GroupLeading:
    def __init__(self, etcd: Etcd, prefix: str, me: LeaderInfo, cfg: BrokerConfig, groups: int,
                 rules: LeaseRules, limits: Limits, make_core: MakeCore, stopping: Callable[[], bool]) -> None:
        """``cfg``: the broker's core config, each group's core gets it restricted to its group;
        ``stopping``: whether the process stops (a handover then waits no more)."""
        self.etcd, self.prefix, self.cfg, self.groups, self.rules = etcd, prefix, cfg, groups, rules
        self.make_core = make_core
        self.stopping = stopping
        self.election = GroupElection(etcd, prefix, me, groups, rules, hand_over=self.hand_over)
        self.active = ActiveCores(limits, cfg.slots, groups, self.status)
        self.metas: dict[int, EtcdMeta] = {}
        # The last epoch each group was led in by this process: it never leads the group in it again.
        self.served: dict[int, int] = {}
        self.cluster_id = b""  # the cluster's one id, the same for every group's core
        self.changed = threading.Condition()  # the loop changed the cores: a handover may be done
        # Whether this broker, cut off from its workers but not from etcd, should leave its groups
        # to the others (as a single leader gives way to a standby); the hold-off doubles each
        # time it leaves without having reached W workers since, so that a broker still cut off
        # does not keep taking groups back by handovers only to leave them dark.
        self.reach = WorkerReach(cfg.w, GIVE_WAY_AFTER * rules.ttl)
        self.hold_off = GIVE_WAY_AFTER * rules.ttl

    @property
    def cores(self) -> dict[int, BrokerCore]:
        return self.active.cores

    def lead(self, now: float) -> None:
        """Make a core for each group the election won at a new epoch; drop the core of each
        group this broker may no longer act for (its lease deadline passed, or handed over)."""
        seats = self.election.seats
        self.active.map = GroupMap(self.cfg.slots, self.groups, dict(seats.leaders))
        for group in list(self.cores):
            if not seats.may_act(group, now):
                self.drop(group, "handed over" if group not in seats.held else "lease deadline passed")
        if not self.cluster_id and seats.held:
            try:
                self.cluster_id = self._cluster_id()
            except EtcdUnavailable as e:
                log.warning("cluster_record_unreadable", error=str(e)[:200])
                return
        for group, epoch in sorted(seats.held.items()):
            if group in self.cores or not seats.may_act(group, now) or epoch <= self.served.get(group, 0):
                continue
            meta = EtcdMeta(self.etcd, f"{self.prefix}groups/{group:05d}/", epoch)
            try:
                restored = meta.load()
            except EtcdUnavailable as e:
                log.warning("metadata_unreadable", group=group, epoch=epoch, error=str(e)[:200])
                continue  # tried again next turn, while the lease holds
            self.served[group] = epoch
            self.metas[group] = meta
            self.cores[group] = self._make_core(meta, restored, epoch, group)
            # A group of a formed cluster: its workers exist, so not reaching them is being cut off.
            self.reach.had_quorum |= len(restored.workers) >= self.cfg.w
            log.info("group_leading", group=group, epoch=epoch, workers=len(restored.workers),
                     slots=len(restored.slots))
        self._give_way_if_cut_off(now)
        with self.changed:
            self.changed.notify_all()

    def _give_way_if_cut_off(self, now: float) -> None:
        """Fewer than W workers live for every group led here, for GIVE_WAY_AFTER leases, while
        another broker is registered: leave every group (the broker's workers are the same
        processes for all its groups; one that reaches none of them can commit nothing)."""
        if not self.cores:
            self.reach.short_since = None
            return
        live = max(sum(1 for w in core.state.workers.values() if w.alive) for core in self.cores.values())
        if live >= self.cfg.w:
            self.hold_off = GIVE_WAY_AFTER * self.rules.ttl
        others = any(b != self.election.me.name for b in self.election.brokers)
        if self.reach.observe(now, live) and others and not self.election.give_way_for:
            log.warning("giving_way", groups=sorted(self.cores), live_workers=live, w=self.cfg.w,
                        hold_off_s=round(self.hold_off, 1))
            self.election.give_way(self.hold_off)
            self.hold_off = min(self.hold_off * 2, MAX_HOLD_OFF)
            self.reach = WorkerReach(self.cfg.w, GIVE_WAY_AFTER * self.rules.ttl)

    def _make_core(self, meta: EtcdMeta, restored: Any, epoch: int, group: int) -> BrokerCore:
        """A group's core: its slots only (and its share of the broker's read cache), and the
        cluster's one id."""
        cluster_id = self.cluster_id
        return self.make_core(meta, restored, epoch, self.cfg.for_group(self.groups, group), lambda: cluster_id)

    def _cluster_id(self) -> bytes:
        """The cluster's id, the same for every group: created once, by the first broker to lead."""
        key = self.prefix + "cluster"
        record = {"id": uuid.uuid4().bytes, "slots": self.cfg.slots, "groups": self.groups}
        self.etcd.create(key, pack(record), 0)
        found = self.etcd.get(key)
        if found is None:
            raise EtcdUnavailable(f"{key} was created and is gone")
        record = unpack(found[0])
        if record.get("groups") != self.groups or record.get("slots") != self.cfg.slots:
            # Another broker formed it with other settings meanwhile (checked at start, too): lead nothing.
            log.error("cluster_settings_differ", groups=record.get("groups"), slots=record.get("slots"),
                      ours_groups=self.groups, ours_slots=self.cfg.slots)
            raise EtcdUnavailable(f"{key}: the cluster has {record.get('groups')} groups, "
                                  f"this broker {self.groups}")
        return bytes(record["id"])

    def drop(self, group: int, reason: str) -> None:
        core = self.cores.pop(group)
        meta = self.metas.pop(group, None)
        if meta is not None:
            meta.close()
        log.warning("group_given_up", group=group, epoch=core.state.epoch, reason=reason)

    def hand_over(self, group: int) -> None:
        """Called by the election's thread: returns once the loop has dropped the group's core
        (the seats without it are already published), so nothing more of it is sent."""
        with self.changed:
            self.changed.wait_for(lambda: group not in self.cores or self.stopping(), timeout=5.0)

    def execute(self, carry_out: Callable[[Ready, EtcdMeta], None]) -> None:
        """Carry out each group core's Ready with its metadata (the process's own answers,
        ``active.take_ready()``, are the caller's: they carry no metadata)."""
        for group, core in list(self.cores.items()):
            ready = core.ready()
            seats = self.election.seats
            if not seats.may_act(group, time.monotonic()):
                # Checked again just before sending: handed over meanwhile, or a pause.
                self.drop(group, "handed over" if group not in seats.held else "lease deadline passed during a turn")
                continue
            try:
                carry_out(ready, self.metas[group])
            except (Deposed, EtcdUnavailable) as e:
                self.drop(group, f"metadata write failed: {e}")  # nothing of this turn was sent

    def stop(self) -> None:
        """Drop every core, then let the election hand every group over and revoke the lease."""
        for group in list(self.cores):
            self.drop(group, "stopping")
        self.election.stop()
        self.election.join(timeout=2 * self.rules.request_timeout + 1)

    def status(self) -> dict[str, Any]:
        """mmi.status of an active broker: the group cores' status merged, and the groups."""
        cores = self.cores
        each = [cores[g].status() for g in sorted(cores)]
        # The workers as the lowest group's core sees them (every core sees the same processes);
        # the slots' figures summed over every group led here.
        st: dict[str, Any] = dict(each[0]) if each else {
            "formed": False, "workers": [], "rf": self.cfg.rf, "w": self.cfg.w}
        if each:
            held: dict[str, int] = {}
            learning: dict[str, int] = {}
            for s in each:
                for w in s["workers"]:
                    held[w["id"]] = held.get(w["id"], 0) + w["slots"]
                    learning[w["id"]] = learning.get(w["id"], 0) + w["learning"]
            st["workers"] = [{**w, "slots": held.get(w["id"], 0), "learning": learning.get(w["id"], 0)}
                             for w in st["workers"]]
            st.update(formed=all(s["formed"] for s in each),
                      under_replicated_slots=sorted(x for s in each for x in s["under_replicated_slots"]),
                      recovering_slots=sum(s["recovering_slots"] for s in each),
                      stalled_slots=[x for s in each for x in s["stalled_slots"]],
                      lost_writes=[x for s in each for x in s["lost_writes"]],
                      committed_writes=sum(s["committed_writes"] for s in each),
                      read_cache_bytes=sum(s.get("read_cache_bytes", 0) for s in each),
                      moves=[m for s in each for m in s["moves"]],
                      misplaced_slots=sum(s["misplaced_slots"] for s in each))
        st.update(role="active", name=self.election.me.name, groups=self.groups,
                  leading={str(g): c.state.epoch for g, c in sorted(cores.items())},
                  slot_map=self.active.map.record(), redirected=self.active.redirected,
                  ha=self.election.describe(time.monotonic()),
                  slots=sum(len(c.state.slots) for c in cores.values()),
                  stats={k: sum(c.state.stats.get(k, 0) for c in cores.values())
                         for k in (next(iter(cores.values())).state.stats if cores else {})})
        return st
