"""The replication conversation (broker PUB -> worker SUB) and what addresses a write.

One message per worker per turn of the broker's loop, ``[worker topic, [header, header, ...],
[value, value, ...], *large values]``, each header one slot's write batch (an array: this is the
hot path), the values of all its ops packed into one frame but for the large ones, which follow as
frames of their own.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from typing import Any

import msgspec

from protocol.frames import pack_values, unpack_values

OP_PUT = 1
OP_DELETE = 2
OP_EXPIRE = 3  # change or remove the TTL of a live key, leaving its value
# Streamed values (docs/protocol.md §1.8). A streamed value is written as chunks staged under a
# stream id, then made the key's value by one commit op; the chunks are never copied again.
OP_CHUNK = 4  # key = stream id (16 bytes) + chunk index (4 bytes BE); value = the chunk
OP_PUT_STREAM = 5  # key = the user key; value = the stream manifest (see Manifest)
OP_ABORT_STREAM = 6  # key = stream id; drop a stream's staged chunks unless it was committed
OP_REAP = 7  # delete a key whose TTL ran out, only if it still has this version and expire_at

COND_NONE = 0
COND_ABSENT = 1  # only if the key does not exist (or has expired)
COND_VERSION = 2  # only if the key exists with version == expected


def slot_for_key(key: bytes, slots: int) -> int:
    """The hash slot of a key: CRC-32 (IEEE, as zlib) of the key bytes, modulo the slot count."""
    return (zlib.crc32(key) & 0xFFFFFFFF) % slots


def worker_topic(worker_id: str, group: int | None = None) -> bytes:
    """PUB/SUB topic of a worker's replication messages: ``TOPIC_PREFIX``, its id, ``b"\\0"`` (so that no
    id's topic is a prefix of another's: SUB filters match prefixes). With slot groups (active
    brokers) the group follows as two bytes: a worker subscribes once per group it serves, and
    gets each message once, on the subscription of the group that sent it; without a group the
    topic is a prefix of all of them."""
    topic = TOPIC_PREFIX + worker_id.encode() + b"\0"
    return topic if group is None else topic + group.to_bytes(2, "big")


# The first byte of every worker topic; it names the message format. It was b"w" while each value
# travelled as a frame of its own: a broker and a worker of different formats then never see each
# other's messages (the worker catches up by REPLAY, whose format did not change) rather than
# misread them.
TOPIC_PREFIX = b"v"


# ---------------------------------------------------------------------------------------------
# Replication messages


class WriteOp(msgspec.Struct, array_like=True):
    """One op of a write batch, on the wire ``[op, key, expire_at, cond, expected]``.

    The batch headers are typed msgspec structs: msgspec builds them in C while it decodes, where
    building dataclasses in Python cost a worker about 3x as much per batch (docs/benchmarks.md,
    "typed replication headers")."""

    op: int  # OP_PUT, OP_DELETE, OP_EXPIRE or OP_REAP
    key: bytes
    expire_at: int = 0  # broker wall clock, ms since the epoch; 0 = no TTL (OP_EXPIRE: 0 removes it)
    cond: int = COND_NONE  # applied only if the condition holds when the replica applies it
    expected: int = 0  # COND_VERSION: the version the key must have

    @property
    def needs_result(self) -> bool:
        """Does the client's answer depend on what the replica found (existed / condition held /
        the stream was complete)?"""
        return self.op not in (OP_PUT, OP_CHUNK, OP_ABORT_STREAM) or self.cond != COND_NONE


class Origin(msgspec.Struct, array_like=True, frozen=True):
    """The client request a write batch is a share of: its client id and request number, and
    whether the client said it may be a retry (``check``: a first attempt cannot have been
    applied before, so replicas skip the look-up). Replicas record it with the write and apply a
    later batch of the same origin in the same slot as a no-op (worker/dedup.py)."""

    cid: bytes
    rid: int
    check: bool


class Replicate(msgspec.Struct, array_like=True):
    """One sequenced write batch of one slot: on the wire (its header) ``[slot, epoch, seq,
    prev_epoch, committed, now, ops]``, then ``origin`` if there is one; its values travel apart
    from it (packed in a replication message; one frame per op in the tail and in REPLAY).

    ``prev_epoch`` is the epoch of the write at ``seq - 1`` in the broker's history: a replica
    applies the batch only if its own last position is exactly ``(prev_epoch, seq - 1)``, which
    keeps every replica's history a prefix of the broker's (the log matching rule of Raft).
    """

    slot: int
    epoch: int
    seq: int
    prev_epoch: int
    committed: int  # the slot's committed seq when sent (lets replicas reclaim safely)
    now: int  # broker wall clock, ms; decides expiry of conditional deletes
    ops: list[WriteOp]
    # One per op (b"" for deletes). Not part of the header: ``header`` leaves it out.
    values: list[bytes] = msgspec.field(default_factory=list)
    origin: Origin | None = None  # the client request (None: a write the broker decided)

    def header(self) -> bytes:
        # A tuple: 7 elements without an origin, as ever (array-like structs always encode every
        # field, so a struct would end in nil, which workers before msgspec cannot read).
        if self.origin is None:
            return _encode_header((self.slot, self.epoch, self.seq, self.prev_epoch, self.committed,
                                   self.now, self.ops))
        return _encode_header((self.slot, self.epoch, self.seq, self.prev_epoch, self.committed,
                               self.now, self.ops, self.origin))

    def frames(self) -> list[bytes]:
        """The batch as ``[header, *values]`` (as kept in the broker's tail and sent by REPLAY)."""
        return [self.header(), *self.values]

    @classmethod
    def decode(cls, header: bytes, values: list[Any]) -> Replicate:
        """A batch from its header and value frames; ValueError if they are not one."""
        try:
            h = _decode_header(header)
        except msgspec.DecodeError as e:  # (ValidationError is one)
            raise ValueError(f"replication message: {e}") from None
        if len(values) != len(h.ops):
            raise ValueError("replication message: value frame count does not match ops")
        return h.with_values(list(values))


class _Header(msgspec.Struct, array_like=True):
    """What ``Replicate.header`` encodes, as it is decoded: the batch without its values."""

    slot: int
    epoch: int
    seq: int
    prev_epoch: int
    committed: int
    now: int
    ops: list[WriteOp]
    origin: Origin | None = None

    def with_values(self, values: list[Any]) -> Replicate:
        return Replicate(self.slot, self.epoch, self.seq, self.prev_epoch, self.committed, self.now, self.ops,
                         values, self.origin)


_encode_header = msgspec.msgpack.Encoder().encode
_decode_header = msgspec.msgpack.Decoder(_Header).decode
_decode_headers = msgspec.msgpack.Decoder(list[_Header]).decode
_ARRAY32 = struct.Struct(">BI")  # a msgpack array32's marker (0xdd) and element count


def _array_of(packed: list[bytes]) -> bytes:
    """The msgpack array of already packed objects: its marker and count, then them, as they are
    (the broker packs each header once, for its tail; the message needs no second encoding)."""
    return _ARRAY32.pack(0xDD, len(packed)) + b"".join(packed)


def encode_replication(worker_id: str, batches: list[list[bytes]], group: int | None = None) -> list[bytes]:
    """One replication message carrying write batches (each ``[header, *values]``) to one worker.
    Batching per worker and per turn, instead of one PUB message per batch, is what lets the
    broker and the workers pay their per-message costs once for many writes.

    The values go packed (``pack_values``): a 1,000-key MSET is then 3 frames, not 1,002."""
    values = [v for b in batches for v in b[1:]]
    return [worker_topic(worker_id, group), _array_of([b[0] for b in batches]), *pack_values(values)]


def decode_replication(frames: list[Any]) -> list[Replicate]:
    """The write batches of one replication message, in the order the broker sequenced them;
    ValueError if it is not one."""
    if len(frames) < 3:
        raise ValueError("replication message: fewer than 3 frames")
    try:
        headers = _decode_headers(frames[1])
        values = unpack_values(frames[2:])
    except ValueError as e:  # (msgspec.DecodeError is one)
        raise ValueError(f"replication message: {e}") from None
    ops = sum(len(h.ops) for h in headers)
    if ops != len(values):
        raise ValueError(f"replication message: {len(values)} values for {ops} ops")
    out, at = [], 0
    for h in headers:
        n = len(h.ops)
        out.append(h.with_values(values[at:at + n]))
        at += n
    return out


MANIFEST = struct.Struct(">16sIQ")  # stream id, chunk count, total size in bytes


@dataclass(slots=True, frozen=True)
class Manifest:
    """Where a streamed value lives: chunks ``0..chunks-1`` of stream ``stream`` in its slot."""

    stream: bytes
    chunks: int
    size: int

    def encode(self) -> bytes:
        return MANIFEST.pack(self.stream, self.chunks, self.size)

    @classmethod
    def decode(cls, data: bytes) -> Manifest:
        stream, chunks, size = MANIFEST.unpack(data)
        return cls(bytes(stream), chunks, size)


CHUNK_INDEX = struct.Struct(">I")


def chunk_key(stream: bytes, index: int) -> bytes:
    """The key of a chunk write (OP_CHUNK) and, after the slot, of a stored chunk."""
    return stream + CHUNK_INDEX.pack(index)

