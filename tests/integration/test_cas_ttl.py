"""Compare-and-set and TTL control through the Python client and real processes."""

from __future__ import annotations

import pytest

from client import ConditionFailed, KeyNotFound
from tests.support.cluster import Cluster, wait_for

pytestmark = pytest.mark.timeout(120)


def test_compare_and_set(cluster: Cluster) -> None:
    c = cluster.client()
    v1 = c.put("account", b"100", if_absent=True)
    with pytest.raises(ConditionFailed) as e:
        c.put("account", b"0", if_absent=True)
    assert e.value.version == v1
    with pytest.raises(ConditionFailed) as e:
        c.put("account", b"90", if_version=v1 + 1)
    assert e.value.version == v1
    v2 = c.put("account", b"90", if_version=v1)
    assert c.get_versioned("account") == (b"90", v2)
    with pytest.raises(ConditionFailed):
        c.delete("account", if_version=v1)
    assert c.delete("account", if_version=v2) is True
    with pytest.raises(ConditionFailed) as e:
        c.put("account", b"1", if_version=v2)
    assert e.value.version is None


def test_ttl_read_change_remove(cluster: Cluster) -> None:
    c = cluster.client()
    c.put("session", b"token", ttl=60_000)
    assert 55_000 < c.ttl("session") <= 60_000
    assert c.expire("session", None) is True
    assert c.ttl("session") is None
    assert c.expire("session", 300) is True
    assert c.ttl("session") <= 300
    wait_for(lambda: c.get("session") is None, 10, 0.05, "session expired")
    with pytest.raises(KeyNotFound):
        c.ttl("session")
    assert c.expire("session", 1000) is False
