"""A worker given several brokers (etcd mode) finds the leader: real processes on loopback. One
broker in its list is a fake (a ROUTER in this test: a standby answering READY with the standby
DISCONNECT, or a deposed leader assigning slots at an old epoch), or nothing at all; the other is
a real broker, where the worker must end up registered and serving."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import lmdb
import pytest
import zmq

from protocol.frames import MDPW, W_ACK, W_ASSIGN, W_DISCONNECT, W_NACK, W_READY, pack
from tests.support.cluster import Cluster, Proc, free_port, wait_for
from worker.brokers import LEADERLESS_LIMIT

Reply = Callable[[bytes, int], list[bytes] | None]

pytestmark = pytest.mark.timeout(90)


def standby(hint: Callable[[int], dict[str, Any]]) -> Reply:
    """A standby's answer to every message: DISCONNECT with ``hint(n)``, n counting the READYs."""
    return lambda cmd, readies: [W_DISCONNECT, pack({"reason": "standby", **hint(readies)})]


@contextmanager
def fake_broker(reply: Reply) -> Iterator[tuple[str, list[bytes]]]:
    """A ROUTER on a free port answering each worker command with ``reply(command, n)`` (the frames
    after MDPW02, or None: no answer), n counting the READYs received (from 1). Yields its url and
    the commands it received."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    url = f"tcp://127.0.0.1:{free_port()}"
    sock.bind(url)
    received: list[bytes] = []
    stop = threading.Event()

    def serve() -> None:
        readies = 0
        while not stop.is_set():
            if not sock.poll(50):
                continue
            identity, *frames = sock.recv_multipart()
            if len(frames) < 2 or frames[0] != MDPW:
                continue
            received.append(frames[1])
            readies += frames[1] == W_READY
            answer = reply(frames[1], readies)
            if answer is not None:
                sock.send_multipart([identity, MDPW, *answer])

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield url, received
    finally:
        stop.set()
        thread.join(5)
        sock.close()
        ctx.term()


def start_listed_worker(cluster: Cluster, brokers: list[str], replications: list[str]) -> Proc:
    """w1 with these lists (owned by the cluster: killed by the fixture whatever happens)."""
    args = ["worker", "--id", "w1", "--data", str(cluster.worker_dir("w1")), "--broker", ",".join(brokers),
            "--replication", ",".join(replications), "--heartbeat", str(cluster.heartbeat),
            "--map-size", str(cluster.map_size)]
    p = Proc("w1", args, cluster.root / "logs" / "w1.log", cluster.env)
    cluster.procs["w1"] = p
    p.start()
    return p


def one_worker_cluster(cluster_factory) -> Cluster:  # type: ignore[no-untyped-def]
    # keys=False: the fake standby speaks in clear (this is about finding the leader, not CURVE).
    cluster = cluster_factory(workers=1, rf=1, w=1, keys=False)
    cluster.start_broker()
    # Listening before the worker starts, or the worker may begin by moving past it.
    wait_for(lambda: "broker_listening" in cluster.procs["broker"].log_tail(), 20, 0.05, "the broker listening")
    return cluster


def switched(log: str, **fields: str) -> bool:
    """Whether ``log`` has a broker_switched line with these fields (``from_`` for ``from``)."""
    want = {f"{k.rstrip('_')}={v}" for k, v in fields.items()}
    return any("broker_switched" in line and want <= set(line.split()) for line in log.splitlines())


def assert_serving(cluster: Cluster) -> None:
    cluster.wait_ready(30, require_running=True)
    assert cluster.alive_workers() == {"w1"}
    c = cluster.client()
    c.put(b"k", b"v")
    assert c.get(b"k") == b"v"


def test_a_worker_told_by_a_standby_where_the_leader_is_registers_there(cluster_factory) -> None:  # type: ignore[no-untyped-def]
    cluster = one_worker_cluster(cluster_factory)
    leader = {"leader": cluster.backend, "replication": cluster.replication}
    no_leader = {"leader": None, "replication": None}
    # Two READYs answered "standby, no leader known" (asked again there), then the leader named.
    asked = LEADERLESS_LIMIT - 1
    with fake_broker(standby(lambda n: leader if n > asked else no_leader)) as (fake, received):
        fake_pub = f"tcp://127.0.0.1:{free_port()}"  # nothing listens: the SUB just waits
        w1 = start_listed_worker(cluster, [fake, cluster.backend], [fake_pub, cluster.replication])
        assert_serving(cluster)
        assert received.count(W_READY) == asked + 1  # no more once the leader was named
        log = w1.log_tail(200)
        assert switched(log, from_=fake, reason="standby", to=cluster.backend), log
        assert log.count("broker_switched") == 1
        assert "standby_knows_no_leader_trying_next" not in log


def test_a_worker_leaves_a_standby_that_keeps_knowing_no_leader(cluster_factory) -> None:  # type: ignore[no-untyped-def]
    """A broker cut off from etcd stands by and knows no leader while another leads: after
    LEADERLESS_LIMIT such answers the worker tries the next broker of its list (the leader)."""
    cluster = one_worker_cluster(cluster_factory)
    with fake_broker(standby(lambda n: {"leader": None, "replication": None})) as (fake, received):
        fake_pub = f"tcp://127.0.0.1:{free_port()}"
        w1 = start_listed_worker(cluster, [fake, cluster.backend], [fake_pub, cluster.replication])
        assert_serving(cluster)
        assert received.count(W_READY) == LEADERLESS_LIMIT
        log = w1.log_tail(200)
        assert "standby_knows_no_leader_trying_next" in log, log


def test_a_worker_whose_first_broker_is_not_listening_moves_to_the_next(cluster_factory) -> None:  # type: ignore[no-untyped-def]
    cluster = one_worker_cluster(cluster_factory)
    nobody = f"tcp://127.0.0.1:{free_port()}"
    w1 = start_listed_worker(cluster, [nobody, cluster.backend], [f"tcp://127.0.0.1:{free_port()}",
                                                                  cluster.replication])
    assert_serving(cluster)
    # The DEALER's monitor reported the refused connection (before the heartbeat rule's silence).
    log = w1.log_tail(200)
    assert switched(log, from_=nobody, reason="disconnected", to=cluster.backend), log


def test_a_worker_leaves_a_broker_that_stops_for_the_next_one(cluster_factory) -> None:  # type: ignore[no-untyped-def]
    """Registered with the real broker (listed second), which then dies: the worker goes round to
    the first (a standby naming the second) and back, and registers again once the broker is back."""
    cluster = one_worker_cluster(cluster_factory)
    leader = {"leader": cluster.backend, "replication": cluster.replication}
    with fake_broker(standby(lambda n: leader)) as (fake, received):
        w1 = start_listed_worker(cluster, [fake, cluster.backend],
                                 [f"tcp://127.0.0.1:{free_port()}", cluster.replication])
        assert_serving(cluster)
        before = received.count(W_READY)
        cluster.procs["broker"].kill()
        wait_for(lambda: received.count(W_READY) > before, 15, 0.05, "the worker trying the standby")
        cluster.start_broker()
        assert_serving(cluster)
        assert w1.running
        log = w1.log_tail(400)
        assert switched(log, from_=cluster.backend, reason="disconnected", to=fake), log


def stored_cluster_id(cluster: Cluster, wid: str) -> bytes:
    env = lmdb.open(str(cluster.worker_dir(wid)), readonly=True, max_dbs=8, map_size=1 << 30)
    try:
        with env.begin() as txn:
            return bytes(txn.get(b"cluster", db=env.open_db(b"meta", txn=txn)))
    finally:
        env.close()


def test_a_worker_refuses_the_assignment_of_a_deposed_leader_and_moves_on(cluster_factory) -> None:  # type: ignore[no-untyped-def]
    """Registered with the real broker (epoch 1), which then stops: the next broker in the list
    assigns slots at epoch 0 (a leader deposed since), in the worker's cluster. The worker refuses
    it, applies nothing, and goes back round to the real broker once it is back (epoch 2)."""
    cluster = one_worker_cluster(cluster_factory)
    cluster_id: list[bytes] = []

    def deposed(cmd: bytes, readies: int) -> list[bytes] | None:
        if cmd != W_READY or not cluster_id:
            return None
        return [W_ASSIGN, pack({"slots": [0, 1, 2], "epoch": 0, "cluster": cluster_id[0]})]

    with fake_broker(deposed) as (fake, received):
        w1 = start_listed_worker(cluster, [cluster.backend, fake],
                                 [cluster.replication, f"tcp://127.0.0.1:{free_port()}"])
        assert_serving(cluster)
        cluster_id.append(stored_cluster_id(cluster, "w1"))
        cluster.procs["broker"].kill()
        wait_for(lambda: switched(w1.log_tail(400), from_=fake, reason="deposed", to=cluster.backend), 15, 0.05,
                 "the worker leaving the deposed leader")
        log = w1.log_tail(400)
        assert any("assignment_from_deposed_broker_refused" in line and {"epoch=0", "highest=1"} <= set(line.split())
                   for line in log.splitlines()), log
        assert W_READY in received and not {W_ACK, W_NACK} & set(received)  # nothing applied, nor asked for
        cluster.start_broker()
        assert_serving(cluster)
        assert w1.running
        assert cluster.status()["epoch"] == 2
