"""Watch end to end on real processes: puts, deletes, TTL changes and expiries in commit order per
key; resuming after a disconnect without a gap or a duplicate; the resync signal; a worker killed
and a broker restarted while a watch is open; the CLI and the AsyncClient."""

from __future__ import annotations

import asyncio
import queue
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import pytest

from client import AsyncClient, Client, InvalidRequest, KeyTooLarge, WatchEvent
from tests.support.cluster import Cluster, wait_for

pytestmark = pytest.mark.timeout(120)


class Watcher:
    """A watch iterated in a thread of its own, so the test can wait for events with a timeout."""

    def __init__(self, cluster: Cluster, prefix: bytes, since: dict[str, Any] | None = None) -> None:
        self.client = Client(cluster.frontend, timeout=15.0)
        self.stream = self.client.watch(prefix, since)
        self.events: queue.Queue[WatchEvent | BaseException] = queue.Queue()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        wait_for(lambda: self.stream.cursor is not None, 10, 0.02, "the watch to open")

    def _run(self) -> None:
        try:
            for ev in self.stream:
                self.events.put(ev)
        except BaseException as e:  # handed to the test thread
            self.events.put(e)

    def take(self, n: int, timeout: float = 15.0) -> list[WatchEvent]:
        out: list[WatchEvent] = []
        deadline = time.monotonic() + timeout
        while len(out) < n:
            try:
                ev = self.events.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                raise AssertionError(f"{len(out)} of {n} events in {timeout}s: {out}") from None
            if isinstance(ev, BaseException):
                raise ev
            out.append(ev)
        return out

    def none_within(self, seconds: float) -> list[WatchEvent]:
        """Events that arrive within ``seconds`` (expected: none)."""
        time.sleep(seconds)
        out = []
        while not self.events.empty():
            ev = self.events.get()
            assert not isinstance(ev, BaseException), ev
            out.append(ev)
        return out

    def stop(self) -> dict[str, Any] | None:
        self.stream.session.ended = True  # the thread closes the stream at its next turn
        self.thread.join(timeout=10)
        assert not self.thread.is_alive()
        self.client.close()
        return self.stream.cursor


def brief(events: list[WatchEvent]) -> list[tuple[str, bytes, bytes | None]]:
    return [(e.kind, e.key, e.value) for e in events]


def test_watch_sees_puts_deletes_ttl_changes_and_expiries_in_commit_order(cluster: Cluster) -> None:
    c = cluster.client()
    w = Watcher(cluster, b"doc:")
    try:
        v1 = c.put(b"doc:1", b"a")
        c.put(b"other", b"not watched")
        v2 = c.put(b"doc:1", b"b")
        c.put(b"doc:2", b"x", ttl=60_000)
        assert c.expire(b"doc:2", 400) is True
        assert c.delete(b"doc:1") is True
        v3 = c.put(b"doc:1", b"c")
        t_expire = time.monotonic() + 0.4
        got = w.take(6)
        assert brief(got) == [("put", b"doc:1", b"a"), ("put", b"doc:1", b"b"), ("put", b"doc:2", b"x"),
                              ("ttl", b"doc:2", None), ("delete", b"doc:1", None), ("put", b"doc:1", b"c")]
        assert [e.version for e in got if e.key == b"doc:1" and e.kind == "put"] == [v1, v2, v3]
        expired = w.take(1, timeout=10)
        assert brief(expired) == [("expired", b"doc:2", None)]
        # The expiry event follows the expiry within a few seconds (workers report every second).
        assert time.monotonic() - t_expire < 5
        assert c.get(b"doc:2") is None and c.get(b"doc:1") == b"c"
        assert w.none_within(1.5) == []  # nothing twice, nothing for other prefixes
    finally:
        w.stop()


def test_watch_resumes_after_a_disconnect_without_gaps_or_duplicates(cluster: Cluster) -> None:
    c = cluster.client()
    w = Watcher(cluster, b"r:")
    c.put(b"r:a", b"1")
    assert brief(w.take(1)) == [("put", b"r:a", b"1")]
    cursor = w.stop()
    assert cursor is not None
    # Changes while nobody watches.
    expected = []
    for i in range(20):
        key = b"r:%d" % (i % 4)
        c.put(key, b"v%d" % i)
        expected.append(("put", key, b"v%d" % i))
        if i % 5 == 4:
            c.delete(key)
            expected.append(("delete", key, None))
    w2 = Watcher(cluster, b"r:", since=cursor)
    try:
        got = w2.take(len(expected))
        assert not any(e.kind == "resync" for e in got)
        for key in {k for _, k, _ in expected}:  # per key: exactly what happened, in order
            assert [e for e in brief(got) if e[1] == key] == [e for e in expected if e[1] == key]
        assert w2.none_within(1.5) == []
        c.put(b"r:live", b"after")
        assert brief(w2.take(1)) == [("put", b"r:live", b"after")]
    finally:
        w2.stop()


def test_watch_says_resync_when_the_cursor_is_too_old(cluster: Cluster) -> None:
    c = cluster.client()
    w = Watcher(cluster, b"big")
    cursor = w.stop()
    # Two 300 KiB values: the slot's in-memory tail (256 KiB) keeps only the last change.
    c.put(b"big", b"1" * 300_000)
    c.put(b"big", b"2" * 300_000)
    w2 = Watcher(cluster, b"big", since=cursor)
    try:
        first = w2.take(1)
        assert first[0].kind == "resync"
        # After the resync the watch goes on from the cursor the broker gave.
        c.put(b"big", b"3")
        assert brief(w2.take(1)) == [("put", b"big", b"3")]
    finally:
        w2.stop()


def test_watch_keeps_delivering_while_a_worker_is_killed(cluster: Cluster) -> None:
    c = cluster.client()
    w = Watcher(cluster, b"k:")
    try:
        for i in range(10):
            c.put(b"k:%d" % (i % 3), b"%d" % i)
        cluster.procs["w3"].signal(signal.SIGKILL)
        for i in range(10, 30):
            c.put(b"k:%d" % (i % 3), b"%d" % i)
        got = w.take(30)
        assert not any(e.kind == "resync" for e in got)
        for k in range(3):
            assert [e.value for e in got if e.key == b"k:%d" % k] == [b"%d" % i for i in range(30) if i % 3 == k]
        assert w.none_within(1.0) == []
    finally:
        w.stop()


def test_watch_across_a_broker_restart_resumes_or_resyncs(cluster: Cluster) -> None:
    c = cluster.client()
    w = Watcher(cluster, b"b:")
    try:
        for i in range(5):
            c.put(b"b:x", b"%d" % i)
        assert [e.value for e in w.take(5)] == [b"%d" % i for i in range(5)]
        time.sleep(1.2)  # a progress message carries the cursor
        broker = cluster.procs["broker"]
        broker.kill()
        cluster.start_broker()
        for i in range(5, 10):
            c.put(b"b:x", b"%d" % i)  # retried until the new broker serves
        got = w.take(5, timeout=30)
        if got[0].kind == "resync":
            # Allowed: the client is told, re-reads, and the watch goes on from the new cursor.
            assert c.get(b"b:x") == b"9"
        else:
            # Resumed: every change made across the restart, once, in order; no resync later.
            assert [e.value for e in got] == [b"%d" % i for i in range(5, 10)]
        c.put(b"b:x", b"10")
        if got[0].kind == "resync":
            later = [e.value for e in got[1:]]
            while b"10" not in later:
                later += [e.value for e in w.take(1)]
            assert later == sorted(later, key=int) and len(set(later)) == len(later)  # in order, once
        else:
            assert brief(w.take(1)) == [("put", b"b:x", b"10")]
    finally:
        w.stop()


def test_watch_bad_input(cluster: Cluster) -> None:
    with Client(cluster.frontend, timeout=10.0) as c:
        with pytest.raises(KeyTooLarge):
            next(iter(c.watch(b"p" * 5000)))
        with pytest.raises(InvalidRequest):
            next(iter(c.watch(b"p", since={"c": b"x", "s": "not a list"})))
        assert c.put(b"still", b"works") > 0


def test_async_watch(cluster: Cluster) -> None:
    async def main() -> None:
        async with AsyncClient(cluster.frontend, timeout=15.0) as c:
            stream = c.watch(b"aw:")
            events: list[WatchEvent] = []

            async def consume() -> None:
                async for ev in stream:
                    events.append(ev)
                    if len(events) == 3:
                        return

            task = asyncio.ensure_future(consume())
            while stream.cursor is None:
                await asyncio.sleep(0.02)
            await c.put(b"aw:1", b"one")
            await c.put(b"aw:1", b"two")
            await c.delete(b"aw:1")
            await asyncio.wait_for(task, 15)
            await stream.close()
            assert brief(events) == [("put", b"aw:1", b"one"), ("put", b"aw:1", b"two"), ("delete", b"aw:1", None)]

    asyncio.run(main())


def test_cli_watch_prints_changes_and_exits_0_on_sigint(cluster: Cluster) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "client.cli", "watch", "cw:", "--url", cluster.frontend],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cluster.env)
    try:
        c = cluster.client()
        out: queue.Queue[bytes] = queue.Queue()
        threading.Thread(target=lambda: [out.put(line) for line in iter(proc.stdout.readline, b"")],  # type: ignore[union-attr]
                         daemon=True).start()

        def first_line() -> bytes | None:
            c.put(b"cw:probe", b"p")  # until the watch is open, these go unseen
            try:
                return out.get(timeout=0.5)
            except queue.Empty:
                return None

        line = wait_for(first_line, 20, 0.0, "zkv watch to print a change")
        assert line.startswith(b"put\tcw:probe\t")
        while not out.empty():
            out.get()
        c.put(b"cw:a", b"hello world")
        c.delete(b"cw:a")
        got = [out.get(timeout=10) for _ in range(2)]
        kind, key, version, value = got[0].decode().rstrip("\n").split("\t")
        assert (kind, key, value) == ("put", "cw:a", "hello world") and int(version) > 0
        assert got[1].decode().split("\t")[:2] == ["delete", "cw:a"]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


def test_streamed_values_in_scan_and_watch_and_their_expiry(cluster: Cluster) -> None:
    import io

    from tests.support.helpers import worker_stream_entries

    c = cluster.client()
    big = bytes(range(256)) * 1024  # 256 KiB in 64 KiB chunks
    w = Watcher(cluster, b"st:")
    try:
        version = c.put_stream(b"st:big", io.BytesIO(big), chunk_size=64 * 1024, ttl=1500)
        c.put(b"st:small", b"inline")
        got = w.take(2)
        assert [(e.kind, e.key) for e in got] == [("put", b"st:big"), ("put", b"st:small")]
        # A streamed value is not carried in the event; it says where its chunks are.
        assert got[0].value is None and got[0].stream is not None
        assert (got[0].version, got[0].stream.size, got[0].stream.chunks) == (version, len(big), 4)
        assert got[1].value == b"inline" and got[1].stream is None
        stream = c.get_stream(b"st:big")
        assert stream is not None and stream.read() == big
        # scan fetches a streamed value whole, as get does; scan_page says where its chunks are.
        assert [(i.key, i.value) for i in c.scan(b"st:")] == [(b"st:big", big), (b"st:small", b"inline")]
        page = c.scan_page(b"st:")
        assert page.items[0].value.size == len(big) and page.items[1].value == b"inline"
        assert [i.key for i in c.scan(b"st:", values=False)] == [b"st:big", b"st:small"]
        # Its expiry goes through the log too: an event, and every replica frees the chunks.
        assert [(e.kind, e.key) for e in w.take(1, timeout=10)] == [("expired", b"st:big")]
        wait_for(lambda: all(worker_stream_entries(cluster.worker_dir(wid)) == (0, 0) for wid in ("w1", "w2", "w3")),
                 10, 0.1, "every replica to free the expired value's chunks")
    finally:
        w.stop()
