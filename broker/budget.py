"""The bytes of replies one client connection has not taken, and what the broker does past the bound.

ZeroMQ bounds a ROUTER's queue to each peer in messages (SNDHWM: 100,000), not bytes, and never
says what a peer has read: 60 unread gets of a 4 MiB value held 270 MiB in the broker. What it can
say is when libzmq is done with a message sent without a copy and with a tracker: the message was
written into the kernel's socket buffer (bounded by the socket's send buffer), or dropped with its
connection. Messages to one peer leave in order, so one tracked message vouches for every earlier
one: a reply is tracked when it is large, or when the small ones since the last tracked one reach
``TRACK_BYTES``. ``held`` is then what libzmq still holds for the connection, to within
``TRACK_BYTES``.

Past ``limit`` (``--max-client-bytes``) a reply is replaced by a short UNAVAILABLE error carrying
the request's id (the client may retry once it reads); past ``limit + ERROR_ALLOWANCE`` even those
are dropped. A reply is always let through when no tracked reply is held, so a value larger than the limit
can still be read by a client that reads. What the broker holds for one connection is thus at most
``limit`` + one reply + ``ERROR_ALLOWANCE`` + ``TRACK_BYTES``, plus the kernel's socket buffer.
Pure bookkeeping: the server (broker/server.py) sends and hands in the trackers.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol

import structlog

from protocol.errors import ErrorCode
from protocol.frames import C_FINAL, MDPC, SERVICE, pack, unpack

log = structlog.get_logger("zkv.broker")

TRACK_BYTES = 64 * 1024  # small replies in a row before one of them carries a tracker
ERROR_ALLOWANCE = 1 << 20  # bytes of error replies past the limit before replies are dropped silently
PRUNE_EVERY = 4096  # replies between sweeps of the connections nothing is held for


class Tracker(Protocol):
    """zmq.MessageTracker: ``done`` once libzmq has released the message."""

    @property
    def done(self) -> bool: ...


class Verdict(Enum):
    SEND = "send"
    REFUSE = "refuse"  # send the error of ``refusal`` instead
    DROP = "drop"


@dataclass
class _Connection:
    segments: deque[tuple[Tracker, int]] = field(default_factory=deque)  # (tracker, bytes it vouches for)
    pending: int = 0  # the bytes of ``segments``
    untracked: int = 0  # bytes sent since the last tracked reply
    refusing: bool = False  # (logged once per episode)


class ReplyBudget:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.connections: dict[bytes, _Connection] = {}
        self.refused = 0
        self.dropped = 0
        self._sends = 0

    def held(self, identity: bytes) -> int:
        """Bytes of replies to ``identity`` libzmq has not yet released (to within TRACK_BYTES)."""
        c = self.connections.get(identity)
        if c is None:
            return 0
        while c.segments and c.segments[0][0].done:
            c.pending -= c.segments.popleft()[1]
        return c.pending + c.untracked

    def admit(self, identity: bytes, size: int) -> Verdict:
        held = self.held(identity)
        c = self.connections.get(identity)
        if c is None or not c.segments or held + size <= self.limit:  # (nothing tracked is held: at
            # most TRACK_BYTES of small replies, so that a reply over the limit still gets through)
            if c is not None and c.refusing:
                c.refusing = False
                log.info("client_reads_again", client=identity.hex(), held=held)
            return Verdict.SEND
        if c is not None and not c.refusing:
            c.refusing = True
            log.warning("client_replies_unread", client=identity.hex(), held=held, limit=self.limit,
                        detail="its replies are refused until it reads (--max-client-bytes)")
        if held <= self.limit + ERROR_ALLOWANCE:
            self.refused += 1
            return Verdict.REFUSE
        self.dropped += 1
        return Verdict.DROP

    def refusal(self, identity: bytes, frames: list[bytes]) -> list[bytes]:
        """The error that replaces a reply past the bound, with the reply's id when it has one."""
        rid, service = None, frames[2] if len(frames) > 2 else SERVICE
        try:
            header = unpack(frames[3])
            if isinstance(header, dict):
                rid = header.get("id")
        except Exception:  # an mmi answer's body is not a header
            pass
        message = (f"{self.held(identity)} bytes of replies to this client are unread, over the broker's "
                   f"--max-client-bytes {self.limit}: this reply was dropped; read your replies, then retry")
        return [MDPC, C_FINAL, service, pack({"id": rid, "ok": False, "code": ErrorCode.UNAVAILABLE.value,
                                              "message": message})]

    def wants_tracker(self, identity: bytes, size: int) -> bool:
        c = self.connections.get(identity)
        return size + (c.untracked if c is not None else 0) >= TRACK_BYTES

    def sent(self, identity: bytes, size: int, tracker: Tracker | None) -> None:
        c = self.connections.get(identity)
        if c is None:
            c = self.connections[identity] = _Connection()
        if tracker is None:
            c.untracked += size
        else:
            c.segments.append((tracker, c.untracked + size))
            c.pending += c.untracked + size
            c.untracked = 0
        self._sends += 1
        if self._sends % PRUNE_EVERY == 0:
            self._prune()

    def forget(self, identity: bytes) -> None:
        """The connection is gone (libzmq dropped what it held for it)."""
        self.connections.pop(identity, None)

    def _prune(self) -> None:
        for identity in [i for i, c in self.connections.items() if self.held(i) < TRACK_BYTES and not c.segments]:
            del self.connections[identity]
