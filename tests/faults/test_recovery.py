"""Replication and faults on real processes: RF copies on disk, SIGKILL under load, quorum loss,
catch-up after a restart, repair of dropped replication messages, broker restart."""

from __future__ import annotations

import signal
import threading
import time

import pytest

from protocol.errors import NotEnoughReplicas, ZkvError
from protocol.replication import slot_for_key
from tests.support.cluster import Cluster, wait_for
from tests.support.helpers import Writer, copies, keys_in_slot, terminate, worker_keys

pytestmark = pytest.mark.timeout(120)

WIDS = ["w1", "w2", "w3"]


def _read_all(c, expected: dict[bytes, bytes], batch: int = 200) -> None:  # type: ignore[no-untyped-def]
    keys = list(expected)
    for i in range(0, len(keys), batch):
        chunk = keys[i:i + batch]
        got = c.mget(chunk)
        missing = [k for k, v in zip(chunk, got, strict=True) if v != expected[k]]
        assert not missing, f"{len(missing)} keys wrong or missing, e.g. {missing[:5]}"


@pytest.mark.parametrize("workers", [3, 4])
def test_every_key_has_exactly_rf_copies(cluster_factory, workers: int) -> None:  # type: ignore[no-untyped-def]
    cluster = cluster_factory(workers=workers).start()
    wids = [f"w{i}" for i in range(1, workers + 1)]
    c = cluster.client()
    expected = {}
    for i in range(150):
        k, v = f"single-{i}".encode(), f"v{i}".encode()
        c.put(k, v)
        expected[k] = v
    batch = {f"multi-{i}".encode(): f"m{i}".encode() * 3 for i in range(300)}
    c.mset(batch)
    expected.update(batch)
    # Overwrites and deletes leave exactly one record per live key on each replica.
    for i in range(0, 150, 3):
        k = f"single-{i}".encode()
        c.put(k, b"over")
        expected[k] = b"over"
    for i in range(1, 150, 3):
        assert c.delete(f"single-{i}".encode()) is True
        del expected[f"single-{i}".encode()]
    _read_all(c, expected)
    # With a fourth worker that registered after the cluster formed, slots move to it: wait until
    # no move is in flight (a source keeps its copy until the move completes). Then every
    # replica acknowledges its copy (W=2 lets one trail for a moment): wait until the workers'
    # key counts add up, then stop them cleanly.
    def settled() -> bool:
        st = cluster.status()
        return not st["moves"] and st["misplaced_slots"] == 0
    wait_for(settled, 30, 0.1, "no slot move in flight or planned")
    wait_for(lambda: sum(worker_keys(cluster).values()) == 3 * len(expected), 10, 0.1,
             "the workers hold 3 copies in all")
    terminate(cluster, *wids)
    count, per_worker = copies(cluster, wids)
    assert set(count) == set(expected), "keys on disk differ from the keys written"
    wrong = {k: n for k, n in count.items() if n != 3}
    assert not wrong, f"{len(wrong)} keys without exactly 3 copies, e.g. {list(wrong.items())[:5]}"
    for wid, recs in per_worker.items():
        for (_slot, key), (_version, _exp, value) in recs.items():
            assert value == expected[key], (wid, key)
    # Replicas of a key agree on its version too.
    for key in expected:
        versions = {recs[(slot_for_key(key, cluster.slots), key)][0]
                    for recs in per_worker.values() if (slot_for_key(key, cluster.slots), key) in recs}
        assert len(versions) == 1, (key, versions)


def test_sigkill_one_worker_under_load_then_two(cluster: Cluster) -> None:
    with Writer(cluster.frontend, "load-") as writer:
        wait_for(lambda: len(writer.acked) >= 150, 30, 0.02, "150 acknowledged writes")
        cluster.procs["w1"].kill()
        killed_at = time.monotonic()
        wait_for(lambda: writer.acks_after(killed_at) >= 300, 40, 0.02,
                 "300 acknowledged writes after w1 was killed")
        writer.stop()
    assert not writer.failed, f"writes failed with one worker down: {writer.failed[:5]}"
    acked = {k: v for k, (v, _ver) in writer.acked.items()}
    c = cluster.client()
    _read_all(c, acked)
    for k, (v, ver) in list(writer.acked.items())[::37]:
        assert c.get_versioned(k) == (v, ver)
    cluster.wait_worker_state("w1", "dead")

    # Second worker down: W=2 can no longer be met in any slot.
    cluster.procs["w2"].kill()
    cluster.wait_worker_state("w2", "dead")
    for attempt in range(3):
        t0 = time.monotonic()
        with pytest.raises(NotEnoughReplicas):
            c.put(f"refused-{attempt}".encode(), b"x")
        elapsed = time.monotonic() - t0
        assert elapsed < 1.0, f"NotEnoughReplicas took {elapsed:.2f}s (request timeout is 3s)"
    t0 = time.monotonic()
    with pytest.raises(NotEnoughReplicas):
        c.mset({b"refused-m1": b"x", b"refused-m2": b"y"})
    with pytest.raises(NotEnoughReplicas):
        c.delete(next(iter(acked)))
    assert time.monotonic() - t0 < 2.0
    r = cluster.zkv("put", "--url", cluster.frontend, "refused-cli", "x")
    assert r.returncode == 4 and b"NOT_ENOUGH_REPLICAS" in r.stderr, (r.returncode, r.stderr)

    # Committed data is still readable from w3 alone, and nothing refused was written.
    _read_all(c, acked)
    assert c.mget([b"refused-0", b"refused-1", b"refused-2", b"refused-m1", b"refused-m2",
                   b"refused-cli"]) == [None] * 6
    assert c.exists(next(iter(acked))) is True


def test_restarted_worker_catches_up_and_serves_reads(cluster: Cluster) -> None:
    c = cluster.client()
    before = {f"before-{i}".encode(): f"b{i}".encode() for i in range(200)}
    c.mset(before)
    cluster.procs["w1"].kill()
    cluster.wait_worker_state("w1", "dead")
    # Writes while w1 is away: small ones in every slot (the broker's log tail still has them) and,
    # in one slot, more bytes than the tail keeps (that slot needs a snapshot).
    during = {f"during-{i}".encode(): f"d{i}".encode() for i in range(300)}
    for i in range(0, 300, 50):
        c.mset(dict(list(during.items())[i:i + 50]))
    big_slot = slot_for_key(b"before-0", cluster.slots)
    big = {k: bytes([n]) * 100_000 for n, k in enumerate(keys_in_slot(big_slot, cluster.slots, 6, "big-"))}
    for k, v in big.items():
        c.put(k, v)
    overwritten = {k: b"new" for k in list(before)[:50]}
    c.mset(overwritten)
    deleted = list(before)[50:70]
    for k in deleted:
        assert c.delete(k) is True
    expected = {**before, **during, **big, **overwritten}
    for k in deleted:
        del expected[k]

    cluster.start_worker("w1")
    cluster.wait_worker_state("w1", "alive")
    cluster.wait_ready()
    # Status says every slot has its RF replicas again. Only w1 is left now: every read must be
    # served by it (the broker may still replay its log tail to it, but no peer can send it a snapshot).
    cluster.procs["w2"].kill()
    cluster.procs["w3"].kill()
    cluster.wait_worker_state("w2", "dead")
    cluster.wait_worker_state("w3", "dead")
    _read_all(c, expected, batch=50)
    assert c.mget(deleted) == [None] * len(deleted)
    for k in list(expected)[::25]:
        assert c.get(k) == expected[k]


def test_dropped_replication_messages_are_repaired(cluster_factory) -> None:  # type: ignore[no-untyped-def]
    # Without the broker's read cache: the reads after w1 and w2 die must be w3's to answer (with
    # the cache the broker would answer them from memory, and w3's gaps would be repaired only by
    # the broker's laggard sweep, after a grace, maybe after this test stopped w3).
    cluster = cluster_factory(broker_args=["--read-cache", "0"]).start(
        worker_extra={"w3": ["--test-drop-replication", "every=7"]})
    c = cluster.client()
    expected = {}
    for i in range(200):
        k, v = f"d-{i}".encode(), f"v{i}".encode()
        c.put(k, v)
        expected[k] = v
    for i in range(0, 400, 100):
        batch = {f"dm-{j}".encode(): f"m{j}".encode() for j in range(i, i + 100)}
        c.mset(batch)
        expected.update(batch)
    _read_all(c, expected)
    # Only w3, which dropped every 7th message, is left: it must fill its gaps and serve every key.
    cluster.procs["w1"].kill()
    cluster.procs["w2"].kill()
    cluster.wait_worker_state("w1", "dead")
    cluster.wait_worker_state("w2", "dead")
    _read_all(c, expected)
    st = cluster.status()
    assert st["replays_sent"] + st["snapshots_sent"] > 0, "no repair happened: did the hook drop anything?"
    terminate(cluster, "w3")
    count, per_worker = copies(cluster, WIDS)
    assert set(count) == set(expected)
    assert all(n == 3 for n in count.values()), [k for k, n in count.items() if n != 3][:5]
    for wid, recs in per_worker.items():
        for (_s, key), (_ver, _exp, value) in recs.items():
            assert value == expected[key], (wid, key)


def test_broker_restart_keeps_data_and_metadata(cluster: Cluster) -> None:
    c = cluster.client()
    expected = {f"pre-{i}".encode(): f"p{i}".encode() for i in range(200)}
    c.mset(expected)
    versions = {k: c.put(k, b"versioned") for k in (b"v1", b"v2", b"v3")}
    expected.update({k: b"versioned" for k in versions})
    st0 = cluster.status()

    with Writer(cluster.frontend, "during-restart-") as writer:
        wait_for(lambda: len(writer.acked) >= 50, 30, 0.02, "50 writes before the broker restart")
        cluster.procs["broker"].kill()
        cluster.start_broker()
        restarted_at = time.monotonic()
        wait_for(lambda: writer.acks_after(restarted_at) >= 50, 60, 0.05,
                 "50 writes acknowledged by the restarted broker")
        writer.stop()
    cluster.wait_ready()
    st1 = cluster.status()
    assert st1["epoch"] > st0["epoch"]
    assert [(w["id"], w["slots"]) for w in st1["workers"]] == [(w["id"], w["slots"]) for w in st0["workers"]]
    assert all(w["state"] == "alive" for w in st1["workers"])
    assert (st1["slots"], st1["rf"], st1["w"]) == (st0["slots"], st0["rf"], st0["w"])
    assert st1["committed_writes"] >= st0["committed_writes"] + len(writer.acked)

    # The same Client object goes on working.
    _read_all(c, expected)
    for k, ver in versions.items():
        assert c.get_versioned(k) == (b"versioned", ver)
    v = c.put(b"after-restart", b"ok")
    assert c.get_versioned(b"after-restart") == (b"ok", v)
    # Every write the writer saw acknowledged is there, applied once (its version is the one the
    # client got back: a second application would have given it a later one).
    for k, (value, ver) in writer.acked.items():
        assert c.get_versioned(k) == (value, ver), k
    # A write that failed across the restart is there once or not at all.
    for k, value, _err in writer.failed:
        got = c.get(k)
        assert got in (None, value), k


def test_every_worker_paused_past_its_liveness_with_a_write_in_flight(cluster: Cluster) -> None:
    """The CI failure of test_a_standby_killed_while_it_takes_over (final reads failed), on its
    own: on a loaded machine every worker stalls at once (a saturated disk) with a write in
    flight, for longer than the broker's liveness. The broker declares them lost; when they wake
    they apply the write, their ACKs are refused (DISCONNECT) and they register again, READY
    reporting the write. Each key must then read, although its slot gets no further write: the
    broker counted only ACKs, so the committed seq stayed below the write and every read of the
    key was held until its timeout, for good (NoReply or TIMEOUT). A pause lets the worker first
    notice the silent broker and register before it applies, which the broker repairs: each
    round hits the defect or not, so there are several."""
    c = cluster.client(timeout=8, attempt_timeout=4)
    keys = [keys_in_slot(slot, cluster.slots, 1, "paused-")[0] for slot in range(5)]  # a slot each
    for k in keys:
        c.put(k, b"old")
    outcome: dict[bytes, object] = {}
    for k in keys:
        for wid in WIDS:
            cluster.procs[wid].signal(signal.SIGSTOP)
        acked: list[bool] = []

        def put(key: bytes = k, acked: list[bool] = acked) -> None:
            with cluster.client(timeout=3, attempt_timeout=3) as pc:
                try:
                    pc.put(key, b"new")
                    acked.append(True)
                except ZkvError:
                    pass  # TIMEOUT: its outcome is unknown

        writer = threading.Thread(target=put)
        writer.start()
        time.sleep(1.3)  # the broker's liveness is 3 heartbeats of 0.3 s
        for wid in WIDS:
            cluster.procs[wid].signal(signal.SIGCONT)
        writer.join()
        wait_for(lambda: cluster.alive_workers() == set(WIDS), 20, 0.05, "every worker registered again")
        try:
            outcome[k] = c.get(k)
        except ZkvError as e:
            outcome[k] = f"{type(e).__name__}: {e}"
        assert outcome[k] in ((b"new",) if acked else (b"old", b"new")), outcome
