"""``zkv bench``: one client process's load, pipelined requests on one DEALER socket.

Nothing is retried: error replies and requests without a reply in ``timeout`` seconds are counted
as errors, by kind (see client/cli/bench.py for the whole run). The exception is a GET read
directly from a worker (lease reads, client/leases.py): refused, or unanswered within
``DIRECT_WAIT``, it is sent to the broker once, as a client would.
"""

from __future__ import annotations

import random
import time
import uuid
from array import array
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import zmq

from client.cli.bench_plan import BATCH_OPS, BenchConfig, BenchError, make_key
from client.leases import DIRECT_WAIT, FRESH_ON, MMI_LEASES, LeaseMap
from protocol.curve import Credentials
from protocol.frames import C_FINAL, C_REQUEST, MDPC, MMI_SERVICE, SERVICE, pack, pack_request_values, unpack

PREFILL_BATCH = 100  # keys per MSET request while prefilling
CHECK_INTERVAL = 0.05  # s between scans for requests that have timed out
READY_TIMEOUT = 10.0  # s to wait for the broker to answer mmi.service with 200
CLIENT_TIMEOUT_KIND = "CLIENT_TIMEOUT"  # no reply at all within the bench's timeout


@dataclass(frozen=True)
class Request:
    header: dict[str, Any]
    values: list[bytes]


class Pipeline:
    """One DEALER socket with up to ``window`` requests in flight, matched to replies by ``id``."""

    def __init__(self, ctx: zmq.Context, url: str, window: int, timeout: float,
                 credentials: Credentials | None = None, direct: bool = True) -> None:
        """``direct``: GETs go to the worker holding their slot's read lease when the broker
        grants leases (``zkv bench --no-direct``: never)."""
        self.ctx = ctx
        self.window = window
        self.timeout = timeout
        self.credentials = credentials
        self.cid = uuid.uuid4().bytes
        self.next_id = 1
        self.sock = self._dealer(url)
        self.direct = direct
        self.leases = LeaseMap()
        self.readers: dict[str, zmq.Socket] = {}  # worker reads endpoint -> its DEALER, kept
        self.direct_served = 0  # GETs answered by a worker, all runs

    def _dealer(self, url: str) -> zmq.Socket:
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        # Before connect: the queue of a connection takes the high-water marks set when it is made.
        sock.setsockopt(zmq.SNDHWM, max(1000, 2 * self.window))
        sock.setsockopt(zmq.RCVHWM, max(1000, 2 * self.window))
        if self.credentials is not None:
            self.credentials.apply(sock)
        sock.connect(url)
        return sock

    def close(self) -> None:
        self.sock.close(linger=0)
        for reader in self.readers.values():
            reader.close(linger=0)
        self.readers.clear()

    def fetch_leases(self, wait: float = 1.0) -> None:
        """The broker's lease map, asked now (nothing of this pipeline is in flight; a late kv
        answer meanwhile belongs to a request already counted as timed out)."""
        self.sock.send_multipart([MDPC, C_REQUEST, MMI_LEASES, b""])
        deadline = time.monotonic() + wait
        while (left := deadline - time.monotonic()) > 0 and self.sock.poll(int(left * 1000) + 1):
            frames = self.sock.recv_multipart()
            if len(frames) >= 3 and frames[1] == C_FINAL and frames[2] == MMI_LEASES:
                self.leases.install(frames[3:], time.monotonic())
                return
        self.leases.install(None, time.monotonic())

    def wait_ready(self, url: str) -> None:
        """Ask the broker (MMI) whether service ``kv`` is up; also proves the connection works."""
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            self.sock.send_multipart([MDPC, C_REQUEST, MMI_SERVICE, SERVICE])
            if self.sock.poll(1000):
                frames = self.sock.recv_multipart()
                if frames[2:4] == [MMI_SERVICE, b"200"]:
                    return
                time.sleep(0.2)
        raise BenchError(f"the broker at {url} did not report service 'kv' ready within {READY_TIMEOUT:.0f}s")

    def run(
        self,
        requests: Iterator[Request],
        count: int,
        on_reply: Callable[[dict[str, Any]], None],
        latencies: array | None,
        errors: dict[str, int],
        window: int | None = None,
        direct: bool = False,
    ) -> None:
        """Send ``count`` requests keeping ``window`` (default: the pipeline's) in flight; append
        each latency (us) to ``latencies`` and count failures by kind in ``errors``. ``direct``:
        the requests are GETs, read from the lease holders when the broker grants leases."""
        window = window or self.window
        if direct and self.direct:
            self.fetch_leases()
            if self.leases.on:
                return self._run_direct(requests, count, on_reply, latencies, errors, window)
        # Without leases: this loop alone, as fast as before lease reads were.
        sock = self.sock
        inflight: dict[int, int] = {}  # request id -> send time, ns
        deadlines: deque[tuple[float, int]] = deque()  # (monotonic deadline, id), in send order
        timeout_ns = int(self.timeout * 1e9)
        sent = 0
        next_check = time.monotonic() + CHECK_INTERVAL
        now_ns = time.perf_counter_ns
        while sent < count or inflight:
            while sent < count and len(inflight) < window:
                req = next(requests)
                rid = self._stamp(req)
                sock.send_multipart([MDPC, C_REQUEST, SERVICE, pack(req.header), *req.values])
                inflight[rid] = now_ns()
                deadlines.append((time.monotonic() + self.timeout, rid))
                sent += 1
            if sock.poll(int(CHECK_INTERVAL * 1000)):
                while True:
                    try:
                        frames = sock.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    t1 = now_ns()
                    if len(frames) < 4 or frames[1] != C_FINAL or frames[2] != SERVICE:
                        continue
                    tally(unpack(frames[3]), t1, inflight, timeout_ns, latencies, on_reply, errors)
            now = time.monotonic()
            if now >= next_check:
                next_check = now + CHECK_INTERVAL
                time_out(deadlines, now, inflight, errors)

    def _stamp(self, req: Request) -> int:
        """Give a request its id and the client id; returns the id."""
        rid = self.next_id
        self.next_id += 1
        req.header["id"] = rid
        req.header["cid"] = self.cid
        req.header["retry"] = False  # never resent: spare the broker the look-up of earlier attempts
        return rid

    def _reader(self, url: str, poller: zmq.Poller) -> zmq.Socket:
        sock = self.readers.get(url)
        if sock is None:
            sock = self.readers[url] = self._dealer(url)
            poller.register(sock, zmq.POLLIN)  # (those of earlier runs: when the run starts)
        return sock

    def _run_direct(
        self,
        requests: Iterator[Request],
        count: int,
        on_reply: Callable[[dict[str, Any]], None],
        latencies: array | None,
        errors: dict[str, int],
        window: int,
    ) -> None:
        """``run`` for GETs with leases on: each GET whose slot has a lease holder goes to its
        reads endpoint; a refusal (or no answer within DIRECT_WAIT) is sent to the broker once,
        and the broker's answer counts. Replies come on any socket (a Poller); the map is
        fetched again (on the broker socket, not waited for) when client/leases.py says so."""
        sock, leases = self.sock, self.leases
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        for reader in self.readers.values():
            poller.register(reader, zmq.POLLIN)
        inflight: dict[int, int] = {}  # request id -> send time, ns
        deadlines: deque[tuple[float, int]] = deque()  # (monotonic deadline, id), in send order
        direct: dict[int, tuple[bytes, str]] = {}  # id -> (header, reads endpoint) of a read at a worker
        direct_deadlines: deque[tuple[float, int]] = deque()  # (when to ask the broker instead, id)
        timeout_ns = int(self.timeout * 1e9)
        sent = 0
        next_check = time.monotonic() + CHECK_INTERVAL
        map_asked: float | None = None  # when an mmi.leases went out unanswered
        now_ns = time.perf_counter_ns

        def to_broker(header: bytes) -> None:
            sock.send_multipart([MDPC, C_REQUEST, SERVICE, header])

        def done(header: dict[str, Any], t1: int) -> None:
            tally(header, t1, inflight, timeout_ns, latencies, on_reply, errors)

        while sent < count or inflight:
            while sent < count and len(inflight) < window:
                req = next(requests)
                rid = self._stamp(req)
                header = pack(req.header)
                key = req.header.get("key")
                url = leases.url_for(key) if req.header.get("op") == "get" and isinstance(key, bytes) else None
                if url is None:
                    sock.send_multipart([MDPC, C_REQUEST, SERVICE, header, *req.values])
                else:
                    self._reader(url, poller).send(header)  # a reads endpoint takes the header alone
                    direct[rid] = (header, url)
                    direct_deadlines.append((time.monotonic() + DIRECT_WAIT, rid))
                inflight[rid] = now_ns()
                deadlines.append((time.monotonic() + self.timeout, rid))
                sent += 1
            for ready, _ in poller.poll(int(CHECK_INTERVAL * 1000)):
                while True:
                    try:
                        frames = ready.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    t1 = now_ns()
                    if ready is sock:
                        if len(frames) < 4 or frames[1] != C_FINAL:
                            continue
                        if frames[2] == MMI_LEASES:
                            leases.install(frames[3:], time.monotonic())
                            map_asked = None
                        elif frames[2] == SERVICE:
                            done(unpack(frames[3]), t1)
                        continue
                    # A worker's answer, [header, *values]: only for a read still waiting there (else
                    # it went to the broker). The bench trusts the broker's frames, not a worker's: a
                    # malformed one is dropped.
                    try:
                        header = unpack(frames[0])
                        rid = header.get("id")
                        at = direct.pop(rid, None) if type(rid) is int else None
                    except (ValueError, AttributeError):
                        continue
                    if at is None:
                        continue
                    if header.get("ok"):
                        self.direct_served += 1
                        done(header, t1)
                    else:  # NOT_LEASED (or an error): once to the broker, whose answer counts
                        leases.forget()
                        to_broker(at[0])
            now = time.monotonic()
            if now >= next_check:
                next_check = now + CHECK_INTERVAL
                while direct_deadlines and direct_deadlines[0][0] <= now:
                    _, rid = direct_deadlines.popleft()
                    at = direct.pop(rid, None)
                    if at is not None and rid in inflight:
                        leases.silent(at[1], now)
                        to_broker(at[0])
                time_out(deadlines, now, inflight, errors, direct)
                if leases.stale(now) and (map_asked is None or now - map_asked >= FRESH_ON):
                    sock.send_multipart([MDPC, C_REQUEST, MMI_LEASES, b""])
                    map_asked = now
        return None


def time_out(deadlines: deque[tuple[float, int]], now: float, inflight: dict[int, int], errors: dict[str, int],
             direct: dict[int, Any] | None = None) -> None:
    """Count the requests whose deadline has passed without a reply (and forget their direct reads)."""
    while deadlines and deadlines[0][0] <= now:
        _, rid = deadlines.popleft()
        if direct is not None:
            direct.pop(rid, None)
        if inflight.pop(rid, None) is not None:
            errors[CLIENT_TIMEOUT_KIND] = errors.get(CLIENT_TIMEOUT_KIND, 0) + 1


def tally(header: dict[str, Any], t1: int, inflight: dict[int, int], timeout_ns: int, latencies: array | None,
          on_reply: Callable[[dict[str, Any]], None], errors: dict[str, int]) -> None:
    """Count one reply (``t1``: when it arrived, ns) against the request it answers in ``inflight``."""
    t0 = inflight.pop(header.get("id"), None)  # type: ignore[arg-type]
    if t0 is None:
        if header.get("id") is None and not header.get("ok"):
            raise BenchError(f"the broker refused a request: {header}")
        return  # a reply after its request timed out: already counted
    if t1 - t0 > timeout_ns:  # answered, but later than the timeout: as if unanswered
        errors[CLIENT_TIMEOUT_KIND] = errors.get(CLIENT_TIMEOUT_KIND, 0) + 1
        return
    if latencies is not None:
        latencies.append((t1 - t0) // 1000)
    if header.get("ok"):
        on_reply(header)
    else:
        kind = str(header.get("code", "UNKNOWN"))
        errors[kind] = errors.get(kind, 0) + 1


class Workload:
    """The requests of one process: which keys, which values, and how replies are judged."""

    def __init__(self, cfg: BenchConfig, proc: int) -> None:
        self.cfg = cfg
        self.proc = proc
        self.value = random.Random(cfg.seed * 7919 + proc).randbytes(cfg.data_size)
        self.rng = random.Random(cfg.seed * 104729 + proc)
        self.misses = 0
        self.ok = 0

    def _indices(self, first: int, n: int) -> list[int]:
        if self.cfg.keyspace:
            return [self.rng.randrange(self.cfg.keyspace) for _ in range(n)]
        return list(range(first, first + n))

    def requests(self, op: str) -> Iterator[Request]:
        """This process's requests of ``op``: every procs-th of the run's request numbers."""
        cfg = self.cfg
        per = cfg.batch if op in BATCH_OPS else 1
        for j in range(self.proc, cfg.requests, cfg.procs):
            keys = [make_key(i, cfg) for i in self._indices(j * per, per)]
            if op == "put":
                yield Request({"op": op, "key": keys[0]}, [self.value])
            elif op in ("get", "exists", "delete"):
                yield Request({"op": op, "key": keys[0]}, [])
            elif op == "mget":
                yield Request({"op": op, "keys": keys, "packed": True} if cfg.packed else {"op": op, "keys": keys}, [])
            else:  # mset
                yield self._mset(keys)

    def _mset(self, keys: list[bytes]) -> Request:
        values = [self.value] * len(keys)
        frames = pack_request_values(values) if self.cfg.packed else None
        if frames is None:
            return Request({"op": "mset", "keys": keys}, values)
        return Request({"op": "mset", "keys": keys, "packed": True}, frames)

    def prefill_requests(self, lo: int, hi: int) -> Iterator[Request]:
        """MSETs writing this process's share of key indices ``[lo, hi)``."""
        step = PREFILL_BATCH * self.cfg.procs
        for start in range(lo + self.proc * PREFILL_BATCH, hi, step):
            keys = [make_key(i, self.cfg) for i in range(start, min(start + PREFILL_BATCH, hi))]
            yield self._mset(keys)

    def cleanup_requests(self) -> Iterator[Request]:
        """Deletes of this process's share of every key index the run may have written."""
        for i in range(self.proc, self.cfg.max_key_index(), self.cfg.procs):
            yield Request({"op": "delete", "key": make_key(i, self.cfg)}, [])

    def judge(self, op: str) -> Callable[[dict[str, Any]], None]:
        """The reply handler of ``op``: counts successes and misses."""

        def on_reply(header: dict[str, Any]) -> None:
            self.ok += 1
            if op == "get":
                self.misses += not header.get("found")
            elif op == "exists":
                self.misses += not header.get("exists")
            elif op == "delete":
                self.misses += not header.get("deleted")
            elif op == "mget":
                self.misses += sum(1 for f in header.get("found", ()) if not f)

        return on_reply


def cleanup_count(cfg: BenchConfig, proc: int) -> int:
    return len(range(proc, cfg.max_key_index(), cfg.procs))


def prefill_count(lo: int, hi: int, procs: int, proc: int) -> int:
    """How many prefill MSETs process ``proc`` sends for key indices ``[lo, hi)``."""
    step = PREFILL_BATCH * procs
    return len(range(lo + proc * PREFILL_BATCH, hi, step))
