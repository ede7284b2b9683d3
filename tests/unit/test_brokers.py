"""client/brokers.py's ``BrokerList``: which broker a client with several URLs talks to (issue 11),
and the watch's use of it. Pure: no sockets."""

from __future__ import annotations

import pytest

from client.brokers import AVOID_GONE_FOR, BrokerList
from client.retry import no_reply
from client.watch import WatchSession, follow_leader
from protocol.errors import NotLeader, Unavailable
from protocol.frames import C_FINAL, MMI_ADMIN, MMI_SERVICE, MMI_STATUS, pack

A, B, C = "tcp://10.0.0.1:5555", "tcp://10.0.0.2:5555", "tcp://10.0.0.3:5555"


def test_one_url_never_moves() -> None:
    b = BrokerList(A)
    assert b.urls == [A] and b.current == A and not b.several
    b.silent()
    assert b.current == A
    assert b.refused(NotLeader("standby", leader=None), 0.05) == 0.05  # backoff, same broker
    assert b.current == A
    assert b.refused(Unavailable("later"), 0.1) == 0.1
    assert b.describe() == A


def test_a_comma_separated_list_with_blanks() -> None:
    b = BrokerList(f" {A} , {B},,{C} ")
    assert b.urls == [A, B, C] and b.current == A and b.several
    assert b.describe() == f"any of {A}, {B}, {C}"
    with pytest.raises(ValueError):
        BrokerList(" , ")


def test_silence_moves_round_the_list() -> None:
    b = BrokerList([A, B, C])
    seen = []
    for _ in range(4):
        b.silent()
        seen.append(b.current)
    assert seen == [B, C, A, B]


def test_not_leader_naming_a_listed_broker_goes_there_at_once() -> None:
    b = BrokerList([A, B, C])
    assert b.refused(NotLeader("standby", leader=C + "/"), 0.05) == 0.0  # matched, not duplicated
    assert b.current == C
    b.silent()
    assert b.current == A  # the rotation goes on from the leader's place in the list


def test_not_leader_naming_a_broker_outside_the_list_is_followed_then_left() -> None:
    b = BrokerList([A, B])
    assert b.refused(NotLeader("standby", leader="tcp://10.0.0.9:5555"), 0.05) == 0.0
    assert b.current == "tcp://10.0.0.9:5555"
    b.silent()  # the leader went away: back to the list, after where it was left
    assert b.current == B
    one = BrokerList(A)  # even with one URL: a standby named its leader
    assert one.refused(NotLeader("standby", leader=B), 0.05) == 0.0 and one.current == B
    one.silent()
    assert one.current == A


def test_not_leader_without_a_leader_or_naming_itself_moves_on_after_the_backoff() -> None:
    b = BrokerList([A, B, C])
    assert b.refused(NotLeader("standby", leader=None), 0.2) == 0.2
    assert b.current == B
    assert b.refused(NotLeader("standby", leader=B), 0.4) == 0.4  # names itself: no help
    assert b.current == C


def test_standbys_pointing_at_each_other_fall_back_to_backoff() -> None:
    b = BrokerList([A, B])
    waits = []
    for _ in range(8):
        target = B if b.current == A else A
        waits.append(b.refused(NotLeader("election under way", leader=target), 0.05))
    assert 0.05 in waits  # not a busy loop between two stale hints
    b.settled()
    assert b.refused(NotLeader("standby", leader=B if b.current == A else A), 0.05) == 0.0


def test_start_at_a_listed_url() -> None:
    b = BrokerList([A, B, C])
    b.start_at(B)
    assert b.current == B
    b.start_at("tcp://elsewhere:1")  # not listed: nothing changes
    assert b.current == B


def test_no_reply_names_every_broker() -> None:
    assert str(no_reply(A, 5.0)) == f"no reply from {A} within 5.0s"
    assert str(no_reply(f"{A},{B}", 5.0)) == f"no reply from any of {A}, {B} within 5.0s"


def test_a_watch_refused_by_a_standby_reopens_at_the_leader_at_once() -> None:
    ws = WatchSession(b"p")
    b = BrokerList([A, B])
    kind, _ = ws.due(0.0, lambda: 7)  # type: ignore[misc]
    assert kind == "open"
    refusal = pack({"id": 7, "ok": False, "code": "NOT_LEADER", "message": "standby", "leader": B})
    assert ws.received(C_FINAL, [refusal], 1.0) == []
    follow_leader(ws, b)
    assert b.current == B
    assert ws.due(1.0, lambda: 8) is not None  # reopened now, not after the backoff
    assert ws.error is None and not ws.silent


def test_a_watch_silence_marks_the_session_for_the_next_broker() -> None:
    ws = WatchSession(b"p")
    ws.due(0.0, lambda: 1)
    assert ws.due(1.0, lambda: 2) is None
    act = ws.due(10.0, lambda: 3)  # nothing heard for longer than WATCH_SILENCE
    assert act is not None and act[0] == "open" and ws.silent


def test_a_management_call_follows_a_standby_to_the_leader_and_moves_on_from_silence() -> None:
    standby_status = [pack({"role": "standby", "leader": B, "formed": False})]
    leader_status = [pack({"role": "leader", "formed": True})]
    b = BrokerList(f"{A},{B},{C}")
    assert b.mmi_again(standby_status, MMI_STATUS, moved=False, out_of_time=False)
    assert b.current == B  # the cluster's status is the leader's
    assert not b.mmi_again(leader_status, MMI_STATUS, moved=False, out_of_time=False)
    assert not b.mmi_again([b"404"], MMI_SERVICE, moved=False, out_of_time=False)  # mmi.service: the answer
    assert b.mmi_again(None, MMI_STATUS, moved=False, out_of_time=False) and b.current == C
    assert b.mmi_again(None, MMI_STATUS, moved=True, out_of_time=False) and b.current == C  # already moved
    assert not b.mmi_again(None, MMI_STATUS, moved=False, out_of_time=True)
    admin_refused = [pack({"ok": False, "code": "NOT_LEADER", "leader": A})]
    assert b.mmi_again(admin_refused, MMI_ADMIN, moved=False, out_of_time=False) and b.current == A


def test_with_one_broker_a_silent_read_only_management_call_is_sent_again_an_admin_command_not() -> None:
    one = BrokerList(A)
    standby_status = [pack({"role": "standby", "leader": B, "formed": False})]
    assert not one.mmi_again(standby_status, MMI_STATUS, moved=False, out_of_time=False)  # its own view
    assert one.mmi_again(None, MMI_STATUS, moved=False, out_of_time=False) and one.current == A
    assert one.mmi_again(None, MMI_SERVICE, moved=False, out_of_time=False)
    assert not one.mmi_again(None, MMI_ADMIN, moved=False, out_of_time=False)  # no de-duplication: once
    assert not one.mmi_again(None, MMI_STATUS, moved=False, out_of_time=True)


def test_a_broker_found_silent_is_not_followed_back_on_a_stale_hint() -> None:
    """Until a dead leader's lease lapses the standbys still name it: the client asks the standby
    again after the backoff instead of going back to wait on the dead one."""
    b = BrokerList([A, B])
    b.silent()  # A (the leader) went silent, now
    assert b.current == B
    assert b.refused(NotLeader("standby", leader=A), 0.05) == 0.05  # a stale hint: stay, back off
    assert b.current == B
    b = BrokerList([A, B])
    b.silent(now=100.0)
    assert b.follow(A, now=100.0 + AVOID_GONE_FOR - 0.1) is False and b.current == B
    assert b.follow("tcp://10.0.0.9:5555", now=101.0) is True  # a new leader is followed at once
    b = BrokerList([A, B])
    b.silent(now=100.0)
    assert b.follow(A, now=100.0 + AVOID_GONE_FOR) is True and b.current == A  # long after: believed
