"""Applying replication batches: every op of every batch, and the slots' new positions, in one
LMDB write transaction, whose commit is the fsync. A position on disk therefore always describes
exactly the data on disk.
"""

from __future__ import annotations

import time
from typing import Any

import lmdb

from protocol.limits import STREAM_INCOMPLETE
from protocol.replication import (
    COND_ABSENT,
    COND_NONE,
    COND_VERSION,
    OP_ABORT_STREAM,
    OP_CHUNK,
    OP_DELETE,
    OP_EXPIRE,
    OP_PUT,
    OP_PUT_STREAM,
    OP_REAP,
    Manifest,
    Replicate,
    WriteOp,
)
from worker import chunks, dedup
from worker.expiry import apply_reap
from worker.records import (
    META_POSITION,
    SLOT_PREFIX,
    Position,
    decode_record,
    decode_record_header,
    encode_position,
    encode_record,
    expiry_key,
    key_suffix,
    meta_key,
)
from worker.tables import Tables

# Per batch whose answer depends on what the replica found: [slot, seq, [[flag, version before], ...]];
# per batch that was a retry of an earlier write: [slot, seq, that write's results or [], [its epoch, seq]].
BatchResults = list[list[Any]]


def apply_batch(t: Tables, batch: list[Replicate]) -> tuple[BatchResults, dict[int, Position], float]:
    """Apply sequenced writes in one transaction (one fsync). The caller has checked order.
    Also returns the seconds LMDB's commit took: writing the dirty pages and fsyncing them.

    Returns the new positions of the touched slots and, for batches whose answer depends on what
    the replica found (deletes, TTL changes, conditional writes), ``(slot, seq, [[flag, version
    before], ...])`` with one entry per op: flag is "the key existed" for a plain delete or
    expire, "the condition held" for a conditional op. Every replica computes the same answers:
    they apply the same history and judge expiry by the broker's clock carried in the batch.

    A batch whose origin (client request) already wrote in the slot changes nothing but the
    position, and is answered with the earlier write's position and results (worker/dedup.py).
    """
    txn = t.env.begin(write=True)
    try:
        results, positions = _write_batch(txn, t, batch)
        began = time.perf_counter()
        txn.commit()
    except BaseException:
        txn.abort()
        t.dedup_floor.clear()  # it described the aborted transaction's view
        raise
    return results, positions, time.perf_counter() - began


def _write_batch(txn: lmdb.Transaction, t: Tables, batch: list[Replicate]) -> tuple[BatchResults, dict[int, Position]]:
    results: BatchResults = []
    positions: dict[int, Position] = {}
    for rep in batch:
        dedup.forget_old(txn, t, rep.slot, rep.now)
        origin = rep.origin
        needs = any(op.needs_result for op in rep.ops)
        # The record is written after the ops when it must carry what they found, else with the
        # look-up, in one call (``claim``).
        claimed = origin is not None and origin.check and not needs
        if claimed:
            before = dedup.claim(txn, t, rep)
        elif origin is not None and origin.check:
            before = dedup.earlier(txn, t, rep.slot, origin)
        else:
            before = None
        if before is not None:
            epoch, seq, found_then = before
            results.append([rep.slot, rep.seq, found_then or [], [epoch, seq]])
        else:
            prefix = SLOT_PREFIX.pack(rep.slot)
            found = [_apply_op(txn, t, rep, prefix, op, value) for op, value in zip(rep.ops, rep.values, strict=True)]
            if needs:
                results.append([rep.slot, rep.seq, found])
            if origin is not None and not claimed:
                dedup.remember(txn, t, rep, found if needs else None)
        positions[rep.slot] = Position(rep.epoch, rep.seq)
    # Each slot's last position only (a turn's batches often touch a slot more than once), in
    # one call: in slot order, as LMDB stores them.
    txn.cursor(db=t.meta).putmulti(
        [(meta_key(META_POSITION, slot), encode_position(pos)) for slot, pos in sorted(positions.items())])
    return results, positions


def _apply_op(txn: lmdb.Transaction, t: Tables, rep: Replicate, prefix: bytes, op: WriteOp,
              value: bytes) -> list[Any]:
    """One op; ``prefix`` is the slot's storage key prefix (``SLOT_PREFIX.pack(rep.slot)``)."""
    if op.op == OP_PUT and op.cond == COND_NONE:  # the common write, first
        return _put(txn, t, rep, op, value, prefix)
    if op.op == OP_CHUNK:
        return chunks.stage_chunk(txn, t, rep.slot, op.key, value)
    if op.op == OP_ABORT_STREAM:
        return [chunks.drop_staged(txn, t, rep.slot, op.key), 0]
    if op.op == OP_REAP:
        return apply_reap(txn, t, rep, op)
    suffix = key_suffix(op.key)
    sk = prefix + suffix
    old = txn.get(sk, db=t.data)
    old_version, old_exp = decode_record_header(old) if old is not None else (0, 0)
    live = old is not None and (old_exp == 0 or old_exp > rep.now)
    if op.cond == COND_ABSENT:
        held = not live
    elif op.cond == COND_VERSION:
        held = live and old_version == op.expected
    else:
        held = True
    answer: list[Any] = [held if op.cond != COND_NONE else live, old_version if live else 0]
    if op.op == OP_PUT_STREAM:
        manifest = Manifest.decode(value)
        if not chunks.stream_complete(txn, t, rep.slot, manifest):
            chunks.drop_staged(txn, t, rep.slot, manifest.stream)
            return [STREAM_INCOMPLETE, answer[1]]
        if not held:
            chunks.drop_staged(txn, t, rep.slot, manifest.stream)
            return answer
        chunks.commit_stream(txn, t, rep.slot, manifest.stream)
    if not held or (op.op == OP_EXPIRE and not live):
        return answer
    if old is not None and old_exp:
        txn.delete(expiry_key(old_exp, rep.slot, suffix), db=t.expiry)
    streamed = op.op == OP_PUT_STREAM
    if op.op == OP_EXPIRE:
        assert old is not None
        kept = decode_record(old)
        value, streamed = kept.value, kept.streamed
    elif old is not None:
        chunks.drop_record_chunks(txn, t, rep.slot, old)
    if op.op == OP_DELETE:
        if old is not None:
            txn.delete(sk, db=t.data)
        return answer
    txn.put(sk, encode_record(rep.seq, op.expire_at, op.key, value, streamed), db=t.data)
    if op.expire_at:
        txn.put(expiry_key(op.expire_at, rep.slot, suffix), b"", db=t.expiry)
    return answer


def _put(txn: lmdb.Transaction, t: Tables, rep: Replicate, op: WriteOp, value: bytes, prefix: bytes) -> list[Any]:
    """An unconditional PUT, the common write: the record is replaced in one look-up, and what it
    replaced is cleaned up after (its TTL index entry, the chunks of a streamed value)."""
    suffix = key_suffix(op.key)
    old = txn.replace(prefix + suffix, encode_record(rep.seq, op.expire_at, op.key, value), db=t.data)
    if op.expire_at:
        txn.put(expiry_key(op.expire_at, rep.slot, suffix), b"", db=t.expiry)
    if old is None:
        return [False, 0]
    old_version, old_exp = decode_record_header(old)
    if old_exp and old_exp != op.expire_at:  # (the same expiry's entry was just written again)
        txn.delete(expiry_key(old_exp, rep.slot, suffix), db=t.expiry)
    chunks.drop_record_chunks(txn, t, rep.slot, old)
    live = old_exp == 0 or old_exp > rep.now
    return [live, old_version if live else 0]
