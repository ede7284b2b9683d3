from __future__ import annotations

from tests.support.cluster import Cluster


def test_put_get_delete_roundtrip(cluster: Cluster) -> None:
    c = cluster.client()
    v1 = c.put(b"k", b"v")
    assert c.get(b"k") == b"v"
    assert c.get_versioned(b"k") == (b"v", v1)
    assert c.delete(b"k") is True
    assert c.get(b"k") is None
    assert c.delete(b"k") is False
