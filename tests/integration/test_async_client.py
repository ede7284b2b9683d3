"""AsyncClient: the same commands as Client, awaitable, many in flight on one socket."""

from __future__ import annotations

import asyncio

import pytest

from client import AsyncClient, ConditionFailed, InvalidRequest
from tests.support.cluster import Cluster

pytestmark = pytest.mark.timeout(120)


def test_async_client_does_what_the_sync_one_does(cluster: Cluster) -> None:
    async def main() -> None:
        async with AsyncClient(cluster.frontend, timeout=15.0) as c:
            v = await c.put("a", b"1")
            assert await c.get_versioned("a") == (b"1", v)
            assert await c.exists("a") is True
            # Many requests in flight on one socket, answered out of order, matched by id.
            versions = await asyncio.gather(*(c.put(f"k{i}", b"v%d" % i) for i in range(200)))
            got = await asyncio.gather(*(c.get_versioned(f"k{i}") for i in range(200)))
            assert got == [(b"v%d" % i, versions[i]) for i in range(200)]  # each reply reached its caller
            await c.mset({b"m1": b"x", b"m2": b"y"})
            assert await c.mget([b"m1", b"m2", b"nope"]) == [b"x", b"y", None]
            with pytest.raises(ConditionFailed):
                await c.put("a", b"2", if_absent=True)
            assert await c.expire("a", 60_000) is True
            assert 50_000 < (await c.ttl("a") or 0) <= 60_000
            assert await c.delete("a") is True
            assert await c.get("a") is None
            with pytest.raises(InvalidRequest):
                await c.get(b"")
            assert (await c.status())["formed"] is True

    asyncio.run(main())
