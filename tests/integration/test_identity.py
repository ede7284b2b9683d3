"""Worker identity: two workers claiming one id, a worker rejoining with a wiped disk under its
old id, and a worker restarted from an older copy of its data directory."""

from __future__ import annotations

import shutil
import signal

import lmdb
import pytest

from tests.support.cluster import Cluster, wait_for
from tests.support.helpers import copies, terminate, worker_keys

pytestmark = pytest.mark.timeout(120)


def _fill(cluster: Cluster, prefix: bytes, n: int) -> dict[bytes, bytes]:
    c = cluster.client()
    items = {prefix + b"%d" % i: prefix + b"-value-%d" % i for i in range(n)}
    c.mset(items)
    return items


def _only_worker_serves(cluster: Cluster, wid: str, items: dict[bytes, bytes]) -> None:
    """Pause the other workers, then read everything: ``wid`` alone must answer it all, up to date."""
    others = [w for w in ("w1", "w2", "w3") if w != wid]
    for w in others:
        cluster.procs[w].signal(signal.SIGSTOP)
    try:
        wait_for(lambda: cluster.alive_workers() == {wid}, 20, 0.1, f"only {wid} alive")
        c = cluster.client()
        got = c.mget(list(items))
        assert got == list(items.values())
    finally:
        for w in others:
            cluster.procs[w].signal(signal.SIGCONT)


def test_a_second_worker_claiming_a_live_id_is_refused(cluster: Cluster) -> None:
    items = _fill(cluster, b"a", 100)
    impostor = cluster.start_worker("w1", data=cluster.root / "impostor", name="impostor")  # same id, other data
    wait_for(lambda: "duplicate_worker_id_refused" in cluster.procs["broker"].log_tail(200), 20, 0.1,
             "the broker refusing the impostor")
    # The real w1 keeps its slots and its data; the impostor got nothing.
    assert cluster.alive_workers() == {"w1", "w2", "w3"}
    assert [w["id"] for w in cluster.status()["workers"]] == ["w1", "w2", "w3"]
    assert cluster.client().mget(list(items)) == list(items.values())
    impostor.kill()
    _only_worker_serves(cluster, "w1", items)


def test_a_worker_with_a_wiped_disk_rejoins_under_its_old_id(cluster: Cluster) -> None:
    items = _fill(cluster, b"b", 200)
    cluster.procs["w2"].kill()
    shutil.rmtree(cluster.worker_dir("w2"))
    cluster.start_worker("w2")  # refused while the broker still counts the old w2 alive, then accepted
    wait_for(lambda: worker_keys(cluster).get("w2") == len(items), 30, 0.2, "w2 refilled")
    cluster.wait_ready()
    _only_worker_serves(cluster, "w2", items)
    terminate(cluster, "w1", "w2", "w3")
    count, _ = copies(cluster, ["w1", "w2", "w3"])
    assert {count[k] for k in items} == {3}


def test_a_worker_restarted_from_an_older_copy_of_its_data_catches_up(cluster: Cluster) -> None:
    old = _fill(cluster, b"c", 100)
    # A consistent copy of w3's LMDB taken while it runs (LMDB allows readers in other processes).
    env = lmdb.open(str(cluster.worker_dir("w3")), readonly=True, max_dbs=4, map_size=1 << 30)
    backup = cluster.root / "w3-backup"
    backup.mkdir()
    env.copy(str(backup))
    env.close()
    new = {k: v + b"-rewritten" for k, v in old.items()}
    c = cluster.client()
    c.mset(new)
    deleted = list(new)[:10]
    for k in deleted:
        assert c.delete(k) is True
    cluster.procs["w3"].kill()
    shutil.rmtree(cluster.worker_dir("w3"))
    shutil.copytree(backup, cluster.worker_dir("w3"))
    cluster.start_worker("w3")
    cluster.wait_worker_state("w3", "alive")
    wait_for(lambda: next(w for w in cluster.status()["workers"] if w["id"] == "w3")["behind_slots"] == 0,
             30, 0.2, "w3 caught up")
    expected = {k: (None if k in deleted else v) for k, v in new.items()}
    _only_worker_serves(cluster, "w3", expected)
