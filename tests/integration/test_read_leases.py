"""Read leases on real processes (issue 16): the broker's lease map names a worker for every slot,
that worker answers GETs at its reads endpoint without the broker, a paused holder holds writes
back no longer than a lease and answers nothing stale when it resumes, and the options refuse
what they cannot do safely."""

from __future__ import annotations

import signal
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
import zmq

from protocol.frames import C_FINAL, C_REQUEST, MDPC, MMI_LEASES, pack, unpack
from protocol.replication import slot_for_key
from tests.support.cluster import ZKV, Cluster, wait_for

pytestmark = pytest.mark.timeout(90)

LEASE = 1.0


def lease_map(cluster: Cluster) -> dict[str, Any]:
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    try:
        s.connect(cluster.frontend)
        s.send_multipart([MDPC, C_REQUEST, MMI_LEASES, b""])
        assert s.poll(5000), "no answer to mmi.leases"
        frames = s.recv_multipart()
        assert frames[:3] == [MDPC, C_FINAL, MMI_LEASES]
        return unpack(frames[3])
    finally:
        s.close()


def holder_of(cluster: Cluster, key: bytes) -> str | None:
    m = lease_map(cluster)
    i = m["holders"][slot_for_key(key, m["slots"])]
    return None if i < 0 else m["urls"][i]


def direct_get(url: str, key: bytes, wait: float = 5.0) -> tuple[dict[str, Any], list[bytes]] | None:
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    try:
        s.connect(url)
        s.send(pack({"op": "get", "id": 7, "cid": uuid.uuid4().bytes, "key": key}))
        if not s.poll(int(wait * 1000)):
            return None
        frames = s.recv_multipart()
        return unpack(frames[0]), frames[1:]
    finally:
        s.close()


def worker_of(cluster: Cluster, url: str) -> str:
    return next(w for w, u in cluster.reads.items() if u == url)


@pytest.fixture
def leased(cluster_factory: Callable[..., Cluster]) -> Cluster:
    c = cluster_factory(read_lease=LEASE, keys=False).start()  # (reads endpoints have no CURVE yet)
    wait_for(lambda: all(i >= 0 for i in lease_map(c)["holders"]), 20, 0.1, "a lease on every slot")
    return c


def test_every_slot_has_a_holder_that_answers_reads_without_the_broker(leased: Cluster) -> None:
    m = lease_map(leased)
    assert m["lease"] == LEASE and len(m["holders"]) == leased.slots
    assert set(m["urls"]) == set(leased.reads.values())  # the holders are spread over every worker
    c = leased.client()
    for i in range(40):
        assert c.put(b"k%d" % i, b"v%d" % i)
    for i in range(40):
        url = holder_of(leased, b"k%d" % i)
        assert url is not None
        hdr, vals = direct_get(url, b"k%d" % i) or ({}, [])
        assert hdr["ok"] and hdr["found"] and vals == [b"v%d" % i], hdr
        others = set(leased.reads.values()) - {url}
        refused, _ = direct_get(sorted(others)[0], b"k%d" % i) or ({}, [])
        assert refused["code"] == "NOT_LEASED", refused
    missing, vals = direct_get(holder_of(leased, b"nope") or "", b"nope") or ({}, [])
    assert missing["ok"] and missing["found"] is False and vals == []
    # The library reads from the holders too, and sees every write it made.
    for i in range(40):
        assert c.put(b"k%d" % i, b"w%d" % i)
        assert c.get(b"k%d" % i) == b"w%d" % i
    assert c.direct_reads_served >= 40
    wait_for(lambda: sum(w["direct_reads"] for w in leased.status()["workers"]) >= 40 + 40, 10, 0.2,
             "the workers' direct reads in status")


def test_a_paused_holder_holds_writes_back_for_at_most_a_lease_and_answers_nothing_stale(leased: Cluster) -> None:
    c = leased.client()
    key = b"paused-key"
    assert c.put(key, b"old")
    url = holder_of(leased, key)
    assert url is not None
    wid = worker_of(leased, url)
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(url)
    leased.procs[wid].signal(signal.SIGSTOP)
    try:
        sock.send(pack({"op": "get", "id": 1, "cid": b"c", "key": key}))
        began = time.monotonic()
        assert c.put(key, b"new")  # commits once the paused holder's lease has run out
        took = time.monotonic() - began
        assert took < LEASE + 3.0, took
        assert c.get(key) == b"new"  # the client falls back to the broker or another holder
        time.sleep(0.5)
    finally:
        leased.procs[wid].signal(signal.SIGCONT)
    try:
        assert sock.poll(5000), "the resumed worker never answered the read it received while paused"
        hdr = unpack(sock.recv_multipart()[0])
        # It read after it resumed (lease gone: refused), or its answer shows the new value.
        assert hdr["ok"] is False and hdr["code"] == "NOT_LEASED", hdr
    finally:
        sock.close()
    wait_for(lambda: (got := direct_get(holder_of(leased, key) or url, key)) is not None and got[1] == [b"new"],
             20, 0.2, "the new value read directly again")


def test_read_leases_refuse_what_they_cannot_do_safely(tmp_path: Any) -> None:
    import subprocess

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*ZKV, *args], capture_output=True, text=True, timeout=30)

    r = run("broker", "--data", str(tmp_path / "b"), "--read-lease", "2", "--keys", str(tmp_path / "keys"))
    assert r.returncode != 0 and "read leases work with one leader and without --keys" in r.stderr
    r = run("broker", "--data", str(tmp_path / "b"), "--read-lease", "5", "--request-timeout", "5")
    assert r.returncode != 0 and "below --request-timeout" in r.stderr
    r = run("broker", "--data", str(tmp_path / "b"), "--read-lease", "-1")
    assert r.returncode != 0 and "--read-lease" in r.stderr
    r = run("worker", "--id", "w1", "--data", str(tmp_path / "w"), "--reads", "tcp://0.0.0.0:7777")
    assert r.returncode != 0 and "beyond loopback" in r.stderr
    r = run("worker", "--id", "w1", "--data", str(tmp_path / "w"), "--reads", "http://127.0.0.1:7777")
    assert r.returncode != 0 and "tcp:// or ipc://" in r.stderr


def test_status_and_metrics_show_the_leases_and_the_reads_they_answered(
        cluster_factory: Callable[..., Cluster]) -> None:
    import urllib.request

    from tests.support.cluster import free_port

    listen = {name: f"127.0.0.1:{free_port()}" for name in ("broker", "w1", "w2", "w3")}
    c = cluster_factory(read_lease=LEASE, keys=False, broker_args=["--metrics", listen["broker"]])
    c.start(worker_extra={w: ["--metrics", listen[w]] for w in ("w1", "w2", "w3")})
    wait_for(lambda: c.status()["leased_slots"] == c.slots, 20, 0.1, "a lease on every slot in status")
    kv = c.client()
    assert kv.put(b"m", b"v")
    for _ in range(30):
        assert kv.get(b"m") == b"v"
    assert kv.direct_reads_served == 30

    def scrape(name: str) -> dict[str, float]:
        with urllib.request.urlopen(f"http://{listen[name]}/metrics", timeout=10) as r:
            lines = r.read().decode().splitlines()
        return {ln.rsplit(" ", 1)[0]: float(ln.rsplit(" ", 1)[1]) for ln in lines if ln and not ln.startswith("#")}

    def settled() -> bool:
        b = scrape("broker")
        workers = [scrape(w) for w in ("w1", "w2", "w3")]
        return (b.get("zkv_broker_leased_slots") == c.slots
                and sum(w.get("zkv_worker_leased_slots", 0) for w in workers) == c.slots
                and sum(w.get("zkv_worker_direct_reads_total", 0) for w in workers) == 30
                and sum(v for k, v in b.items() if k.startswith("zkv_broker_worker_direct_reads{")) == 30)

    wait_for(settled, 15, 0.3, "the lease and direct read metrics")
    assert c.status()["read_lease"] == LEASE
