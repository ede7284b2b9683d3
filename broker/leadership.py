"""When a broker may act as the leader (etcd mode): the lease rules, as pure decisions on a clock.

Patroni's rule, in seconds: a leader renews its lease every ``renew_every`` and acts only until
``ttl - margin`` after the *send* time of its last renewal that etcd confirmed. etcd starts the
lease's new TTL when it receives the request, which is after we sent it, so by the leader's own
clock its right to act ends before etcd can let the lease expire; ``margin`` covers clock-rate
drift between the two machines and the time between checking and acting. A successor takes the
leader key only after etcd expired the lease, so two brokers never act at once, even when the old
leader is paused (SIGSTOP, a long GC) and wakes up in the middle of a turn: it finds its deadline
passed before it sends anything. Anything it still sent carries its epoch, and workers that
registered with the successor refuse a lower epoch (the fencing token: Jepsen's lock finding).

The loop that talks to etcd (broker/etcd.py) feeds this object; the server loop asks ``may_act``
before each turn and before it sends what the turn decided.
"""

from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_TTL = 3  # s; etcd leases are whole seconds; failover target is 5 s
DEFAULT_RENEW_EVERY = 0.5  # s between keepalives
DEFAULT_MARGIN = 0.75  # s; see the module docstring
ETCD_REQUEST_TIMEOUT = 0.75  # s one etcd request may take before it is given up


@dataclass(frozen=True)
class LeaseRules:
    ttl: int = DEFAULT_TTL
    renew_every: float = DEFAULT_RENEW_EVERY
    margin: float = DEFAULT_MARGIN
    request_timeout: float = ETCD_REQUEST_TIMEOUT

    def check(self) -> None:
        """Patroni's inequality, adapted: two failed renewals in a row (each up to the request
        timeout) still leave the leader time to renew before it must stop."""
        if self.ttl < 2:
            raise ValueError(f"lease ttl {self.ttl}s: at least 2 s (etcd raises shorter leases anyway)")
        if self.renew_every + 2 * self.request_timeout > self.ttl - self.margin:
            raise ValueError(f"lease ttl {self.ttl}s too short for renewals every {self.renew_every}s with "
                             f"{self.request_timeout}s requests and a {self.margin}s margin")


@dataclass(frozen=True)
class LeaderInfo:
    """What the leader key says: who leads, where to reach it, its epoch (the key's create
    revision: it only grows with each new leader)."""

    name: str
    epoch: int
    frontend: str
    backend: str
    replication: str

    def record(self) -> dict[str, object]:
        """The leader key's value (the epoch is the key's create revision, not in the value)."""
        return {"name": self.name, "frontend": self.frontend, "backend": self.backend,
                "replication": self.replication}


@dataclass
class Leadership:
    """This broker's standing: leader (with the epoch etcd gave it) or standby, and until when
    it may act. Written by the etcd loop's thread, read by the server loop: each field is replaced
    whole, never mutated in place."""

    rules: LeaseRules = field(default_factory=LeaseRules)
    epoch: int = 0  # > 0 while this broker holds the leader key
    valid_until: float = 0.0  # monotonic; the leader acts only before this
    leader: LeaderInfo | None = None  # the current leader as last read (ours or another's)
    lease_id: int = 0
    term_deadline: float = 0.0  # the last valid_until of the latest term, kept after it is lost

    def elected(self, epoch: int, lease_id: int, sent_at: float, me: LeaderInfo) -> None:
        """We created the leader key with a lease granted (or last renewed) at ``sent_at``."""
        self.lease_id = lease_id
        self.leader = me
        self.valid_until = self.term_deadline = sent_at + self.rules.ttl - self.rules.margin
        self.epoch = epoch

    def renewed(self, sent_at: float) -> None:
        """etcd confirmed the keepalive we sent at ``sent_at``."""
        if self.epoch:
            self.valid_until = max(self.valid_until, sent_at + self.rules.ttl - self.rules.margin)
            self.term_deadline = self.valid_until

    def lost(self) -> None:
        """The lease is gone (expired, revoked) or the key is another's: stop at once. Who leads
        now is unknown until etcd is read again: never name ourselves to those we send on."""
        if self.leader is not None and self.epoch and self.leader.epoch == self.epoch:
            self.leader = None
        self.epoch = 0
        self.valid_until = 0.0
        self.lease_id = 0

    def may_act(self, now: float) -> bool:
        return self.epoch > 0 and now < self.valid_until

    def remaining(self, now: float) -> float:
        return max(0.0, self.valid_until - now) if self.epoch else 0.0


# etcd mode: a leader that had W live workers and then fewer for this many lease TTLs gives its
# lease up, and stays out of the election as long, so that a standby that may reach them leads
# (with slot groups: every group it leads, so that the other brokers lead them).
GIVE_WAY_AFTER = 2


@dataclass
class WorkerReach:
    """Should a leader that lost its workers give way? A leader cut off from its workers but not
    from etcd keeps its lease for ever and can commit nothing; a standby may reach them. The rule:
    a leader that had at least W live workers in this term and then, for ``window`` seconds, had
    fewer, gives its lease up (and stays out of the next election for a while, so that another
    broker wins it). A leader that never reached W workers in its term (a cluster starting, every
    worker down) keeps leading: giving way would only move the same wait to another broker, over
    and over."""

    w: int
    window: float
    had_quorum: bool = False
    short_since: float | None = None  # monotonic; since when fewer than W workers are live

    def observe(self, now: float, live: int) -> bool:
        """``live`` workers are live now; True when the leader should give way."""
        if live >= self.w:
            self.had_quorum, self.short_since = True, None
            return False
        if not self.had_quorum:
            return False
        if self.short_since is None:
            self.short_since = now
        return now - self.short_since >= self.window
