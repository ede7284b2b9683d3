"""The worker's on-disk record layout (LMDB). Snapshots carry records verbatim between workers.

"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

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

