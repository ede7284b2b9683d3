"""Watches (docs/protocol.md §1.10): the rules of one watch, shared by both clients.

``WatchSession`` decides what to send when (open, keepalive, resume from the cursor) and turns
the broker's messages into ``WatchEvent``s; ``client.client.WatchStream`` and
``client.aio.AsyncWatchStream`` only move its frames on a socket of their own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from client.brokers import BrokerList
from client.commands import Key, StreamInfo, error_for, key_bytes
from client.retry import BACKOFF_FIRST, BACKOFF_MAX
from client.routing import Redirect, Router
from protocol.errors import NotLeader, ZkvError
from protocol.frames import C_PARTIAL, pack, unpack

WATCH_KEEPALIVE = 2.0  # s between keepalives (the broker drops a watch after 10 s without one)
WATCH_SILENCE = 4.0  # s without any message (the broker sends progress every second): resume


class WatchEvent(NamedTuple):
    """A committed change: ``put`` (value set), ``delete``, ``ttl`` (TTL changed, value kept),
    ``expired`` (the TTL ran out, the key is gone), or ``resync`` (the broker could not replay
    what happened since the cursor: re-read with scan; later events follow the new cursor)."""

    kind: str
    key: bytes
    value: bytes | None  # put only
    version: int  # the change's seq in its slot: the key's version after a put or ttl
    expire_at: int  # ms since the epoch by the broker's clock, 0 = none (put, ttl)
    slot: int
    # A put of a streamed value carries no value (``value`` is None) but where its chunks are:
    # read it with get_stream (it raises ValueChanged if the key was rewritten since).
    stream: StreamInfo | None = None


class CursorMark(NamedTuple):
    """Where the broker said the events received so far end (a watch message's ``cursor``): taken
    as the delivered cursor once every event before it has been handed out."""

    cursor: dict[str, Any]


def _copy(cursor: dict[str, Any] | None) -> dict[str, Any] | None:
    return None if cursor is None else {**cursor, "s": list(cursor["s"])}


class WatchSession:
    """The rules of one watch, shared by both clients (they only move frames): open it, keep it
    alive, check the message counter, keep the cursor, and resume from the cursor after a lost
    message, a silence, a broker restart or a retryable error."""

    def __init__(self, prefix: Key = b"", since: dict[str, Any] | None = None, group: int | None = None) -> None:
        self.prefix = key_bytes(prefix)
        # Active brokers: the slot group this session watches (one share of a fanned-out watch,
        # opened at the group's leader); None: the whole key space at the one broker or leader.
        self.group = group
        # {"c": cluster id, "s": [seq per slot]}: opaque, pass it back as since. ``cursor`` is past
        # everything received (what a resume asks for); ``delivered`` past what the stream handed
        # out (what its user may save: events received but not yet taken are not behind it).
        self.cursor = _copy(since)
        self.delivered = _copy(since)
        self.rid = 0
        self.n = 0
        self.open_at: float | None = 0.0  # when to (re)open the watch; None while it is open
        self.last_heard = self.last_keepalive = 0.0
        self.backoff = BACKOFF_FIRST
        self.ended = False
        # Why the watch resumes, for a client with several brokers: ``silent`` (nothing heard in
        # WATCH_SILENCE, or the connection gone: try the next broker) and ``error`` (the last
        # retried error reply, NOT_LEADER: follow its leader). The stream reads and clears them.
        self.silent = False
        self.error: ZkvError | None = None
        self.spans_groups = False  # refused for naming no group: the stream fans it out
        self.hops = 0  # group leaders followed in a row (follow_leader)

    def due(self, now: float, next_id: Callable[[], int]) -> tuple[str, list[bytes]] | None:
        """What to send now: ("open", body) on a fresh socket, ("send", body), or None."""
        if self.ended:
            return None
        if self.open_at is None and now - self.last_heard > WATCH_SILENCE:
            self.lost(now)
        if self.open_at is not None:
            if now < self.open_at:
                return None
            self.rid, self.n, self.open_at = next_id(), 0, None
            self.last_heard = self.last_keepalive = now
            hdr: dict[str, Any] = {"op": "watch", "id": self.rid, "prefix": self.prefix}
            if self.cursor is not None:
                hdr["since"] = self.cursor
            return "open", [self._pack(hdr)]
        if now - self.last_keepalive >= WATCH_KEEPALIVE:
            self.last_keepalive = now
            return "send", [self._pack({"op": "watch", "id": self.rid, "keepalive": True})]
        return None

    def _pack(self, hdr: dict[str, Any]) -> bytes:
        if self.group is not None:
            hdr["group"] = self.group  # every message of it: the broker routes each by its group
        return pack(hdr)

    def share(self, group: int) -> WatchSession:
        """The session watching ``group``'s share of this watch, from the same cursor (a group's
        leader reads only its own slots' seqs of it)."""
        return WatchSession(self.prefix, self.delivered, group)

    def wait(self, now: float) -> float:
        """Seconds until ``due`` has something to do."""
        if self.open_at is not None:
            return max(self.open_at - now, 0.0)
        return max(min(self.last_heard + WATCH_SILENCE, self.last_keepalive + WATCH_KEEPALIVE) - now, 0.0)

    def cancel(self) -> list[bytes]:
        self.ended = True
        return [self._pack({"op": "watch", "id": self.rid, "cancel": True})]

    def lost(self, now: float) -> None:
        """The broker went silent (or its connection is gone): resume from the cursor now."""
        self.silent = True
        self._resume(now, 0.0)

    def _resume(self, now: float, delay: float) -> None:
        self.open_at = now + delay

    def deliver(self, item: WatchEvent | CursorMark) -> WatchEvent | None:
        """Hand out one received item, in order: the event (its change is then behind the
        delivered cursor), or None for a cursor mark (which becomes the delivered cursor)."""
        if isinstance(item, CursorMark):
            self.delivered = item.cursor
            return None
        if item.kind != "resync" and self.delivered is not None and 0 <= item.slot < len(self.delivered["s"]):
            self.delivered["s"][item.slot] = max(self.delivered["s"][item.slot], item.version)
        return item

    def received(self, command: bytes, frames: list[bytes], now: float) -> list[WatchEvent | CursorMark]:
        """A message from the broker (``command`` PARTIAL or FINAL, ``frames`` = header, values):
        its events and cursor marks, to be handed out through ``deliver`` in this order."""
        rh = unpack(frames[0])
        if self.open_at is not None or rh.get("id") != self.rid:
            return []  # an earlier subscription's message
        self.last_heard = now
        if command == C_PARTIAL:
            if rh.get("n") != self.n + 1:
                self._resume(now, 0.0)  # a message was lost (a full queue): resume from the cursor
                return []
            self.n += 1
            self.hops = 0
            self.backoff = BACKOFF_FIRST
            events: list[WatchEvent | CursorMark] = []
            streams = rh.get("streams") or {}
            for i, ((kind, key, slot, seq, expire_at), value) in enumerate(zip(rh["events"], frames[1:], strict=True)):
                m = streams.get(i)
                if m is not None:
                    info = StreamInfo(seq, int(m["size"]), bytes(m["stream"]), int(m["chunks"]))
                    events.append(WatchEvent(kind, bytes(key), None, seq, expire_at, slot, info))
                else:
                    events.append(WatchEvent(kind, bytes(key), value if kind == "put" else None, seq, expire_at, slot))
                if self.cursor is not None:
                    self.cursor["s"][slot] = max(self.cursor["s"][slot], seq)
            if "cursor" in rh:
                self.cursor = _copy(rh["cursor"])
                events.append(CursorMark(rh["cursor"]))
            return events
        if rh.get("ok"):
            if rh.get("resync"):
                self.cursor = _copy(rh["cursor"])
                self._resume(now, 0.0)
                return [CursorMark(rh["cursor"]), WatchEvent("resync", b"", None, 0, 0, -1)]
            self.ended = True  # cancelled
            return []
        err = error_for(rh)
        if self.group is None and rh.get("code") == "BAD_REQUEST" and isinstance(rh.get("groups"), int):
            # Active brokers: a watch names its group. The stream fans it out over the groups
            # (from this session's cursor) once it has the map; until then, it waits.
            self.spans_groups = True
            self._resume(now, self.backoff)
            self.backoff = min(self.backoff * 2, BACKOFF_MAX)
            return []
        if not err.retried:
            self.ended = True
            raise err
        self.error = err
        self._resume(now, self.backoff)
        self.backoff = min(self.backoff * 2, BACKOFF_MAX)
        return []



def merged_cursor(shares: Sequence[WatchSession]) -> dict[str, Any] | None:
    """The delivered cursor of a watch fanned out over the slot groups (``shares[g]`` watching
    group g): each slot's seq from its group's share, in the shape of one broker's cursor, so
    that it resumes either kind of watch. None until every share has a cursor."""
    parts = [s.delivered for s in shares]
    if not parts or any(p is None for p in parts):
        return None
    cluster, slots = parts[0]["c"], len(parts[0]["s"])  # type: ignore[index]
    if any(p["c"] != cluster or len(p["s"]) != slots for p in parts):  # type: ignore[index]
        return None  # a share resynced against another cluster's cursor: no whole cursor yet
    groups = len(parts)
    return {"c": cluster, "s": [parts[s % groups]["s"][s] for s in range(slots)]}  # type: ignore[index]


def next_url(session: WatchSession, at: str | None, brokers: BrokerList, router: Router) -> str:
    """Where ``session`` opens next, after it was at ``at``: after a silence, away from it (the
    next broker; for a group's share, not the leader the map named, which is forgotten); then
    its group's leader by the slot map, else the broker list's current one."""
    if session.silent:
        if session.group is not None:
            router.forget({"group": session.group}, at or "")
        if session.group is None or at == brokers.current:
            brokers.silent()  # several brokers: a silence moves the watch to the next one
    session.silent = False
    target = router.target({"group": session.group}) if session.group is not None else None
    return target or brokers.current


def follow_leader(session: WatchSession, brokers: BrokerList, router: Router | None = None) -> None:
    """After a message: if the watch was refused with NOT_LEADER, go to the leader it names (the
    watch then reopens there at once; a group's share notes it in the slot map) or to the next
    broker (after the backoff)."""
    err, session.error = session.error, None
    if err is None or session.open_at is None:
        return
    if session.group is not None and router is not None and isinstance(err, NotLeader):
        session.hops += 1
        if router.follow(Redirect(session.group, err.leader, 0), session.hops):
            session.open_at = min(session.open_at, session.last_heard)
        else:
            session.hops = 0
        return
    if brokers.refused(err, 1.0) == 0.0:
        session.open_at = min(session.open_at, session.last_heard)
