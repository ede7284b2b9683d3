"""The broker's metadata in a real etcd (broker/etcd.py ``EtcdMeta``): what one leader writes, a
successor reads back; and a deposed leader's write is refused. No mocks: Debian's etcd-server on a
free port in a temporary directory."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.etcd import Deposed, Etcd, EtcdMeta
from broker.ready import Metadata
from tests.support.ha import EtcdCluster

pytestmark = pytest.mark.timeout(60)

PREFIX = "/zkv-meta-test/"


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[Etcd]:
    cluster = EtcdCluster(tmp_path / "etcd").start()
    try:
        yield Etcd(cluster.endpoints.split(","), timeout=2.0)
    finally:
        cluster.stop()


def lead(etcd: Etcd) -> tuple[int, int]:
    """Take the leader key on a lease (as broker/etcd.py ``Election`` does): (epoch, lease); the
    key's create revision is the epoch."""
    lease = etcd.grant(10)
    epoch = etcd.create(PREFIX + "leader", b"{}", lease)
    assert epoch
    return epoch, lease


def test_a_successor_reads_what_the_leader_wrote_open_streams_included(etcd: Etcd) -> None:
    epoch, _ = lead(etcd)
    meta = EtcdMeta(etcd, PREFIX, epoch)
    assert meta.load().cluster == {}
    s1, s2 = b"\x01" * 16, b"\x02" * 16
    meta.apply(Metadata(cluster={"formed": True, "slots": 8, "rf": 3, "id": b"c"},
                        workers={"w1": {"data_id": b"d1"}},
                        slots={3: {"replicas": ["w1"], "epochs": [[epoch, 1]]}},
                        streams={s1: {"slot": 3, "key": b"big"}, s2: {"slot": 5, "key": b"other"}}), sync=True)
    meta.apply(Metadata(streams={s2: None}), sync=True)  # committed or aborted: closed
    restored = EtcdMeta(etcd, PREFIX, epoch).load()
    assert restored.cluster["slots"] == 8 and restored.workers == {"w1": {"data_id": b"d1", "draining": False}}
    assert restored.slots == {3: {"replicas": ["w1"], "epochs": [[epoch, 1]]}}
    # A successor aborts the streams their clients left (broker/streams.py): it must know them.
    assert restored.streams == {s1: {"slot": 3, "key": b"big"}}
    assert restored.positions_known is False


def test_a_deposed_leader_cannot_write(etcd: Etcd) -> None:
    old, lease = lead(etcd)
    stale = EtcdMeta(etcd, PREFIX, old)
    etcd.revoke(lease)  # its lease is gone (lapsed, revoked): the key with it; a successor leads
    new, _ = lead(etcd)
    assert new > old
    with pytest.raises(Deposed):
        stale.apply(Metadata(streams={b"\x03" * 16: {"slot": 1, "key": b"k"}}), sync=True)
    assert EtcdMeta(etcd, PREFIX, new).load().streams == {}

