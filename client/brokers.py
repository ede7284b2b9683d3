"""Several brokers (etcd mode, issue 11): which one a client talks to, and when it moves on.

A client is given one broker frontend or a comma-separated list of them. It talks to one at a
time. ``BrokerList`` is the rule, kept free of sockets (the clock only as a default argument) so
that every sender shares it: ``Client`` and ``AsyncClient`` requests, the windowed sender of
streamed puts, watches:

* a ``NOT_LEADER`` reply naming the leader: go there (the list's entry if it is one, else the
  named URL itself) and resend at once; the request had no effect (docs/protocol.md §1.4);
  except to a broker this client found silent less than ``AVOID_GONE_FOR`` seconds ago: until a
  dead leader's lease lapses the standbys still name it, so the client asks the standby again
  after the usual backoff (it names the new leader, or leads, within a second of the election);
* a ``NOT_LEADER`` without a leader, or no reply in time: the next URL of the list, after the
  usual backoff (client/retry.py) for the former;
* with one URL nothing ever moves: the behaviour of a single broker is unchanged.

``Link`` watches one socket's connection (a ZeroMQ socket monitor, as client/probe.py does): with
several brokers a client asks it whether the broker it waits for is there at all, so that a dead
broker costs about ``FAILOVER_WAIT`` seconds rather than a whole attempt timeout.
"""

from __future__ import annotations

import itertools
import time

import zmq
from zmq.utils.monitor import parse_monitor_message

from protocol.errors import NotLeader, ZkvError
from protocol.frames import MMI_SERVICE, MMI_STATUS, unpack
from protocol.limits import split_urls

# Why a monitor and not a shorter first attempt: ZeroMQ's connect never fails, and a DEALER whose
# broker is dead (SIGKILL, or nothing listening yet) just queues the request and waits out the
# whole attempt timeout (6 s). A shorter wait would also give up on a live leader whose answer
# is merely slow (a write waiting for its replicas takes up to the broker's 5 s request timeout),
# and closing that socket would throw the answer away. The monitor tells the two apart: a live
# broker's connection is up (the ZMTP handshake done) however slow its answer; a dead one's is
# refused or dropped by its host's kernel at once. So with several brokers a request waits its
# full attempt timeout while the connection is up, and moves on once it has been down for
# FAILOVER_WAIT (a broker that restarts within that reconnects first). A host that vanishes
# without a reset (power loss, a partition) shows nothing: the attempt timeout still covers it.
FAILOVER_WAIT = 1.0  # s a connection may be down (or not yet up) before the client moves on
LINK_CHECK = 0.1  # s between looks at the monitor while waiting for a reply
# s a broker found silent is not followed back to on a standby's hint: a dead leader is named
# until its lease lapses (3 s by default) and found dead after FAILOVER_WAIT at the earliest.
# Longer would cost more if the broker was only slow: the client would stay away from a leader.
AVOID_GONE_FOR = 3.0
# ZMTP heartbeats on a watched connection (several brokers): libzmq's I/O thread answers them even
# while the broker's Python is busy, so only a stopped process (SIGSTOP, a hung machine) or a cut
# network misses them; the connection then drops and the Link sees it down. Without them a hung
# leader's connection stays up and costs a whole attempt timeout.
HEARTBEAT_IVL_MS = 500
HEARTBEAT_TIMEOUT_MS = 2000
# The longest a client's send may wait to be queued (client.linked_dealer): normally it never
# waits (a DEALER queues up to its high-water mark); only a connection with no queue does.
SEND_TIMEOUT_MS = 1000

_LINK_EVENTS = zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED
_links = itertools.count()


def _norm(url: str) -> str:
    return url.strip().rstrip("/").lower()


def _same(a: str, b: str) -> bool:
    return _norm(a) == _norm(b)


class BrokerList:
    """The brokers a client may talk to and the one it talks to now (``current``)."""

    def __init__(self, urls: str | list[str]) -> None:
        self.urls = split_urls(urls) if isinstance(urls, str) else list(urls)
        if not self.urls:
            raise ValueError("no broker URL")
        self._i = 0
        self._leader: str | None = None  # a leader named by a standby that is not in the list
        self._hops = 0  # leaders followed since the last answer that was not NOT_LEADER
        self._gone: dict[str, float] = {}  # URL (normalised) -> when (monotonic) it was found silent

    @property
    def current(self) -> str:
        return self._leader or self.urls[self._i]

    @property
    def several(self) -> bool:
        """More than one URL: failover rules apply (one URL keeps today's behaviour exactly)."""
        return len(self.urls) > 1

    def describe(self) -> str:
        return self.urls[0] if len(self.urls) == 1 else "any of " + ", ".join(self.urls)

    def start_at(self, url: str) -> None:
        """Talk to ``url`` (one of the list) first, as after a probe found it listening."""
        for i, u in enumerate(self.urls):
            if _same(u, url):
                self._i, self._leader = i, None
                return

    def next(self) -> str:
        """Move on to the next URL of the list (after a silence, or a NOT_LEADER naming no one);
        from a followed leader outside the list, back to the list after where it was left."""
        if self._leader is not None:
            self._leader = None
        if self.several:
            self._i = (self._i + 1) % len(self.urls)
        return self.current

    def follow(self, leader: str | None, now: float | None = None) -> bool:
        """A standby named ``leader``: talk to it. True if the client should resend at once;
        False if it moved to the next URL instead (no leader named, the standby named itself, or
        more leaders followed in a row than there are URLs: standbys that disagree while an
        election runs), or stays (the leader named is one it found silent just now: a stale
        hint), after which the usual backoff applies."""
        if leader and self._gone:
            at = self._gone.get(_norm(leader))
            if at is not None and (now if now is not None else time.monotonic()) - at < AVOID_GONE_FOR:
                return False
        if not leader or _same(leader, self.current) or self._hops > len(self.urls):
            self._hops = 0
            self.next()
            return False
        self._hops += 1
        for i, u in enumerate(self.urls):
            if _same(u, leader):
                self._i, self._leader = i, None
                return True
        self._leader = leader.strip()
        return True

    def route(self, url: str) -> None:
        """Active brokers: the next request goes to ``url``, its keys' group leader by the slot
        map (client/slotmap.py); not a failover, so nothing is counted."""
        if _same(url, self.current):
            return
        for i, u in enumerate(self.urls):
            if _same(u, url):
                self._i, self._leader = i, None
                return
        self._leader = url.strip()

    def settled(self) -> None:
        """An answer that was not NOT_LEADER came: the current broker serves."""
        self._hops = 0

    def silent(self, now: float | None = None) -> None:
        """No reply in time from ``current``: with several URLs (or a followed leader outside
        them), the next one."""
        if self.several or self._leader is not None:
            self._gone[_norm(self.current)] = now if now is not None else time.monotonic()
            self.next()

    def mmi_again(self, reply: list[bytes] | None, service: bytes, moved: bool, out_of_time: bool) -> bool:
        """After one attempt of a management call (mmi.status, mmi.service, mmi.admin): True if it
        must be sent again, to the broker now ``current``.

        - An answer: final, except that with several brokers a standby's own answer (``role:
          standby``, or ``code: NOT_LEADER``) naming a leader is followed: the cluster's status is
          the leader's (mmi.service excepted: a standby's 404 is the answer).
        - No answer in the attempt's time: with several brokers, the next one (unless ``moved``:
          another request already left this one); with one, the same broker again on a fresh
          connection, for the read-only calls (status, service) only: an admin command has no
          de-duplication, so it is not resent.
        - Nothing is sent again once the call's time is up."""
        if out_of_time:
            return False
        if reply is not None:
            leader = _standby_leader(reply) if self.several and service != MMI_SERVICE else None
            return leader is not None and self.follow(leader)
        if not self.several:
            return service in (MMI_STATUS, MMI_SERVICE)
        if not moved:
            self.silent()
        return True

    def refused(self, err: ZkvError | None, wait: float) -> float:
        """After a retried error reply with backoff ``wait``: for NOT_LEADER, follow its leader
        (returns 0: resend at once) or move on (returns ``wait``); other errors change nothing."""
        if not isinstance(err, NotLeader):
            self.settled()
            return wait
        return 0.0 if self.follow(err.leader) else wait


class Link:
    """Whether one socket's connection to its broker is up, read from a ZeroMQ socket monitor.
    Attach it before the socket connects (events before that are lost). Not thread-safe."""

    def __init__(self, sock: zmq.Socket) -> None:
        addr = f"inproc://zkv-link-{id(self)}-{next(_links)}"
        sock.monitor(addr, _LINK_EVENTS)
        # A plain (not asyncio) PAIR on the same context, read without blocking: the asyncio
        # client's socket is monitored the same way.
        self._ctx = zmq.Context.shadow(sock.context.underlying)
        self._pair = self._ctx.socket(zmq.PAIR)
        self._pair.setsockopt(zmq.LINGER, 0)
        self._pair.connect(addr)
        self._sock = sock
        self.up = False
        self.down_since = time.monotonic()

    def _drain(self) -> None:
        while self._pair.poll(0):
            event = parse_monitor_message(self._pair.recv_multipart())["event"]
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.up = True
            elif event == zmq.EVENT_DISCONNECTED and self.up:
                self.up, self.down_since = False, time.monotonic()

    def dead(self, now: float | None = None) -> bool:
        """The connection has been down (or never up) for FAILOVER_WAIT seconds."""
        self._drain()
        return not self.up and (now if now is not None else time.monotonic()) - self.down_since >= FAILOVER_WAIT

    def close(self) -> None:
        try:
            self._sock.disable_monitor()
        except zmq.ZMQError:
            pass
        self._pair.close(linger=0)


def _standby_leader(reply: list[bytes]) -> str | None:
    """The leader a standby names in a management answer, or None when it is not a standby's."""
    try:
        answer = unpack(reply[0]) if reply else None
    except Exception:
        return None
    if not isinstance(answer, dict) or (answer.get("role") != "standby" and answer.get("code") != "NOT_LEADER"):
        return None
    leader = answer.get("leader")
    return leader if isinstance(leader, str) and leader else None
