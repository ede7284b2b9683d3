"""Routing with several active brokers (client/slotmap.py): keys to their group's leader, a
multi-key request split by broker, and scan pages of several brokers merged: paging through the
merged pages gives every key once, in order, whatever each broker's page held."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from client.commands import ScanItem
from client.slotmap import SlotMap, merge_pages, merge_scans, merge_split
from protocol.replication import slot_for_key

MAP = SlotMap(slots=64, groups=4, leaders={0: "tcp://a:1", 1: "tcp://b:1", 2: "tcp://a:1"}, revision=7)


def test_keys_go_to_their_groups_leader_and_a_request_splits_by_broker() -> None:
    keys = [f"k{i}".encode() for i in range(40)]
    for k in keys:
        assert MAP.group_of(k) == slot_for_key(k, 64) % 4
        assert MAP.leader_for(k) == MAP.leaders.get(MAP.group_of(k))
    shares = MAP.split(keys)
    assert sorted(i for idx in shares.values() for i in idx) == list(range(40))  # each key once
    for broker, idx in shares.items():
        assert idx == sorted(idx) and all(MAP.leader_for(keys[i]) == broker for i in idx)
    assert None in shares  # group 3 has no leader: its keys wait for one
    assert MAP.newer_than(6) and not MAP.newer_than(7)


def test_a_map_round_trips_and_a_bad_one_is_refused() -> None:
    assert SlotMap.from_record(MAP.record()) == MAP
    for bad in ({}, {"slots": 64, "groups": 0, "revision": 1}, {"slots": 4, "groups": 8, "revision": 1},
                {"slots": 64, "groups": 4, "revision": 1, "leaders": {"9": "tcp://x:1"}},
                {"slots": "x", "groups": 4, "revision": 1}):
        with pytest.raises(ValueError):
            SlotMap.from_record(bad)


def broker_page(keys: list[bytes], after: bytes | None, limit: int, cap: int) -> tuple[list[ScanItem], bool]:
    """One broker's scan page: its keys after ``after``, at most ``limit``, cut short at ``cap``
    (the page's byte limit), never empty when there is more (docs/protocol.md)."""
    rest = [k for k in sorted(keys) if after is None or k > after]
    take = max(1, min(limit, cap))
    page = rest[:take]
    return [ScanItem(k, b"v", 1) for k in page], len(rest) > len(page)


@settings(max_examples=300, deadline=None)
@given(keys=st.sets(st.binary(min_size=1, max_size=4), max_size=60), brokers=st.integers(1, 4),
       limit=st.integers(1, 10), seed=st.integers(0, 2**32 - 1))
def test_paging_through_merged_pages_gives_every_key_once_in_order(keys: set[bytes], brokers: int, limit: int,
                                                                    seed: int) -> None:
    rng = random.Random(seed)
    owned: list[list[bytes]] = [[] for _ in range(brokers)]
    for k in keys:  # each key lives on exactly one broker (its group's leader)
        owned[rng.randrange(brokers)].append(k)
    seen: list[bytes] = []
    after: bytes | None = None
    for _ in range(len(keys) + 2):
        pages = [broker_page(o, after, limit, rng.randint(1, limit)) for o in owned]
        items, more = merge_pages(pages, limit)
        assert len(items) <= limit
        assert items or not more, "a merged page with more is never empty"
        seen += [it.key for it in items]
        if not more:
            break
        after = items[-1].key
    else:
        pytest.fail("the scan did not finish")
    assert seen == sorted(keys)


def test_a_page_with_more_must_not_be_empty() -> None:
    with pytest.raises(ValueError):
        merge_pages([([], True)], 5)
    assert merge_pages([([], False), ([ScanItem(b"a", b"", 1)], False)], 5) == ([ScanItem(b"a", b"", 1)], False)


def test_an_mget_split_by_group_is_answered_in_the_keys_order() -> None:
    keys = [f"m{i}".encode() for i in range(30)]
    shares = MAP.by_group(keys)
    assert len(shares) > 1 and sorted(i for idx in shares.values() for i in idx) == list(range(30))
    assert all(MAP.group_of(keys[i]) == g for g, idx in shares.items() for i in idx)
    # Each group's broker answers its share: per-key lists and one value frame per key.
    parts = [(idx, {"id": 9, "ok": True, "found": [i % 3 != 0 for i in idx], "versions": list(idx)},
              [b"v%d" % i for i in idx]) for idx in shares.values()]
    header, values = merge_split(30, parts)
    assert header["found"] == [i % 3 != 0 for i in range(30)]
    assert header["versions"] == list(range(30))
    assert values == [b"v%d" % i for i in range(30)]
    assert header["ok"] is True and header["id"] == 9
    # An MSET's answers carry no frames: none come back.
    assert merge_split(3, [([0, 2], {"ok": True}, []), ([1], {"ok": True}, [])]) == ({"ok": True}, [])


def test_a_not_leader_teaches_the_map_one_groups_leader() -> None:
    learned = MAP.learn(3, "tcp://c:1")
    assert learned.leaders == {**MAP.leaders, 3: "tcp://c:1"} and learned.revision == MAP.revision
    assert MAP.learn(0, None).leaders == {1: "tcp://b:1", 2: "tcp://a:1"}
    assert MAP.leaders[0] == "tcp://a:1"  # the map is never changed in place


def test_scan_replies_of_every_group_merge_into_one_page() -> None:
    # Group 0's page is cut at b"c" (more), group 1's is complete: only keys up to b"c" may be
    # returned; a streamed value's manifest follows its key to its new index.
    g0 = ({"id": 1, "ok": True, "keys": [b"a", b"c"], "versions": [1, 3], "more": True}, [b"A", b"C"])
    g1 = ({"id": 1, "ok": True, "keys": [b"b", b"d"], "versions": [2, 4], "more": False,
           "streams": {0: {"stream": b"s", "size": 9, "chunks": 1}}}, [b"", b"D"])
    header, values = merge_scans([g0, g1], limit=10)
    assert header["keys"] == [b"a", b"b", b"c"] and header["versions"] == [1, 2, 3]
    assert values == [b"A", b"", b"C"] and header["more"] is True
    assert header["streams"] == {1: {"stream": b"s", "size": 9, "chunks": 1}}
    # Cut by the limit: more, though every group was complete.
    header, values = merge_scans([g1, ({"keys": [b"e"], "versions": [5], "more": False}, [b"E"])], limit=2)
    assert header["keys"] == [b"b", b"d"] and header["more"] is True and "streams" in header
    # Keys only (no value frames) stay without values; an empty page with more ends like one broker's.
    header, values = merge_scans([({"keys": [b"x"], "versions": [7], "more": False}, []),
                                  ({"keys": [], "versions": [], "more": True}, [])], limit=5)
    assert header["keys"] == [b"x"] and values == [] and header["more"] is False


def test_a_split_mget_carries_streamed_values_back_by_index_and_an_mset_sums_its_count() -> None:
    hdr, values = merge_split(4, [([1, 3], {"ok": True, "found": [True, True], "streams": {1: {"size": 9}}},
                                   [b"", b""]),
                                  ([0, 2], {"ok": True, "found": [True, True], "streams": {0: {"size": 5}}},
                                   [b"", b"x"])])
    assert hdr["streams"] == {3: {"size": 9}, 0: {"size": 5}} and values == [b"", b"", b"x", b""]
    hdr, _ = merge_split(3, [([0, 2], {"ok": True, "count": 2}, []), ([1], {"ok": True, "count": 1}, [])])
    assert hdr["count"] == 3
    miss = {"ok": True, "found": [False]}
    hdr, _ = merge_split(2, [([0], miss, [b""]), ([1], miss, [b""])])
    assert "streams" not in hdr and "count" not in hdr
