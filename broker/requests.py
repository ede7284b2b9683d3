"""Requests in flight: who asked, what is still outstanding, when it times out; and the one way
a request is answered with an error (``RequestTable.fail``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from broker.messages import WRITE_OPS, KvRequest
from broker.replies import error
from broker.state import BrokerState
from protocol.errors import ErrorCode
from protocol.replication import COND_NONE


@dataclass
class Request:
    id: int  # client's request number (echoed)
    identity: bytes
    cid: bytes
    op: str
    deadline: float
    keys: list[bytes]
    results: list[Any]
    outstanding: int = 0
    done: bool = False  # the current waiter has been answered (reply or error)
    committed: bool = False  # writes: every part committed; a retry gets the stored answer
    parts: list[list[int]] = field(default_factory=list)  # writes: [slot, epoch, seq]
    dedup_key: tuple[bytes, int] | None = None
    deduplicated: bool = False  # a part was a retry the replicas had applied before (their answer is in parts)
    # A part committed by the positions a READY reported, its ACK (with what the replicas found)
    # refused: the write is applied, but its answer is not known (broker/writes.py).
    results_lost: bool = False
    maybe_retry: bool = True  # false when the client says this is its first attempt
    cond: int = COND_NONE  # put/delete: applied only if this condition holds
    expected: int = 0  # COND_VERSION: the version the key must have
    stream: bytes = b""  # put_chunk / put_commit / put_abort / get_chunks: the stream id
    index: int = 0  # put_chunk: the chunk's index; get_chunks: the first chunk asked for
    manifest: bytes = b""  # put_commit: the encoded Manifest
    packed_reply: bool = False  # mget: answer with the values packed (docs/protocol.md §1.2)

    @classmethod
    def of(cls, identity: bytes, msg: KvRequest, deadline: float) -> Request:
        return cls(msg.rid, identity, msg.cid, msg.op, deadline, msg.keys, [None] * len(msg.keys),
                   maybe_retry=msg.maybe_retry, cond=msg.cond, expected=msg.expected, stream=msg.stream,
                   index=msg.index, manifest=msg.manifest, packed_reply=msg.packed)


@dataclass
class WriteBatch:
    """One slot's share of a write request, sequenced at one seq (``Slot.pending``)."""

    request: Request
    indices: list[int]
    found: list[list[Any]] | None = None  # per op [flag, version before], from the first ACK
    # The (epoch, seq) of the earlier write of the same client request, when the replicas found
    # this batch was a retry of it and applied it as a no-op (worker/dedup.py).
    duplicate_of: list[int] | None = None


class RequestTable:
    """Every request that waits for workers, so that the tick can time it out."""

    def __init__(self, state: BrokerState) -> None:
        self.state = state
        self.waiting: dict[int, Request] = {}

    def add(self, req: Request) -> None:
        self.waiting[id(req)] = req

    def remove(self, req: Request) -> None:
        self.waiting.pop(id(req), None)

    def fail(self, req: Request, code: ErrorCode, message: str) -> None:
        if req.done:
            return
        req.done = True
        self.remove(req)
        error(self.state, req.identity, req.id, code, message)

    def tick(self, now: float) -> None:
        for req in list(self.waiting.values()):
            if not req.done and now > req.deadline:
                what = "write not acknowledged by enough replicas in time; it may still be applied" \
                    if req.op in WRITE_OPS else "read not answered in time"
                self.fail(req, ErrorCode.TIMEOUT, what)
