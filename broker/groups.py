"""Which slot groups this broker should lead (issue 15, active brokers; sans-I/O).

In etcd mode with several active brokers the slots fall into ``groups`` groups (slot % groups),
each led by one live broker: the holder of the key ``groups/G/leader``, created on that broker's
lease with ``If(create_revision == 0)`` as the single leader key is today, so etcd decides who
leads and the key's create revision is the group's epoch (its fencing token). There is no
coordinator: every broker looks at the same two things in etcd (the live brokers under
``brokers/`` and the holders of the group keys) and applies this rule to itself:

- **Quota.** Of ``groups`` groups over ``n`` live brokers, broker number ``i`` in name order
  gets ``groups // n``, plus one if ``i < groups % n``: the quotas add up to ``groups`` exactly.
- **Preference.** Which groups a broker takes first: rendezvous hashing (highest random weight,
  Thaler and Ravishankar 1998) of (group, broker). A broker joining or leaving changes the
  preferred owner of about ``groups / n`` groups only, so a rebalance moves about that many.
- **Campaign** for a free group (no holder) while under quota, most preferred first; any free
  group left free for ``FREE_GRACE`` seconds is taken by anyone, quota or not: a group without a
  leader serves nothing, so availability comes before balance.
- **Release** one group at a time, only while over quota and some other live broker is under
  its quota (else a release would only move the imbalance): the group this broker prefers least.
  A release is an orderly handover, not a failover (the holder stops sequencing the group, then
  deletes its key), so it is paced: at most one per ``RELEASE_EVERY`` seconds.

Safety does not depend on this rule: two brokers can never hold one group's key (etcd's
transaction), and a deposed holder is fenced by the group's epoch. The rule only decides who
leads, and converges once the view stops changing (tests/unit/test_groups.py).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Set
from dataclasses import dataclass, field

FREE_GRACE = 2.0  # s a free group waits for a broker under quota before anyone takes it
RELEASE_EVERY = 1.0  # s between two releases by one broker


def group_of(slot: int, groups: int) -> int:
    return slot % groups


def quotas(brokers: Set[str], groups: int) -> dict[str, int]:
    """How many groups each live broker should lead: as even as can be, summing to ``groups``."""
    names = sorted(brokers)
    if not names:
        return {}
    base, extra = divmod(groups, len(names))
    return {b: base + (1 if i < extra else 0) for i, b in enumerate(names)}


def weight(group: int, broker: str) -> int:
    """The rendezvous weight of (group, broker): the same on every broker, stable across restarts."""
    return int.from_bytes(hashlib.blake2b(f"{group}\x00{broker}".encode(), digest_size=8).digest(), "big")


@dataclass(frozen=True)
class Plan:
    campaign: tuple[int, ...] = ()  # groups to try to take (create-if-absent, on this broker's lease)
    release: tuple[int, ...] = ()  # groups to hand over (stop sequencing, then delete the key)


@dataclass
class GroupBalance:
    """One broker's side of the rule; ``plan`` is called each turn with what etcd shows."""

    me: str
    groups: int
    free_since: dict[int, float] = field(default_factory=dict)
    last_release: float = float("-inf")

    def plan(self, now: float, brokers: Set[str], holders: Mapping[int, str]) -> Plan:
        """``brokers``: the live brokers (this one included); ``holders``: group -> broker for
        every group whose key exists."""
        if self.me not in brokers:
            return Plan()  # not registered (its lease is gone): it may lead nothing
        quota = quotas(brokers, self.groups)
        held = sorted(g for g, b in holders.items() if b == self.me)
        free = [g for g in range(self.groups) if g not in holders]
        for g in list(self.free_since):
            if g in holders:
                del self.free_since[g]
        for g in free:
            self.free_since.setdefault(g, now)

        def preference(g: int) -> tuple[bool, int]:
            # Most preferred first: the groups for which this broker has the highest weight of
            # all live brokers, then by its own weight.
            mine = weight(g, self.me)
            return (mine >= max(weight(g, b) for b in brokers), mine)

        campaign: list[int] = []
        room = quota[self.me] - len(held)
        for g in sorted(free, key=preference, reverse=True):
            if room > 0:
                campaign.append(g)
                room -= 1
            elif now - self.free_since[g] >= FREE_GRACE:
                campaign.append(g)  # nobody under quota took it: lead it rather than leave it dark
        release: tuple[int, ...] = ()
        counts = {b: 0 for b in brokers}
        for b in holders.values():
            if b in counts:
                counts[b] += 1
        someone_short = any(counts[b] < quota[b] for b in brokers if b != self.me)
        if (len(held) > quota[self.me] and someone_short and not free
                and now - self.last_release >= RELEASE_EVERY):
            release = (min(held, key=preference),)
            self.last_release = now
        return Plan(tuple(campaign), release)
