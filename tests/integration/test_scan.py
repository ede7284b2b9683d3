"""Scan end to end on real processes: key order across slots, pages, prefixes, expiry, long keys,
bad input, a worker killed in the middle, the CLI and the AsyncClient."""

from __future__ import annotations

import asyncio
import signal
import time

import pytest

from client import AsyncClient, InvalidRequest, KeyTooLarge
from tests.support.cluster import Cluster, wait_for

pytestmark = pytest.mark.timeout(120)


def test_scan_in_key_order_across_slots_with_pages_and_prefix(cluster: Cluster) -> None:
    c = cluster.client()
    users = {b"user:%04d" % i: b"u%d" % i for i in range(250)}
    c.mset(users)
    c.mset({b"order:%d" % i: b"o" for i in range(30)})
    c.put(b"user", b"not under user:")
    items = list(c.scan(b"user:", limit=17))
    assert [i.key for i in items] == sorted(users)
    assert [i.value for i in items] == [users[k] for k in sorted(users)]
    versions = c.mget([i.key for i in items[:3]])
    assert versions == [users[i.key] for i in items[:3]]
    assert items[5].version == c.get_versioned(items[5].key)[1]  # type: ignore[index]
    # One page: `more` until the last page; start_after continues where it stopped.
    page = c.scan_page(b"user:", limit=100)
    assert len(page.items) == 100 and page.more
    page2 = c.scan_page(b"user:", start_after=page.items[-1].key, limit=200)
    assert [i.key for i in page.items + page2.items] == sorted(users) and page2.more is False
    assert list(c.scan_keys(b"order:")) == sorted(b"order:%d" % i for i in range(30))
    assert [i.key for i in c.scan(b"")] == sorted([*users, *(b"order:%d" % i for i in range(30)), b"user"])
    assert list(c.scan(b"nothing-here")) == []


def test_scan_skips_expired_and_deleted_keys(cluster: Cluster) -> None:
    c = cluster.client()
    c.put(b"s:keep", b"1")
    c.put(b"s:gone", b"2", ttl=300)
    c.put(b"s:del", b"3")
    c.delete(b"s:del")
    t0 = time.monotonic()
    first = [i.key for i in c.scan(b"s:")]
    if time.monotonic() - t0 < 0.25:  # looked before the TTL could run out
        assert first == [b"s:gone", b"s:keep"]
    wait_for(lambda: [i.key for i in c.scan(b"s:")] == [b"s:keep"], 5, 0.05, "the expired key to leave the scan")


def test_scan_long_keys(cluster: Cluster) -> None:
    c = cluster.client()
    stem = b"L" * 400
    keys = sorted([stem + bytes([b]) * n for b in (0, 9, 250) for n in (1, 2, 600)] + [stem[:200], stem])
    for k in keys:
        c.put(k, k[-2:])
    for limit in (1, 4, 1000):
        items = list(c.scan(b"L", limit=limit))
        assert [i.key for i in items] == keys, limit
        assert [i.value for i in items] == [k[-2:] for k in keys]


@pytest.mark.parametrize("kw,exc", [
    ({"limit": 0}, InvalidRequest),
    ({"limit": -5}, InvalidRequest),
    ({"limit": 10_001}, InvalidRequest),
    ({"limit": "10"}, InvalidRequest),
    ({"prefix": b"p" * 4097}, KeyTooLarge),
])
def test_scan_bad_input(cluster: Cluster, kw: dict, exc: type) -> None:
    c = cluster.client()
    c.put(b"p1", b"x")
    with pytest.raises(exc):
        c.scan_page(**kw)
    assert [i.key for i in c.scan(b"p")] == [b"p1"]  # nothing changed, the broker keeps serving
    assert cluster.procs["broker"].running


def test_scan_while_a_worker_is_killed(cluster: Cluster) -> None:
    c = cluster.client()
    keys = {b"k:%04d" % i: b"%d" % i for i in range(600)}
    c.mset(keys)
    pages = 0
    got = []
    start = None
    while True:
        page = c.scan_page(b"k:", start_after=start, limit=50)
        got += page.items
        pages += 1
        if pages == 3:
            cluster.procs["w2"].signal(signal.SIGKILL)  # mid-scan, without warning
        if not page.more:
            break
        start = page.items[-1].key
    assert pages == 12
    assert [(i.key, i.value) for i in got] == sorted(keys.items())
    cluster.wait_worker_state("w2", "dead")
    # With w2 gone for good, every slot still has two replicas that answer.
    assert [(i.key, i.value) for i in c.scan(b"k:", limit=10_000)] == sorted(keys.items())


def test_cli_scan(cluster: Cluster) -> None:
    c = cluster.client()
    c.mset({b"cli:a": b"1", b"cli:b": b"two\tcols", b"cli:c": b"3", b"other": b"x"})
    out = cluster.zkv("scan", "cli:", "--url", cluster.frontend)
    assert out.returncode == 0, out.stderr
    assert out.stdout.decode().splitlines() == ["cli:a\t1", "cli:b\ttwo\\tcols", "cli:c\t3"]
    out = cluster.zkv("scan", "cli:", "--keys-only", "--limit", "2", "--url", cluster.frontend)
    assert out.stdout.decode().splitlines() == ["cli:a", "cli:b"]
    out = cluster.zkv("scan", "cli:", "--page-size", "0", "--url", cluster.frontend)
    assert out.returncode == 1 and b"BAD_REQUEST" in out.stderr


def test_async_scan(cluster: Cluster) -> None:
    cluster.client().mset({b"as:%02d" % i: b"v%d" % i for i in range(40)})

    async def main() -> None:
        async with AsyncClient(cluster.frontend, timeout=15.0) as c:
            items = [i async for i in c.scan(b"as:", limit=7)]
            assert [(i.key, i.value) for i in items] == [(b"as:%02d" % i, b"v%d" % i) for i in range(40)]
            assert [k async for k in c.scan_keys(b"as:1")] == [b"as:%02d" % i for i in range(10, 20)]
            with pytest.raises(InvalidRequest):
                await c.scan_page(limit=0)

    asyncio.run(main())
