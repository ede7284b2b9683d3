"""Clients given several brokers (issue 11, etcd mode), against real sockets on loopback: a fake
standby (a real ROUTER in a thread of the test, answering every kv request with NOT_LEADER and
mmi.status as a standby) listed first, a real cluster second. Client, AsyncClient, watches,
streamed puts and the ``zkv`` CLI all end up served by the real broker; a list whose first URL
has nothing listening works, and quickly."""

from __future__ import annotations

import asyncio
import io
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from client import AsyncClient, Client
from client.commands import Call, put
from tests.support.cluster import Cluster, free_port
from tests.support.standby import FakeBroker

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def fakes() -> Iterator[Any]:
    made: list[FakeBroker] = []

    def make(leader: str | None | bool) -> FakeBroker:
        f = FakeBroker(leader)
        made.append(f)
        return f

    yield make
    for f in made:
        f.close()


def nothing_listening() -> str:
    return f"tcp://127.0.0.1:{free_port()}"


def test_a_resend_to_the_named_leader_keeps_the_id_and_cid(fakes: Any) -> None:
    leader = fakes(False)
    standby = fakes(leader.url)
    with Client(f"{standby.url},{nothing_listening()}", timeout=5, attempt_timeout=2) as c:
        assert c.put(b"k", b"v") == 1
        assert c.brokers.current == leader.url  # followed though it is not in the list
    assert len(standby.got) == 1 and len(leader.got) == 1
    first, resent = standby.got[0], leader.got[0]
    assert (resent["id"], resent["cid"], resent["op"]) == (first["id"], first["cid"], "put")
    assert first["retry"] is False and resent["retry"] is True


def test_client_is_served_by_the_leader_a_standby_names(cluster: Cluster, fakes: Any) -> None:
    standby = fakes(cluster.frontend)
    with Client(f"{standby.url},{cluster.frontend}", timeout=10, credentials=cluster.credentials) as c:
        t0 = time.monotonic()
        v = c.put(b"ha:1", b"one")
        assert time.monotonic() - t0 < 2.0  # followed at once, no backoff, no timeout
        assert c.get(b"ha:1") == b"one"
        assert c.brokers.current == cluster.frontend
        assert c.put_stream(b"ha:big", io.BytesIO(b"x" * 300_000), chunk_size=64 * 1024) > 0
    assert [h["op"] for h in standby.got] == ["put"]  # one refusal, then the leader for good
    assert cluster.client().get_versioned(b"ha:1") == (b"one", v)
    assert cluster.client().get(b"ha:big") == b"x" * 300_000


def test_the_window_of_a_streamed_put_moves_with_everything_in_flight(fakes: Any) -> None:
    leader = fakes(False)
    standby = fakes(leader.url)
    done: list[int] = []
    calls = [Call("put", {"key": f"w{i}".encode()}, lambda rh, _v: done.append(rh["id"]), [b"v"])
             for i in range(10)]
    with Client(f"{standby.url},{leader.url}", timeout=5, attempt_timeout=2) as c:
        c._run_window(iter(calls), 4)
    assert len(standby.got) == 4  # the first window, refused
    ids = [h["id"] for h in leader.got]
    assert sorted(ids) == sorted(set(ids)) == sorted(done)  # every request served once, by the leader
    assert len(ids) == 10 and {h["id"] for h in standby.got} <= set(ids)
    assert all(h["retry"] for h in leader.got if h["id"] in {s["id"] for s in standby.got})


def test_the_window_leaves_a_dead_broker_within_about_a_second(fakes: Any) -> None:
    leader = fakes(False)
    calls = [put(f"d{i}", b"v") for i in range(6)]
    with Client(f"{nothing_listening()},{leader.url}", timeout=10) as c:
        t0 = time.monotonic()
        c._run_window(iter(calls), 4)
        took = time.monotonic() - t0
    assert sorted(h["id"] for h in leader.got) == list(range(1, 7))
    assert took < 3.0, took


def test_async_client_is_served_by_the_leader_a_standby_names(cluster: Cluster, fakes: Any) -> None:
    standby = fakes(cluster.frontend)

    async def run() -> list[bytes | None]:
        async with AsyncClient(f"{standby.url},{cluster.frontend}", timeout=10,
                               credentials=cluster.credentials) as c:
            await asyncio.gather(*(c.put(f"ha:a{i}".encode(), b"v%d" % i) for i in range(20)))
            assert c.brokers.current == cluster.frontend
            return await asyncio.gather(*(c.get(f"ha:a{i}".encode()) for i in range(20)))

    assert asyncio.run(run()) == [b"v%d" % i for i in range(20)]
    assert standby.got and all(h["op"] == "put" for h in standby.got)
    assert cluster.client().get(b"ha:a7") == b"v7"


def test_a_watch_through_a_standby_sees_the_leaders_changes(cluster: Cluster, fakes: Any) -> None:
    standby = fakes(cluster.frontend)
    c = Client(f"{standby.url},{cluster.frontend}", timeout=10, credentials=cluster.credentials)
    w = c.watch(b"hw:")
    try:
        done = threading.Event()
        got: list[Any] = []

        def take() -> None:
            for e in w:
                got.append(e)
                if len(got) == 2:
                    break
            done.set()

        t = threading.Thread(target=take, daemon=True)
        t.start()
        time.sleep(0.5)
        writer = cluster.client()
        writer.put(b"hw:1", b"a")
        writer.put(b"hw:2", b"b")
        assert done.wait(15), got
        assert [(e.kind, e.key, e.value) for e in got] == [("put", b"hw:1", b"a"), ("put", b"hw:2", b"b")]
        assert [h["op"] for h in standby.got][:1] == ["watch"]
    finally:
        w.close()
        c.close()


def test_nothing_listening_at_the_first_url_costs_about_a_second(cluster: Cluster) -> None:
    with Client(f"{nothing_listening()},{cluster.frontend}", timeout=10, credentials=cluster.credentials) as c:
        t0 = time.monotonic()
        c.put(b"ha:dead", b"x")
        took = time.monotonic() - t0
        assert c.brokers.current == cluster.frontend
    assert took < 3.0, took  # one FAILOVER_WAIT (1 s), not the 6 s attempt timeout

    async def run() -> float:
        async with AsyncClient(f"{nothing_listening()},{cluster.frontend}", timeout=10,
                               credentials=cluster.credentials) as ac:
            t0 = time.monotonic()
            assert await ac.get(b"ha:dead") == b"x"
            return time.monotonic() - t0

    assert asyncio.run(run()) < 3.0


def test_cli_put_and_get_through_a_standby(cluster: Cluster, fakes: Any) -> None:
    standby = fakes(cluster.frontend)
    urls = f"{standby.url},{cluster.frontend}"
    put = cluster.zkv("put", "--url", urls, "ha:cli", "hello")
    assert put.returncode == 0, put.stderr
    got = cluster.zkv("get", "--url", urls, "ha:cli")
    assert got.returncode == 0, got.stderr
    assert got.stdout.strip() == b"hello"
    assert cluster.client().get(b"ha:cli") == b"hello"
    st = cluster.zkv("status", "--url", standby.url)
    assert st.returncode == 0, st.stderr
    assert f"role standby  leader {cluster.frontend}".encode() in st.stdout


def test_cli_with_nothing_at_the_first_url(cluster: Cluster) -> None:
    urls = f"{nothing_listening()},{cluster.frontend}"
    t0 = time.monotonic()
    put = cluster.zkv("put", "--url", urls, "ha:cli2", "there")
    assert put.returncode == 0, put.stderr
    assert time.monotonic() - t0 < 10
    got = cluster.zkv("get", "--url", urls, "ha:cli2")
    assert got.returncode == 0 and got.stdout.strip() == b"there", got.stderr


def test_cli_names_every_broker_when_none_answers(tmp_path: Any) -> None:
    import subprocess
    import sys

    a, b = nothing_listening(), nothing_listening()
    r = subprocess.run([sys.executable, "-m", "client.cli", "get", "--url", f"{a},{b}", "k"], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 5, r.stderr
    assert f"no broker at any of {a}, {b}" in r.stderr


def test_a_broker_killed_mid_session_is_left_within_about_a_second(cluster: Cluster, fakes: Any) -> None:
    other = fakes(False)  # the broker listed second: a leader that answers every request
    with Client(f"{cluster.frontend},{other.url}", timeout=10, credentials=cluster.credentials) as c:
        assert c.put(b"ha:before", b"x") >= 1  # served by the real broker
        assert not other.got
        cluster.procs["broker"].kill()  # SIGKILL: its host's kernel drops the connection
        t0 = time.monotonic()
        assert c.put(b"ha:after", b"y") == 1  # the fake's answer
        took = time.monotonic() - t0
        assert c.brokers.current == other.url
    assert [h["key"] for h in other.got] == [b"ha:after"]
    assert took < 3.0, took  # one FAILOVER_WAIT, not the 6 s attempt timeout


def test_an_async_watch_through_a_standby_sees_the_leaders_changes(cluster: Cluster, fakes: Any) -> None:
    standby = fakes(cluster.frontend)

    async def run() -> list[tuple[str, bytes, bytes | None]]:
        async with AsyncClient(f"{standby.url},{cluster.frontend}", timeout=10,
                               credentials=cluster.credentials) as c:
            w = c.watch(b"haw:")
            got: list[Any] = []

            async def take() -> None:
                async for e in w:
                    got.append(e)
                    if len(got) == 2:
                        return

            task = asyncio.ensure_future(take())
            try:
                await asyncio.sleep(0.5)
                await c.put(b"haw:1", b"a")
                await c.put(b"haw:2", b"b")
                await asyncio.wait_for(task, 15)
            finally:
                task.cancel()
                await w.close()
            return [(e.kind, e.key, e.value) for e in got]

    assert asyncio.run(run()) == [("put", b"haw:1", b"a"), ("put", b"haw:2", b"b")]
    assert "watch" in [h["op"] for h in standby.got]


def test_a_status_call_whose_connection_goes_nowhere_is_sent_again_on_a_fresh_one() -> None:
    """Found by the pause failover test: a client's connection made just after a broker woke up
    carried nothing to it, while a new client's did. A management call waited its whole timeout on
    it; now, as a kv request, it resends after each attempt timeout on a fresh connection."""
    fake = FakeBroker(False, ignore_first_connection=True)
    try:
        with Client(fake.url, timeout=10, attempt_timeout=1.0) as c:
            t0 = time.monotonic()
            assert c.status() == {"role": "leader"}
            took = time.monotonic() - t0
        assert fake.asked == 2 and 0.9 < took < 5, (fake.asked, took)
    finally:
        fake.close()
