"""Slot groups led by several brokers on a real etcd (broker/group_election.py, issue 15):
three brokers share 16 groups evenly; one dies and the others take its groups, at higher epochs;
one joins and takes its share by orderly handovers. Sampled every 20 ms throughout: no group is
ever claimed by two brokers that may act for it. The brokers here are the election threads alone
(no sockets), each with its own etcd client and lease, against Debian's etcd-server."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.etcd import Etcd
from broker.group_election import GroupElection, GroupSeats, group_key
from broker.groups import quotas
from broker.leadership import LeaderInfo
from tests.support.cluster import wait_for
from tests.support.ha import EtcdCluster

pytestmark = pytest.mark.timeout(90)

PREFIX = "/zkv-groups-test/"
GROUPS = 16


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[EtcdCluster]:
    cluster = EtcdCluster(tmp_path / "etcd").start()
    try:
        yield cluster
    finally:
        cluster.stop()


class Brokers:
    """Election threads by name, a sampler checking exclusivity, and the handovers seen."""

    def __init__(self, endpoints: str) -> None:
        self.endpoints = endpoints
        self.live: dict[str, GroupElection] = {}
        self.handovers: list[tuple[str, int, bool]] = []  # (broker, group, its key still there)
        self.violations: list[str] = []
        # What a crashed broker last believed: a paused one would wake up with exactly this, and
        # may act on it until its deadline; nobody may take its groups before.
        self.ghosts: dict[str, GroupSeats] = {}
        self.samples = 0
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()

    def start(self, name: str) -> GroupElection:
        etcd = Etcd(self.endpoints.split(","), timeout=0.75)

        def hand_over(group: int, name: str = name, etcd: Etcd = etcd) -> None:
            entry = etcd.get(group_key(PREFIX, group))
            self.handovers.append((name, group, entry is not None))

        e = GroupElection(etcd, PREFIX, LeaderInfo(name, 0, f"tcp://{name}:1", f"tcp://{name}:2",
                                                   f"tcp://{name}:3"), GROUPS, hand_over=hand_over)
        self.live[name] = e
        e.start()
        return e

    def crash(self, name: str) -> None:
        """Stop without revoking: the lease runs out by itself, as when a broker dies."""
        e = self.live.pop(name)
        e.stop(revoke=False)
        e.join(10)
        self.ghosts[name] = e.last_seats  # the last it published, its latest deadline

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            now = time.monotonic()
            claims: dict[int, list[str]] = {}
            views = [(name, e.seats) for name, e in list(self.live.items())] + list(self.ghosts.items())
            for name, seats in views:
                for g in seats.held:
                    if seats.may_act(g, now):
                        claims.setdefault(g, []).append(name)
            self.samples += 1
            self.violations += [f"group {g}: {names}" for g, names in claims.items() if len(names) > 1]

    def counts(self) -> dict[str, int]:
        return {name: len(e.seats.held) for name, e in self.live.items()}

    def balanced(self) -> bool:
        held = [g for e in self.live.values() for g in e.seats.held]
        return sorted(held) == list(range(GROUPS)) and self.counts() == quotas(set(self.live), GROUPS)

    def close(self) -> None:
        """A clean stop of every broker, still sampled: each gives its groups up in order."""
        for e in self.live.values():
            e.stop()
        for e in self.live.values():
            e.join(10)
        self._stop.set()
        self._sampler.join(5)


def test_brokers_share_the_groups_take_a_dead_ones_and_hand_over_to_a_new_one(etcd: EtcdCluster) -> None:
    brokers = Brokers(etcd.endpoints)
    try:
        for name in ("b1", "b2", "b3"):
            brokers.start(name)
        wait_for(brokers.balanced, 20, 0.05, "16 groups shared 6/5/5")
        assert brokers.counts() == {"b1": 6, "b2": 5, "b3": 5}
        before = {g: e for b in brokers.live.values() for g, e in b.seats.held.items()}
        b2_groups = set(brokers.live["b2"].seats.held)

        brokers.crash("b2")
        crashed = time.monotonic()
        wait_for(brokers.balanced, 20, 0.05, "b2's groups taken by b1 and b3 (8/8)")
        took = time.monotonic() - crashed
        after = {g: e for b in brokers.live.values() for g, e in b.seats.held.items()}
        assert all(after[g] > before[g] for g in b2_groups), "a group retaken at an epoch not higher"
        # b2's lease (3 s) must run out first; the survivors take its groups within a few turns.
        assert 1.0 < took < 12, took

        brokers.handovers.clear()
        brokers.start("b4")
        wait_for(brokers.balanced, 30, 0.05, "b4 given its share by handovers (6/5/5)")
        assert sorted(brokers.counts().values()) == [5, 5, 6]
        assert len(brokers.handovers) == brokers.counts()["b4"]  # each group handed over once
        # Each handover ran while the holder's key still existed: the key goes only after it.
        assert all(still for _, _, still in brokers.handovers), brokers.handovers
        assert brokers.samples > 100
        assert brokers.violations == []
    finally:
        brokers.close()
    # A clean stop revokes the leases: every group key is gone at once.
    client = Etcd(etcd.endpoints.split(","), timeout=2)
    assert client.get_prefix(PREFIX + "groups/") == {}
