"""A registered worker's messages (MDP/0.2 worker side plus zkv's extensions), decoded once at
the edge into typed objects. READY is decoded by broker/membership.py, which registers the worker.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from protocol.frames import (
    W_ACK,
    W_DISCONNECT,
    W_EXPIRED,
    W_FINAL,
    W_HEARTBEAT,
    W_NACK,
    W_PARTIAL,
    W_SNAPSHOT_PART,
    unpack,
)


@dataclass(slots=True)
class Ack:
    """Cumulative applied positions [(slot, epoch, seq)], what conditional ops found
    [(slot, seq, found)], and the snapshot transfer whose install this ACK reports."""

    positions: list[tuple[int, int, int]]
    results: list[tuple[int, int, list[list[Any]]]] = field(default_factory=list)
    snap: bytes = b""


@dataclass(slots=True)
class Nack:
    slot: int
    epoch: int
    seq: int


@dataclass(slots=True)
class Heartbeat:
    stats: dict[str, Any] | None


@dataclass(slots=True)
class Answer:
    """A worker's answer to a request (W_FINAL) or a part of one (W_PARTIAL)."""

    final: bool
    token: bytes
    body: list[bytes]  # [header, *values]


@dataclass(slots=True)
class SnapshotPart:
    header: dict[str, Any]
    frames: list[bytes]  # the part as it is forwarded: [header, *records]


@dataclass(slots=True)
class Expired:
    keys: list[list[Any]]  # [slot, key, version, expire_at]


@dataclass(slots=True)
class Disconnect:
    pass


@dataclass(slots=True)
class UnknownCommand:
    command: bytes


WorkerMessage = Ack | Nack | Heartbeat | Answer | SnapshotPart | Expired | Disconnect | UnknownCommand


def decode_worker(cmd: bytes, body: list[bytes]) -> WorkerMessage:
    """One message of a registered worker (READY is decoded by the membership part). Raises
    ValueError (or another exception) when the message is malformed."""
    if cmd == W_ACK:
        ack = unpack(body[0])
        return Ack([(int(s), int(e), int(q)) for s, e, q in ack.get("pos", [])],
                   [(int(s), int(q), found) for s, q, found in ack.get("res", [])], bytes(ack.get("snap") or b""))
    if cmd == W_FINAL or cmd == W_PARTIAL:
        return Answer(cmd == W_FINAL, body[0], body[2:])
    if cmd == W_HEARTBEAT:
        return Heartbeat(unpack(body[0]) if body else None)
    if cmd == W_NACK:
        info = unpack(body[0])
        return Nack(int(info["slot"]), int(info["epoch"]), int(info["seq"]))
    if cmd == W_SNAPSHOT_PART:
        return SnapshotPart(unpack(body[0]), body)
    if cmd == W_EXPIRED:
        return Expired(unpack(body[0]).get("keys", []))
    if cmd == W_DISCONNECT:
        return Disconnect()
    return UnknownCommand(cmd)

