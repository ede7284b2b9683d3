"""Snapshots of one slot on disk: the donor's consistent cut, and the receiver's install part by
part. A snapshot is a stream of tagged entries, (tag + key within the slot, value): records,
stored chunks, open streams and the client requests the slot's writes came from (without it, a
replica filled by a snapshot would apply a retried write that the others refuse), carried
verbatim (their layout: worker/records.py)."""

from __future__ import annotations

from collections.abc import Generator

import lmdb

from protocol.replication import CHUNK_INDEX, Manifest
from worker import dedup
from worker.records import (
    META_INSTALLING,
    META_POSITION,
    SLOT_PREFIX,
    Position,
    decode_position,
    decode_record,
    decode_record_header,
    encode_position,
    expiry_key,
    meta_key,
)
from worker.slots import delete_slot_data
from worker.tables import Tables

SNAP_RECORD, SNAP_CHUNK, SNAP_STAGED, SNAP_DEDUP = b"d", b"b", b"s", b"u"

SnapshotEntries = Generator[tuple[bytes, bytes], None, None]


def cut(txn: lmdb.Transaction, t: Tables, slot: int) -> tuple[Position, tuple[int, int], SnapshotEntries]:
    """Donor: the slot's position in ``txn``, (keys, bytes) in it, and its tagged entries
    (SNAP_RECORD + storage key suffix, record; SNAP_CHUNK + stream id + index, chunk;
    SNAP_STAGED + stream id, b""; SNAP_DEDUP + request number + client id, entry). The
    generator owns ``txn``: it aborts it when exhausted or closed, so every entry comes from the
    same state as the position."""
    pos = decode_position(txn.get(meta_key(META_POSITION, slot), db=t.meta))
    prefix = SLOT_PREFIX.pack(slot)
    sources = ((SNAP_RECORD, t.data), (SNAP_CHUNK, t.blobs), (SNAP_STAGED, t.staged), (SNAP_DEDUP, t.dedup))
    keys = size = 0
    for _, db in sources:
        cur = txn.cursor(db=db)
        if cur.set_range(prefix):
            for k, v in cur:
                if bytes(k[:SLOT_PREFIX.size]) != prefix:
                    break
                keys += db == t.data
                size += len(k) - SLOT_PREFIX.size + len(v)

    def entries() -> SnapshotEntries:
        try:
            for tag, db in sources:
                cur = txn.cursor(db=db)
                if cur.set_range(prefix):
                    for k, v in cur:
                        if bytes(k[:SLOT_PREFIX.size]) != prefix:
                            break
                        yield tag + bytes(k[SLOT_PREFIX.size:]), bytes(v)
        finally:
            txn.abort()

    return pos, (keys, size), entries()


# A live entry of a backup dump: (item, frame). Items: ["v", key, version, expire_at] with the value
# as frame; ["s", key, version, expire_at, size, chunks] (frame b"") followed by its chunks, each
# ["c"] with the chunk as frame (docs/protocol.md §1.11).
DumpEntries = Generator[tuple[list, bytes], None, None]


def live_cut(txn: lmdb.Transaction, t: Tables, slot: int, now: int) -> tuple[Position, DumpEntries]:
    """A backup's cut of one slot: its position in ``txn`` and its records not expired at
    ``now`` (the broker's clock), as a client sees them, each streamed value followed by its
    chunks from the same transaction (a value replaced meanwhile is still read whole). The
    generator owns ``txn`` as ``cut``'s does."""
    pos = decode_position(txn.get(meta_key(META_POSITION, slot), db=t.meta))
    prefix = SLOT_PREFIX.pack(slot)

    def entries() -> DumpEntries:
        try:
            cur = txn.cursor(db=t.data)
            if not cur.set_range(prefix):
                return
            for k, v in cur:
                if bytes(k[:SLOT_PREFIX.size]) != prefix:
                    break
                r = decode_record(v)
                if r.expire_at and r.expire_at <= now:
                    continue  # expired, not yet reaped
                key = r.long_key or bytes(k[SLOT_PREFIX.size:])
                if not r.streamed:
                    yield ["v", key, r.version, r.expire_at], r.value
                    continue
                m = Manifest.decode(r.value)
                yield ["s", key, r.version, r.expire_at, m.size, m.chunks], b""
                for i in range(m.chunks):
                    chunk = txn.get(prefix + m.stream + CHUNK_INDEX.pack(i), db=t.blobs)
                    if chunk is None:
                        raise ValueError(f"slot {slot}: chunk {i} of a streamed value is missing")
                    yield ["c"], bytes(chunk)
        finally:
            txn.abort()

    return pos, entries()


def begin_install(txn: lmdb.Transaction, t: Tables, slot: int) -> None:
    """Receiver: empty the slot, drop its position and mark it half written, so a restart before
    finish_install empties it again."""
    delete_slot_data(txn, t, slot)
    txn.delete(meta_key(META_POSITION, slot), db=t.meta)
    txn.put(meta_key(META_INSTALLING, slot), b"", db=t.meta)


def install_part(txn: lmdb.Transaction, t: Tables, slot: int, entries: list[tuple[bytes, bytes]]) -> None:
    """Receiver: write one part of a snapshot (tagged entries, as ``cut`` yields them)."""
    prefix = SLOT_PREFIX.pack(slot)
    for tagged, value in entries:
        tag, key = tagged[:1], tagged[1:]
        if tag == SNAP_RECORD:
            txn.put(prefix + key, value, db=t.data)
            _, exp = decode_record_header(value)
            if exp:
                txn.put(expiry_key(exp, slot, key), b"", db=t.expiry)
        elif tag == SNAP_CHUNK:
            txn.put(prefix + key, value, db=t.blobs)
        elif tag == SNAP_STAGED:
            txn.put(prefix + key, value, db=t.staged)
        elif tag == SNAP_DEDUP:
            dedup.restore(txn, t, slot, key, value)
        else:
            raise ValueError(f"unknown snapshot entry tag {tag!r}")


def finish_install(txn: lmdb.Transaction, t: Tables, slot: int, pos: Position) -> None:
    """Receiver: the last part is written; the slot has its position and is whole again."""
    txn.put(meta_key(META_POSITION, slot), encode_position(pos), db=t.meta)
    txn.delete(meta_key(META_INSTALLING, slot), db=t.meta)
