"""A slot's data as a whole, inside a caller's write transaction: its applied position, and
removing everything it holds (records, expiry entries, chunks, open streams, the client requests
its writes came from)."""

from __future__ import annotations

import lmdb

from worker.records import (
    META_INSTALLING,
    META_POSITION,
    SLOT_PREFIX,
    Position,
    decode_position,
    decode_record_header,
    expiry_key,
    meta_key,
)
from worker.tables import Tables


def load_positions(txn: lmdb.Transaction, t: Tables) -> dict[int, Position]:
    return {slot: decode_position(raw) for slot, raw in _meta_entries(txn, t, META_POSITION)}


def half_installed(txn: lmdb.Transaction, t: Tables) -> list[int]:
    """Slots marked as a snapshot install in progress (a crash cut it short)."""
    return [slot for slot, _ in _meta_entries(txn, t, META_INSTALLING)]


def _meta_entries(txn: lmdb.Transaction, t: Tables, kind: bytes) -> list[tuple[int, bytes]]:
    out: list[tuple[int, bytes]] = []
    cur = txn.cursor(db=t.meta)
    if cur.set_range(kind):
        for k, v in cur:
            if not k.startswith(kind):
                break
            out.append((SLOT_PREFIX.unpack_from(k, len(kind))[0], v))
    return out


def forget_slot(txn: lmdb.Transaction, t: Tables, slot: int) -> None:
    """Remove the slot's data, its position and any install marker."""
    delete_slot_data(txn, t, slot)
    txn.delete(meta_key(META_POSITION, slot), db=t.meta)
    txn.delete(meta_key(META_INSTALLING, slot), db=t.meta)


def delete_slot_data(txn: lmdb.Transaction, t: Tables, slot: int) -> None:
    prefix = SLOT_PREFIX.pack(slot)
    t.dedup_floor.pop(slot, None)
    for db in (t.blobs, t.staged, t.dedup, t.dedup_age):
        cur = txn.cursor(db=db)
        if cur.set_range(prefix):
            while cur.key().startswith(prefix):
                if not cur.delete():
                    break
    cur = txn.cursor(db=t.data)
    if cur.set_range(prefix):
        while cur.key().startswith(prefix):
            _, exp = decode_record_header(cur.value())
            if exp:
                txn.delete(expiry_key(exp, slot, cur.key()[SLOT_PREFIX.size:]), db=t.expiry)
            if not cur.delete():
                break
