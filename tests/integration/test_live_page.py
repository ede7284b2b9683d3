"""The live cluster page (the gateway's ``/``, issue 14) in a real browser: Debian's chromium,
headless, driven by Playwright. The page must show slot moves progressing while a joining worker
fills, and a worker going dead when it is killed, live, without a reload.

``ZKV_UPDATE_SCREENSHOT=1`` also writes the screenshot taken mid-move to docs/img/live-page.png."""

from __future__ import annotations

import os
import shutil
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.cluster import Cluster, wait_for
from tests.support.requirements import missing

pytestmark = pytest.mark.timeout(150)

DOCS_SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "img" / "live-page.png"
# As root and on a machine with no outside network: no sandbox, and none of chromium's own
# background connections (they are refused by the dozen and slow its start).
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]
SLOTS = 4
VALUE = 256 * 1024
VALUES = 64  # 16 MiB: about 4 MiB a slot, copied at 1 MiB/s, so a move lasts seconds


@pytest.fixture
def page() -> Iterator[Any]:
    chromium = shutil.which("chromium")
    if chromium is None:
        missing("chromium is not installed (Debian: apt-get install chromium); the live page test drives it")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing("playwright is not installed (pip install -e '.[test]')")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            yield page
        finally:
            browser.close()


def poll(page: Any, what: str, cond: Callable[[], Any], timeout: float = 30.0) -> Any:
    """Wait until ``cond()`` (which reads the page) is truthy, with what the page showed if not."""
    try:
        return wait_for(cond, timeout, 0.1, what)
    except AssertionError as e:
        raise AssertionError(f"{e}\nthe page showed:\n{page.inner_text('body')}") from None


def move_rows(page: Any) -> list[tuple[int, float]]:
    return [(int(slot), float(pct)) for slot, pct in page.eval_on_selector_all(
        "#moves tr[data-slot]", "rows => rows.map(r => [r.dataset.slot, r.dataset.percent])")]


def worker_states(page: Any) -> dict[str, str]:
    return dict(page.eval_on_selector_all(
        "#workers tr[data-worker]", "rows => rows.map(r => [r.dataset.worker, r.dataset.state])"))


def test_live_page_shows_moves_progressing_and_a_worker_dying(cluster_factory: Callable[..., Cluster],
                                                               page: Any, tmp_path: Path) -> None:
    cluster = cluster_factory(slots=SLOTS, broker_args=["--copy-rate", "1", "--move-concurrency", "1",
                                                        "--grace", "600"]).start()
    base = cluster.start_gateway()
    with cluster.client() as c:
        for i in range(VALUES):
            c.put(f"fill:{i:03}".encode(), bytes([i]) * VALUE)

    page.goto(base + "/")
    poll(page, "the three workers alive on the page",
         lambda: worker_states(page) == {"w1": "alive", "w2": "alive", "w3": "alive"})
    assert page.inner_text("#committed") not in ("", "–")
    assert "every slot has all its replicas" in page.inner_text("#under")

    # A fourth worker joins: slots move to it one at a time, each copied at 1 MiB/s, while a
    # client writes (the page shows the write rate).
    stop = threading.Event()

    def write_load() -> None:
        with cluster.client() as c:
            i = 0
            while not stop.wait(0.02):
                c.put(f"load:{i % 100}".encode(), b"x")
                i += 1

    writer = threading.Thread(target=write_load, daemon=True)
    writer.start()
    cluster.start_worker("w4")
    seen: dict[int, list[float]] = {}

    def progressed() -> bool:
        for slot, pct in move_rows(page):
            if not seen.get(slot) or seen[slot][-1] != pct:
                seen.setdefault(slot, []).append(pct)
        # A move seen part-way, then further on, on the page as it updated itself.
        return any(len([p for p in ps if 0 < p < 100]) >= 2 and ps == sorted(ps) for ps in seen.values())

    try:
        poll(page, "a slot move's progress bar advancing", progressed, timeout=60)
        poll(page, "the write rate shown", lambda: page.inner_text("#rate-writes") not in ("–", "0"))
    finally:
        stop.set()
        writer.join(10)
    screenshot = page.screenshot(full_page=True)
    (tmp_path / "live-page.png").write_bytes(screenshot)
    if os.environ.get("ZKV_UPDATE_SCREENSHOT") == "1":
        DOCS_SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        DOCS_SCREENSHOT.write_bytes(screenshot)
    row = page.locator("#moves tr[data-slot]").first
    assert "w4" in row.inner_text() and "MiB" in row.inner_text()
    assert page.locator("#moves progress").count() >= 1
    assert "w4" in worker_states(page)

    poll(page, "every move finished", lambda: not move_rows(page) and "no slot is moving" in page.inner_text("#moves"),
         timeout=90)
    # The page's figures are the cluster's: w4 holds slots now.
    w4_slots = int(page.inner_text("#workers tr[data-worker='w4'] td:nth-child(4)"))
    assert w4_slots == next(w["slots"] for w in cluster.status()["workers"] if w["id"] == "w4") > 0

    # A worker is killed: the page shows it dead, and its slots under-replicated, by itself.
    cluster.procs["w1"].signal(signal.SIGKILL)
    poll(page, "w1 shown dead", lambda: worker_states(page).get("w1") == "dead")
    poll(page, "w1's slots shown under-replicated", lambda: "Under-replicated" in page.inner_text("#under"))
    assert page.locator("#workers tr[data-worker='w1'] .state.dead").count() == 1
    assert not page.locator("#banner.shown").count()
