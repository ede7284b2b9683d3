"""Reads of committed records, inside a caller's read transaction: point reads and prefix scans.
Expiry is judged by the ``now`` the broker sent with the request."""

from __future__ import annotations

import heapq
from collections.abc import Iterator
from dataclasses import dataclass

import lmdb

from worker.records import (
    KEY_INLINE_MAX,
    META_POSITION,
    NOTHING_APPLIED,
    SLOT_PREFIX,
    Position,
    decode_position,
    decode_record,
    meta_key,
    storage_key,
)
from worker.tables import Tables


@dataclass(slots=True)
class ReadResult:
    found: bool
    version: int  # record version if found, else the slot's applied seq
    expire_at: int
    value: bytes  # the value, or the encoded Manifest when ``streamed``
    streamed: bool = False


@dataclass(slots=True)
class ScanEntry:
    key: bytes
    version: int
    expire_at: int
    value: bytes  # b"" when the scan asked for keys only; the encoded Manifest when ``streamed``
    streamed: bool = False


@dataclass(slots=True)
class ScanResult:
    entries: list[ScanEntry]  # in key order, merged over the slots asked for
    complete: bool  # every matching entry of those slots is in ``entries``
    applied: dict[int, Position]  # slot -> applied position of the state that was read


def read(txn: lmdb.Transaction, t: Tables, slots_keys: list[tuple[int, bytes]], now: int, with_values: bool,
         positions: dict[int, Position]) -> list[ReadResult]:
    """A miss reports the slot's applied seq (from ``positions``) as its version."""
    out: list[ReadResult] = []
    for slot, key in slots_keys:
        rec = txn.get(storage_key(slot, key), db=t.data)
        if rec is not None:
            r = decode_record(rec)
            if r.expire_at == 0 or r.expire_at > now:
                value = r.value if with_values or r.streamed else b""
                out.append(ReadResult(True, r.version, r.expire_at, value, r.streamed))
                continue
        out.append(ReadResult(False, positions.get(slot, NOTHING_APPLIED).seq, 0, b""))
    return out


def scan(txn: lmdb.Transaction, t: Tables, slots: list[int], prefix: bytes, start_after: bytes | None,
         limit: int, now: int, with_values: bool, max_bytes: int) -> ScanResult:
    """Live entries (not expired at ``now``) of ``slots`` whose key starts with ``prefix`` and
    is above ``start_after``, in key order: at most ``limit``, and values of at most
    ``max_bytes`` together with the keys (at least one entry). One read transaction: the entries
    and the applied positions describe the same state."""
    entries: list[ScanEntry] = []
    complete = True
    applied = {s: decode_position(txn.get(meta_key(META_POSITION, s), db=t.meta)) for s in slots}
    merged = heapq.merge(*(_scan_slot(txn, t, s, prefix, start_after, now, with_values) for s in slots),
                         key=lambda e: e.key)
    size = 0
    for e in merged:
        if len(entries) >= limit or (entries and size + len(e.key) + len(e.value) > max_bytes):
            complete = False
            break
        entries.append(e)
        size += len(e.key) + len(e.value)
    return ScanResult(entries, complete, applied)


def _scan_slot(txn: lmdb.Transaction, t: Tables, slot: int, prefix: bytes, start_after: bytes | None,
               now: int, with_values: bool) -> Iterator[ScanEntry]:
    """One slot's matching entries in key order. Storage order is key order except among long
    keys sharing their first KEY_INLINE_MAX bytes (ordered by digest there); such keys are
    adjacent in storage, so each such run is sorted before it is yielded."""
    sp = SLOT_PREFIX.pack(slot)
    stem = prefix[:KEY_INLINE_MAX]
    # Every key above start_after or under prefix is stored at or after its first 400 bytes.
    lo = max(stem, (start_after or b"")[:KEY_INLINE_MAX])
    cur = txn.cursor(db=t.data)
    if not cur.set_range(sp + lo):
        return
    run: list[ScanEntry] = []  # long keys with one stem, waiting to be sorted
    run_stem = b""
    lead = sp + stem
    for k, v in cur:
        if not k.startswith(lead):
            break
        suffix = k[SLOT_PREFIX.size:]
        rec = decode_record(v, with_value=False)  # the value is copied only for entries that match
        key = rec.long_key or suffix
        if not key.startswith(prefix) or (start_after is not None and key <= start_after) \
                or (rec.expire_at and rec.expire_at <= now):
            continue
        value = decode_record(v).value if with_values else b""
        e = ScanEntry(key, rec.version, rec.expire_at, value, rec.streamed)
        if rec.long_key:
            if run and suffix[:KEY_INLINE_MAX] != run_stem:
                run.sort(key=lambda r: r.key)
                yield from run
                run = []
            run_stem = suffix[:KEY_INLINE_MAX]
            run.append(e)
            continue
        if run:
            run.sort(key=lambda r: r.key)
            yield from run
            run = []
        yield e
    run.sort(key=lambda r: r.key)
    yield from run
