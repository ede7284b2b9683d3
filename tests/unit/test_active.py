"""Active brokers' routing (broker/active.py): each request to the core of its group, NOT_LEADER
with the group's leader for a group led elsewhere, workers registered per group."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from broker.active import ActiveCores, request_group
from broker.core import BrokerCore
from broker.leadership import LeaderInfo
from broker.messages import Invalid, KvRequest, Limits, ScanRequest
from broker.state import BrokerConfig, Restored
from protocol.frames import C_REQUEST, MDPC, MDPW, MMI_SLOTS, SERVICE, W_ASSIGN, W_DISCONNECT, W_READY, pack, unpack
from protocol.replication import slot_for_key

SLOTS, GROUPS = 16, 4
LIMITS = Limits(1024, 1 << 20, 1 << 30)


def core(group: int) -> BrokerCore:
    cfg = BrokerConfig(slots=SLOTS, rf=1, w=1, groups=GROUPS, group=group)
    ids = itertools.count()
    return BrokerCore(cfg, Restored(), 100 + group, clock=lambda: 1.0, wall_ms=lambda: 1000,
                      new_id=lambda: next(ids).to_bytes(16, "big"), lookup_dedup=lambda cid, rid: None)


def key_of_group(group: int, skip: int = 0) -> bytes:
    return [k for i in range(1000) if slot_for_key(k := b"k%d" % i, SLOTS) % GROUPS == group][skip]


def replies(active: ActiveCores, *cores: BrokerCore) -> list[dict[str, Any]]:
    out = [r for c in cores for r in c.ready().client] + active.take_ready().client
    return [unpack(frames[3]) if frames[2] == SERVICE else frames[3] for _, frames in out]


@pytest.fixture
def active() -> ActiveCores:
    a = ActiveCores(LIMITS, SLOTS, GROUPS, status=lambda: {"role": "active"})
    a.map = a.map.__class__(SLOTS, GROUPS, {g: LeaderInfo(f"b{g % 2}", 10 + g, f"tcp://b{g % 2}:1",
                                                          f"tcp://b{g % 2}:2", f"tcp://b{g % 2}:3")
                                            for g in range(GROUPS)})
    a.cores[1] = core(1)
    return a


def test_a_key_of_a_group_led_here_reaches_its_core(active: ActiveCores) -> None:
    k = key_of_group(1)
    active.on_client(b"c", [MDPC, C_REQUEST, SERVICE, pack({"id": 1, "op": "get", "key": k})])
    [answer] = replies(active, active.cores[1])
    # The core answers: the cluster of its group is not formed (no worker yet), not NOT_LEADER.
    assert answer["id"] == 1 and answer["code"] == "UNAVAILABLE" and "not formed" in answer["message"]


def test_a_key_of_a_group_led_elsewhere_gets_not_leader_with_its_leader(active: ActiveCores) -> None:
    k = key_of_group(2)
    active.on_client(b"c", [MDPC, C_REQUEST, SERVICE, pack({"id": 7, "op": "put", "key": k}), b"v"])
    [answer] = replies(active, active.cores[1])
    assert answer == {"id": 7, "ok": False, "code": "NOT_LEADER", "leader": "tcp://b0:1", "group": 2,
                      "revision": 13, "message": "slot group 2 is led by tcp://b0:1"}
    assert active.redirected == 1


def test_keys_of_two_groups_in_one_request_are_refused_and_touch_nothing(active: ActiveCores) -> None:
    keys = [key_of_group(1), key_of_group(2)]
    active.on_client(b"c", [MDPC, C_REQUEST, SERVICE, pack({"id": 3, "op": "mget", "keys": keys})])
    [answer] = replies(active, active.cores[1])
    assert answer["code"] == "BAD_REQUEST" and "2 slot groups" in answer["message"] and answer["id"] == 3
    # Two keys of one group are one request.
    assert request_group(KvRequest(4, "mget", [key_of_group(3), key_of_group(3, 1)], []), SLOTS, GROUPS) == 3


def test_a_scan_must_name_its_group() -> None:
    with pytest.raises(Invalid, match="names its group"):
        request_group(ScanRequest(1, b"", None, 10, True), SLOTS, GROUPS)
    with pytest.raises(Invalid, match="names its group"):
        request_group(ScanRequest(1, b"", None, 10, True, group=GROUPS), SLOTS, GROUPS)
    assert request_group(ScanRequest(1, b"", None, 10, True, group=2), SLOTS, GROUPS) == 2


def test_mmi_slots_is_the_map(active: ActiveCores) -> None:
    active.on_client(b"c", [MDPC, C_REQUEST, MMI_SLOTS, b""])
    [body] = replies(active)
    assert unpack(body) == {"slots": SLOTS, "groups": GROUPS, "revision": 13,
                            "leaders": {str(g): f"tcp://b{g % 2}:1" for g in range(GROUPS)}}


def ready_frames(wid: str, group: int | None) -> list[bytes]:
    info = {"id": wid, "data_id": b"d-" + wid.encode(), "positions": []}
    if group is not None:
        info["group"] = group
    return [MDPW, W_READY, SERVICE, pack(info)]


def test_workers_register_per_group(active: ActiveCores) -> None:
    c1 = active.cores[1]
    active.on_worker(b"w1-g1", ready_frames("w1", 1))
    # The core of group 1 formed its group (RF 1): its slots only, assigned with the group.
    sent = c1.ready().workers
    [(identity, frames)] = sent
    assert identity == b"w1-g1" and frames[1] == W_ASSIGN
    assign = unpack(frames[2])
    assert assign["group"] == 1 and assign["groups"] == GROUPS
    assert assign["slots"] == [s for s in range(SLOTS) if s % GROUPS == 1] == sorted(c1.state.slots)
    # A READY for a group led elsewhere: the standby's DISCONNECT, naming that group's leader.
    active.on_worker(b"w1-g2", ready_frames("w1", 2))
    [(identity, frames)] = active.take_ready().workers
    assert identity == b"w1-g2" and frames[1] == W_DISCONNECT
    assert unpack(frames[2]) == {"reason": "standby", "leader": "tcp://b0:2", "replication": "tcp://b0:3",
                                 "groups": GROUPS, "group": 2}
    # A READY without a group: told how many groups the cluster has; no core saw it.
    active.on_worker(b"w2", ready_frames("w2", None))
    [(identity, frames)] = active.take_ready().workers
    assert unpack(frames[2]) == {"reason": "groups", "groups": GROUPS}
    assert set(c1.state.workers) == {"w1"}
