"""The lease rules (broker/leadership.py) and what a standby answers (broker/standby.py)."""

from __future__ import annotations

import pytest

from broker.leadership import LeaderInfo, Leadership, LeaseRules, WorkerReach
from broker.messages import Limits
from broker.standby import Standby
from protocol.frames import (
    C_FINAL,
    C_REQUEST,
    MDPC,
    MDPW,
    MMI_ADMIN,
    MMI_STATUS,
    SERVICE,
    W_DISCONNECT,
    W_READY,
    pack,
    unpack,
)

ME = LeaderInfo("b1", 0, "tcp://h1:5555", "tcp://h1:5556", "tcp://h1:5557")
OTHER = LeaderInfo("b2", 41, "tcp://h2:5555", "tcp://h2:5556", "tcp://h2:5557")


def test_a_leader_acts_only_until_ttl_minus_margin_after_its_last_confirmed_renewal() -> None:
    rules = LeaseRules(ttl=3, renew_every=0.5, margin=0.75)
    ld = Leadership(rules)
    assert not ld.may_act(0.0)
    ld.elected(42, 7, sent_at=100.0, me=LeaderInfo("b1", 42, ME.frontend, ME.backend, ME.replication))
    assert ld.may_act(100.0) and ld.may_act(102.24)
    assert not ld.may_act(102.25)  # 100 + 3 - 0.75: etcd cannot have expired the lease yet
    ld.renewed(sent_at=101.0)
    assert ld.may_act(103.2) and not ld.may_act(103.25)
    ld.renewed(sent_at=100.5)  # a late confirmation of an older keepalive never shortens the term
    assert ld.may_act(103.2)
    ld.lost()
    assert not ld.may_act(101.0) and ld.epoch == 0
    assert ld.leader is None  # no longer names itself as the leader to those it sends on


def test_a_standby_renewal_grants_nothing() -> None:
    ld = Leadership(LeaseRules())
    ld.renewed(sent_at=5.0)
    assert not ld.may_act(5.1)


@pytest.mark.parametrize("ttl,renew,timeout,ok", [(3, 0.5, 0.75, True), (2, 0.5, 0.75, False),
                                                  (1, 0.1, 0.1, False), (30, 10, 10, False), (30, 5, 10, True)])
def test_lease_rules_leave_room_for_two_failed_renewals(ttl: int, renew: float, timeout: float, ok: bool) -> None:
    rules = LeaseRules(ttl=ttl, renew_every=renew, request_timeout=timeout, margin=0.75)
    if ok:
        rules.check()
    else:
        with pytest.raises(ValueError):
            rules.check()


def kv(rid: int, **fields: object) -> list[bytes]:
    return [MDPC, C_REQUEST, SERVICE, pack({"op": "get", "id": rid, "key": b"k", **fields})]


def test_a_standby_answers_every_request_not_leader_naming_the_leader() -> None:
    sb = Standby(Limits(4096, 1 << 20, 1 << 30))
    asked = []

    def status() -> dict[str, str]:
        asked.append(1)
        return {"role": "standby"}

    sb.on_client(b"c", kv(7), OTHER, status)
    sb.on_client(b"c", [*kv(8, op="put"), b"value"], None, status)
    sb.on_client(b"c", [MDPC, C_REQUEST, SERVICE, b"\xc1"], OTHER, status)
    assert asked == []  # built only for mmi.status
    sb.on_client(b"c", [MDPC, C_REQUEST, MMI_STATUS], OTHER, status)
    sb.on_client(b"c", [MDPC, C_REQUEST, MMI_ADMIN, pack({"cmd": "rebalance"})], OTHER, status)
    assert asked == [1]
    out = sb.take_ready().client
    headers = [unpack(frames[3]) for _, frames in out]
    assert all(frames[:2] == [MDPC, C_FINAL] for _, frames in out)
    assert headers[0] == {"id": 7, "ok": False, "code": "NOT_LEADER", "leader": OTHER.frontend,
                          "message": f"this broker is a standby: the leader is {OTHER.frontend}"}
    assert headers[1]["code"] == "NOT_LEADER" and headers[1]["leader"] is None and headers[1]["id"] == 8
    assert headers[2]["code"] == "BAD_REQUEST" and headers[2]["id"] is None  # malformed: said so
    assert headers[3] == {"role": "standby"}
    assert headers[4]["code"] == "NOT_LEADER" and headers[4]["ok"] is False
    assert sb.take_ready().client == []


def test_a_standby_sends_workers_to_the_leader() -> None:
    sb = Standby(Limits(4096, 1 << 20, 1 << 30))
    sb.on_worker(b"w", [MDPW, W_READY, SERVICE, pack({"id": "w1"})], OTHER)
    sb.on_worker(b"w", [MDPW, W_DISCONNECT], OTHER)  # a worker leaving is not answered
    sb.on_worker(b"x", [b"junk"], None)
    out = sb.take_ready().workers
    assert [identity for identity, _ in out] == [b"w", b"x"]
    assert out[0][1][:2] == [MDPW, W_DISCONNECT]
    assert unpack(out[0][1][2]) == {"reason": "standby", "leader": OTHER.backend, "replication": OTHER.replication}
    assert unpack(out[1][1][2])["leader"] is None


def test_a_leader_gives_way_only_after_losing_the_workers_it_had() -> None:
    reach = WorkerReach(w=2, window=6.0)
    # Never had W workers in this term (a cluster starting, every worker down): keeps leading.
    assert not reach.observe(0.0, 0)
    assert not reach.observe(100.0, 1)
    assert reach.observe(101.0, 2) is False  # now it has them
    # Fewer than W: gives way only once that lasted the whole window.
    assert not reach.observe(110.0, 1)
    assert not reach.observe(115.9, 0)
    assert reach.observe(116.0, 1)
    # Back to W in between restarts the window.
    reach = WorkerReach(w=2, window=6.0)
    reach.observe(0.0, 3)
    assert not reach.observe(1.0, 1)
    assert not reach.observe(5.0, 2)
    assert not reach.observe(6.5, 1)
    assert not reach.observe(12.0, 1)
    assert reach.observe(12.5, 1)
