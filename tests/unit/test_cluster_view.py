"""The live page's view (client/gateway/cluster_view.py): counters become per-second rates
between two status readings; a counter that went down (a new leader counts from 0) gives none."""

from __future__ import annotations

import asyncio

from client.gateway.cluster_view import PAGE_QUEUE, ClusterFeed, ClusterView


def status(writes: int, reads: int | None, applied: dict[str, int]) -> dict:
    st: dict = {"writes_committed": writes, "workers": [{"id": w, "applied": a} for w, a in applied.items()]}
    if reads is not None:
        st["reads_served"] = reads
    return st


def test_rates_between_two_readings() -> None:
    view = ClusterView()
    first = view.update(status(100, 10, {"w1": 50, "w2": 50}), now=10.0)
    assert first["rates"]["writes_committed"] is None  # one reading: no rate yet
    assert [w["applied_per_s"] for w in first["workers"]] == [None, None]
    second = view.update(status(300, 10, {"w1": 250, "w2": 150}), now=12.0)
    assert second["rates"]["writes_committed"] == 100.0
    assert second["rates"]["reads_served"] == 0.0
    assert {w["id"]: w["applied_per_s"] for w in second["workers"]} == {"w1": 100.0, "w2": 50.0}
    assert second["error"] is None and second["writes_committed"] == 300


def test_a_counter_not_started_is_zero_and_a_reset_gives_no_rate() -> None:
    view = ClusterView()
    view.update(status(500, None, {"w1": 10}), now=1.0)
    st = view.update(status(20, 4, {"w1": 12, "w9": 3}), now=2.0)  # a new leader: its counters from 0
    assert st["rates"]["writes_committed"] is None
    assert st["rates"]["reads_served"] == 4.0  # absent before: counted from 0
    assert {w["id"]: w["applied_per_s"] for w in st["workers"]} == {"w1": 2.0, "w9": None}


def test_the_feed_polls_only_while_a_page_listens_and_a_slow_page_gets_the_latest() -> None:
    """ClusterFeed (the gateway's poller) against a status source that counts its calls."""
    async def main() -> None:
        calls = 0

        async def status() -> dict:
            nonlocal calls
            calls += 1
            return {"writes_committed": calls * 10, "workers": []}

        feed = ClusterFeed(status, clock=lambda: float(calls), interval=0.01)
        assert (await feed.current())["writes_committed"] == 10 and not feed.polling()  # no page: one read
        page = feed.subscribe()
        assert feed.polling()
        first = await asyncio.wait_for(page.get(), 1)
        assert first["writes_committed"] >= 10
        await asyncio.sleep(0.2)  # the page reads nothing meanwhile: its queue keeps the newest
        assert page.qsize() == PAGE_QUEUE
        views = [page.get_nowait() for _ in range(PAGE_QUEUE)]
        assert [v["writes_committed"] for v in views] == sorted(v["writes_committed"] for v in views)
        assert views[-1]["writes_committed"] >= calls * 10 - 10  # the latest, or the one before
        assert (await feed.current()) is feed.latest  # pages keep it fresh: no extra read
        second = feed.subscribe()
        assert second.get_nowait() is feed.latest  # a new page's first paint, at once
        feed.unsubscribe(page)
        feed.unsubscribe(second)
        await asyncio.sleep(0.05)
        assert not feed.polling()  # nobody listens: no more status requests
        stopped_at = calls
        await asyncio.sleep(0.05)
        assert calls == stopped_at
        await feed.close()

    asyncio.run(main())
