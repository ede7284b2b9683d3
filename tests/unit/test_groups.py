"""The slot groups' leadership rule (broker/groups.py), driven through random schedules of
brokers joining, leaving and taking turns against a model of etcd's group keys (create if
absent; a broker's keys vanish with its lease)."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from broker.groups import FREE_GRACE, GroupBalance, group_of, quotas, weight
from broker.state import BrokerConfig

TURN = 0.5  # s between a broker's turns (its lease renewal)


class Etcd:
    """The group keys: group -> holder; create-if-absent, delete by the holder, lease expiry."""

    def __init__(self) -> None:
        self.holders: dict[int, str] = {}
        self.brokers: set[str] = set()
        self.handovers = 0
        self.free_rounds: dict[int, int] = {}  # group -> turn rounds in a row it ended without a leader

    def turn(self, b: GroupBalance, now: float) -> None:
        plan = b.plan(now, frozenset(self.brokers), dict(self.holders))
        for g in plan.release:
            assert self.holders.get(g) == b.me, "released a group it does not hold"
            del self.holders[g]
            self.handovers += 1
        for g in plan.campaign:
            assert self.holders.get(g) != b.me, "campaigned for a group it holds"
            self.holders.setdefault(g, b.me)  # If(create_revision == 0): the first wins

    def expire(self, name: str) -> None:
        self.brokers.discard(name)
        for g in [g for g, h in self.holders.items() if h == name]:
            del self.holders[g]


def run(etcd: Etcd, balances: dict[str, GroupBalance], now: float, seconds: float, rng: random.Random) -> float:
    """Every live broker takes a turn each TURN, in a random order; returns the time after."""
    end = now + seconds
    while now < end:
        names = sorted(etcd.brokers)
        rng.shuffle(names)
        for name in names:
            etcd.turn(balances[name], now)
        if names:
            for g in range(next(iter(balances.values())).groups):
                etcd.free_rounds[g] = etcd.free_rounds.get(g, 0) + 1 if g not in etcd.holders else 0
            # One broker hands a group over in a round, one under quota takes it in the next.
            assert max(etcd.free_rounds.values()) <= 2, f"a group without a leader: {etcd.free_rounds}"
        now += TURN
    return now


def balanced(etcd: Etcd, groups: int) -> bool:
    quota = quotas(etcd.brokers, groups)
    counts = {b: sum(1 for h in etcd.holders.values() if h == b) for b in etcd.brokers}
    return len(etcd.holders) == groups and counts == quota


def test_quotas_are_even_and_add_up() -> None:
    assert quotas({"b1", "b2", "b3"}, 16) == {"b1": 6, "b2": 5, "b3": 5}
    assert quotas({"b1"}, 16) == {"b1": 16}
    assert quotas(set(), 16) == {}
    assert sum(quotas({f"b{i}" for i in range(7)}, 64).values()) == 64
    assert group_of(37, 16) == 5
    assert weight(3, "b1") == weight(3, "b1") != weight(3, "b2")


@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), groups=st.sampled_from([1, 4, 16, 64]),
       events=st.lists(st.tuples(st.sampled_from(["join", "leave"]), st.integers(1, 5)), min_size=1, max_size=8))
def test_any_schedule_of_joins_and_leaves_settles_balanced(seed: int, groups: int,
                                                           events: list[tuple[str, int]]) -> None:
    """Whatever brokers joined and left, once the membership stops changing every group has a
    leader and every broker leads its quota; and while any broker lives, no group stays without a
    leader for more than two turn rounds in a row (``run`` checks it after every round)."""
    rng = random.Random(seed)
    etcd, balances = Etcd(), {}
    now = 0.0
    for kind, n in events:
        name = f"b{n}"
        if kind == "join" and name not in etcd.brokers:
            etcd.brokers.add(name)
            balances[name] = GroupBalance(name, groups)  # a restarted broker starts afresh
        elif kind == "leave" and name in etcd.brokers:
            etcd.expire(name)
        now = run(etcd, balances, now, rng.choice([0.0, 1.0, 5.0]), rng)
    if etcd.brokers:
        now = run(etcd, balances, now, groups * 1.5 + 5, rng)  # one release a second at most
        assert balanced(etcd, groups), (quotas(etcd.brokers, groups), etcd.holders)
        settled = dict(etcd.holders)
        run(etcd, balances, now, 10, rng)
        assert etcd.holders == settled, "a balanced cluster kept moving groups"


def test_a_join_moves_about_its_share_and_a_leave_only_the_leavers() -> None:
    rng = random.Random(7)
    etcd, balances = Etcd(), {}
    for name in ("b1", "b2", "b3"):
        etcd.brokers.add(name)
        balances[name] = GroupBalance(name, 64)
    now = run(etcd, balances, 0.0, 60, rng)
    assert balanced(etcd, 64)
    etcd.handovers = 0
    before = dict(etcd.holders)
    etcd.brokers.add("b4")
    balances["b4"] = GroupBalance("b4", 64)
    now = run(etcd, balances, now, 60, rng)
    assert balanced(etcd, 64)
    moved = sum(1 for g in before if etcd.holders[g] != before[g])
    assert moved == etcd.handovers == 16  # exactly b4's quota: no group moves twice
    before = dict(etcd.holders)
    etcd.expire("b2")
    run(etcd, balances, now, 60, rng)
    assert balanced(etcd, 64)
    changed = {g for g in before if etcd.holders[g] != before[g]}
    assert {g for g in before if before[g] == "b2"} <= changed
    # Besides b2's groups, only what evening out the quotas needs (22, 21, 21 from 16 each).
    assert len(changed) - sum(1 for h in before.values() if h == "b2") <= 2


def test_a_free_group_is_taken_past_quota_when_nobody_under_quota_takes_it() -> None:
    b1 = GroupBalance("b1", 4)
    brokers = frozenset({"b1", "b2"})
    holders = {0: "b1", 1: "b1", 2: "b2"}  # b2 (quota 2) does not take group 3, say it cannot
    assert b1.plan(0.0, brokers, holders).campaign == ()
    assert b1.plan(FREE_GRACE - 0.1, brokers, holders).campaign == ()
    assert b1.plan(FREE_GRACE, brokers, holders).campaign == (3,)
    assert GroupBalance("b9", 4).plan(0.0, brokers, {}).campaign == ()  # not a live broker


def test_a_group_core_gets_its_share_of_the_read_cache() -> None:
    """However many groups a broker leads, their caches together stay within its --read-cache."""
    cfg = BrokerConfig(slots=64, read_cache=64 << 20)
    cores = [cfg.for_group(16, g) for g in range(16)]
    assert sum(c.read_cache for c in cores) <= cfg.read_cache and cores[3].read_cache == 4 << 20
    assert cores[3].group == 3 and cores[3].groups == 16 and cores[3].owns(19) and not cores[3].owns(18)
    assert cfg.groups == 1 and cfg.read_cache == 64 << 20  # (the broker's own settings unchanged)
