"""Compare-and-set and TTL in the cores (tests/support/sim.py): expiry by the broker clock,
conditions decided alike on every replica, TTL read, changed and removed without the value."""

from __future__ import annotations

import pytest

from tests.support.sim import SimCluster

pytestmark = pytest.mark.timeout(120)


def test_ttl_follows_the_broker_clock(sim: SimCluster) -> None:
    sim.put(b"t", b"v", ttl=1000)
    assert sim.get(b"t") == b"v"
    sim.advance(1.1)
    assert sim.get(b"t") is None
    hdr, _ = sim.call("exists", key=b"t")
    assert hdr["exists"] is False
    hdr, _ = sim.call("delete", key=b"t")
    assert hdr["deleted"] is False  # an expired key did not exist, on every replica alike
    # Its space is reclaimed by the broker's clock, whatever the workers' clocks say.
    sim.put(b"t2", b"v", ttl=500)
    sim.advance(1.0)
    for w in sim.workers.values():
        assert w.core is not None
        assert w.core.store.reclaim_expired(w.core.broker_now) >= 1
        assert b"t2" not in sim.worker_data(w.wid)


def test_compare_and_set_succeeds_or_fails_alike_on_every_replica(sim: SimCluster) -> None:
    v1 = sim.put(b"cas", b"a", if_absent=True)["version"]
    hdr = sim.put(b"cas", b"b", if_absent=True)
    assert hdr["ok"] is False and hdr["code"] == "CONDITION_FAILED" and hdr["version"] == v1
    hdr = sim.put(b"cas", b"c", if_version=v1 + 1000)
    assert hdr["code"] == "CONDITION_FAILED" and hdr["version"] == v1
    v2 = sim.put(b"cas", b"d", if_version=v1)["version"]
    assert v2 > v1 and sim.get(b"cas") == b"d"
    hdr, _ = sim.call("delete", key=b"cas", if_version=v1)
    assert hdr["code"] == "CONDITION_FAILED" and hdr["version"] == v2
    hdr, _ = sim.call("delete", key=b"cas", if_version=v2)
    assert hdr["ok"] and hdr["deleted"] is True
    hdr = sim.put(b"cas", b"e", if_version=v2)  # gone: no version matches
    assert hdr["code"] == "CONDITION_FAILED" and hdr["version"] is None
    assert sim.put(b"cas", b"f", if_absent=True)["ok"]
    sim.advance(0.5)
    assert all(sim.worker_data(w)[b"cas"] == b"f" for w in ("w1", "w2", "w3"))
    for bad in ({"if_version": 0}, {"if_version": "1"}, {"if_absent": 1}, {"if_absent": True, "if_version": 3}):
        hdr = sim.put(b"cas", b"x", **bad)
        assert hdr["code"] == "BAD_REQUEST", (bad, hdr)


def test_ttl_can_be_read_changed_and_removed_without_the_value(sim: SimCluster) -> None:
    sim.put(b"t", b"value", ttl=10_000)
    hdr, _ = sim.call("ttl", key=b"t")
    assert hdr["found"] and 9_000 < hdr["ttl"] <= 10_000
    hdr, _ = sim.call("expire", key=b"t", ttl=500)
    assert hdr["applied"] is True
    hdr, _ = sim.call("ttl", key=b"t")
    assert hdr["ttl"] <= 500
    hdr, _ = sim.call("expire", key=b"t")  # no ttl: remove it
    assert hdr["applied"] is True
    sim.advance(1.0)
    hdr, _ = sim.call("ttl", key=b"t")
    assert hdr["found"] and hdr["ttl"] is None
    assert sim.get(b"t") == b"value"
    hdr, _ = sim.call("expire", key=b"missing", ttl=100)
    assert hdr["applied"] is False
    hdr, _ = sim.call("ttl", key=b"missing")
    assert hdr["found"] is False
    sim.call("expire", key=b"t", ttl=300)
    sim.advance(0.5)
    assert sim.get(b"t") is None
    hdr, _ = sim.call("expire", key=b"t", ttl=-5)
    assert hdr["code"] == "BAD_REQUEST"
