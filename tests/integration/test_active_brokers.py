"""Active brokers (issue 15, ``--groups``), real processes on a real etcd: three brokers share the
slot groups, each sequencing its own; workers register with every group's leader; a broker's
death moves its groups to the others and loses no acknowledged write."""

from __future__ import annotations

import asyncio
import base64
import json
import queue
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from client import AsyncClient
from protocol.errors import ZkvError
from tests.support.active import broker_status, full_map, wait_served
from tests.support.cluster import free_port, wait_for
from tests.support.ha import EtcdCluster, HaCluster, stop

pytestmark = pytest.mark.timeout(150)

GROUPS = 6
SLOTS = 48


@pytest.fixture
def active(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[HaCluster]:
    etcd = EtcdCluster(tmp_path / "etcd").start()
    cluster = HaCluster(tmp_path / "zkv", etcd=etcd, brokers=3, lease_ttl=3, slots=SLOTS,
                        broker_args=["--groups", str(GROUPS)])
    try:
        yield cluster
    finally:
        stop(cluster, etcd, request)


def served(cluster: HaCluster, names: list[str]) -> dict[str, dict[str, Any]]:
    return wait_served(cluster, names, GROUPS)


def start_three(cluster: HaCluster) -> dict[str, dict[str, Any]]:
    cluster.start_broker()
    for i in range(1, 4):
        cluster.start_worker(f"w{i}")
    return served(cluster, ["b1", "b2", "b3"])


class Writer(threading.Thread):
    """Puts under way from a client of every broker, through whatever the test does; each
    acknowledged put is remembered, with its version."""

    def __init__(self, cluster: HaCluster, tag: str) -> None:
        super().__init__(daemon=True)
        self.client = cluster.client(timeout=30.0)
        self.tag = tag.encode()
        self.acked: dict[bytes, bytes] = {}
        self.failed = 0
        self.stop_at = threading.Event()

    def run(self) -> None:
        i = 0
        while not self.stop_at.is_set():
            k, v = self.tag + b":%05d" % i, b"v%d" % i
            try:
                self.client.put(k, v)
                self.acked[k] = v
            except ZkvError:
                self.failed += 1
            i += 1

    def finish(self) -> dict[bytes, bytes]:
        self.stop_at.set()
        self.join(60)
        assert not self.is_alive()
        return self.acked


class WatchThread(threading.Thread):
    """A watch of ``prefix`` iterated on a thread of its own; its events in a queue."""

    def __init__(self, cluster: HaCluster, prefix: bytes) -> None:
        super().__init__(daemon=True)
        self.client = cluster.client(timeout=30.0)
        self.stream = self.client.watch(prefix)
        self.stream.opened()  # every group's leader holds its share
        self.events: queue.Queue[Any] = queue.Queue()
        self.start()

    def run(self) -> None:
        try:
            for ev in self.stream:
                self.events.put(ev)
        except BaseException as e:  # noqa: BLE001 - raised by take()
            self.events.put(e)

    def take(self, n: int, timeout: float = 30.0) -> tuple[list[tuple[bytes, bytes | None]], int]:
        """The next ``n`` puts, and how many resyncs came among them."""
        puts, resyncs = [], 0
        deadline = time.monotonic() + timeout
        while len(puts) < n:
            try:
                ev = self.events.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                raise AssertionError(f"{len(puts)} of {n} puts in {timeout} s: {puts}") from None
            if isinstance(ev, BaseException):
                raise ev
            if ev.kind == "resync":
                resyncs += 1
            else:
                assert ev.kind == "put", ev
                puts.append((ev.key, ev.value))
        return puts, resyncs

    def stop(self) -> dict[str, Any] | None:
        self.stream.session.ended = True  # the thread closes the stream at its next turn
        self.join(10)
        assert not self.is_alive()
        self.client.close()
        return self.stream.cursor


def lost(cluster: HaCluster, acked: dict[bytes, bytes]) -> list[bytes]:
    with cluster.client(timeout=20.0) as c:
        keys = sorted(acked)
        got = [v for i in range(0, len(keys), 100) for v in c.mget(keys[i:i + 100])]
    return [k for k, v in zip(keys, got, strict=True) if v != acked[k]]


# A pause past the lease (and the linearizability of the histories) is in
# tests/faults/test_active_failover.py; "pause" here too costs the suite 20 s for little more.
@pytest.mark.parametrize("fault", ["kill"])
def test_three_active_brokers_share_the_groups_and_survive_a_fault(active: HaCluster, fault: str) -> None:
    """Each broker sequences its own groups; one is SIGKILLed (or SIGSTOPped past its lease and
    resumed later); under a write load the other two take its groups at higher epochs, and no
    acknowledged write is lost (a resumed broker gives its groups up: its lease has lapsed)."""
    cluster = active
    sts = start_three(cluster)
    smap = full_map(cluster, "b1")
    assert smap.groups == GROUPS and smap.slots == SLOTS and len(smap.leaders) == GROUPS
    assert set(smap.leaders.values()) == {cluster.broker_endpoints[n][0] for n in ("b1", "b2", "b3")}
    with cluster.client(timeout=20.0) as c:
        keys = [b"pre%03d" % i for i in range(60)]
        c.mset({k: k + b"!" for k in keys})  # split by group: every broker takes its share
        assert c.mget(keys) == [k + b"!" for k in keys]
        # A scan asks every group's leader and merges their pages (7 keys a page: many merges).
        assert [(it.key, it.value) for it in c.scan(b"pre", limit=7)] == [(k, k + b"!") for k in keys]
        assert list(c.scan_keys(b"pre00", limit=3)) == keys[:10]
    sts = {n: broker_status(cluster, n) for n in ("b1", "b2", "b3")}
    assert all(st["stats"]["writes_committed"] > 0 for st in sts.values()), {
        n: st["stats"]["writes_committed"] for n, st in sts.items()}

    # A watch of every group: one share at each group's leader, the events merged.
    watch = WatchThread(cluster, b"wk")
    with cluster.client(timeout=20.0) as c:
        c.mset({b"wk1:%02d" % i: b"a%d" % i for i in range(12)})
    puts, resyncs = watch.take(12)
    assert sorted(puts) == [(b"wk1:%02d" % i, b"a%d" % i) for i in range(12)] and not resyncs
    writer = Writer(cluster, fault)
    writer.start()
    try:
        time.sleep(1.0)
        victim = "b2"
        its_groups = {int(g) for g in sts[victim]["leading"]}
        if fault == "kill":
            cluster.procs[victim].kill()
        else:
            cluster.procs[victim].signal(signal.SIGSTOP)
        began = time.monotonic()
        sts = served(cluster, ["b1", "b3"])
        taken = time.monotonic() - began
        survivors = {cluster.broker_endpoints[n][0] for n in ("b1", "b3")}
        new_map = full_map(cluster, "b1", survivors)
        assert new_map.revision > smap.revision
        assert all(new_map.leaders[g] in survivors for g in its_groups)
        if fault == "pause":
            cluster.procs[victim].signal(signal.SIGCONT)
            # It wakes with groups it may no longer act for: it drops them, then takes its share back.
            sts = served(cluster, ["b1", "b2", "b3"])
        time.sleep(1.0)
    finally:
        acked = writer.finish()
    # The watch's shares of the dead broker's groups resumed at their new leaders, from their
    # cursors: a new leader holds no changes from before it led, so each says resync at most once.
    with cluster.client(timeout=20.0) as c:
        c.mset({b"wk2:%02d" % i: b"b%d" % i for i in range(12)})
        puts, resyncs = watch.take(12)
        assert sorted(puts) == [(b"wk2:%02d" % i, b"b%d" % i) for i in range(12)]
        assert resyncs <= len(its_groups), f"{resyncs} resyncs for {len(its_groups)} groups moved"
        assert watch.events.empty(), "an event delivered twice"
        cursor = watch.stop()
        assert cursor is not None and len(cursor["s"]) == SLOTS
        c.mset({b"wk3:%02d" % i: b"c%d" % i for i in range(12)})

    async def resumed() -> list[tuple[bytes, bytes | None]]:
        # From the merged cursor, an AsyncClient's watch replays exactly what came after it.
        async with AsyncClient(cluster.frontend, timeout=20.0) as ac:
            async with ac.watch(b"wk", since=cursor) as stream:
                events = [await asyncio.wait_for(stream.__anext__(), 30) for _ in range(12)]
                return [(ev.key, ev.value) for ev in events]

    assert sorted(asyncio.run(resumed())) == [(b"wk3:%02d" % i, b"c%d" % i) for i in range(12)]
    assert len(acked) > 50, f"only {len(acked)} puts acknowledged ({writer.failed} failed)"
    missing = lost(cluster, {**acked, **{k: k + b"!" for k in keys}})
    assert not missing, f"{len(missing)} of {len(acked)} acknowledged writes lost: {missing[:5]}"
    assert taken < 30, f"groups of the {fault}ed broker led again after {taken:.1f} s"


def test_group_leadership_moves_to_a_joining_broker_under_load(active: HaCluster) -> None:
    """Two brokers lead the six groups 3/3; a third joins under a write load and gets its share by
    orderly handovers (the holder stops sequencing, then deletes the key); nothing acknowledged
    is lost and the map names the newcomer."""
    cluster = active
    cluster.start_broker("b1")
    cluster.start_broker("b2")
    for i in range(1, 4):
        cluster.start_worker(f"w{i}")
    served(cluster, ["b1", "b2"])
    writer = Writer(cluster, "move")
    writer.start()
    try:
        time.sleep(1.0)
        cluster.start_broker("b3")
        sts = served(cluster, ["b1", "b2", "b3"])
        time.sleep(1.0)
    finally:
        acked = writer.finish()
    assert len(sts["b3"]["leading"]) == 2
    assert cluster.broker_endpoints["b3"][0] in full_map(cluster, "b3").leaders.values()
    # `zkv status` at any broker: which broker leads which groups, and each one's load.
    out = cluster.zkv("status", "--url", cluster.broker_endpoints["b3"][0]).stdout.decode()
    assert out.startswith(f"role active  broker b3  groups {GROUPS}"), out
    rows = {line.split()[0]: line.split() for line in out.splitlines()[2:5]}
    assert set(rows) == {"b1", "b2", "b3"}, out
    assert sorted(len(r[2].split(",")) if "-" not in r[2] else 2 for r in rows.values()) == [2, 2, 2], out
    assert all(r[1] == cluster.broker_endpoints[name][0] and r[4].isdigit() for name, r in rows.items()), out

    async def routed() -> None:
        # AsyncClient routes as Client does: it learns the map from a redirect or refusal, keeps a
        # socket to each group leader, and splits MSET/MGET and scans over the groups.
        keys = [b"async%03d" % i for i in range(60)]
        async with AsyncClient(cluster.frontend, timeout=20.0) as ac:
            await ac.put(b"async-first", b"1")
            # Refused at first (its keys span the groups): the map fetched, the MSET split by it.
            await ac.mset({k: b"v" + k for k in keys})
            assert ac.router.slot_map is not None and ac.router.slot_map.groups == GROUPS
            assert len(ac.router.slot_map.by_group(keys)) == GROUPS
            assert await ac.mget(keys) == [b"v" + k for k in keys]
            got = [it.key async for it in ac.scan(prefix=b"async0", limit=7)]
            assert got == keys, got[:5]
            assert await ac.get(b"async-first") == b"1"
            assert len(ac._conns) >= 2, f"one socket only: {list(ac._conns)}"  # the leaders of 3 brokers' groups

    asyncio.run(routed())
    assert len(acked) > 50, f"only {len(acked)} puts acknowledged ({writer.failed} failed)"
    missing = lost(cluster, acked)
    assert not missing, f"{len(missing)} of {len(acked)} acknowledged writes lost: {missing[:5]}"
    gateway_over_the_groups(cluster)
    admin_over_the_groups(cluster)


def admin_over_the_groups(cluster: HaCluster) -> None:
    """Operator commands go to every group's leader (each keeps its own workers' roles), and the
    answer says what each group did."""
    every = [f"group {g}:" for g in range(GROUPS)]
    r = cluster.zkv("drain", "w1", "--url", cluster.frontend)
    err = r.stderr.decode()
    assert r.returncode != 0 and all(g in err for g in every) and "RF is 3" in err, err
    r = cluster.zkv("rebalance", "--wait", "--url", cluster.broker_endpoints["b2"][0])
    out = r.stdout.decode()
    assert r.returncode == 0 and all(g in out for g in every) and "balanced" in out, (out, r.stderr.decode())
    with cluster.client(timeout=20.0) as c:
        answer = c.admin("undrain", "w2")
        assert answer["ok"] and sorted(answer["groups"], key=int) == [str(g) for g in range(GROUPS)], answer
        moved = c.admin("move", slot=1, from_="w9", to="w1")  # one group's leader answers: w9 holds nothing
        assert not moved["ok"] and list(moved["groups"]) == [str(1 % GROUPS)] and "w9 does not hold" in moved["message"]


def gateway_over_the_groups(cluster: HaCluster) -> None:
    """The HTTP gateway (on AsyncClient) routes too: puts of every group, a scan page merged
    over the groups, and an SSE watch of them all."""
    base = cluster.start_gateway()
    with requests.get(base + "/v1/watch?prefix=gw", stream=True, timeout=30) as sse:
        lines = iter(sse.raw.readline, b"")
        assert next(lines).rstrip() == b": watching"
        for i in range(12):
            assert requests.put(f"{base}/v1/kv/gw{i:02d}", data=b"g%d" % i, timeout=20).status_code == 200
        page = requests.get(base + "/v1/kv?prefix=gw&limit=5", timeout=20).json()
        assert [base64.b64decode(it["key"]) for it in page["items"]] == [b"gw%02d" % i for i in range(5)]
        assert page["next"]
        puts = []
        for line in lines:
            if line.startswith(b"data: ") and b'"value"' in line:
                puts.append(base64.b64decode(json.loads(line[6:])["key"]))
                if len(puts) == 12:
                    break
        assert sorted(puts) == [b"gw%02d" % i for i in range(12)]


def test_a_broker_of_another_shape_refuses_to_start(active: HaCluster) -> None:
    """A prefix holds one cluster: a broker whose --groups (or no groups) differs says so and
    exits, before it takes any group or the leader key."""
    cluster = active
    cluster.start_broker("b1")
    cluster.start_worker("w1")
    # Leading a group, b1 has made the cluster's record in etcd (its id, slots and groups).
    wait_for(lambda: len(broker_status(cluster, "b1").get("leading", {})) == GROUPS, 30, 0.2, "b1 leading")
    assert cluster.etcd is not None
    for groups in ("1", "4"):
        r = cluster.zkv("broker", "--data", str(cluster.root / "odd"), "--etcd", cluster.etcd.endpoints,
                        "--etcd-prefix", cluster.prefix, "--slots", str(SLOTS), "--groups", groups,
                        "--frontend", f"tcp://127.0.0.1:{free_port()}", "--backend", f"tcp://127.0.0.1:{free_port()}",
                        "--replication", f"tcp://127.0.0.1:{free_port()}", timeout=30)
        err = r.stderr.decode()
        assert r.returncode == 1 and f"holds a cluster of {GROUPS} slot groups and {SLOTS} slots" in err, err
    assert cluster.etcd.get(cluster.prefix + "leader") is None  # the one-leader broker never campaigned
