"""The worker's LMDB engine: records per slot, applied positions, the expiry index, and the
chunks of streamed values.

Everything one replication batch changes (records, expiry index, chunks, the slot positions) is
written in one LMDB write transaction, and the transaction's commit is the fsync: a position on
disk always describes exactly the data on disk.

A streamed value is stored as chunks in ``blobs`` under ``slot + stream id + index``; while its
stream is open the stream id is listed in ``staged``; its commit writes the key's record with the
stream's manifest in place of the value (the chunks stay where they are). Replacing, deleting or
expiring the key frees the chunks; aborting a stream frees its staged chunks.
"""

from __future__ import annotations

import heapq
import os
import struct
import uuid
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from typing import Any

import lmdb

from protocol.limits import STREAM_ID_BYTES, STREAM_INCOMPLETE
from protocol.replication import (
    CHUNK_INDEX,
    COND_ABSENT,
    COND_NONE,
    COND_VERSION,
    OP_ABORT_STREAM,
    OP_CHUNK,
    OP_DELETE,
    OP_EXPIRE,
    OP_PUT_STREAM,
    OP_REAP,
    Manifest,
    Replicate,
    WriteOp,
)
from worker.records import (
    KEY_INLINE_MAX,
    RECORD_HEADER,
    RECORD_STREAMED,
    decode_record,
    decode_record_header,
    encode_record,
    key_suffix,
    storage_key,
)

POSITION = struct.Struct(">QQ")  # epoch, seq
EXPIRY_KEY = struct.Struct(">QH")  # expire_at, slot (then the user key)
SLOT_PREFIX = struct.Struct(">H")

# Snapshot entries are (tag + key within the slot, value): records, stored chunks, open streams.
SNAP_RECORD, SNAP_CHUNK, SNAP_STAGED = b"d", b"b", b"s"


@dataclass(slots=True, frozen=True)
class Position:
    epoch: int = 0
    seq: int = 0


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
    applied: dict[int, int]  # slot -> applied seq of the state that was read


@dataclass(slots=True)
class ExpiredKey:
    slot: int
    key: bytes
    version: int
    expire_at: int
    index_key: bytes = b""  # its entry in the expiry index (where the next walk continues)


@dataclass(slots=True)
class ReadResult:
    found: bool
    version: int  # record version if found, else the slot's applied seq
    expire_at: int
    value: bytes  # the value, or the encoded Manifest when ``streamed``
    streamed: bool = False


def _is_streamed(record: bytes) -> bool:
    return bool(RECORD_HEADER.unpack_from(record)[2] & RECORD_STREAMED)


class SlotStore:
    """Records of every slot a worker holds, in one LMDB environment."""

    def __init__(self, path: str, map_size: int = 1 << 36, sync: bool = True) -> None:
        os.makedirs(path, exist_ok=True)
        self.path = path
        self.env = lmdb.open(
            path, map_size=map_size, max_dbs=8, sync=sync, metasync=sync, writemap=False
        )
        self.data = self.env.open_db(b"data")
        self.meta = self.env.open_db(b"meta")
        self.expiry = self.env.open_db(b"expiry")
        self.blobs = self.env.open_db(b"blobs")  # slot + stream id + chunk index -> chunk
        self.staged = self.env.open_db(b"staged")  # slot + stream id of streams not yet committed
        self.positions: dict[int, Position] = {}
        with self.env.begin(write=True) as txn:
            # A snapshot install cut short (a crash between its parts): its slot is half written
            # and has no position. Empty it; the broker sees the slot as empty and repairs it.
            cur = txn.cursor(db=self.meta)
            half = []
            if cur.set_range(b"i"):
                for k, _ in cur:
                    if not k.startswith(b"i"):
                        break
                    half.append(SLOT_PREFIX.unpack(k[1:3])[0])
            for slot in half:
                self._delete_slot(txn, slot)
                txn.delete(b"i" + SLOT_PREFIX.pack(slot), db=self.meta)
                txn.delete(b"p" + SLOT_PREFIX.pack(slot), db=self.meta)
            data_id = txn.get(b"uuid", db=self.meta)
            if data_id is None:
                data_id = uuid.uuid4().bytes
                txn.put(b"uuid", data_id, db=self.meta)
            self.data_id: bytes = data_id
            cur = txn.cursor(db=self.meta)
            if cur.set_range(b"p"):
                for k, v in cur:
                    if not k.startswith(b"p"):
                        break
                    (slot,) = SLOT_PREFIX.unpack(k[1:3])
                    self.positions[slot] = Position(*POSITION.unpack(v))

    def close(self) -> None:
        self.env.sync(True)
        self.env.close()

    def position(self, slot: int) -> Position:
        return self.positions.get(slot, Position())

    # -- writes ---------------------------------------------------------------------------------

    def apply_batch(self, batch: list[Replicate]) -> list[tuple[int, int, list[list[Any]]]]:
        """Apply sequenced writes in one transaction (one fsync). The caller has checked order.

        Returns, for batches whose answer depends on what the replica found (deletes, TTL changes,
        conditional writes), ``(slot, seq, [[flag, version before], ...])`` with one entry per op:
        flag is "the key existed" for a plain delete or expire, "the condition held" for a
        conditional op. Every replica computes the same answers: they apply the same history and
        judge expiry by the broker's clock carried in the batch.
        """
        results: list[tuple[int, int, list[list[Any]]]] = []
        new_positions: dict[int, Position] = {}
        with self.env.begin(write=True) as txn:
            for rep in batch:
                found: list[list[Any]] = []
                for op, value in zip(rep.ops, rep.values, strict=True):
                    found.append(self._apply_op(txn, rep, op, value))
                if any(op.needs_result for op in rep.ops):
                    results.append((rep.slot, rep.seq, found))
                pos = Position(rep.epoch, rep.seq)
                new_positions[rep.slot] = pos
                txn.put(b"p" + SLOT_PREFIX.pack(rep.slot), POSITION.pack(pos.epoch, pos.seq), db=self.meta)
        self.positions.update(new_positions)
        return results

    def _apply_op(self, txn: lmdb.Transaction, rep: Replicate, op: WriteOp, value: bytes) -> list[Any]:
        prefix = SLOT_PREFIX.pack(rep.slot)
        if op.op == OP_CHUNK:
            stream = op.key[:STREAM_ID_BYTES]
            if txn.get(prefix + stream, db=self.staged) is None and self._has_chunks(txn, rep.slot, stream):
                # Chunks and no open stream: the stream was committed (its id is public in every
                # get answer). Writing into it would change a committed value behind its version.
                return [False, 0]
            txn.put(prefix + op.key, value, db=self.blobs)
            txn.put(prefix + stream, b"", db=self.staged)
            return [True, 0]
        if op.op == OP_ABORT_STREAM:
            return [self._drop_staged(txn, rep.slot, op.key), 0]
        if op.op == OP_REAP:
            return self._apply_reap(txn, rep, op)
        suffix = key_suffix(op.key)
        sk = prefix + suffix
        old = txn.get(sk, db=self.data)
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
            if not self._stream_complete(txn, rep.slot, manifest):
                self._drop_staged(txn, rep.slot, manifest.stream)
                return [STREAM_INCOMPLETE, answer[1]]
            if not held:
                self._drop_staged(txn, rep.slot, manifest.stream)
                return answer
            txn.delete(prefix + manifest.stream, db=self.staged)
        if not held or (op.op == OP_EXPIRE and not live):
            return answer
        if old is not None and old_exp:
            txn.delete(EXPIRY_KEY.pack(old_exp, rep.slot) + suffix, db=self.expiry)
        streamed = op.op == OP_PUT_STREAM
        if op.op == OP_EXPIRE:
            assert old is not None
            kept = decode_record(old)
            value, streamed = kept.value, kept.streamed
        elif old is not None and _is_streamed(old):
            self._drop_chunks(txn, rep.slot, Manifest.decode(decode_record(old).value).stream)
        if op.op == OP_DELETE:
            if old is not None:
                txn.delete(sk, db=self.data)
            return answer
        txn.put(sk, encode_record(rep.seq, op.expire_at, op.key, value, streamed), db=self.data)
        if op.expire_at:
            txn.put(EXPIRY_KEY.pack(op.expire_at, rep.slot) + suffix, b"", db=self.expiry)
        return answer

    def _stream_complete(self, txn: lmdb.Transaction, slot: int, m: Manifest) -> bool:
        """Does the slot hold exactly chunks 0..chunks-1 of this open stream, of ``size`` bytes?"""
        start = SLOT_PREFIX.pack(slot) + m.stream
        if m.chunks < 1 or txn.get(start, db=self.staged) is None:
            return False
        count = size = 0
        cur = txn.cursor(db=self.blobs)
        if cur.set_range(start):
            for k, v in cur:
                if not k.startswith(start):
                    break
                if CHUNK_INDEX.unpack_from(k, len(start))[0] != count:
                    return False
                count += 1
                size += len(v)
        return count == m.chunks and size == m.size

    def _has_chunks(self, txn: lmdb.Transaction, slot: int, stream: bytes) -> bool:
        start = SLOT_PREFIX.pack(slot) + stream
        cur = txn.cursor(db=self.blobs)
        return cur.set_range(start) and bytes(cur.key()).startswith(start)

    def _drop_staged(self, txn: lmdb.Transaction, slot: int, stream: bytes) -> bool:
        """Free the chunks of a stream that was never committed (a committed one is left alone)."""
        if not txn.delete(SLOT_PREFIX.pack(slot) + stream, db=self.staged):
            return False
        self._drop_chunks(txn, slot, stream)
        return True

    def _drop_chunks(self, txn: lmdb.Transaction, slot: int, stream: bytes) -> None:
        start = SLOT_PREFIX.pack(slot) + stream
        cur = txn.cursor(db=self.blobs)
        if cur.set_range(start):
            while cur.key().startswith(start):
                if not cur.delete():
                    break

    def begin_snapshot_install(self, slot: int) -> None:
        """Empty a slot that a snapshot is about to replace. Until finish_snapshot_install, the
        slot has no position and is marked half written (emptied again if the worker restarts)."""
        prefix = SLOT_PREFIX.pack(slot)
        with self.env.begin(write=True) as txn:
            self._delete_slot(txn, slot)
            txn.delete(b"p" + prefix, db=self.meta)
            txn.put(b"i" + prefix, b"", db=self.meta)
        self.positions.pop(slot, None)

    def install_snapshot_part(self, slot: int, entries: list[tuple[bytes, bytes]]) -> None:
        """Write one part of a snapshot (tagged entries, as ``snapshot`` yields them)."""
        prefix = SLOT_PREFIX.pack(slot)
        with self.env.begin(write=True) as txn:
            for tagged, value in entries:
                tag, key = tagged[:1], tagged[1:]
                if tag == SNAP_RECORD:
                    txn.put(prefix + key, value, db=self.data)
                    _, exp = decode_record_header(value)
                    if exp:
                        txn.put(EXPIRY_KEY.pack(exp, slot) + key, b"", db=self.expiry)
                elif tag == SNAP_CHUNK:
                    txn.put(prefix + key, value, db=self.blobs)
                elif tag == SNAP_STAGED:
                    txn.put(prefix + key, value, db=self.staged)
                else:
                    raise ValueError(f"unknown snapshot entry tag {tag!r}")

    def finish_snapshot_install(self, slot: int, pos: Position) -> None:
        prefix = SLOT_PREFIX.pack(slot)
        with self.env.begin(write=True) as txn:
            txn.put(b"p" + prefix, POSITION.pack(pos.epoch, pos.seq), db=self.meta)
            txn.delete(b"i" + prefix, db=self.meta)
        self.positions[slot] = pos

    def install_snapshot(self, slot: int, pos: Position, entries: list[tuple[bytes, bytes]]) -> None:
        """Replace a slot's content with a whole snapshot taken at ``pos``."""
        self.begin_snapshot_install(slot)
        self.install_snapshot_part(slot, entries)
        self.finish_snapshot_install(slot, pos)

    def drop_slot(self, slot: int) -> None:
        """Forget a slot this worker no longer holds: its records and its position."""
        with self.env.begin(write=True) as txn:
            self._delete_slot(txn, slot)
            txn.delete(b"p" + SLOT_PREFIX.pack(slot), db=self.meta)
            txn.delete(b"i" + SLOT_PREFIX.pack(slot), db=self.meta)
        self.positions.pop(slot, None)

    @property
    def cluster_id(self) -> bytes:
        with self.env.begin() as txn:
            return bytes(txn.get(b"cluster", b"", db=self.meta))

    def set_cluster_id(self, cluster_id: bytes) -> None:
        with self.env.begin(write=True) as txn:
            txn.put(b"cluster", cluster_id, db=self.meta)

    def _delete_slot(self, txn: lmdb.Transaction, slot: int) -> None:
        prefix = SLOT_PREFIX.pack(slot)
        for db in (self.blobs, self.staged):
            cur = txn.cursor(db=db)
            if cur.set_range(prefix):
                while cur.key().startswith(prefix):
                    if not cur.delete():
                        break
        cur = txn.cursor(db=self.data)
        if cur.set_range(prefix):
            while cur.key().startswith(prefix):
                record = cur.value()
                _, exp = decode_record_header(record)
                if exp:
                    txn.delete(EXPIRY_KEY.pack(exp, slot) + cur.key()[2:], db=self.expiry)
                if not cur.delete():
                    break

    def reclaim_expired(self, broker_now: int, limit: int = 10_000) -> int:
        """Delete records whose TTL ran out by the broker's clock. Positions do not change: an
        expired record is already invisible to every read, this only frees its space."""
        removed = 0
        with self.env.begin(write=True) as txn:
            cur = txn.cursor(db=self.expiry)
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
                rec = txn.get(sk, db=self.data)
                if rec is not None and decode_record_header(rec)[1] == exp:
                    if _is_streamed(rec):
                        self._drop_chunks(txn, slot, Manifest.decode(decode_record(rec).value).stream)
                    txn.delete(sk, db=self.data)
                    removed += 1
                if not cur.delete():
                    break
        return removed

    # -- reads ----------------------------------------------------------------------------------

    def read(
        self, slots_keys: list[tuple[int, bytes]], now: int, with_values: bool = True
    ) -> list[ReadResult]:
        out: list[ReadResult] = []
        with self.env.begin(buffers=False) as txn:
            for slot, key in slots_keys:
                rec = txn.get(storage_key(slot, key), db=self.data)
                if rec is not None:
                    r = decode_record(rec)
                    if r.expire_at == 0 or r.expire_at > now:
                        value = r.value if with_values or r.streamed else b""
                        out.append(ReadResult(True, r.version, r.expire_at, value, r.streamed))
                        continue
                out.append(ReadResult(False, self.position(slot).seq, 0, b""))
        return out

    def read_chunks(self, slot: int, stream: bytes, first: int, count: int) -> list[bytes]:
        """Chunks ``first..first+count-1`` of a stored stream; fewer (or none) past its end or
        if the stream is gone (the key was replaced or deleted)."""
        out: list[bytes] = []
        prefix = SLOT_PREFIX.pack(slot) + stream
        with self.env.begin() as txn:
            for i in range(first, first + count):
                chunk = txn.get(prefix + CHUNK_INDEX.pack(i), db=self.blobs)
                if chunk is None:
                    break
                out.append(chunk)
        return out

    def snapshot(self, slot: int) -> tuple[Position, tuple[int, int], Generator[tuple[bytes, bytes], None, None]]:
        """A consistent snapshot of one slot: its position, (keys, bytes) in it, and its tagged
        entries (SNAP_RECORD + storage key suffix, record; SNAP_CHUNK + stream id + index, chunk;
        SNAP_STAGED + stream id, b""). The read transaction stays open until the generator is
        exhausted or closed."""
        txn = self.env.begin(buffers=True)
        raw = txn.get(b"p" + SLOT_PREFIX.pack(slot), db=self.meta)
        pos = Position(*POSITION.unpack(raw)) if raw else Position()
        prefix = SLOT_PREFIX.pack(slot)
        sources = ((SNAP_RECORD, self.data), (SNAP_CHUNK, self.blobs), (SNAP_STAGED, self.staged))
        keys = size = 0
        for _, db in sources:
            cur = txn.cursor(db=db)
            if cur.set_range(prefix):
                for k, v in cur:
                    if bytes(k[:2]) != prefix:
                        break
                    keys += db == self.data
                    size += len(k) - 2 + len(v)

        def entries() -> Generator[tuple[bytes, bytes], None, None]:
            try:
                for tag, db in sources:
                    cur = txn.cursor(db=db)
                    if cur.set_range(prefix):
                        for k, v in cur:
                            if bytes(k[:2]) != prefix:
                                break
                            yield tag + bytes(k[2:]), bytes(v)
            finally:
                txn.abort()

        return pos, (keys, size), entries()

    def stats(self) -> dict[str, int]:
        with self.env.begin() as txn:
            keys = txn.stat(self.data)["entries"]
        info = self.env.info()
        disk = 0
        for name in ("data.mdb",):
            try:
                disk += os.stat(os.path.join(self.path, name)).st_blocks * 512
            except OSError:
                pass
        return {"keys": keys, "disk_bytes": disk, "map_used": info["last_pgno"] * self.env.stat()["psize"]}

    # -- scan -----------------------------------------------------------------------------------

    def scan(self, slots: list[int], prefix: bytes, start_after: bytes | None, limit: int, now: int,
             with_values: bool, max_bytes: int) -> ScanResult:
        """Live entries (not expired at ``now``) of ``slots`` whose key starts with ``prefix`` and
        is above ``start_after``, in key order: at most ``limit``, and values of at most
        ``max_bytes`` together with the keys (at least one entry). One read transaction: the entries and the
        applied positions describe the same state."""
        entries: list[ScanEntry] = []
        complete = True
        with self.env.begin(buffers=False) as txn:
            applied = {}
            for s in slots:
                raw = txn.get(b"p" + SLOT_PREFIX.pack(s), db=self.meta)
                applied[s] = POSITION.unpack(raw)[1] if raw else 0
            merged = heapq.merge(*(self._scan_slot(txn, s, prefix, start_after, now, with_values) for s in slots),
                                 key=lambda e: e.key)
            size = 0
            for e in merged:
                if len(entries) >= limit or (entries and size + len(e.key) + len(e.value) > max_bytes):
                    complete = False
                    break
                entries.append(e)
                size += len(e.key) + len(e.value)
        return ScanResult(entries, complete, applied)

    def _scan_slot(self, txn: lmdb.Transaction, slot: int, prefix: bytes, start_after: bytes | None,
                   now: int, with_values: bool) -> Iterator[ScanEntry]:
        """One slot's matching entries in key order. Storage order is key order except among long
        keys sharing their first KEY_INLINE_MAX bytes (ordered by digest there); such keys are
        adjacent in storage, so each such run is sorted before it is yielded."""
        sp = SLOT_PREFIX.pack(slot)
        stem = prefix[:KEY_INLINE_MAX]
        # Every key above start_after or under prefix is stored at or after its first 400 bytes.
        lo = max(stem, (start_after or b"")[:KEY_INLINE_MAX])
        cur = txn.cursor(db=self.data)
        if not cur.set_range(sp + lo):
            return
        run: list[ScanEntry] = []  # long keys with one stem, waiting to be sorted
        run_stem = b""
        lead = sp + stem
        for k, v in cur:
            if not k.startswith(lead):
                break
            suffix = k[2:]
            version, expire_at, klen = RECORD_HEADER.unpack_from(v)
            streamed = bool(klen & RECORD_STREAMED)
            klen &= ~RECORD_STREAMED
            key = v[RECORD_HEADER.size:RECORD_HEADER.size + klen] if klen else suffix
            if not key.startswith(prefix) or (start_after is not None and key <= start_after) \
                    or (expire_at and expire_at <= now):
                continue
            e = ScanEntry(key, version, expire_at, v[RECORD_HEADER.size + klen:] if with_values else b"", streamed)
            if klen:
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

    # -- expiry through the log -----------------------------------------------------------------

    def expired_keys(self, broker_now: int, limit: int = 1000, after: bytes | None = None,
                     slots: set[int] | None = None) -> list[ExpiredKey]:
        """Records whose TTL ran out by the broker's clock, oldest expiry first (after the expiry
        index entry ``after``, of the given ``slots`` only). The broker sequences their deletion
        (OP_REAP), so every replica removes them in the same order and a watch sees the expiry.
        Each key's ``index_key`` lets the next call continue after it."""
        out: list[ExpiredKey] = []
        with self.env.begin(buffers=False) as txn:
            cur = txn.cursor(db=self.expiry)
            if not (cur.set_range(after + b"\x00") if after is not None else cur.first()):
                return out
            for ek, _ in cur:
                exp, slot = EXPIRY_KEY.unpack_from(ek)
                if exp > broker_now or len(out) >= limit:
                    break
                if slots is not None and slot not in slots:
                    continue
                rec = txn.get(SLOT_PREFIX.pack(slot) + ek[EXPIRY_KEY.size:], db=self.data)
                if rec is None:
                    continue
                r = decode_record(rec)
                if r.expire_at == exp:
                    out.append(ExpiredKey(slot, r.long_key or bytes(ek[EXPIRY_KEY.size:]), r.version, exp, bytes(ek)))
        return out

    def _apply_reap(self, txn: lmdb.Transaction, rep: Replicate, op: WriteOp) -> list[Any]:
        """Delete a key whose TTL ran out, if nothing rewrote it since it was reported: its version
        is still ``op.expected`` and its expire_at ``op.expire_at``, which is past by the broker's
        clock in the batch. Answer: [deleted, version before]."""
        suffix = key_suffix(op.key)
        sk = SLOT_PREFIX.pack(rep.slot) + suffix
        old = txn.get(sk, db=self.data)
        if old is None:
            return [False, 0]
        version, exp = decode_record_header(old)
        if version != op.expected or exp != op.expire_at or not exp or exp > rep.now:
            return [False, version]
        if _is_streamed(old):
            self._drop_chunks(txn, rep.slot, Manifest.decode(decode_record(old).value).stream)
        txn.delete(sk, db=self.data)
        txn.delete(EXPIRY_KEY.pack(exp, rep.slot) + suffix, db=self.expiry)
        return [True, version]
