"""The worker's on-disk layout: how the keys of its LMDB databases are built and what their values
hold. Snapshots carry records verbatim between workers, so a change here is a change of the
snapshot protocol too.

Every key except meta's ids begins with the slot (SLOT_PREFIX), so a slot is one key range per
database:

- ``data``: storage key (slot + key suffix) -> record (RECORD_HEADER, the long key, the value)
- ``expiry``: EXPIRY_KEY (expire_at, slot) + key suffix -> b"": the TTL index, soonest first
- ``blobs``: slot + stream id + chunk index -> one chunk of a streamed value
- ``staged``: slot + stream id -> b"": a stream whose value is not committed yet
- ``dedup``: slot + DEDUP_ID (request number) + client id -> DEDUP_ENTRY (epoch, seq, broker
  clock of the write) + packed results or b"": the client requests this slot's writes came from
  (worker/dedup.py)
- ``dedup_age``: slot + broker clock (u64 BE) + DEDUP_ID + client id -> b"": that table by age, oldest first
- ``meta``: b"p" + slot -> POSITION; b"i" + slot -> b"" while a snapshot install of the slot is
  half done; b"uuid" -> this data directory's id; b"cluster" -> the cluster's id; b"epoch" -> the
  highest broker epoch this worker has accepted an assignment from (u64 BE; fencing, worker/core.py)
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

SLOT_PREFIX = struct.Struct(">H")
POSITION = struct.Struct(">QQ")  # epoch, seq
EXPIRY_KEY = struct.Struct(">QH")  # expire_at, slot (then the key suffix)

DEDUP_ID = struct.Struct(">Q")  # request number (then the client id)
DEDUP_ENTRY = struct.Struct(">QQQ")  # epoch, seq of the write that carried the request, broker clock ms
AGE = struct.Struct(">Q")

META_POSITION = b"p"
META_INSTALLING = b"i"
META_DATA_ID = b"uuid"
META_CLUSTER = b"cluster"
META_EPOCH = b"epoch"  # not a slot entry: its first byte is neither META_POSITION nor META_INSTALLING
EPOCH = struct.Struct(">Q")

# LMDB keys are at most 511 bytes. Keys up to KEY_INLINE_MAX bytes are stored as they are (so a
# slot's records are in key order); a longer key is stored as its first KEY_INLINE_MAX bytes plus
# a 16-byte BLAKE2b digest of the whole key, and the record keeps the whole key. The two forms
# have different lengths, so they can never be mistaken for each other.
KEY_INLINE_MAX = 400
RECORD_HEADER = struct.Struct(">QQH")  # version (slot seq of the last write), expire_at ms (0 = none),
# length of the whole key kept in the record (0 when the key is stored inline), with the top bit
# set when the value is streamed (the record then holds the stream's manifest, not the value)
RECORD_STREAMED = 0x8000


@dataclass(slots=True, frozen=True)
class Position:
    """How far a slot's history has been applied: the last write batch's (epoch, seq)."""

    epoch: int = 0
    seq: int = 0


# A slot with nothing applied. Shared (positions are immutable): the look-ups of the write and
# read paths return it for a slot they do not know without building a Position each time.
NOTHING_APPLIED = Position()


@dataclass(slots=True)
class Record:
    version: int
    expire_at: int
    long_key: bytes  # the whole key when it is longer than KEY_INLINE_MAX, else b""
    value: bytes  # the value, or the Manifest of a streamed value
    streamed: bool = False


def key_suffix(key: bytes) -> bytes:
    """The part of the storage key after the slot."""
    if len(key) <= KEY_INLINE_MAX:
        return key
    return key[:KEY_INLINE_MAX] + hashlib.blake2b(key, digest_size=16).digest()


def storage_key(slot: int, key: bytes) -> bytes:
    """Worker LMDB key: slot (2 bytes BE) then the key (or its long form), so a slot is one key range."""
    return SLOT_PREFIX.pack(slot) + key_suffix(key)


def expiry_key(expire_at: int, slot: int, suffix: bytes) -> bytes:
    """The expiry index entry of the record stored under ``slot + suffix``."""
    return EXPIRY_KEY.pack(expire_at, slot) + suffix


def dedup_suffix(cid: bytes, rid: int) -> bytes:
    """The part of a ``dedup`` key after the slot: request number, then client id."""
    return DEDUP_ID.pack(rid) + cid


def dedup_age_key(slot: int, now: int, suffix: bytes) -> bytes:
    """The ``dedup_age`` entry of the ``dedup`` entry ``slot + suffix`` recorded at broker clock ``now``."""
    return SLOT_PREFIX.pack(slot) + AGE.pack(now) + suffix


def meta_key(kind: bytes, slot: int) -> bytes:
    """A slot's entry in ``meta``: META_POSITION or META_INSTALLING."""
    return kind + SLOT_PREFIX.pack(slot)


def encode_position(pos: Position) -> bytes:
    return POSITION.pack(pos.epoch, pos.seq)


def decode_position(raw: bytes | None) -> Position:
    return Position(*POSITION.unpack(raw)) if raw else NOTHING_APPLIED


def encode_record(version: int, expire_at: int, key: bytes, value: bytes, streamed: bool = False) -> bytes:
    long_key = key if len(key) > KEY_INLINE_MAX else b""
    flags = RECORD_STREAMED if streamed else 0
    return RECORD_HEADER.pack(version, expire_at, len(long_key) | flags) + long_key + value


def decode_record_header(record: bytes) -> tuple[int, int]:
    version, expire_at, _ = RECORD_HEADER.unpack_from(record)
    return version, expire_at


def is_streamed(record: bytes) -> bool:
    return bool(RECORD_HEADER.unpack_from(record)[2] & RECORD_STREAMED)


def decode_record(record: bytes, with_value: bool = True) -> Record:
    """The record's fields; ``with_value=False`` leaves the value out (b""), not copying it."""
    version, expire_at, klen = RECORD_HEADER.unpack_from(record)
    streamed = bool(klen & RECORD_STREAMED)
    klen &= ~RECORD_STREAMED
    start = RECORD_HEADER.size
    value = bytes(record[start + klen :]) if with_value else b""
    return Record(version, expire_at, bytes(record[start : start + klen]), value, streamed)
