"""Active brokers (``--groups``) in the tests: each broker's own status and slot map, and waits
for the groups to be led and served (tests/integration/test_active_brokers.py,
tests/faults/test_active_failover.py)."""

from __future__ import annotations

from typing import Any

from client import Client
from client.slotmap import SlotMap
from protocol.frames import MMI_SLOTS, unpack
from tests.support.cluster import wait_for
from tests.support.ha import HaCluster


def broker_status(cluster: HaCluster, name: str) -> dict[str, Any]:
    with Client(cluster.broker_endpoints[name][0], timeout=3.0) as c:
        return c.status()


def slot_map(cluster: HaCluster, name: str) -> SlotMap:
    with Client(cluster.broker_endpoints[name][0], timeout=3.0) as c:
        reply = c._mmi(MMI_SLOTS, [b""], 3.0)
    assert reply is not None
    return SlotMap.from_record(unpack(reply[0]))


def full_map(cluster: HaCluster, name: str, leaders: set[str] | None = None) -> SlotMap:
    """``name``'s slot map once it names a leader for every group (each broker reads the group
    keys twice a second: just after a handover its map may lack the group's new leader), all of
    them among ``leaders`` if given."""

    def full() -> SlotMap | None:
        m = slot_map(cluster, name)
        if len(m.leaders) != m.groups or (leaders is not None and not set(m.leaders.values()) <= leaders):
            return None
        return m

    return wait_for(full, 10.0, 0.1, f"{name}'s slot map naming every group's leader")


def agreed_map(cluster: HaCluster, names: list[str], leaders: set[str] | None = None) -> SlotMap:
    """The slot map once every one of ``names`` answers the same full one (see ``full_map``): what a
    test needs that counts NOT_LEADER answers, since a client learns its map from whichever broker
    refuses it first, and a broker whose map still lags a handover sends it to a wrong leader."""

    def agreed() -> SlotMap | None:
        maps = []
        for n in names:
            m = slot_map(cluster, n)
            if len(m.leaders) != m.groups or (leaders is not None and not set(m.leaders.values()) <= leaders):
                return None
            maps.append(m)
        return maps[0] if all(m == maps[0] for m in maps) else None

    return wait_for(agreed, 10.0, 0.1, f"{names} answering the same slot map, naming every group's leader")


def wait_served(cluster: HaCluster, names: list[str], groups: int, timeout: float = 60.0) -> dict[str, dict[str, Any]]:
    """Until every group is led by one of ``names``, as evenly as can be (handovers are paced:
    one a second per broker), and each of them has every slot of its groups formed, recovered and
    fully replicated; their statuses."""
    even = sorted(groups // len(names) + (i < groups % len(names)) for i in range(len(names)))

    def served() -> dict[str, dict[str, Any]] | None:
        try:
            sts = {n: broker_status(cluster, n) for n in names}
        except Exception:
            return None
        led = [g for st in sts.values() for g in st.get("leading", {})]
        if sorted(int(g) for g in led) != list(range(groups)):
            return None
        if sorted(len(st["leading"]) for st in sts.values()) != even:
            return None
        for st in sts.values():
            if st["slots"] != len(st["leading"]) * cluster.slots // groups or st.get("recovering_slots", 1) \
                    or st.get("under_replicated_slots", 1):
                return None
        return sts

    return wait_for(served, timeout, 0.2, f"every one of {groups} groups led by {names} and served")
