"""broker/read_cache.py on its own: what it admits, what a write or a clear voids, and that its
size is exactly what it holds, within its budget."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from broker.read_cache import ENTRY_OVERHEAD, MAX_CACHED_VALUE, NOT_FILLABLE, ReadCache
from protocol.replication import OP_PUT, WriteOp


def held(c: ReadCache) -> int:
    return sum(len(k) + len(v) + ENTRY_OVERHEAD for k, (_, v, _) in c.entries.items())


def test_a_read_sent_before_a_write_of_its_slot_fills_nothing() -> None:
    c = ReadCache(1 << 20)
    g = c.generation(pending=False)
    c.written(1, [WriteOp(OP_PUT, b"other")])
    c.fill(1, g, [(b"k", 1, b"v", 0)])
    assert not c.entries
    c.fill(2, g, [(b"k2", 1, b"v", 0)])  # another slot's write does not matter
    assert list(c.entries) == [b"k2"]


def test_a_write_drops_its_keys_and_a_clear_voids_reads_in_flight() -> None:
    c = ReadCache(1 << 20)
    c.fill(1, c.generation(pending=False), [(b"a", 1, b"v", 0), (b"b", 1, b"w", 0)])
    c.written(1, [WriteOp(OP_PUT, b"a")])
    assert list(c.entries) == [b"b"]
    g = c.generation(pending=False)
    c.clear()
    c.fill(3, g, [(b"c", 1, b"v", 0)])
    assert not c.entries and c.size == 0
    c.fill(3, c.generation(pending=False), [(b"c", 1, b"v", 0)])
    assert list(c.entries) == [b"c"]


def test_pending_writes_no_budget_large_values_and_expiry() -> None:
    c = ReadCache(1 << 20)
    assert c.generation(pending=True) == NOT_FILLABLE
    assert ReadCache(0).generation(pending=False) == NOT_FILLABLE
    c.fill(1, c.generation(pending=False), [(b"big", 1, b"x" * (MAX_CACHED_VALUE + 1), 0), (b"t", 2, b"v", 1000)])
    assert list(c.entries) == [b"t"]
    assert c.lookup(b"t", 999) == (2, b"v", 1000)
    assert c.lookup(b"t", 1000) is None and not c.entries and c.size == 0


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["fill", "write", "lookup", "clear"]),
                          st.integers(0, 3), st.integers(0, 30), st.integers(0, 3000)), max_size=80))
def test_size_is_what_it_holds_and_never_over_budget(steps: list[tuple[str, int, int, int]]) -> None:
    c = ReadCache(20_000)
    for op, slot, k, n in steps:
        key = b"k%d-%d" % (slot, k)
        if op == "fill":
            c.fill(slot, c.generation(pending=False), [(key, n, b"v" * n, 0), (key + b"x", n, b"w" * (n // 2), 0)])
        elif op == "write":
            c.written(slot, [WriteOp(OP_PUT, key)])
            assert key not in c.entries
        elif op == "lookup":
            c.lookup(key, 0)
        else:
            c.clear()
        assert c.size == held(c) <= c.budget
