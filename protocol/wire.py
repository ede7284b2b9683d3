"""Frame layouts and codecs of the three zkv conversations.

1. Client <-> broker: MDP/0.2 client framing, service ``kv``.
   request  ``[MDPC02, 0x01, service, header, *values]``
   reply    ``[MDPC02, 0x03, service, header, *values]``
2. Worker <-> broker: MDP/0.2 worker framing plus zkv extension commands (>= 0x10).
3. Replication (broker PUB -> worker SUB): one message per worker per turn of the broker's loop,
   ``[worker topic, [header, header, ...], *values]``, each header one slot's write batch.

Headers are msgpack maps (client, worker requests) or arrays (replication, hot path).
Values always travel as frames of their own so that the broker never decodes or copies them.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any

import msgpack

MDPC = b"MDPC02"
MDPW = b"MDPW02"

# Client commands (RFC 18).
C_REQUEST = b"\x01"
C_PARTIAL = b"\x02"
C_FINAL = b"\x03"

# Worker commands (RFC 18).
W_READY = b"\x01"
W_REQUEST = b"\x02"
W_PARTIAL = b"\x03"
W_FINAL = b"\x04"
W_HEARTBEAT = b"\x05"
W_DISCONNECT = b"\x06"
# zkv extensions, worker -> broker.
W_ACK = b"\x10"  # cumulative applied positions (and results of conditional ops)
W_NACK = b"\x11"  # "I am at (epoch, seq) in this slot and need what follows"
W_SNAPSHOT_PART = b"\x12"  # a part of a slot snapshot, sent by the donor
W_EXPIRED = b"\x13"  # keys whose TTL ran out by the broker's clock: the broker sequences their reaping
# zkv extensions, broker -> worker.
W_ASSIGN = b"\x20"  # the slots this worker holds
W_REPLAY = b"\x21"  # a replication message resent point-to-point (gap repair)
W_SNAPSHOT_REQUEST = b"\x22"  # donor: send a snapshot of this slot
W_SNAPSHOT_DELIVER = b"\x23"  # receiver: a snapshot part (forwarded from the donor)

SERVICE = b"kv"
MMI_SERVICE = b"mmi.service"
MMI_STATUS = b"mmi.status"
MMI_ADMIN = b"mmi.admin"

DEFAULT_SLOTS = 1024
MAX_KEY_BYTES = 4096
DEFAULT_MAX_VALUE_BYTES = 64 * 1024 * 1024

OP_PUT = 1
OP_DELETE = 2
OP_EXPIRE = 3  # change or remove the TTL of a live key, leaving its value
# Streamed values (docs/protocol.md §1.8). A streamed value is written as chunks staged under a
# stream id, then made the key's value by one commit op; the chunks are never copied again.
OP_CHUNK = 4  # key = stream id (16 bytes) + chunk index (4 bytes BE); value = the chunk
OP_PUT_STREAM = 5  # key = the user key; value = the stream manifest (see Manifest)
OP_ABORT_STREAM = 6  # key = stream id; drop a stream's staged chunks unless it was committed
OP_REAP = 7  # delete a key whose TTL ran out, only if it still has this version and expire_at

STREAM_ID_BYTES = 16
DEFAULT_CHUNK_BYTES = 1 << 20  # what clients send; the broker accepts chunks up to MAX_CHUNK_BYTES
MAX_CHUNK_BYTES = 8 << 20
DEFAULT_MAX_STREAM_BYTES = 4 << 30  # a streamed value's default size limit (broker --max-stream)

COND_NONE = 0
COND_ABSENT = 1  # only if the key does not exist (or has expired)
COND_VERSION = 2  # only if the key exists with version == expected

def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


def slot_for_key(key: bytes, slots: int) -> int:
    """The hash slot of a key: CRC-32 (IEEE, as zlib) of the key bytes, modulo the slot count."""
    return (zlib.crc32(key) & 0xFFFFFFFF) % slots


def worker_topic(worker_id: str) -> bytes:
    """PUB/SUB topic of a worker's replication messages: ``b"w"``, its id, ``b"\\0"`` (so that no
    id's topic is a prefix of another's: SUB filters match prefixes)."""
    return b"w" + worker_id.encode() + b"\0"


# ---------------------------------------------------------------------------------------------
# Replication messages


@dataclass(slots=True)
class WriteOp:
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


@dataclass(slots=True)
class Replicate:
    """One sequenced write batch of one slot.

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
    values: list[bytes] = field(default_factory=list)  # one per op (b"" for deletes)

    def header(self) -> bytes:
        return pack(
            [
                self.slot,
                self.epoch,
                self.seq,
                self.prev_epoch,
                self.committed,
                self.now,
                [[o.op, o.key, o.expire_at, o.cond, o.expected] for o in self.ops],
            ]
        )

    def frames(self) -> list[bytes]:
        """The batch as ``[header, *values]`` (as kept in the broker's tail and sent by REPLAY)."""
        return [self.header(), *self.values]

    @classmethod
    def decode(cls, header: bytes, values: list[Any]) -> Replicate:
        return cls.from_fields(unpack(header), values)

    @classmethod
    def from_fields(cls, fields: list[Any], values: list[Any]) -> Replicate:
        slot, epoch, seq, prev_epoch, committed, now, ops = fields
        wops = [WriteOp(int(o[0]), bytes(o[1]), int(o[2]), int(o[3]), int(o[4])) for o in ops]
        if len(values) != len(wops):
            raise ValueError("replication message: value frame count does not match ops")
        return cls(slot, epoch, seq, prev_epoch, committed, now, wops, list(values))


def encode_replication(worker_id: str, batches: list[list[bytes]]) -> list[bytes]:
    """One replication message carrying write batches (each ``[header, *values]``) to one worker.
    Batching per worker and per turn, instead of one PUB message per batch, is what lets the
    broker and the workers pay their per-message costs once for many writes."""
    headers = [b[0] for b in batches]
    return [worker_topic(worker_id), pack(headers), *[v for b in batches for v in b[1:]]]


def decode_replication(frames: list[Any]) -> list[Replicate]:
    """The write batches of one replication message, in the order the broker sequenced them."""
    headers = unpack(frames[1])
    if not isinstance(headers, list):
        raise ValueError("replication message: header frame is not a list")
    out, at = [], 2
    for header in headers:
        fields = unpack(header)
        n = len(fields[6])
        out.append(Replicate.from_fields(fields, frames[at:at + n]))
        at += n
    if at != len(frames):
        raise ValueError("replication message: more value frames than ops")
    return out


# ---------------------------------------------------------------------------------------------
# Stored record layout (worker LMDB), kept here because snapshots carry records verbatim.

# LMDB keys are at most 511 bytes. Keys up to KEY_INLINE_MAX bytes are stored as they are (so a
# slot's records are in key order); a longer key is stored as its first KEY_INLINE_MAX bytes plus
# a 16-byte BLAKE2b digest of the whole key, and the record keeps the whole key. The two forms
# have different lengths, so they can never be mistaken for each other.
KEY_INLINE_MAX = 400
RECORD_HEADER = struct.Struct(">QQH")  # version (slot seq of the last write), expire_at ms (0 = none),
# length of the whole key kept in the record (0 when the key is stored inline), with the top bit
# set when the value is streamed (the record then holds the stream's manifest, not the value)
RECORD_STREAMED = 0x8000


@dataclass(slots=True)
class Record:
    version: int
    expire_at: int
    long_key: bytes  # the whole key when it is longer than KEY_INLINE_MAX, else b""
    value: bytes  # the value, or the Manifest of a streamed value
    streamed: bool = False


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


def key_suffix(key: bytes) -> bytes:
    """The part of the storage key after the slot."""
    if len(key) <= KEY_INLINE_MAX:
        return key
    return key[:KEY_INLINE_MAX] + hashlib.blake2b(key, digest_size=16).digest()


def storage_key(slot: int, key: bytes) -> bytes:
    """Worker LMDB key: slot (2 bytes BE) then the key (or its long form), so a slot is one key range."""
    return struct.pack(">H", slot) + key_suffix(key)


def encode_record(version: int, expire_at: int, key: bytes, value: bytes, streamed: bool = False) -> bytes:
    long_key = key if len(key) > KEY_INLINE_MAX else b""
    flags = RECORD_STREAMED if streamed else 0
    return RECORD_HEADER.pack(version, expire_at, len(long_key) | flags) + long_key + value


def decode_record_header(record: bytes) -> tuple[int, int]:
    version, expire_at, _ = RECORD_HEADER.unpack_from(record)
    return version, expire_at


def decode_record(record: bytes) -> Record:
    version, expire_at, klen = RECORD_HEADER.unpack_from(record)
    streamed = bool(klen & RECORD_STREAMED)
    klen &= ~RECORD_STREAMED
    start = RECORD_HEADER.size
    return Record(version, expire_at, bytes(record[start : start + klen]), bytes(record[start + klen :]), streamed)
