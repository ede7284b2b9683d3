"""The workers' messages (MDP/0.2 worker side plus zkv's extensions), decoded once at the edge
into typed, checked objects. Every field is checked for its type and size, never converted: a
worker's ``bytes(n)`` of an integer would allocate n bytes, and ``int("3")`` would accept a string.
A malformed message raises ``ValueError`` and changes nothing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Annotated, Any

import msgspec

from broker.messages import is_int
from protocol.frames import (
    SERVICE,
    W_ACK,
    W_DISCONNECT,
    W_EXPIRED,
    W_FINAL,
    W_HEARTBEAT,
    W_LEASE_REQUEST,
    W_NACK,
    W_PARTIAL,
    W_SNAPSHOT_PART,
    unpack,
)


@dataclass(slots=True)
class Ack:
    """Cumulative applied positions [(slot, epoch, seq)], what conditional ops found
    [(slot, seq, found, None)] or, for a batch that was a retry of an earlier write, [(slot, seq,
    what that write found, [its epoch, seq])], and the snapshot transfer whose install this ACK
    reports."""

    positions: list[tuple[int, int, int]]
    results: list[tuple[int, int, list[list[Any]], list[int] | None]] = field(default_factory=list)
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
class LeaseRequest:
    """A worker with a reads endpoint asks for read leases; ``id`` names the request in the grant
    (the worker measures its lease from when it sent this request)."""

    id: int


@dataclass(slots=True)
class UnknownCommand:
    command: bytes


WorkerMessage = Ack | Nack | Heartbeat | Answer | SnapshotPart | Expired | LeaseRequest | Disconnect | UnknownCommand


WORKER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # printable, no NUL, fits the metadata key
MAX_ID_BYTES = 64  # data ids, process ids, transfer tokens


@dataclass(slots=True)
class Register:
    """READY: who the worker is, which data directory it holds, and where each slot stands."""

    wid: str
    data_id: bytes
    process: bytes
    positions: dict[int, tuple[int, int]]  # slot -> (epoch, seq)
    keys: int = 0
    disk_bytes: int = 0
    reads: str = ""  # the worker's reads endpoint (lease reads), "" without one


MAX_URL = 256


def _map(frame: bytes) -> dict[str, Any]:
    v = unpack(frame)
    if not isinstance(v, dict):
        raise ValueError("expected a msgpack map")
    return v


def _int(v: Any, name: str) -> int:
    if not is_int(v) or not 0 <= v < 2**63:
        raise ValueError(f"{name} must be a non-negative integer")
    return v


def _bytes(v: Any, name: str, max_len: int = MAX_ID_BYTES, allow_empty: bool = True) -> bytes:
    if not isinstance(v, bytes) or len(v) > max_len or (not v and not allow_empty):
        raise ValueError(f"{name} must be bytes of {'0' if allow_empty else '1'} to {max_len}")
    return v


def _earlier(v: Any) -> list[int]:
    if not isinstance(v, list) or len(v) != 2:
        raise ValueError("res: the earlier write must be [epoch, seq]")
    return [_int(v[0], "res"), _int(v[1], "res")]


_NonNegative = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]  # as ``_int`` checks an integer
# [(slot, epoch, seq), ...], checked in C: an MSET's ACK carries one per slot it touched (hundreds).
_Triples = list[tuple[_NonNegative, _NonNegative, _NonNegative]]


class _AckBody(msgspec.Struct):
    """An ACK's map as it is decoded."""

    pos: _Triples = []
    res: list[Any] = []
    snap: bytes | None = None


_decode_ack = msgspec.msgpack.Decoder(_AckBody).decode


def _triples(v: Any, name: str) -> list[tuple[int, int, int]]:
    try:
        return msgspec.convert(v, _Triples)
    except msgspec.ValidationError as e:
        raise ValueError(f"{name}: {e}") from None


def decode_ready(body: list[bytes]) -> Register:
    if len(body) < 2 or body[0] != SERVICE:
        raise ValueError("READY must name service 'kv' and carry an info frame")
    info = _map(body[1])
    wid = info.get("id")
    if not isinstance(wid, str) or not WORKER_ID.fullmatch(wid):
        raise ValueError("worker id must be 1 to 64 of A-Z a-z 0-9 . _ - (starting with a letter or digit)")
    positions = {s: (e, q) for s, e, q in _triples(info.get("positions", []), "positions")}
    return Register(wid, _bytes(info.get("data_id"), "data_id", allow_empty=False),
                    _bytes(info.get("process", b""), "process"), positions,
                    _int(info.get("keys", 0), "keys"), _int(info.get("disk_bytes", 0), "disk_bytes"),
                    _reads_url(info.get("reads", "")))


def _reads_url(v: Any) -> str:
    if not isinstance(v, str) or len(v) > MAX_URL or (v and not v.startswith(("tcp://", "ipc://"))):
        raise ValueError(f"reads must be a tcp:// or ipc:// endpoint of at most {MAX_URL} characters")
    return v


def decode_worker(cmd: bytes, body: list[bytes]) -> WorkerMessage:
    """One message of a registered worker (READY: ``decode_ready``). Raises ValueError (or
    another exception) when the message is malformed."""
    if cmd == W_ACK:
        ack = _decode_ack(body[0])  # (msgspec.ValidationError is a ValueError)
        results = ack.res
        if not all(isinstance(r, list) and len(r) in (3, 4) and isinstance(r[2], list) for r in results):
            raise ValueError("res entries must be [slot, seq, [found, ...]] or [slot, seq, [found, ...], [epoch, seq]]")
        return Ack(ack.pos,
                   [(_int(r[0], "res"), _int(r[1], "res"), r[2], _earlier(r[3]) if len(r) == 4 else None)
                    for r in results],
                   _bytes(ack.snap or b"", "snap"))
    if cmd == W_FINAL or cmd == W_PARTIAL:
        if len(body) < 3:
            raise ValueError("an answer needs [token, empty, header, *values]")
        return Answer(cmd == W_FINAL, body[0], body[2:])
    if cmd == W_HEARTBEAT:
        stats = _map(body[0]) if body else None
        if stats is not None:
            for name in ("keys", "disk_bytes", "applied", "commits", "retries_absorbed", "direct_reads",
                         "clock_ms"):
                if name in stats:
                    _int(stats[name], name)
        return Heartbeat(stats)
    if cmd == W_NACK:
        info = _map(body[0])
        return Nack(_int(info.get("slot"), "slot"), _int(info.get("epoch"), "epoch"), _int(info.get("seq"), "seq"))
    if cmd == W_SNAPSHOT_PART:
        hdr = _map(body[0])
        hdr["token"] = _bytes(hdr.get("token"), "token", allow_empty=False)
        for name in ("part", "keys", "bytes", "total_keys", "total_bytes"):
            _int(hdr.get(name, 0), name)
        return SnapshotPart(hdr, body)
    if cmd == W_EXPIRED:
        keys = _map(body[0]).get("keys", [])
        if not isinstance(keys, list) or not all(
                isinstance(k, list) and len(k) == 4 and isinstance(k[1], bytes) and is_int(k[0]) and is_int(k[2])
                and is_int(k[3]) for k in keys):
            raise ValueError("keys entries must be [slot, key (bin), version, expire_at]")
        return Expired(keys)
    if cmd == W_LEASE_REQUEST:
        return LeaseRequest(_int(_map(body[0]).get("id"), "id"))
    if cmd == W_DISCONNECT:
        return Disconnect()
    return UnknownCommand(cmd)
