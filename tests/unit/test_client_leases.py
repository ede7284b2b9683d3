"""Lease reads, the client's side (client/leases.py; /work/spec/lease_reads.md): the lease map a
client decodes from ``mmi.leases``, when it asks again, and where a GET goes, with real ZeroMQ
sockets on loopback: a fake broker and a fake worker reads endpoint (ROUTERs served by a thread).
No cluster needed."""

from __future__ import annotations

import asyncio
import threading
import time
from array import array
from collections.abc import Iterator
from typing import Any

import pytest
import zmq

from client.aio import AsyncClient
from client.cli.bench_load import Pipeline, Request
from client.client import Client
from client.leases import (
    DIRECT_WAIT,
    FRESH_OFF,
    FRESH_ON,
    MMI_LEASES,
    MUTE,
    NOT_LEASED,
    REFETCH_MIN,
    LeaseMap,
)
from protocol.curve import CREDENTIALS_ENV
from protocol.errors import ClientClosed
from protocol.frames import C_FINAL, MDPC, SERVICE, pack, unpack
from protocol.limits import URL_ENV
from protocol.replication import slot_for_key

pytestmark = pytest.mark.timeout(30)

WORKER = "tcp://127.0.0.1:7001"
OTHER = "tcp://127.0.0.1:7002"


def lease_answer(slots: int = 16, lease: float = 2.0, urls: list[str] | None = None,
                 holders: list[int] | None = None) -> list[bytes]:
    urls = [WORKER] if urls is None else urls
    return [pack({"slots": slots, "lease": lease, "urls": urls,
                  "holders": [0] * slots if holders is None else holders})]


@pytest.fixture(autouse=True)
def _no_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No broker URL or CURVE credentials from the environment (ZKV_TEST_CURVE=1 runs set one)."""
    monkeypatch.delenv(CREDENTIALS_ENV, raising=False)
    monkeypatch.delenv(URL_ENV, raising=False)


# ---------------------------------------------------------------------------------------------
# LeaseMap, sans-I/O


def test_a_good_map_names_each_slots_holder_by_the_brokers_slot_function() -> None:
    holders = [i % 3 - 1 for i in range(16)]  # -1, 0, 1, -1, ...
    m = LeaseMap()
    m.install(lease_answer(urls=[WORKER, OTHER], holders=holders), now=100.0)
    assert m.on and m.slots == 16 and m.lease == 2.0
    for i in range(200):
        key = b"key:%d" % i
        h = holders[slot_for_key(key, 16)]
        assert m.url_for(key) == (None if h < 0 else [WORKER, OTHER][h]), key


@pytest.mark.parametrize("reply", [
    [b"501"],  # a broker that does not know mmi.leases
    lease_answer(lease=0, urls=[], holders=[-1] * 16),  # --read-lease 0
    lease_answer(lease=0),  # off, whatever the rest says
    [b"\xc1"],  # not msgpack
    [pack([1, 2, 3])],  # not a map
    [pack({"slots": 16})],  # fields missing
    lease_answer(holders=[0] * 15),  # fewer holders than slots
    lease_answer(holders=[1] * 16),  # an index past the urls
    lease_answer(holders=[-2] * 16),
    lease_answer(slots=0, holders=[]),
    lease_answer(urls=[b"tcp://127.0.0.1:7001"]),  # type: ignore[list-item]  # bytes, not str
    [pack({"slots": 16, "lease": True, "urls": [WORKER], "holders": [0] * 16})],
    [pack({"slots": 16.0, "lease": 2.0, "urls": [WORKER], "holders": [0] * 16})],
    [],
    [*lease_answer(), b"extra"],
])
def test_501_leases_off_and_malformed_answers_mean_leases_off(reply: list[bytes]) -> None:
    m = LeaseMap()
    m.install(lease_answer(), now=0.0)  # on before: a bad answer turns it off, not half on
    assert m.on
    m.install(reply, now=1.0)
    assert not m.on
    assert m.url_for(b"k") is None
    assert not m.stale(1.0 + FRESH_OFF - 0.01) and m.stale(1.0 + FRESH_OFF)


def test_leases_on_without_a_holder_yet_reads_through_the_broker_and_asks_every_second() -> None:
    m = LeaseMap()
    m.install(lease_answer(holders=[-1] * 16), now=0.0)
    assert not m.on and m.url_for(b"k") is None
    assert not m.stale(FRESH_ON - 0.01) and m.stale(FRESH_ON)


def test_staleness_rules() -> None:
    m = LeaseMap()
    assert m.stale(0.0)  # never fetched: the first GET asks
    m.install(lease_answer(), now=10.0)
    assert not m.stale(10.0 + FRESH_ON - 0.01)
    assert m.stale(10.0 + FRESH_ON)
    m.install(lease_answer(), now=20.0)
    m.forget()  # a direct read failed: ask again at once, though no more often than REFETCH_MIN
    assert not m.stale(20.0 + REFETCH_MIN / 2)
    assert m.stale(20.0 + REFETCH_MIN)
    m.install([b"501"], now=30.0)
    assert not m.stale(30.0 + FRESH_ON) and m.stale(30.0 + FRESH_OFF)


def test_no_answer_keeps_the_map_and_waits_the_usual_time() -> None:
    m = LeaseMap()
    m.install(lease_answer(), now=0.0)
    m.install(None, now=5.0)  # the broker did not answer in time
    assert m.url_for(b"k") == WORKER
    assert not m.stale(5.5) and m.stale(5.0 + FRESH_ON)
    off = LeaseMap()
    off.install(None, now=0.0)  # never answered: off, asked again in FRESH_OFF
    assert not off.on and not off.stale(FRESH_ON) and off.stale(FRESH_OFF)


def test_a_silent_endpoint_is_skipped_for_a_while() -> None:
    m = LeaseMap()
    holders = [i % 2 for i in range(16)]
    m.install(lease_answer(urls=[WORKER, OTHER], holders=holders), now=0.0)
    m.silent(WORKER, now=1.0)
    keys = [b"key:%d" % i for i in range(100)]
    assert all(m.url_for(k) in (None, OTHER) for k in keys)
    assert any(m.url_for(k) == OTHER for k in keys)
    assert m.stale(1.0 + REFETCH_MIN)  # and the map is asked again
    m.install(lease_answer(urls=[WORKER, OTHER], holders=holders), now=1.5)  # still named: still muted
    assert all(m.url_for(k) != WORKER for k in keys)
    m.install(lease_answer(urls=[WORKER, OTHER], holders=holders), now=1.0 + MUTE)
    assert any(m.url_for(k) == WORKER for k in keys)
    m.silent(WORKER, now=10.0)
    m.silent(OTHER, now=10.0)
    assert not m.on and m.url_for(b"k") is None


# ---------------------------------------------------------------------------------------------
# Real sockets: a fake broker and a fake worker reads endpoint


class Fakes:
    """Two ROUTERs on free loopback ports, served by one thread: a broker (answers mmi.leases
    with ``lease_reply`` and kv requests with value ``b"from-broker"``) and a worker reads
    endpoint (``mode``: "answer" with ``b"from-worker"``, "refuse" NOT_LEASED, "silent")."""

    def __init__(self) -> None:
        self.ctx = zmq.Context()
        self.broker = self._bind()
        self.worker = self._bind()
        self.broker_url = self.broker.getsockopt_string(zmq.LAST_ENDPOINT)
        self.worker_url = self.worker.getsockopt_string(zmq.LAST_ENDPOINT)
        self.lease_reply: list[bytes] = lease_answer(urls=[self.worker_url])
        self.mode = "answer"
        self.lock = threading.Lock()
        self.mmi = 0  # mmi.leases asked
        self.at_broker: list[dict[str, Any]] = []  # kv request headers
        self.at_worker: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _bind(self) -> zmq.Socket:
        sock = self.ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind("tcp://127.0.0.1:0")
        return sock

    def map(self, **kw: Any) -> None:
        with self.lock:
            self.lease_reply = lease_answer(**{"urls": [self.worker_url], **kw})

    def _serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self.broker, zmq.POLLIN)
        poller.register(self.worker, zmq.POLLIN)
        while not self._stop.is_set():
            for sock, _ in poller.poll(20):
                ident, *frames = sock.recv_multipart()
                if sock is self.broker:
                    self._on_broker(ident, frames)
                else:
                    self._on_worker(ident, frames)

    def _on_broker(self, ident: bytes, frames: list[bytes]) -> None:
        if frames[2] == MMI_LEASES:
            with self.lock:
                self.mmi += 1
                reply = self.lease_reply
            self.broker.send_multipart([ident, MDPC, C_FINAL, MMI_LEASES, *reply])
            return
        if frames[2] != SERVICE:
            self.broker.send_multipart([ident, MDPC, C_FINAL, frames[2], b"501"])
            return
        hdr = unpack(frames[3])
        with self.lock:
            self.at_broker.append(hdr)
        if hdr["op"] == "get":
            out = [pack({"id": hdr["id"], "ok": True, "found": True, "version": 1}), b"from-broker"]
        elif hdr["op"] == "mget":
            n = len(hdr["keys"])
            out = [pack({"id": hdr["id"], "ok": True, "found": [True] * n, "versions": [1] * n}),
                   *[b"from-broker"] * n]
        else:
            out = [pack({"id": hdr["id"], "ok": True, "version": 2})]
        self.broker.send_multipart([ident, MDPC, C_FINAL, SERVICE, *out])

    def _on_worker(self, ident: bytes, frames: list[bytes]) -> None:
        assert len(frames) == 1  # a reads endpoint's framing: the header alone
        hdr = unpack(frames[0])
        with self.lock:
            self.at_worker.append(hdr)
            mode = self.mode
        if mode == "silent":
            return
        if mode == "refuse":
            out = [pack({"id": hdr["id"], "ok": False, "code": NOT_LEASED, "message": "no lease"})]
        else:
            out = [pack({"id": hdr["id"], "ok": True, "found": True, "version": 1}), b"from-worker"]
        self.worker.send_multipart([ident, *out])

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.broker.close(0)
        self.worker.close(0)
        self.ctx.term()


@pytest.fixture
def fakes() -> Iterator[Fakes]:
    f = Fakes()
    try:
        yield f
    finally:
        f.close()


def _client(f: Fakes, **kw: Any) -> Client:
    return Client(f.broker_url, timeout=5.0, attempt_timeout=2.0, context=f.ctx, **kw)


def test_a_get_goes_to_the_lease_holder_and_writes_to_the_broker(fakes: Fakes) -> None:
    c = _client(fakes)
    try:
        assert c.get(b"k") == b"from-worker"
        assert c.get(b"k2") == b"from-worker"
        assert c.direct_reads_served == 2
        assert c.put(b"k", b"v") == 2
        assert c.mget([b"k", b"k2"]) == [b"from-broker"] * 2
        assert [h["op"] for h in fakes.at_broker] == ["put", "mget"]
        assert [h["key"] for h in fakes.at_worker] == [b"k", b"k2"]
        assert all(h["cid"] == c.client_id and type(h["id"]) is int for h in fakes.at_worker)
        assert fakes.mmi == 1  # one map for both reads
    finally:
        c.close()
    assert not c._readers
    with pytest.raises(ClientClosed):  # with a fresh map too
        c.get(b"k")


def test_only_the_slots_the_map_names_are_read_directly(fakes: Fakes) -> None:
    held = slot_for_key(b"k", 16)
    fakes.map(holders=[0 if s == held else -1 for s in range(16)])
    other = next(k for k in (b"o%d" % i for i in range(1000)) if slot_for_key(k, 16) != held)
    c = _client(fakes)
    try:
        assert c.get(b"k") == b"from-worker"
        assert c.get(other) == b"from-broker"
        assert [h["key"] for h in fakes.at_worker] == [b"k"]
        assert [h["key"] for h in fakes.at_broker] == [other]
    finally:
        c.close()


def test_not_leased_falls_back_to_the_broker_and_refreshes_the_map(fakes: Fakes) -> None:
    fakes.mode = "refuse"
    c = _client(fakes)
    try:
        assert c.get(b"k") == b"from-broker"
        assert len(fakes.at_worker) == 1 and len(fakes.at_broker) == 1
        assert fakes.at_broker[0]["id"] == fakes.at_worker[0]["id"]  # the same read, resent
        assert c.direct_reads_served == 0
        time.sleep(REFETCH_MIN)
        fakes.mode = "answer"
        assert c.get(b"k") == b"from-worker"
        assert fakes.mmi == 2  # asked again after the refusal, not a second later
    finally:
        c.close()


def test_a_silent_worker_costs_one_short_wait_then_the_broker(fakes: Fakes) -> None:
    fakes.mode = "silent"
    c = _client(fakes)
    try:
        t0 = time.monotonic()
        assert c.get(b"k") == b"from-broker"
        took = time.monotonic() - t0
        assert DIRECT_WAIT <= took < DIRECT_WAIT + 1.0
        t0 = time.monotonic()
        assert c.get(b"k") == b"from-broker"  # skipped while muted, though the map still names it
        assert time.monotonic() - t0 < DIRECT_WAIT
        assert len(fakes.at_worker) == 1 and len(fakes.at_broker) == 2
    finally:
        c.close()


@pytest.mark.parametrize("off", ["501", "lease 0", "no direct reads"])
def test_with_leases_off_nothing_goes_to_a_worker(fakes: Fakes, off: str) -> None:
    kw: dict[str, Any] = {}
    if off == "501":
        fakes.lease_reply = [b"501"]
    elif off == "lease 0":
        fakes.map(lease=0)  # the holders are ignored when the lease is 0
    else:
        kw["direct_reads"] = False
    c = _client(fakes, **kw)
    try:
        for i in range(20):
            assert c.get(b"k%d" % i) == b"from-broker"
        assert fakes.at_worker == [] and len(fakes.at_broker) == 20
        assert fakes.mmi == (0 if kw else 1)  # one question per FRESH_OFF at most
    finally:
        c.close()


def test_the_async_client_reads_directly_too(fakes: Fakes) -> None:
    async def main() -> None:
        c = AsyncClient(fakes.broker_url, timeout=5.0, attempt_timeout=2.0)
        try:
            got = await asyncio.gather(*(c.get(b"k%d" % i) for i in range(10)))
            assert got == [b"from-worker"] * 10 and c.direct_reads_served == 10
            assert fakes.mmi == 1  # the reads that found no map waited for one answer
            fakes.mode = "refuse"
            assert await c.get(b"k") == b"from-broker"
            fakes.mode = "silent"
            await asyncio.sleep(REFETCH_MIN)
            assert await c.get(b"k") == b"from-broker"
            assert not c._readers  # the silent endpoint's socket is dropped
            assert len(fakes.at_broker) == 2 and len(fakes.at_worker) == 12
        finally:
            await c.close()

    asyncio.run(main())


def test_bench_reads_directly_and_resends_refusals_to_the_broker(fakes: Fakes) -> None:
    pipe = Pipeline(fakes.ctx, fakes.broker_url, window=8, timeout=5.0)
    try:
        # (silent: the reads in flight wait DIRECT_WAIT, the endpoint is muted, the rest go to the broker)
        for mode, direct, at_broker in (("answer", 20, 0), ("refuse", 0, 20), ("silent", 0, 20)):
            fakes.mode = mode
            replies: list[dict[str, Any]] = []
            errors: dict[str, int] = {}
            served, brokered = pipe.direct_served, len(fakes.at_broker)
            reqs = (Request({"op": "get", "key": b"k%d" % i}, []) for i in range(20))
            pipe.run(reqs, 20, replies.append, array("q"), errors, direct=True)
            assert errors == {} and len(replies) == 20, mode
            assert pipe.direct_served - served == direct, mode
            assert len(fakes.at_broker) - brokered == at_broker, mode
        assert 40 < len(fakes.at_worker) < 60
        workers = len(fakes.at_worker)
        off = Pipeline(fakes.ctx, fakes.broker_url, window=8, timeout=5.0, direct=False)
        try:
            replies = []
            off.run((Request({"op": "get", "key": b"k"}, []) for _ in range(5)), 5, replies.append, None, {},
                    direct=True)
            assert len(replies) == 5 and len(fakes.at_worker) == workers
        finally:
            off.close()
    finally:
        pipe.close()
