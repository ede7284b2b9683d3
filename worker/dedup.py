"""Exactly-once writes across brokers: each slot's table of the client requests its writes came from.

A write batch carries its client request's (client id, request number) (``Origin``). A replica
records it in the same transaction as the write; a later batch of the same origin in the same
slot is a retry that a broker sequenced again (a successor after a failover does not know what its
predecessor sequenced): it changes nothing, and the replica answers it with the first write's
position and results. The table is part of the slot's replicated state, so every replica decides
alike: they apply the same history, and forget entries by the broker clock carried in the batches
(``DEDUP_RETENTION_MS``), never by their own. Snapshots carry it (worker/snapshots.py).
"""

from __future__ import annotations

from typing import Any

import lmdb

from protocol.frames import pack, unpack
from protocol.limits import DEDUP_RETENTION_MS
from protocol.replication import Origin, Replicate
from worker.records import AGE, DEDUP_ENTRY, SLOT_PREFIX, dedup_age_key, dedup_suffix
from worker.tables import Tables

FORGET_PER_BATCH = 64  # entries forgotten per applied batch at most (deterministic: same on every replica)


NO_ENTRIES = 1 << 64  # the floor of a slot with an empty table: above every broker clock


def forget_old(txn: lmdb.Transaction, t: Tables, slot: int, now: int) -> None:
    """Drop the slot's entries recorded before ``now - DEDUP_RETENTION_MS`` (broker clock), oldest
    first, at most FORGET_PER_BATCH: a slot's table then shrinks as fast as writes can fill it.

    ``t.dedup_floor`` (no entry of the slot is older) lets most calls return without a cursor walk:
    what this deletes depends only on the table and ``now``, so skipping a walk that would delete
    nothing keeps every replica's table the same."""
    horizon = now - DEDUP_RETENTION_MS
    floor = t.dedup_floor.get(slot)
    if floor is not None and floor >= horizon:
        return
    prefix = SLOT_PREFIX.pack(slot)
    cur = txn.cursor(db=t.dedup_age)
    start = SLOT_PREFIX.size + AGE.size
    t.dedup_floor.pop(slot, None)
    if not cur.set_range(prefix):
        t.dedup_floor[slot] = NO_ENTRIES
        return
    for _ in range(FORGET_PER_BATCH):
        key = cur.key()
        if not key.startswith(prefix):
            t.dedup_floor[slot] = NO_ENTRIES
            return
        age = AGE.unpack_from(key, SLOT_PREFIX.size)[0]
        if age >= horizon:
            t.dedup_floor[slot] = age  # the table is in age order: this is its oldest entry
            return
        txn.delete(prefix + key[start:], db=t.dedup)
        if not cur.delete():
            t.dedup_floor[slot] = NO_ENTRIES
            return
    # FORGET_PER_BATCH reached: older entries may remain, and the floor stays unknown


def earlier(txn: lmdb.Transaction, t: Tables, slot: int, origin: Origin) -> tuple[int, int, list[Any] | None] | None:
    """The (epoch, seq, results) of the write this origin already made in the slot, or None."""
    raw = txn.get(SLOT_PREFIX.pack(slot) + dedup_suffix(origin.cid, origin.rid), db=t.dedup)
    return None if raw is None else _decode_entry(raw)


def remember(txn: lmdb.Transaction, t: Tables, rep: Replicate, results: list[Any] | None) -> None:
    """Record that ``rep`` carried its origin (with the results a retry must be answered with)."""
    assert rep.origin is not None
    suffix = dedup_suffix(rep.origin.cid, rep.origin.rid)
    value = DEDUP_ENTRY.pack(rep.epoch, rep.seq, rep.now) + (pack(results) if results is not None else b"")
    txn.put(SLOT_PREFIX.pack(rep.slot) + suffix, value, db=t.dedup)
    _index_by_age(t, txn, rep, suffix)


def claim(txn: lmdb.Transaction, t: Tables, rep: Replicate) -> tuple[int, int, list[Any] | None] | None:
    """``earlier`` and ``remember`` in one LMDB call, for a batch whose record carries no results
    (its answer does not depend on what the replica finds, so the record is complete before its
    ops are applied): records ``rep``'s origin unless the slot already has it, and then returns
    what ``earlier`` would have. Half the look-ups of the common write (a plain PUT or MSET share)."""
    assert rep.origin is not None
    suffix = dedup_suffix(rep.origin.cid, rep.origin.rid)
    key = SLOT_PREFIX.pack(rep.slot) + suffix
    if txn.put(key, DEDUP_ENTRY.pack(rep.epoch, rep.seq, rep.now), overwrite=False, db=t.dedup):
        _index_by_age(t, txn, rep, suffix)
        return None
    raw = txn.get(key, db=t.dedup)
    assert raw is not None  # (put refused to overwrite it, in this transaction)
    return _decode_entry(raw)


def _decode_entry(raw: bytes) -> tuple[int, int, list[Any] | None]:
    epoch, seq, _now = DEDUP_ENTRY.unpack_from(raw)
    rest = raw[DEDUP_ENTRY.size:]
    return epoch, seq, unpack(rest) if rest else None


def _index_by_age(t: Tables, txn: lmdb.Transaction, rep: Replicate, suffix: bytes) -> None:
    """The age index entry of a record just written, and the slot's floor (``forget_old``)."""
    txn.put(dedup_age_key(rep.slot, rep.now, suffix), b"", db=t.dedup_age)
    floor = t.dedup_floor.get(rep.slot)
    if floor is not None and rep.now < floor:
        t.dedup_floor[rep.slot] = rep.now


def restore(txn: lmdb.Transaction, t: Tables, slot: int, suffix: bytes, value: bytes) -> None:
    """Snapshot install: one entry of the donor's table, and its age index entry."""
    t.dedup_floor.pop(slot, None)
    txn.put(SLOT_PREFIX.pack(slot) + suffix, value, db=t.dedup)
    _epoch, _seq, now = DEDUP_ENTRY.unpack_from(value)
    txn.put(dedup_age_key(slot, now, suffix), b"", db=t.dedup_age)
