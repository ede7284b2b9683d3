"""The worker's storage of streamed values, on a real LMDB without any network: staging,
commit, abort, completeness, conditions, freeing, and snapshots that carry chunks."""

from __future__ import annotations

from pathlib import Path

import pytest

from protocol.limits import STREAM_INCOMPLETE
from protocol.replication import (
    COND_ABSENT,
    OP_ABORT_STREAM,
    OP_CHUNK,
    OP_DELETE,
    OP_EXPIRE,
    OP_PUT,
    OP_PUT_STREAM,
    Manifest,
    Replicate,
    WriteOp,
    chunk_key,
)
from worker.store import Position, SlotStore

pytestmark = pytest.mark.timeout(60)

SLOT = 7
SID = b"S" * 16


class Log:
    """Writes one slot's history, one op per batch, in order."""

    def __init__(self, store: SlotStore) -> None:
        self.store, self.seq = store, 0

    def apply(self, op: WriteOp, value: bytes = b"", now: int = 1_000) -> list:
        self.seq += 1
        rep = Replicate(SLOT, 1, self.seq, 1 if self.seq > 1 else 0, 0, now, [op], [value])
        results = self.store.apply_batch([rep])
        return results[0][2][0] if results else [True, 0]

    def chunks(self, stream: bytes, parts: list[bytes]) -> None:
        for i, part in enumerate(parts):
            self.apply(WriteOp(OP_CHUNK, chunk_key(stream, i)), part)

    def commit(self, key: bytes, stream: bytes, chunks: int, size: int, cond: int = 0, expected: int = 0,
               expire_at: int = 0) -> list:
        return self.apply(WriteOp(OP_PUT_STREAM, key, expire_at, cond, expected),
                          Manifest(stream, chunks, size).encode())


def counts(store: SlotStore) -> tuple[int, int]:
    with store.env.begin() as txn:
        return txn.stat(store.blobs)["entries"], txn.stat(store.staged)["entries"]


def read_value(store: SlotStore, key: bytes) -> bytes | None:
    r = store.read([(SLOT, key)], now=1_000)[0]
    if not r.found:
        return None
    if not r.streamed:
        return r.value
    m = Manifest.decode(r.value)
    return b"".join(store.read_chunks(SLOT, m.stream, 0, m.chunks))


@pytest.fixture
def store(tmp_path: Path) -> SlotStore:
    s = SlotStore(str(tmp_path / "w"), map_size=1 << 28)
    yield s
    s.close()


def test_staged_chunks_are_invisible_until_the_commit(store: SlotStore) -> None:
    log = Log(store)
    log.chunks(SID, [b"aa", b"bb", b"c"])
    assert read_value(store, b"k") is None and counts(store) == (3, 1)
    assert log.commit(b"k", SID, 3, 5) == [False, 0]  # committed; the key did not exist before
    assert read_value(store, b"k") == b"aabbc" and counts(store) == (3, 0)


def test_an_incomplete_stream_is_refused_and_freed(store: SlotStore) -> None:
    log = Log(store)
    log.chunks(SID, [b"aa", b"bb"])
    assert log.commit(b"k", SID, 3, 6)[0] == STREAM_INCOMPLETE  # a chunk short
    assert read_value(store, b"k") is None and counts(store) == (0, 0)
    log.chunks(SID, [b"aa", b"bb"])
    assert log.commit(b"k", SID, 2, 5)[0] == STREAM_INCOMPLETE  # wrong size
    assert counts(store) == (0, 0)
    # A hole: chunks 0 and 2 but not 1.
    log.apply(WriteOp(OP_CHUNK, chunk_key(SID, 0)), b"a")
    log.apply(WriteOp(OP_CHUNK, chunk_key(SID, 2)), b"c")
    assert log.commit(b"k", SID, 2, 2)[0] == STREAM_INCOMPLETE
    assert counts(store) == (0, 0)


def test_a_second_commit_of_the_same_stream_leaves_the_value_alone(store: SlotStore) -> None:
    log = Log(store)
    log.chunks(SID, [b"x", b"y"])
    log.commit(b"k", SID, 2, 2)
    assert log.commit(b"other", SID, 2, 2)[0] == STREAM_INCOMPLETE  # no longer open
    assert read_value(store, b"k") == b"xy" and counts(store) == (2, 0)
    assert log.apply(WriteOp(OP_ABORT_STREAM, SID)) == [True, 0]  # an abort after the commit
    assert read_value(store, b"k") == b"xy" and counts(store) == (2, 0)


def test_conditions_decide_and_a_refused_stream_is_freed(store: SlotStore) -> None:
    log = Log(store)
    log.apply(WriteOp(OP_PUT, b"k"), b"plain")
    log.chunks(SID, [b"x", b"y"])
    assert log.commit(b"k", SID, 2, 2, cond=COND_ABSENT) == [False, 1]
    assert read_value(store, b"k") == b"plain" and counts(store) == (0, 0)


def test_replace_delete_expire_and_reclaim_free_the_chunks(store: SlotStore) -> None:
    log = Log(store)
    log.chunks(SID, [b"x", b"y"])
    log.commit(b"k", SID, 2, 2)
    log.apply(WriteOp(OP_PUT, b"k"), b"small")  # replaced by an ordinary value
    assert counts(store) == (0, 0) and read_value(store, b"k") == b"small"

    other = b"T" * 16
    log.chunks(other, [b"1", b"2", b"3"])
    log.commit(b"k", other, 3, 3)
    log.apply(WriteOp(OP_DELETE, b"k"))
    assert counts(store) == (0, 0) and read_value(store, b"k") is None

    third = b"U" * 16
    log.chunks(third, [b"1", b"2"])
    log.commit(b"k", third, 2, 2)
    log.apply(WriteOp(OP_EXPIRE, b"k", expire_at=1_500))  # TTL set without touching the chunks
    r = store.read([(SLOT, b"k")], now=1_000)[0]
    assert r.streamed and r.expire_at == 1_500 and counts(store) == (2, 0)
    assert read_value(store, b"k") == b"12"
    assert store.reclaim_expired(broker_now=2_000) == 1
    assert counts(store) == (0, 0) and store.read([(SLOT, b"k")], now=2_000)[0].found is False


def test_abort_frees_a_staged_stream(store: SlotStore) -> None:
    log = Log(store)
    log.chunks(SID, [b"x", b"y"])
    assert log.apply(WriteOp(OP_ABORT_STREAM, SID)) == [True, 0]
    assert counts(store) == (0, 0)


def test_snapshots_carry_chunks_and_open_streams(store: SlotStore, tmp_path: Path) -> None:
    log = Log(store)
    log.chunks(SID, [b"ab", b"cd"])
    log.commit(b"k", SID, 2, 4)
    log.chunks(b"O" * 16, [b"open"])  # still being written
    pos, (keys, size), entries = store.snapshot(SLOT)
    entries = list(entries)
    assert keys == 1 and pos == Position(1, log.seq)
    assert size == sum(len(k) - 1 + len(v) for k, v in entries)

    receiver = SlotStore(str(tmp_path / "r"), map_size=1 << 28)
    try:
        receiver.begin_snapshot_install(SLOT)
        receiver.install_snapshot_part(SLOT, entries[:2])
        receiver.install_snapshot_part(SLOT, entries[2:])
        receiver.finish_snapshot_install(SLOT, pos)
        assert read_value(receiver, b"k") == b"abcd" and counts(receiver) == (3, 1)
        assert receiver.position(SLOT) == pos
        # The open stream can still be committed on the receiver, exactly as on the donor.
        rlog = Log(receiver)
        rlog.seq = log.seq
        assert rlog.commit(b"k2", b"O" * 16, 1, 4)[0] is False
        assert read_value(receiver, b"k2") == b"open"
    finally:
        receiver.close()


def test_a_snapshot_install_cut_short_is_emptied_on_restart(tmp_path: Path) -> None:
    path = str(tmp_path / "w")
    s = SlotStore(path, map_size=1 << 28)
    log = Log(s)
    log.chunks(SID, [b"old"])
    log.commit(b"k", SID, 1, 3)
    s.begin_snapshot_install(SLOT)
    s.install_snapshot_part(SLOT, [(b"d" + b"half", b"\x00" * 18 + b"v")])
    s.close()  # the worker dies between two parts
    s = SlotStore(path, map_size=1 << 28)
    try:
        assert SLOT not in s.positions
        assert s.read([(SLOT, b"half")], now=0)[0].found is False and counts(s) == (0, 0)
    finally:
        s.close()
