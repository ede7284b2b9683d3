"""The worker's write path on a real LMDB without any network: what a batch of writes leaves in
the record, TTL-index and exactly-once tables, checked against a model and against the same
store with its shortcuts turned off."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

import lmdb
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.replication import COND_ABSENT, COND_NONE, OP_DELETE, OP_EXPIRE, OP_PUT, Origin, Replicate, WriteOp
from worker import dedup
from worker.records import EXPIRY_KEY, SLOT_PREFIX, decode_record_header
from worker.store import SlotStore

pytestmark = pytest.mark.timeout(120)

SLOT = 3
KEYS = [b"a", b"b", b"c"]
TTLS = [0, 1_500, 2_500]


@contextmanager
def fresh_store() -> Iterator[SlotStore]:
    with tempfile.TemporaryDirectory() as path:
        store = SlotStore(path, map_size=1 << 24, sync=False)
        try:
            yield store
        finally:
            store.close()


def entries(store: SlotStore, db: lmdb._Database) -> list[tuple[bytes, bytes]]:
    with store.env.begin() as txn:
        return [(bytes(k), bytes(v)) for k, v in txn.cursor(db=db)]


def expiry_matches_records(store: SlotStore) -> bool:
    """The TTL index holds exactly one entry per record with an expiry, under that expiry."""
    want = set()
    for key, record in entries(store, store.data):
        _version, expire_at = decode_record_header(record)
        if expire_at:
            want.add(EXPIRY_KEY.pack(expire_at, SLOT_PREFIX.unpack_from(key)[0]) + key[SLOT_PREFIX.size:])
    return {k for k, _ in entries(store, store.expiry)} == want


# (op, key, expire_at, condition, broker clock step)
write_ops = st.tuples(
    st.sampled_from([OP_PUT, OP_PUT, OP_DELETE, OP_EXPIRE]),
    st.sampled_from(KEYS),
    st.sampled_from(TTLS),
    st.sampled_from([COND_NONE, COND_NONE, COND_ABSENT]),
    st.integers(0, 600),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(write_ops, min_size=1, max_size=40))
def test_writes_answer_as_the_model_and_keep_the_ttl_index_exact(history: list) -> None:
    """PUT (unconditional: one look-up; or if absent), DELETE and EXPIRE over keys with and
    without TTLs: every answer is the model's, every key reads as the model says, and the TTL
    index never keeps an entry of a replaced expiry nor misses one."""
    with fresh_store() as store:
        model: dict[bytes, tuple[int, int]] = {}  # key -> (version, expire_at), expired ones kept
        now = 1_000
        for seq, (op, key, expire_at, cond, step) in enumerate(history, start=1):
            now += step
            if op != OP_PUT:
                cond = COND_NONE
            old = model.get(key)
            live = old is not None and (old[1] == 0 or old[1] > now)
            held = not live if cond == COND_ABSENT else True
            want = [held if cond != COND_NONE else live, old[0] if live else 0]
            if op == OP_PUT and held:
                model[key] = (seq, expire_at)
            elif op == OP_DELETE:
                model.pop(key, None)
            elif op == OP_EXPIRE and live:
                model[key] = (seq, expire_at)

            rep = Replicate(SLOT, 1, seq, 1 if seq > 1 else 0, 0, now,
                            [WriteOp(op, key, expire_at, cond)], [b"v%d" % seq if op == OP_PUT else b""])
            results = store.apply_batch([rep])
            if rep.ops[0].needs_result:
                assert results[0][2][0] == want, (seq, op, key)
            else:  # an unconditional PUT's answer is not sent: what it leaves is checked below
                assert results == []
            assert expiry_matches_records(store)
            for k in KEYS:
                r = store.read([(SLOT, k)], now=now)[0]
                entry = model.get(k)
                alive = entry is not None and (entry[1] == 0 or entry[1] > now)
                assert r.found == alive and (not alive or (r.version, r.expire_at) == entry), k


# (slot, broker clock step (it can go back across a failover), requests, whether the batch fails)
dedup_steps = st.tuples(
    st.sampled_from([1, 2]),
    st.integers(-150_000, 90_000),
    st.integers(1, 5),
    st.booleans(),
)


@settings(max_examples=100, deadline=None)
@given(st.lists(dedup_steps, min_size=1, max_size=30), st.randoms(use_true_random=False))
def test_forgetting_with_the_floor_leaves_the_tables_of_a_full_walk(steps: list, rng) -> None:
    """``Tables.dedup_floor`` only skips walks that would delete nothing: a store that uses it and
    one that walks the age index on every batch end with the same exactly-once tables and answers,
    whatever the broker clock does and when batches fail half way (their transaction aborted)."""
    with pytest.MonkeyPatch.context() as mp, fresh_store() as fast, fresh_store() as full:
        mp.setattr(dedup, "FORGET_PER_BATCH", 2)  # so that a walk often stops before the horizon
        now, seq, rid = 200_000, 0, 0
        for slot, step, requests, fails in steps:
            now = max(0, now + step)
            batch = []
            for _ in range(requests):
                seq += 1
                rid += 1
                retry = rng.random() < 0.3 and rid > 1
                origin = Origin(b"client-%d" % rng.randrange(2), rng.randrange(1, rid) if retry else rid, retry)
                batch.append(Replicate(slot, 1, seq, 1, 0, now, [WriteOp(OP_PUT, b"k%d" % seq)], [b"v"], origin))
            if fails:  # a write that raises after the others were applied: zip(strict) refuses it
                seq += 1
                batch.append(Replicate(slot, 1, seq, 1, 0, now, [WriteOp(OP_PUT, b"bad")], []))
            apply_both(fast, full, batch, fails)


def apply_both(fast: SlotStore, full: SlotStore, batch: list[Replicate], fails: bool = False) -> None:
    """Apply ``batch`` to a store that uses the floor and to one made to walk the age index on
    every batch, and check that both answer the same and hold the same exactly-once tables."""
    answers = []
    for store in (fast, full):
        if store is full:
            store.tables.dedup_floor.clear()
        try:
            answers.append(store.apply_batch(batch))
        except ValueError:
            assert fails
            answers.append(None)
    assert answers[0] == answers[1]
    for db in ("dedup", "dedup_age"):
        assert entries(fast, getattr(fast.tables, db)) == entries(full, getattr(full.tables, db)), db


def request(seq: int, now: int, rid: int, slot: int = 1) -> Replicate:
    return Replicate(slot, 1, seq, 1, 0, now, [WriteOp(OP_PUT, b"k%d" % seq)], [b"v"], Origin(b"c", rid, False))


def test_a_failed_batch_leaves_no_floor_behind() -> None:
    """The failed batch forgot the oldest request and saw the next one's age as the floor; its
    transaction is aborted, the oldest request is back, and the next batch must forget it again."""
    with fresh_store() as fast, fresh_store() as full:
        apply_both(fast, full, [request(1, 0, 1)])
        apply_both(fast, full, [request(2, 100_000, 2)])
        bad = Replicate(1, 1, 4, 1, 0, 130_000, [WriteOp(OP_PUT, b"bad")], [])
        apply_both(fast, full, [request(3, 130_000, 3), bad], fails=True)
        assert len(entries(fast, fast.tables.dedup)) == 2  # the failed batch changed nothing
        apply_both(fast, full, [request(3, 130_000, 3)])
        assert len(entries(fast, fast.tables.dedup)) == 2  # the request at 0 forgotten, 3 remembered


def test_a_request_remembered_after_the_clock_went_back_lowers_the_floor() -> None:
    """A new broker's clock can be behind the old one's: a request remembered at an earlier time
    than the slot's oldest entry becomes the oldest, and is forgotten when its time comes."""
    with fresh_store() as fast, fresh_store() as full:
        apply_both(fast, full, [request(1, 200_000, 1)])  # the floor: 200,000
        apply_both(fast, full, [request(2, 100_000, 2)])  # behind it
        apply_both(fast, full, [request(3, 230_000, 3)])  # horizon 110,000: request 2 is forgotten
        assert len(entries(fast, fast.tables.dedup)) == 2


def claim_in_two_calls(txn: lmdb.Transaction, t, rep: Replicate):  # noqa: ANN001, ANN201
    """What ``dedup.claim`` stands for: the look-up, then (if the origin is new) the record."""
    before = dedup.earlier(txn, t, rep.slot, rep.origin)
    if before is None:
        dedup.remember(txn, t, rep, None)
    return before


# (slot, op, whether the request is a retry of an earlier one, broker clock step)
claim_steps = st.tuples(
    st.sampled_from([1, 2]),
    st.sampled_from([OP_PUT, OP_PUT, OP_DELETE]),
    st.booleans(),
    st.integers(0, 40_000),
)


@settings(max_examples=100, deadline=None)
@given(st.lists(claim_steps, min_size=1, max_size=30), st.randoms(use_true_random=False))
def test_claiming_an_origin_in_one_call_is_the_look_up_then_the_record(steps: list, rng) -> None:
    """A batch whose answer needs nothing the replica finds (an unconditional PUT) looks its
    origin up and records it in one LMDB call; a store that does both in two calls (as batches of
    deletes still do) ends with the same records, exactly-once tables and answers, retries (in the
    same transaction and in later ones) and deletes mixed in."""
    with pytest.MonkeyPatch.context() as mp, fresh_store() as one_call, fresh_store() as two_calls:
        seqs: dict[int, int] = {}
        now, rid = 100_000, 0
        for slot, op, retry, step in steps:
            now += step
            batch = []
            for _ in range(rng.randrange(1, 4)):
                rid += 1
                seqs[slot] = seqs.get(slot, 0) + 1
                again = retry and rid > 1 and rng.random() < 0.7
                origin = Origin(b"client", rng.randrange(1, rid) if again else rid, True)
                batch.append(Replicate(slot, 1, seqs[slot], 1, 0, now, [WriteOp(op, b"k%d" % rng.randrange(3))],
                                       [b"v%d" % rid if op == OP_PUT else b""], origin))
            answers = [one_call.apply_batch(batch)]
            mp.setattr(dedup, "claim", claim_in_two_calls)
            answers.append(two_calls.apply_batch(batch))
            mp.undo()
            assert answers[0] == answers[1]
        for db in ("data", "dedup", "dedup_age"):
            assert entries(one_call, getattr(one_call.tables, db)) == entries(two_calls, getattr(two_calls.tables, db))
        assert entries(one_call, one_call.tables.dedup), "no origin was recorded"
