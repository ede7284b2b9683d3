"""The chunks of streamed values, inside a caller's LMDB transaction.

A streamed value is stored as chunks in ``blobs`` under ``slot + stream id + index``; while its
stream is open the stream id is listed in ``staged``; its commit writes the key's record with the
stream's manifest in place of the value (the chunks stay where they are). Replacing, deleting or
expiring the key frees the chunks; aborting a stream frees its staged chunks.
"""

from __future__ import annotations

from typing import Any

import lmdb

from protocol.limits import STREAM_ID_BYTES
from protocol.replication import CHUNK_INDEX, Manifest
from worker.records import SLOT_PREFIX, decode_record, is_streamed
from worker.tables import Tables


def stage_chunk(txn: lmdb.Transaction, t: Tables, slot: int, key: bytes, chunk: bytes) -> list[Any]:
    """Store one chunk (``key`` = stream id + index) of an open stream. Answer: [stored, 0]."""
    prefix = SLOT_PREFIX.pack(slot)
    stream = key[:STREAM_ID_BYTES]
    if txn.get(prefix + stream, db=t.staged) is None and has_chunks(txn, t, slot, stream):
        # Chunks and no open stream: the stream was committed (its id is public in every
        # get answer). Writing into it would change a committed value behind its version.
        return [False, 0]
    txn.put(prefix + key, chunk, db=t.blobs)
    txn.put(prefix + stream, b"", db=t.staged)
    return [True, 0]


def stream_complete(txn: lmdb.Transaction, t: Tables, slot: int, m: Manifest) -> bool:
    """Does the slot hold exactly chunks 0..chunks-1 of this open stream, of ``size`` bytes?"""
    start = SLOT_PREFIX.pack(slot) + m.stream
    if m.chunks < 1 or txn.get(start, db=t.staged) is None:
        return False
    count = size = 0
    cur = txn.cursor(db=t.blobs)
    if cur.set_range(start):
        for k, v in cur:
            if not k.startswith(start):
                break
            if CHUNK_INDEX.unpack_from(k, len(start))[0] != count:
                return False
            count += 1
            size += len(v)
    return count == m.chunks and size == m.size


def has_chunks(txn: lmdb.Transaction, t: Tables, slot: int, stream: bytes) -> bool:
    start = SLOT_PREFIX.pack(slot) + stream
    cur = txn.cursor(db=t.blobs)
    return cur.set_range(start) and bytes(cur.key()).startswith(start)


def commit_stream(txn: lmdb.Transaction, t: Tables, slot: int, stream: bytes) -> None:
    """The stream's value becomes a record's: its chunks are no longer staged."""
    txn.delete(SLOT_PREFIX.pack(slot) + stream, db=t.staged)


def drop_staged(txn: lmdb.Transaction, t: Tables, slot: int, stream: bytes) -> bool:
    """Free the chunks of a stream that was never committed (a committed one is left alone)."""
    if not txn.delete(SLOT_PREFIX.pack(slot) + stream, db=t.staged):
        return False
    drop_chunks(txn, t, slot, stream)
    return True


def drop_chunks(txn: lmdb.Transaction, t: Tables, slot: int, stream: bytes) -> None:
    start = SLOT_PREFIX.pack(slot) + stream
    cur = txn.cursor(db=t.blobs)
    if cur.set_range(start):
        while cur.key().startswith(start):
            if not cur.delete():
                break


def drop_record_chunks(txn: lmdb.Transaction, t: Tables, slot: int, record: bytes) -> None:
    """Free the chunks of a record's value if it is streamed (the record is being replaced or removed)."""
    if is_streamed(record):
        drop_chunks(txn, t, slot, Manifest.decode(decode_record(record).value).stream)


def read_chunks(txn: lmdb.Transaction, t: Tables, slot: int, stream: bytes, first: int, count: int) -> list[bytes]:
    """Chunks ``first..first+count-1`` of a stored stream; fewer (or none) past its end or
    if the stream is gone (the key was replaced or deleted)."""
    out: list[bytes] = []
    prefix = SLOT_PREFIX.pack(slot) + stream
    for i in range(first, first + count):
        chunk = txn.get(prefix + CHUNK_INDEX.pack(i), db=t.blobs)
        if chunk is None:
            break
        out.append(chunk)
    return out
