"""Streamed values end to end: put_stream / get_stream, their limits and bad inputs, a stream cut
by its client, and a worker killed while a stream is in flight (real processes, loopback)."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path

import pytest

from client import (
    AsyncClient,
    ConditionFailed,
    InvalidRequest,
    KeyNotFound,
    StreamIncomplete,
    ValueChanged,
    ValueTooLarge,
)
from protocol.frames import C_PARTIAL, C_REQUEST, MDPC, SERVICE, pack, unpack
from tests.support.cluster import Cluster, wait_for
from tests.support.helpers import RawPeer, terminate, worker_stream_entries

pytestmark = pytest.mark.timeout(180)

KIB, MIB = 1 << 10, 1 << 20
CHUNK = 64 * KIB  # small chunks: many of them, in little time


def pattern(size: int, seed: int = 0) -> bytes:
    """Bytes that differ chunk to chunk (a misplaced chunk cannot go unnoticed)."""
    block = hashlib.sha256(str(seed).encode()).digest() * (KIB // 32)
    out = bytearray()
    i = 0
    while len(out) < size:
        out += i.to_bytes(4, "big") + block[4:]
        i += 1
    return bytes(out[:size])


def stream_entries(cluster: Cluster) -> dict[str, tuple[int, int]]:
    return {w: worker_stream_entries(cluster.worker_dir(w)) for w in ("w1", "w2", "w3")
            if cluster.worker_dir(w).exists()}


def test_put_stream_and_get_stream_round_trip(cluster: Cluster) -> None:
    c = cluster.client()
    data = pattern(3 * MIB + 12345)
    acked: list[int] = []
    v1 = c.put_stream(b"movie", io.BytesIO(data), chunk_size=CHUNK, progress=acked.append)
    assert sum(acked) == len(data) and len(acked) == -(-len(data) // CHUNK)

    stream = c.get_stream(b"movie", credit=3)
    assert stream is not None and stream.version == v1 and stream.size == len(data)
    chunks = list(stream)
    assert len(chunks) == len(acked) and b"".join(chunks) == data
    # The plain calls fetch a streamed value whole; a file-like read works too.
    assert c.get(b"movie") == data
    assert c.get_versioned(b"movie") == (data, v1)
    assert c.mget([b"movie", b"nothing"]) == [data, None]
    s2 = c.get_stream(b"movie")
    assert s2 is not None and s2.read(10) == data[:10] and s2.read() == data[10:]
    assert c.exists(b"movie") is True
    # Every replica holds every chunk, and nothing is left staged.
    chunks_per_worker = {w: e for w, e in stream_entries(cluster).items()}
    assert chunks_per_worker == {w: (len(acked), 0) for w in ("w1", "w2", "w3")}, chunks_per_worker

    # Overwriting with a small value frees the chunks on every replica; so does a delete.
    v2 = c.put(b"movie", b"trailer")
    assert v2 > v1 and c.get(b"movie") == b"trailer"
    wait_for(lambda: all(e == (0, 0) for e in stream_entries(cluster).values()), 10, 0.1, "chunks freed")
    c.put_stream(b"movie", io.BytesIO(data), chunk_size=CHUNK)
    assert c.delete(b"movie") is True
    assert c.get_stream(b"movie") is None and c.get(b"movie") is None
    wait_for(lambda: all(e == (0, 0) for e in stream_entries(cluster).values()), 10, 0.1, "chunks freed")


def test_a_value_that_fits_one_chunk_is_an_ordinary_put(cluster: Cluster) -> None:
    c = cluster.client()
    version = c.put_stream(b"small", io.BytesIO(b"x" * 1000), chunk_size=CHUNK)
    stream = c.get_stream(b"small")
    assert stream is not None and stream.version == version and list(stream) == [b"x" * 1000]
    assert c.put_stream(b"empty", io.BytesIO(b"")) > 0 and c.get(b"empty") == b""
    assert all(e == (0, 0) for e in stream_entries(cluster).values())
    with pytest.raises(InvalidRequest):
        c.put_stream(b"text", io.StringIO("not bytes"))


def test_compare_and_set_and_ttl_on_streamed_values(cluster: Cluster) -> None:
    c = cluster.client()
    data = pattern(400 * KIB, seed=1)
    v1 = c.put_stream(b"doc", io.BytesIO(data), chunk_size=CHUNK, if_absent=True)
    with pytest.raises(ConditionFailed) as e:
        c.put_stream(b"doc", io.BytesIO(pattern(300 * KIB, 2)), chunk_size=CHUNK, if_absent=True)
    assert e.value.version == v1
    with pytest.raises(ConditionFailed):
        c.put_stream(b"doc", io.BytesIO(pattern(300 * KIB, 2)), chunk_size=CHUNK, if_version=v1 + 1000)
    assert c.get(b"doc") == data
    # The failed attempts left nothing behind: only the committed value's chunks remain.
    wait_for(lambda: all(e == (7, 0) for e in stream_entries(cluster).values()), 10, 0.1,
             "failed streams' chunks freed")
    new = pattern(200 * KIB, seed=3)
    v2 = c.put_stream(b"doc", io.BytesIO(new), chunk_size=CHUNK, if_version=v1)
    assert v2 > v1 and c.get(b"doc") == new

    # TTL: readable, changeable without rewriting the value, and expiry frees the chunks.
    c.put_stream(b"tmp", io.BytesIO(data), chunk_size=CHUNK, ttl=60_000)
    remaining = c.ttl(b"tmp")
    assert remaining is not None and 0 < remaining <= 60_000
    assert c.expire(b"tmp", 500) is True
    assert c.get(b"tmp") == data  # the value survived the TTL change
    wait_for(lambda: c.get_stream(b"tmp") is None, 10, 0.05, "tmp expires")
    with pytest.raises(KeyNotFound):
        c.ttl(b"tmp")
    wait_for(lambda: all(e == (4, 0) for e in stream_entries(cluster).values()), 15, 0.2,
             "expired value's chunks reclaimed (doc's 4 remain)")


def test_stream_over_the_limit_is_refused_and_leaves_nothing(cluster_factory) -> None:  # type: ignore[no-untyped-def]
    cluster = cluster_factory(broker_args=["--max-stream", str(1 * MIB)]).start()
    c = cluster.client()
    with pytest.raises(ValueTooLarge):
        c.put_stream(b"huge", io.BytesIO(pattern(2 * MIB)), chunk_size=CHUNK)
    assert c.get(b"huge") is None
    wait_for(lambda: all(e == (0, 0) for e in stream_entries(cluster).values()), 10, 0.1,
             "the refused stream's chunks freed")
    # The same through the asyncio client (its chunk lanes stop when one fails).
    async def go() -> None:
        async with AsyncClient(cluster.frontend, timeout=15.0) as kv:
            with pytest.raises(ValueTooLarge):
                await kv.put_stream(b"huge", io.BytesIO(pattern(2 * MIB)), chunk_size=CHUNK, window=4)

    asyncio.run(go())
    assert c.get(b"huge") is None
    wait_for(lambda: all(e == (0, 0) for e in stream_entries(cluster).values()), 10, 0.1,
             "the refused async stream's chunks freed")
    assert cluster.status()["open_streams"] == 0
    # A commit that announces more than the limit is refused before anything is written.
    with RawPeer(cluster.frontend) as peer:
        hdr, _ = peer.kv({"op": "put_commit", "id": 1, "key": b"huge", "stream": uuid.uuid4().bytes,
                          "chunks": 3, "size": 2 * MIB})
    assert hdr["ok"] is False and hdr["code"] == "VALUE_TOO_LARGE", hdr
    # Exactly at the limit is fine.
    exact = pattern(1 * MIB)
    c.put_stream(b"fits", io.BytesIO(exact), chunk_size=CHUNK)
    assert c.get(b"fits") == exact


def test_bad_stream_requests_get_errors_and_change_nothing(cluster: Cluster) -> None:
    c = cluster.client()
    c.put(b"keep", b"value")
    sid = uuid.uuid4().bytes
    bad = [
        ({"op": "put_chunk", "key": b"k", "stream": b"short", "index": 0}, [b"x"], "BAD_REQUEST"),
        ({"op": "put_chunk", "key": b"k", "stream": sid, "index": -1}, [b"x"], "BAD_REQUEST"),
        ({"op": "put_chunk", "key": b"k", "stream": sid, "index": "0"}, [b"x"], "BAD_REQUEST"),
        ({"op": "put_chunk", "key": b"k", "stream": sid, "index": 0}, [], "BAD_REQUEST"),
        ({"op": "put_chunk", "key": b"k", "stream": sid, "index": 0}, [b""], "BAD_REQUEST"),
        ({"op": "put_chunk", "key": b"k", "stream": sid, "index": 0}, [b"x" * (8 * MIB + 1)], "VALUE_TOO_LARGE"),
        ({"op": "put_chunk", "stream": sid, "index": 0}, [b"x"], "BAD_REQUEST"),
        ({"op": "put_commit", "key": b"k", "stream": sid, "chunks": 0, "size": 1}, [], "BAD_REQUEST"),
        ({"op": "put_commit", "key": b"k", "stream": sid, "chunks": 1, "size": 0}, [], "BAD_REQUEST"),
        ({"op": "put_commit", "key": b"k", "stream": sid, "chunks": 1}, [], "BAD_REQUEST"),
        ({"op": "put_commit", "key": b"k", "stream": sid, "chunks": 1, "size": 1, "if_version": 0}, [],
         "BAD_REQUEST"),
        ({"op": "put_abort", "key": b"k"}, [], "BAD_REQUEST"),
        ({"op": "get_chunks", "key": b"k", "stream": sid, "first": 0, "count": 0}, [], "BAD_REQUEST"),
        ({"op": "get_chunks", "key": b"k", "stream": sid, "first": 0, "count": 17}, [], "BAD_REQUEST"),
        ({"op": "get_chunks", "key": b"k", "stream": sid, "first": -1, "count": 1}, [], "BAD_REQUEST"),
        ({"op": "get_chunks", "key": b"k", "stream": sid, "first": 0}, [], "BAD_REQUEST"),
    ]
    with RawPeer(cluster.frontend) as peer:
        for n, (header, values, code) in enumerate(bad, start=1):
            hdr, frames = peer.kv({"id": n, **header}, values)
            assert hdr["ok"] is False and hdr["code"] == code, (header, hdr)
            assert hdr["id"] == n and frames == []
        # A commit whose chunks are not all there: STREAM_INCOMPLETE, nothing written.
        for index in (0, 2):
            hdr, _ = peer.kv({"op": "put_chunk", "id": 100 + index, "key": b"k", "stream": sid, "index": index},
                             [b"abc"])
            assert hdr == {"id": 100 + index, "ok": True, "index": index}, hdr
        hdr, _ = peer.kv({"op": "put_commit", "id": 200, "key": b"k", "stream": sid, "chunks": 3, "size": 9})
        assert hdr["ok"] is False and hdr["code"] == "STREAM_INCOMPLETE", hdr
        # A wrong total size is just as incomplete (the chunks of that stream were freed above).
        sid2 = uuid.uuid4().bytes
        peer.kv({"op": "put_chunk", "id": 300, "key": b"k", "stream": sid2, "index": 0}, [b"abc"])
        hdr, _ = peer.kv({"op": "put_commit", "id": 301, "key": b"k", "stream": sid2, "chunks": 1, "size": 4})
        assert hdr["code"] == "STREAM_INCOMPLETE", hdr
        # Reading chunks of a stream that is not a committed value gives none: the client
        # library turns that into ValueChanged.
        hdr, frames = peer.kv({"op": "get_chunks", "id": 400, "key": b"k", "stream": sid, "first": 0, "count": 2})
        assert hdr == {"id": 400, "ok": True, "next": 0}, hdr
    assert c.get(b"k") is None and c.get(b"keep") == b"value"
    wait_for(lambda: all(e == (0, 0) for e in stream_entries(cluster).values()), 10, 0.1,
             "incomplete streams' chunks freed")
    # The client library raises StreamIncomplete for it.
    with pytest.raises(StreamIncomplete):
        c.request("put_commit", {"key": b"k", "stream": sid, "chunks": 3, "size": 9})


def test_get_chunks_arrive_as_partials_then_a_final(cluster: Cluster) -> None:
    """The wire shape other-language clients rely on (docs/protocol.md §1.8)."""
    c = cluster.client()
    data = pattern(5 * CHUNK)
    c.put_stream(b"wire", io.BytesIO(data), chunk_size=CHUNK)
    with RawPeer(cluster.frontend) as peer:
        hdr, frames = peer.kv({"op": "get", "id": 1, "key": b"wire"})
        assert hdr["found"] is True and frames == [], hdr
        m = hdr["stream"]
        assert m["chunks"] == 5 and m["size"] == len(data) and len(m["stream"]) == 16
        peer.send(MDPC, C_REQUEST, SERVICE, pack(
            {"op": "get_chunks", "id": 2, "key": b"wire", "stream": m["stream"], "first": 1, "count": 3}))
        got = []
        while True:
            reply = peer.recv()
            head = unpack(reply[3])
            if reply[1] == C_PARTIAL:
                assert head["id"] == 2 and len(reply) == 5
                got.append((head["index"], reply[4]))
            else:
                assert head == {"id": 2, "ok": True, "next": 4}, head
                break
    assert got == [(i, data[i * CHUNK:(i + 1) * CHUNK]) for i in (1, 2, 3)]


CUT_CLIENT = textwrap.dedent("""
    import sys, time
    from client import Client

    class Slow:
        '''Gives 4 chunks, then blocks: the client is killed while it waits.'''
        def __init__(self):
            self.n = 0
        def read(self, size):
            self.n += 1
            if self.n > 4:
                print("stalled", flush=True)
                time.sleep(3600)
            return bytes([self.n]) * size

    Client(sys.argv[1], timeout=30).put_stream(b"cut", Slow(), chunk_size=65536)
""")


def start_stalled_stream(cluster: Cluster, tmp_path: Path) -> subprocess.Popen[bytes]:
    """A client process (CUT_CLIENT) whose stream stalls after its first chunks, once those are
    staged, invisible, on every replica. The caller kills it (and must, also on failure)."""
    script = tmp_path / "cut_client.py"
    script.write_text(CUT_CLIENT)
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen([sys.executable, str(script), cluster.frontend], stdout=subprocess.PIPE,
                            cwd=repo, env={**cluster.env, "PYTHONPATH": str(repo)})
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"stalled"
        wait_for(lambda: all(e[1] == 1 and e[0] >= 3 for e in stream_entries(cluster).values()), 10, 0.1,
                 "the first chunks staged on every replica")
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc


def test_a_stream_cut_by_its_client_leaves_nothing(cluster_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cluster = cluster_factory(broker_args=["--stream-idle", "1"]).start()
    c = cluster.client()
    c.put(b"cut", b"old value")
    proc = start_stalled_stream(cluster, tmp_path)
    try:
        assert c.get(b"cut") == b"old value"
        assert cluster.status()["open_streams"] == 1
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # The broker aborts the idle stream: every replica frees the staged chunks.
    wait_for(lambda: all(e == (0, 0) for e in stream_entries(cluster).values()), 15, 0.2,
             "the cut stream's chunks freed on every replica")
    assert c.get(b"cut") == b"old value"
    st = cluster.status()
    assert st["streams_aborted"] == 1 and st["open_streams"] == 0


def test_a_stream_left_open_across_a_broker_restart_is_still_aborted(cluster_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cluster = cluster_factory(broker_args=["--stream-idle", "2"]).start()
    proc = start_stalled_stream(cluster, tmp_path)
    try:
        proc.kill()
        proc.wait(10)
        terminate(cluster, "broker")  # the open stream is in the broker's LMDB, not only in memory
        cluster.start_broker()
        cluster.wait_ready(30)
        wait_for(lambda: all(e == (0, 0) for e in stream_entries(cluster).values()), 20, 0.2,
                 "the stream opened before the restart aborted after it")
        assert cluster.client().get(b"cut") is None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


class SlowFile(io.RawIOBase):
    """A file that yields its data slowly, and says when half of it has been read."""

    def __init__(self, data: bytes, delay: float) -> None:
        self.buf, self.delay, self.pos = data, delay, 0
        self.half = threading.Event()

    def read(self, size: int = -1) -> bytes:
        time.sleep(self.delay)
        out = self.buf[self.pos:self.pos + size]
        self.pos += len(out)
        if self.pos >= len(self.buf) // 2:
            self.half.set()
        return out


def test_a_worker_killed_during_a_stream(cluster: Cluster) -> None:
    """A stream in flight survives the death of a replica (W=2 of the other two); the dead
    replica, restarted, is repaired with every chunk (by snapshot: the tail cannot hold them)."""
    c = cluster.client()
    data = pattern(4 * MIB, seed=7)
    src = SlowFile(data, 0.01)
    result: dict[str, object] = {}
    t = threading.Thread(target=lambda: result.update(v=cluster.client().put_stream(b"flight", src,
                                                                                     chunk_size=CHUNK)))
    t.start()
    assert src.half.wait(30)
    cluster.procs["w1"].kill()
    t.join(60)
    assert not t.is_alive() and isinstance(result.get("v"), int), result
    assert c.get(b"flight") == data

    # A read while a replica dies: it completes from the others.
    c.put_stream(b"read-me", io.BytesIO(pattern(2 * MIB, seed=8)), chunk_size=CHUNK)
    stream = c.get_stream(b"read-me", credit=1)
    assert stream is not None
    got = [next(iter(stream))]
    cluster.procs["w2"].kill()
    got += list(stream)
    assert b"".join(got) == pattern(2 * MIB, seed=8)

    # w1 and w2 come back; once w1 is repaired, it alone serves both values whole.
    cluster.start_worker("w1")
    cluster.start_worker("w2")
    cluster.wait_ready(60)
    wait_for(lambda: all(w["behind_slots"] == 0 for w in cluster.status()["workers"]), 30, 0.2,
             "every replica caught up")
    terminate(cluster, "w2", "w3")
    assert c.get(b"flight") == data
    assert c.get(b"read-me") == pattern(2 * MIB, seed=8)


def test_value_changed_while_reading(cluster: Cluster) -> None:
    c = cluster.client()
    c.put_stream(b"moving", io.BytesIO(pattern(8 * CHUNK, seed=4)), chunk_size=CHUNK)
    stream = c.get_stream(b"moving", credit=2)
    assert stream is not None
    it = iter(stream)
    next(it)
    c.put_stream(b"moving", io.BytesIO(pattern(8 * CHUNK, seed=5)), chunk_size=CHUNK)
    with pytest.raises(ValueChanged):
        list(it)
    assert c.get(b"moving") == pattern(8 * CHUNK, seed=5)


def test_cli_put_file_and_get_to_file(cluster: Cluster, tmp_path: Path) -> None:
    data = os.urandom(3 * MIB + 7)
    src, dst = tmp_path / "in.bin", tmp_path / "out.bin"
    src.write_bytes(data)
    r = cluster.zkv("put", "--url", cluster.frontend, "blob", "--file", str(src))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(b"OK version=")
    r = cluster.zkv("get", "--url", cluster.frontend, "blob", "-o", str(dst))
    assert r.returncode == 0, r.stderr
    assert dst.read_bytes() == data
    r = cluster.zkv("get", "--url", cluster.frontend, "no-such-key", "-o", str(tmp_path / "x"))
    assert r.returncode == 3


def test_async_client_streams(cluster: Cluster) -> None:
    data = pattern(MIB + 5, seed=9)

    async def go() -> None:
        async with AsyncClient(cluster.frontend, timeout=15.0) as kv:
            v = await kv.put_stream(b"async-big", io.BytesIO(data), chunk_size=CHUNK, window=3)
            stream = await kv.get_stream(b"async-big", credit=5)
            assert stream is not None and stream.version == v and stream.size == len(data)
            chunks = [ch async for ch in stream]
            assert len(chunks) == 17 and b"".join(chunks) == data
            assert await kv.get(b"async-big") == data
            with pytest.raises(ConditionFailed):
                await kv.put_stream(b"async-big", io.BytesIO(data), chunk_size=CHUNK, if_absent=True)
            assert await kv.get_stream(b"async-none") is None

    asyncio.run(go())


def test_a_value_over_the_limit_gets_a_clear_error_not_a_dropped_connection(cluster_factory) -> None:  # type: ignore[no-untyped-def]
    """A frame far over --max-value makes libzmq drop the connection before the broker can answer;
    the client library checks large requests against the limit first and says what to do."""
    cluster = cluster_factory(broker_args=["--max-value", str(9 * MIB)]).start()
    c = cluster.client()
    big = b"x" * (40 * MIB)
    with pytest.raises(ValueTooLarge, match="put_stream"):
        c.put(b"big", big)
    with pytest.raises(ValueTooLarge):
        c.mset({b"a": big[: 5 * MIB], b"b": big[: 5 * MIB]})
    assert c.get(b"big") is None
    # The same value streamed is fine, and a value under the limit goes in one request.
    c.put_stream(b"big", io.BytesIO(big))
    assert c.get(b"big") == big
    assert c.put(b"fits", big[: 8 * MIB + 1]) > 0

    async def go() -> None:
        async with AsyncClient(cluster.frontend, timeout=15.0) as kv:
            with pytest.raises(ValueTooLarge):
                await kv.put(b"big2", big)

    asyncio.run(go())
