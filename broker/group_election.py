"""Leading slot groups on etcd (issue 15, active brokers): this broker's lease, its registration,
and the group keys it holds, by the rule of broker/groups.py. Like ``Election`` (broker/etcd.py)
it runs in a thread of its own and never touches the broker's sockets.

Keys, under the cluster's prefix::

    brokers/NAME           this broker's registration (JSON) on its lease: the live brokers
    groups/GGGGG/leader    the group's leader (JSON: name, endpoints) on the leader's lease; its
                           create revision is the group's epoch

One lease per broker, whatever the number of groups it leads; it renews every ``renew_every``,
and the broker acts for its groups only until ``ttl - margin`` after the send time of its last
renewal that etcd confirmed (the lease rules of broker/leadership.py), for every group at once.
A key this broker created on an earlier lease is not its own: that lease will run out.

A group is handed over in order: ``hand_over(group)`` (the server loop stops sequencing it and
returns once nothing more of it will be sent), then the key is deleted if it is still the one
this broker created, so a successor never leads a group while its predecessor still acts.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog

from broker.etcd import Etcd, EtcdUnavailable, leader_info
from broker.groups import GroupBalance
from broker.leadership import LeaderInfo, LeaseRules

log = structlog.get_logger("zkv.broker")


def group_key(prefix: str, group: int) -> str:
    return f"{prefix}groups/{group:05d}/leader"


@dataclass(frozen=True)
class GroupSeats:
    """What this broker leads, as of the last turn: group -> epoch, and until when it may act.
    Replaced whole by the election's thread, read by the server loop."""

    held: dict[int, int]
    valid_until: float  # monotonic
    leaders: dict[int, LeaderInfo]  # every group's leader as last read, this broker's included

    def may_act(self, group: int, now: float) -> bool:
        return group in self.held and now < self.valid_until


class GroupElection(threading.Thread):
    def __init__(self, etcd: Etcd, prefix: str, me: LeaderInfo, groups: int, rules: LeaseRules | None = None,
                 hand_over: Callable[[int], None] = lambda group: None) -> None:
        super().__init__(name="zkv-group-election", daemon=True)
        self.etcd, self.prefix, self.me, self.rules = etcd, prefix, me, rules or LeaseRules()
        self.balance = GroupBalance(me.name, groups)
        self.hand_over = hand_over
        self.seats = GroupSeats({}, 0.0, {})
        self.lease = 0
        self.stopped = threading.Event()
        self.etcd_ok = True
        self.revoke_on_stop = True
        self.last_seats = self.seats  # the last seats published before the thread ended
        # Groups handed over whose key is not deleted yet (the delete failed): group -> epoch.
        # They are never ours again; the delete is retried each turn.
        self.released: dict[int, int] = {}
        self.brokers: frozenset[str] = frozenset()  # the live brokers, as of the last turn
        self.give_way_for = 0.0  # set by the loop (``give_way``), acted on at the next turn
        self.held_off_until = 0.0  # monotonic: not registered, so leading nothing, until then

    def give_way(self, hold_off: float) -> None:
        """Leave every group to the other brokers, and stay out for ``hold_off`` seconds (a
        broker that can reach no workers; broker/group_leading.py). Called by the loop."""
        self.give_way_for = hold_off

    def _leave(self, hold_off: float) -> None:
        """Hand every group over in order, then revoke the lease: its registration and every
        group key go at once, and the others take the groups at their next turn."""
        seats = self.seats
        self.seats = GroupSeats({}, 0.0, seats.leaders)
        for group in sorted(seats.held):
            self.hand_over(group)
        if self.lease:
            try:
                self.etcd.revoke(self.lease)
            except EtcdUnavailable:
                pass  # it runs out by itself
        self.lease = 0
        self.released.clear()
        self.held_off_until = time.monotonic() + hold_off
        log.warning("groups_left", groups=sorted(seats.held), hold_off_s=round(hold_off, 1))

    def stop(self, revoke: bool = True) -> None:
        """Stop; with ``revoke`` (a clean stop) give every group up at once. Without it the lease
        runs out by itself, as when the process dies."""
        self.revoke_on_stop = revoke
        self.stopped.set()

    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                self._turn()
                self.etcd_ok = True
            except EtcdUnavailable as e:
                if self.etcd_ok:
                    log.warning("etcd_unreachable", error=str(e)[:300])
                self.etcd_ok = False
            except Exception:  # never let the thread die: the broker would lead blind
                log.exception("group_election_turn_failed")
            self.stopped.wait(self.rules.renew_every)
        self.last_seats = seats = self.seats
        if not self.revoke_on_stop:
            return  # as a crash: the lease runs out by itself
        # A clean stop hands every group over in order: nothing more of it is sent, then the
        # lease (and every key on it) goes, so a successor need not wait for it to run out.
        self.seats = GroupSeats({}, 0.0, seats.leaders)
        for group in sorted(seats.held):
            self.hand_over(group)
        if self.lease:
            try:
                self.etcd.revoke(self.lease)
            except EtcdUnavailable:
                pass

    def _turn(self) -> None:
        if self.give_way_for:
            hold_off, self.give_way_for = self.give_way_for, 0.0
            self._leave(hold_off)
        if time.monotonic() < self.held_off_until:
            return
        sent = time.monotonic()
        if self.lease and self.etcd.keepalive(self.lease) <= 0:
            if self.seats.held:
                log.warning("lease_expired", groups=sorted(self.seats.held))
            self.seats = GroupSeats({}, 0.0, self.seats.leaders)
            self.lease = 0
        if not self.lease:
            sent = time.monotonic()
            lease = self.etcd.grant(self.rules.ttl)
            self.etcd.put(self.prefix + "brokers/" + self.me.name, json.dumps(self.me.record()).encode(), lease)
            self.lease = lease  # only once registered: a failed put is retried with a new lease
            self.released.clear()  # keys on the old lease go with it
        for group, epoch in list(self.released.items()):
            self.etcd.delete_if_created(group_key(self.prefix, group), epoch)
            del self.released[group]
        valid_until = sent + self.rules.ttl - self.rules.margin
        brokers = {k.rsplit("/", 1)[-1] for k in self.etcd.get_prefix(self.prefix + "brokers/")}
        self.brokers = frozenset(brokers)
        held: dict[int, int] = {}
        holders: dict[int, str] = {}
        leaders: dict[int, LeaderInfo] = {}
        for key, (value, created, lease) in self.etcd.get_prefix_entries(self.prefix + "groups/").items():
            group = _group_of_key(key)
            info = leader_info(value, created)
            if group is None or info is None:
                continue
            holders[group] = info.name
            leaders[group] = info
            if info.name == self.me.name and lease == self.lease and self.released.get(group) != created:
                held[group] = created
        plan = self.balance.plan(sent, brokers, holders)
        for group in plan.release:
            if group in held:
                self.seats = GroupSeats({g: e for g, e in held.items() if g != group}, valid_until, leaders)
                self.hand_over(group)  # nothing more of the group is sent after this returns
                self.released[group] = held.pop(group)
                self.etcd.delete_if_created(group_key(self.prefix, group), self.released[group])
                del self.released[group]
                log.info("group_handed_over", group=group)
        for group in plan.campaign:
            epoch = self.etcd.create(group_key(self.prefix, group), json.dumps(self.me.record()).encode(), self.lease)
            if epoch is not None:
                held[group] = epoch
                leaders[group] = LeaderInfo(self.me.name, epoch, self.me.frontend, self.me.backend,
                                            self.me.replication)
                log.info("group_leader_elected", group=group, epoch=epoch)
        self.seats = GroupSeats(held, valid_until, leaders)

    def describe(self, now: float) -> dict[str, Any]:
        seats = self.seats
        return {"groups": {str(g): e for g, e in sorted(seats.held.items())},
                "lease_remaining": round(max(0.0, seats.valid_until - now), 2) if seats.held else 0.0,
                "etcd_reachable": self.etcd_ok}


def _group_of_key(key: str) -> int | None:
    parts = key.rsplit("/", 2)
    if len(parts) != 3 or parts[2] != "leader" or not parts[1].isdigit():
        return None
    return int(parts[1])

