"""Snapshots of one slot on disk: the donor's consistent cut, and the receiver's install part by
part. A snapshot is a stream of tagged entries, (tag + key within the slot, value): records,
stored chunks and open streams, carried verbatim (their layout: worker/records.py)."""

from __future__ import annotations

from collections.abc import Generator

import lmdb

from worker.records import (
    META_INSTALLING,
    META_POSITION,
    SLOT_PREFIX,
    Position,
    decode_position,
    decode_record_header,
    encode_position,
    expiry_key,
    meta_key,
)
from worker.slots import delete_slot_data
from worker.tables import Tables

SNAP_RECORD, SNAP_CHUNK, SNAP_STAGED = b"d", b"b", b"s"

SnapshotEntries = Generator[tuple[bytes, bytes], None, None]


def cut(txn: lmdb.Transaction, t: Tables, slot: int) -> tuple[Position, tuple[int, int], SnapshotEntries]:
    """Donor: the slot's position in ``txn``, (keys, bytes) in it, and its tagged entries
    (SNAP_RECORD + storage key suffix, record; SNAP_CHUNK + stream id + index, chunk;
    SNAP_STAGED + stream id, b""). The generator owns ``txn``: it aborts it when exhausted or
    closed, so every entry comes from the same state as the position."""
    pos = decode_position(txn.get(meta_key(META_POSITION, slot), db=t.meta))
    prefix = SLOT_PREFIX.pack(slot)
    sources = ((SNAP_RECORD, t.data), (SNAP_CHUNK, t.blobs), (SNAP_STAGED, t.staged))
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
        else:
            raise ValueError(f"unknown snapshot entry tag {tag!r}")


def finish_install(txn: lmdb.Transaction, t: Tables, slot: int, pos: Position) -> None:
    """Receiver: the last part is written; the slot has its position and is whole again."""
    txn.put(meta_key(META_POSITION, slot), encode_position(pos), db=t.meta)
    txn.delete(meta_key(META_INSTALLING, slot), db=t.meta)
