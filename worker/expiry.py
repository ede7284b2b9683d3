"""Expiry on disk, by the broker's clock: finding expired records (the broker then sequences their
deletion as OP_REAP, so every replica removes them at the same place in the slot's order and a
watch sees the expiry), applying a reap, and the local fallback that reclaims space."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import lmdb

from protocol.replication import Replicate, WriteOp
from worker.chunks import drop_record_chunks
from worker.records import EXPIRY_KEY, SLOT_PREFIX, decode_record, decode_record_header, expiry_key, key_suffix
from worker.tables import Tables


@dataclass(slots=True)
class ExpiredKey:
    slot: int
    key: bytes
    version: int
    expire_at: int
    index_key: bytes = b""  # its entry in the expiry index (where the next walk continues)


def expired_keys(txn: lmdb.Transaction, t: Tables, broker_now: int, limit: int, after: bytes | None,
                 slots: set[int] | None) -> list[ExpiredKey]:
    """Records whose TTL ran out by the broker's clock, oldest expiry first (after the expiry
    index entry ``after``, of the given ``slots`` only). Each key's ``index_key`` lets the next
    call continue after it."""
    out: list[ExpiredKey] = []
    cur = txn.cursor(db=t.expiry)
    if not (cur.set_range(after + b"\x00") if after is not None else cur.first()):
        return out
    for ek, _ in cur:
        exp, slot = EXPIRY_KEY.unpack_from(ek)
        if exp > broker_now or len(out) >= limit:
            break
        if slots is not None and slot not in slots:
            continue
        rec = txn.get(SLOT_PREFIX.pack(slot) + ek[EXPIRY_KEY.size:], db=t.data)
        if rec is None:
            continue
        r = decode_record(rec)
        if r.expire_at == exp:
            out.append(ExpiredKey(slot, r.long_key or bytes(ek[EXPIRY_KEY.size:]), r.version, exp, bytes(ek)))
    return out


def apply_reap(txn: lmdb.Transaction, t: Tables, rep: Replicate, op: WriteOp) -> list[Any]:
    """Delete a key whose TTL ran out, if nothing rewrote it since it was reported: its version
    is still ``op.expected`` and its expire_at ``op.expire_at``, which is past by the broker's
    clock in the batch. Answer: [deleted, version before]."""
    suffix = key_suffix(op.key)
    sk = SLOT_PREFIX.pack(rep.slot) + suffix
    old = txn.get(sk, db=t.data)
    if old is None:
        return [False, 0]
    version, exp = decode_record_header(old)
    if version != op.expected or exp != op.expire_at or not exp or exp > rep.now:
        return [False, version]
    drop_record_chunks(txn, t, rep.slot, old)
    txn.delete(sk, db=t.data)
    txn.delete(expiry_key(exp, rep.slot, suffix), db=t.expiry)
    return [True, version]


def reclaim_expired(txn: lmdb.Transaction, t: Tables, broker_now: int, limit: int) -> int:
    """Delete records whose TTL ran out by the broker's clock. Positions do not change: an
    expired record is already invisible to every read, this only frees its space."""
    removed = 0
    cur = txn.cursor(db=t.expiry)
    if not cur.first():
        return 0
    while removed < limit:
        ek = cur.key()
        if not ek:  # past the last entry
            break
        exp, slot = EXPIRY_KEY.unpack_from(ek)
        if exp > broker_now:
            break
        sk = SLOT_PREFIX.pack(slot) + ek[EXPIRY_KEY.size :]
        rec = txn.get(sk, db=t.data)
        if rec is not None and decode_record_header(rec)[1] == exp:
            drop_record_chunks(txn, t, slot, rec)
            txn.delete(sk, db=t.data)
            removed += 1
        if not cur.delete():
            break
    return removed
