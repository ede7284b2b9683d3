"""client/routing.py: where a request goes with active brokers, what a refusal teaches, and how a
request spanning slot groups splits and merges (the rules both clients share)."""

from __future__ import annotations

import pytest

from client.routing import Redirect, Router
from protocol.frames import pack

pytestmark = pytest.mark.timeout(10)

A, B = "tcp://a:1", "tcp://b:1"


def routed(groups: int = 4, slots: int = 16) -> Router:
    r = Router()
    r.install([pack({"slots": slots, "groups": groups, "revision": 5,
                     "leaders": {str(g): (A if g % 2 == 0 else B) for g in range(groups)}})])
    return r


def key_in(r: Router, group: int) -> bytes:
    assert r.slot_map is not None
    return next(b"k%d" % i for i in range(1000) if r.slot_map.group_of(b"k%d" % i) == group)


def test_without_a_map_nothing_is_routed_or_split() -> None:
    r = Router()
    assert r.target({"key": b"x"}) is None
    assert r.split("mget", {"keys": [b"a", b"b"]}, None) is None
    assert r.split("scan", {"prefix": b""}, None) is None
    r.install(None)
    r.install([b"501"])
    r.install([pack({"slots": 0})])
    assert r.slot_map is None


def test_a_request_goes_to_its_groups_leader_and_a_silent_leader_is_forgotten() -> None:
    r = routed()
    k0, k1 = key_in(r, 0), key_in(r, 1)
    assert r.target({"key": k0}) == A and r.target({"keys": [k1]}) == B
    assert r.target({"group": 3, "prefix": b""}) == B
    r.forget({"key": k0}, B)  # B does not lead group 0: nothing changes
    assert r.target({"key": k0}) == A
    r.forget({"key": k0}, A)
    assert r.target({"key": k0}) is None and r.target({"key": k1}) == B


def test_a_not_leader_naming_a_group_is_followed_and_a_newer_revision_asks_for_the_map() -> None:
    r = routed()
    assert r.redirect([pack({"code": "NOT_LEADER", "leader": A})]) is None  # standby mode: no group
    assert r.redirect([b"\xc1"]) is None and r.redirect([]) is None
    red = r.redirect([pack({"code": "NOT_LEADER", "leader": A, "group": 1, "revision": 5})])
    assert red is not None and not r.needs_map(red)
    assert r.follow(red) and r.target({"group": 1}) == A
    none = r.redirect([pack({"code": "NOT_LEADER", "leader": None, "group": 1, "revision": 9})])
    assert none is not None and r.needs_map(none)
    assert not r.follow(none) and r.target({"group": 1}) is None  # a handover: back off
    assert not Router().follow(none)  # no map: nothing to follow


def test_a_refusal_spanning_groups_asks_for_the_map_only_without_one() -> None:
    refusal = [pack({"code": "BAD_REQUEST", "groups": 4, "revision": 5})]
    assert Router().spans_groups(refusal)
    assert not Router().spans_groups([pack({"code": "BAD_REQUEST"})])
    assert not routed().spans_groups(refusal)


def test_an_mset_splits_by_group_and_the_answers_go_back_in_the_keys_order() -> None:
    r = routed()
    keys = [key_in(r, g) for g in (2, 0, 2, 1)]
    split = r.split("mset", {"keys": keys, "ttl": 5}, [b"v0", b"v1", b"v2", b"v3"])
    assert split is not None and len(split.parts) == 3
    assert all(p.header["ttl"] == 5 for p in split.parts)
    by_keys = {tuple(p.header["keys"]): p.values for p in split.parts}
    assert by_keys[(keys[0], keys[2])] == [b"v0", b"v2"] and by_keys[(keys[1],)] == [b"v1"]
    replies = [({"ok": True, "versions": [10 * i + j for j in range(len(p.header["keys"]))]}, [])
               for i, p in enumerate(split.parts)]
    hdr, values = split.merge(replies)
    assert hdr["versions"] == [0, 10, 1, 20] and values == []
    assert r.split("mset", {"keys": [keys[0], keys[2]]}, [b"a", b"b"]) is None  # one group: whole
    assert r.split("get", {"key": keys[0]}, None) is None


def test_an_mget_split_gives_the_values_back_by_index() -> None:
    r = routed()
    keys = [key_in(r, g) for g in (3, 1, 3)]
    split = r.split("mget", {"keys": keys}, None)
    assert split is not None and [p.values for p in split.parts] == [None, None]
    hdr, values = split.merge([({"ok": True}, [b"x", b"z"]), ({"ok": True}, [b"y"])])
    assert values == [b"x", b"y", b"z"]


def test_a_scan_without_a_group_asks_every_group_and_merges_in_key_order() -> None:
    r = routed(groups=3)
    split = r.split("scan", {"prefix": b"p", "limit": 2}, None)
    assert split is not None and [p.header["group"] for p in split.parts] == [0, 1, 2]
    assert r.split("scan", {"prefix": b"p", "group": 1}, None) is None
    pages = [({"keys": [b"pa", b"pd"], "versions": [1, 2], "more": True}, [b"A", b"D"]),
             ({"keys": [b"pb"], "versions": [3], "more": False}, [b"B"]),
             ({"keys": [], "versions": [], "more": False}, [])]
    hdr, values = split.merge(pages)
    assert hdr["keys"] == [b"pa", b"pb"] and values == [b"A", b"B"] and hdr["more"]


def test_a_watch_share_names_its_group_in_every_message_and_starts_from_the_same_cursor() -> None:
    from client.watch import WatchSession
    from protocol.frames import unpack

    whole = WatchSession(b"p", since={"c": b"cl", "s": [4, 5, 6, 7]})
    share = whole.share(1)
    assert share.cursor == whole.cursor and share.cursor is not whole.cursor
    ids = iter(range(1, 10))
    kind, body = share.due(0.0, lambda: next(ids))
    opened = unpack(body[0])
    assert kind == "open" and opened["group"] == 1 and opened["since"]["s"] == [4, 5, 6, 7]
    assert unpack(share.due(2.5, lambda: 0)[1][0]) == {"op": "watch", "id": 1, "keepalive": True, "group": 1}
    assert unpack(share.cancel()[0])["group"] == 1
    assert "group" not in unpack(WatchSession(b"p").due(0.0, lambda: 1)[1][0])


def test_the_cursor_of_a_fanned_out_watch_takes_each_slot_from_its_groups_share() -> None:
    from client.watch import WatchSession, merged_cursor

    shares = [WatchSession(b"", since={"c": b"cl", "s": [0] * 6}, group=g) for g in range(3)]
    for g, s in enumerate(shares):
        assert s.delivered is not None
        s.delivered["s"] = [10 * g + slot if slot % 3 == g else 0 for slot in range(6)]
    assert merged_cursor(shares) == {"c": b"cl", "s": [0, 11, 22, 3, 14, 25]}
    assert merged_cursor([*shares, WatchSession(b"", group=3)]) is None  # one share not yet opened


def test_a_silent_share_forgets_its_leader_and_a_not_leader_moves_it() -> None:
    from client.brokers import BrokerList
    from client.watch import WatchSession, follow_leader, next_url
    from protocol.errors import NotLeader

    r = routed()
    brokers = BrokerList([A, B])
    share = WatchSession(b"", group=1)
    assert next_url(share, None, brokers, r) == B  # group 1's leader
    share.silent = True
    assert next_url(share, B, brokers, r) == brokers.current and r.target({"group": 1}) is None
    share.open_at, share.last_heard, share.error = 5.0, 1.0, NotLeader("no", leader=B)
    follow_leader(share, brokers, r)
    assert share.open_at == 1.0 and r.target({"group": 1}) == B  # resent at once, to B


def test_an_admin_command_goes_to_every_groups_leader_and_the_answers_merge() -> None:
    from client.routing import merge_admin
    from protocol.frames import unpack

    assert Router().admin_plan(pack({"cmd": "drain", "worker": "w1"})) is None  # no groups: as ever
    r = routed()
    plan = r.admin_plan(pack({"cmd": "drain", "worker": "w1"}))
    assert plan is not None and plan.urls == [A, B] and not plan.leaderless
    move = r.admin_plan(pack({"cmd": "move", "slot": 7, "from": "w1", "to": "w2"}))
    assert move is not None and move.urls == [B]  # slot 7: group 3, led by B
    def done(*groups: tuple[str, str]) -> list[bytes]:
        return [pack({"ok": True, "groups": {g: {"ok": True, "message": m} for g, m in groups}})]

    answers = {A: done(("0", "a"), ("2", "c")), B: done(("1", "b"), ("3", "d"))}
    merged = unpack(merge_admin(plan, answers)[0])
    assert merged["ok"] and merged["message"] == "group 0: a; group 1: b; group 2: c; group 3: d"
    merged = unpack(merge_admin(plan, {**answers, B: None})[0])
    assert not merged["ok"] and merged["message"].startswith(f"no answer from {B}")
    # A broker that led fewer groups when the command came than the map said: not done.
    merged = unpack(merge_admin(plan, {**answers, B: done(("1", "b"))})[0])
    assert not merged["ok"] and "group 3: no answer from its leader" in merged["message"]
    r.forget({"group": 1}, B)
    gap = r.admin_plan(pack({"cmd": "rebalance"}))
    assert gap is not None and gap.leaderless == [1]
    assert not unpack(merge_admin(gap, answers)[0])["ok"]


def test_leaders_naming_each_other_make_a_request_back_off_after_a_hop_per_broker() -> None:
    r = routed()  # two brokers lead the groups
    assert [r.follow(Redirect(1, A if h % 2 else B, 5), h) for h in (1, 2, 3)] == [True, True, False]
    assert r.follow(Redirect(1, A, 5), 1)  # another request's count is its own
