"""Which broker a worker talks to, when several run (etcd mode: one leader, the others standbys).

``--broker`` and ``--replication`` list the same brokers in the same order: pair i is broker i's
backend and its replication PUB. The worker talks to one pair at a time, starting with the first;
``BrokerList`` decides which, free of sockets (worker/server.py connects them):

- ``next()``: the broker is deposed: the next pair in the list, wrapping around. With one
  broker that is the same one again (today's rule). ``leave(now)``: the same for a broker found
  gone (silent, disconnected, nothing listening), which is then not followed back for
  ``AVOID_GONE_FOR`` seconds when a standby names it: until its lease lapses a standby still
  names a dead or paused leader, and going back costs the worker another wait for silence.
- ``on_disconnect(info)``: a DISCONNECT's body (docs/protocol.md §2). A standby naming the leader:
  follow the hint (the listed pair with that backend, or the hint and its replication url as a
  pair of their own); a standby that knows no leader: stay and register again (it may become the
  leader), but after ``LEADERLESS_LIMIT`` such answers in a row go on to the next pair (a broker
  cut off from etcd knows no leader while another leads); no body: register again with the same
  broker.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from protocol.limits import split_urls

FOLLOW = "follow"  # moved to the broker a standby named as leader
WAIT = "wait"  # a standby without a leader: READY again to the same broker after a pause
AGAIN = "again"  # plain DISCONNECT ("register again"): READY again to the same broker
NEXT = "next"  # a standby that kept knowing no leader: on to the next pair
LEADERLESS_LIMIT = 3  # answers "standby, no leader" in a row from one broker before trying the next
AVOID_GONE_FOR = 3.0  # s a broker found gone is not followed back to on a standby's hint (as clients)


@dataclass(frozen=True, slots=True)
class BrokerPair:
    backend: str  # the worker's DEALER connects here
    replication: str  # its SUB connects here


class BrokerList:
    def __init__(self, backends: list[str], replications: list[str]) -> None:
        if not backends or len(backends) != len(replications):
            raise ValueError(
                f"--broker lists {len(backends)} endpoint(s) and --replication {len(replications)}: give one "
                "replication PUB per broker backend, in the same order (ZKV_WORKER_BROKER, ZKV_WORKER_REPLICATION)")
        self.pairs = [BrokerPair(b, r) for b, r in zip(backends, replications, strict=True)]
        self.index = 0
        self.outside: BrokerPair | None = None  # a leader named by a standby but not in the list
        self.leaderless = 0  # "standby, no leader" answers in a row from the current broker
        self.gone: dict[str, float] = {}  # backend -> when (monotonic) it was found gone

    @classmethod
    def parse(cls, broker: str, replication: str) -> BrokerList:
        """From the option values (comma-separated lists); ValueError names what is wrong."""
        return cls(split_urls(broker), split_urls(replication))

    @property
    def several(self) -> bool:
        return len(self.pairs) > 1

    @property
    def current(self) -> BrokerPair:
        return self.outside or self.pairs[self.index]

    def next(self) -> BrokerPair:
        """The pair after the current one (after an outside leader: the one after the listed pair
        whose standby named it)."""
        self.outside = None
        self.leaderless = 0
        self.index = (self.index + 1) % len(self.pairs)
        return self.current

    def leave(self, now: float) -> BrokerPair:
        """The current broker is gone (silent, its connection dropped or refused): the next pair."""
        if self.several:
            self.gone[self.current.backend] = now
        return self.next()

    def follow(self, leader: str, replication: str | None) -> BrokerPair | None:
        """Go to the broker a standby named as leader; None (and no change) when the hint cannot
        be used: it is not in the list and comes without a replication url."""
        for i, pair in enumerate(self.pairs):
            if pair.backend == leader:
                self.index, self.outside = i, None
                return pair
        if not replication:
            return None
        self.outside = BrokerPair(leader, replication)
        return self.outside

    def on_disconnect(self, info: Mapping[str, Any], now: float = 0.0) -> str:
        """A DISCONNECT with this body (empty: ``{}``), at ``now`` (monotonic): FOLLOW (``current``
        is the leader now), NEXT (``current`` is the next pair), WAIT or AGAIN (``current``
        unchanged)."""
        if info.get("reason") != "standby":
            self.leaderless = 0
            return AGAIN
        leader = info.get("leader")
        if isinstance(leader, str) and leader in self.gone and now - self.gone[leader] < AVOID_GONE_FOR:
            return WAIT  # a stale hint: ask this standby again, it learns the new leader soon
        if isinstance(leader, str) and leader and leader != self.current.backend:
            replication = info.get("replication")
            if self.follow(leader, replication if isinstance(replication, str) else None) is not None:
                self.leaderless = 0
                return FOLLOW
        self.leaderless += 1
        if self.several and self.leaderless >= LEADERLESS_LIMIT:
            self.leaderless = 0
            self.next()
            return NEXT
        return WAIT
