"""Property-based fuzzing of both ROUTER sockets of a real broker, with real workers behind it.

Client side: well-framed requests with random headers (ops real and not, every field name with
values of random types and sizes, random value frames) and random framing. Every message whose
header carries an integer ``id`` must get a reply carrying that id. Worker side: a raw DEALER on
the backend, with or without a READY first (random or well-formed, never the id of a real
worker), then random commands with random bodies. After each example the broker is alive; at
the end, and every few examples, a key written before keeps its value and the real workers
are alive. The figures (messages, replies, crashes) are logged (``-o log_cli=true``).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.frames import (
    C_FINAL,
    C_REQUEST,
    MDPC,
    MDPW,
    MMI_ADMIN,
    MMI_SERVICE,
    MMI_STATUS,
    SERVICE,
    W_ACK,
    W_DISCONNECT,
    W_EXPIRED,
    W_FINAL,
    W_HEARTBEAT,
    W_NACK,
    W_PARTIAL,
    W_READY,
    W_SNAPSHOT_PART,
    pack,
    unpack,
)
from tests.support.cluster import Cluster
from tests.support.helpers import RawPeer

pytestmark = pytest.mark.timeout(240)
log = logging.getLogger("zkv.tests.fuzz")

KNOWN_KEY, KNOWN_VALUE = b"fuzz-known", os.urandom(64)
REAL_WORKERS = {"w1", "w2", "w3"}
EXAMPLES = int(os.environ.get("ZKV_FUZZ_EXAMPLES", "300"))  # per socket
FUZZ_SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                         suppress_health_check=list(HealthCheck))

OPS = ["put", "get", "delete", "exists", "mget", "mset", "ttl", "expire", "put_chunk", "put_commit", "put_abort",
       "get_chunks", "scan", "watch", "dump", "", "nope", "GET"]
FIELDS = ["key", "keys", "ttl", "if_version", "if_absent", "cid", "retry", "stream", "index", "size", "chunks",
          "first", "count", "prefix", "start_after", "limit", "values", "cancel", "keepalive", "since", "slot",
          "part", "dump", "worker"]

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.sampled_from([0, 1, 2**31, 2**32, 2**32 - 1]),
    st.floats(), st.text(max_size=12), st.binary(max_size=24), st.binary(min_size=16, max_size=16),
    st.binary(min_size=4096, max_size=4200))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=8)
headers = st.fixed_dictionaries({"op": st.one_of(st.sampled_from(OPS), values)},
                                optional={name: values for name in FIELDS})


def _mentions_known(v: Any) -> bool:
    """Nothing may name the known key (a put or delete of it would change it legitimately)."""
    if isinstance(v, bytes | str):
        return (v.encode() if isinstance(v, str) else v) == KNOWN_KEY
    if isinstance(v, list):
        return any(_mentions_known(x) for x in v)
    if isinstance(v, dict):
        return any(_mentions_known(x) for x in v.values())
    return False


@st.composite
def client_messages(draw: st.DrawFn) -> tuple[list[bytes], dict[str, Any] | None, bool]:
    """(frames, header, with_id): random framing (header None), or a kv request whose header the
    test packs after it has set ``id`` to its own request number (when ``with_id``)."""
    if draw(st.integers(0, 4)) == 0:
        frames = draw(st.lists(st.one_of(
            st.sampled_from([MDPC, C_REQUEST, SERVICE, MMI_SERVICE, MMI_STATUS, MMI_ADMIN, b""]),
            st.binary(max_size=48), values.map(pack)), min_size=1, max_size=6))
        return frames, None, False
    header = draw(headers.filter(lambda h: not _mentions_known(h)))
    with_id = draw(st.integers(0, 9)) > 0
    if not with_id and draw(st.booleans()):
        header["id"] = draw(st.one_of(st.none(), st.text(max_size=4), st.floats(), st.booleans()))
    body = draw(st.lists(st.binary(max_size=3000), max_size=3))
    return body, header, with_id


@st.composite
def worker_sessions(draw: st.DrawFn) -> tuple[list[bytes] | None, list[list[bytes]]]:
    """(a READY's frames or None, then commands), from one raw DEALER on the backend."""
    ready = None
    if draw(st.booleans()):
        info = draw(st.fixed_dictionaries(
            {"id": st.one_of(st.sampled_from(["fz1", "fz2", "", "w" * 600]), values)},
            optional={"data_id": st.one_of(st.binary(min_size=1, max_size=16), values),
                      "process": values, "positions": values, "keys": values, "disk_bytes": values}
        ).filter(lambda i: not isinstance(i["id"], str) or i["id"] not in REAL_WORKERS))
        ready = [MDPW, W_READY, draw(st.sampled_from([SERVICE, b"", b"nope"])), pack(info)]
    cmd = st.sampled_from([W_READY, W_HEARTBEAT, W_ACK, W_NACK, W_FINAL, W_PARTIAL, W_SNAPSHOT_PART, W_EXPIRED,
                           W_DISCONNECT, b"\x77", b""])
    bodies = st.lists(st.one_of(values.map(pack), st.binary(max_size=40), st.binary(min_size=8, max_size=8)),
                      max_size=4)
    commands = draw(st.lists(st.tuples(st.sampled_from([MDPW, MDPW, MDPW, b"MDPW01", b""]), cmd, bodies),
                             min_size=1, max_size=5))
    return ready, [[proto, c, *b] for proto, c, b in commands]


class Figures:
    def __init__(self) -> None:
        self.sent = self.with_id = self.answered = self.replies = self.crashes = 0

    def line(self, side: str) -> str:
        return (f"fuzz {side}: {self.sent} messages sent, {self.with_id} with an integer id, {self.answered} "
                f"answered with it, {self.replies} replies received, {self.crashes} broker crashes")


def _check_intact(cluster: Cluster) -> None:
    assert cluster.procs["broker"].running, cluster.procs["broker"].log_tail()
    broker_log = cluster.procs["broker"].log_tail(1_000_000)
    for net in ("message_handling_failed", "request_handling_failed"):  # the last-resort handlers
        assert net not in broker_log, f"a message reached {net}:\n{broker_log[-3000:]}"
    st_ = cluster.status()
    alive = {w["id"] for w in st_["workers"] if w["state"] == "alive"}
    assert REAL_WORKERS <= alive, f"a real worker was lost: {alive}"
    with cluster.client() as c:
        assert c.get(KNOWN_KEY) == KNOWN_VALUE


@pytest.fixture
def fuzz_cluster(cluster_factory) -> Cluster:  # type: ignore[no-untyped-def]
    # No auto-rebalance: a well-formed READY from the fuzzer registers a worker, which must not be
    # given slots (taking a slot with a forged worker is what CURVE and worker keys prevent).
    # The product's heartbeat (1 s): with 0.3 s a loaded machine loses real workers.
    cluster = cluster_factory(broker_args=["--no-auto-rebalance", "--max-value", "65536"], heartbeat=None).start()
    with cluster.client() as c:
        c.put(KNOWN_KEY, KNOWN_VALUE)
    return cluster


def test_fuzz_the_client_router(fuzz_cluster: Cluster) -> None:
    cluster, fig = fuzz_cluster, Figures()
    peer = RawPeer(cluster.frontend)
    rid = iter(range(1, 10**9))
    started = time.monotonic()

    @FUZZ_SETTINGS
    @given(client_messages())
    def one(msg: tuple[list[bytes], dict[str, Any] | None, bool]) -> None:
        frames, header, with_id = msg
        n = next(rid)
        if header is not None:
            if with_id:
                header["id"] = n
            frames = [MDPC, C_REQUEST, SERVICE, pack(header), *frames]
        peer.send(*frames)
        fig.sent += 1
        if with_id:
            fig.with_id += 1
            deadline = time.monotonic() + 10.0
            while True:
                assert time.monotonic() < deadline, f"no reply with id {n} to {header}"
                got = peer.recv(timeout=max(0.1, deadline - time.monotonic()))
                fig.replies += 1
                if len(got) >= 4 and got[0] == MDPC and got[2] == SERVICE and _id_of(got[3]) == n:
                    fig.answered += 1
                    break
        else:  # no id to wait for: a round trip through the broker's loop, then on
            peer.send(MDPC, C_REQUEST, MMI_SERVICE, SERVICE)
            while True:
                got = peer.recv(timeout=10.0)
                fig.replies += 1
                if got[:3] == [MDPC, C_FINAL, MMI_SERVICE]:
                    break
        if not cluster.procs["broker"].running:
            fig.crashes += 1
            raise AssertionError(f"the broker died on {frames!r}:\n{cluster.procs['broker'].log_tail()}")
        if fig.sent % 50 == 0:
            _check_intact(cluster)

    try:
        one()
    finally:
        peer.close()
        log.warning("%s in %.1f s", fig.line("client ROUTER"), time.monotonic() - started)
    _check_intact(cluster)
    assert fig.answered == fig.with_id and fig.crashes == 0


def _id_of(frame: bytes) -> Any:
    try:
        h = unpack(frame)
    except Exception:
        return None
    return h.get("id") if isinstance(h, dict) else None


def test_fuzz_the_worker_router(fuzz_cluster: Cluster) -> None:
    cluster, fig = fuzz_cluster, Figures()
    ctx = zmq.Context.instance()
    started = time.monotonic()
    peer = RawPeer(cluster.frontend)
    phases = {"send": 0.0, "round trip": 0.0, "check": 0.0}

    @FUZZ_SETTINGS
    @given(worker_sessions())
    def one(session: tuple[list[bytes] | None, list[list[bytes]]]) -> None:
        ready, commands = session
        t0 = time.monotonic()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(cluster.backend)
        try:
            for frames in ([ready] if ready else []) + commands:
                sock.send_multipart(frames)
                fig.sent += 1
            while sock.poll(20):  # what the broker says back (DISCONNECT, ASSIGN, heartbeats)
                sock.recv_multipart()
                fig.replies += 1
        finally:
            sock.close(linger=0)
        t1 = time.monotonic()
        peer.call(MDPC, C_REQUEST, MMI_SERVICE, SERVICE, timeout=10.0)  # a round trip: all taken in
        t2 = time.monotonic()
        phases["send"] += t1 - t0
        phases["round trip"] += t2 - t1
        if not cluster.procs["broker"].running:
            fig.crashes += 1
            raise AssertionError(f"the broker died on {session!r}:\n{cluster.procs['broker'].log_tail()}")
        if fig.sent % 50 < len(commands) + 1:
            _check_intact(cluster)
        phases["check"] += time.monotonic() - t2

    try:
        one()
    finally:
        peer.close()
        log.warning("%s in %.1f s (%s)", fig.line("worker ROUTER"), time.monotonic() - started, phases)
    _check_intact(cluster)
    assert fig.crashes == 0
