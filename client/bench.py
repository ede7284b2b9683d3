"""``zkv bench``: a load generator in the manner of ``redis-benchmark``.

Each of ``procs`` client processes opens one DEALER socket to the broker and keeps its share of
``clients`` requests in flight (pipelining; replies are matched to requests by the header ``id``).
Every request carries the process's client id (``cid``) and a request number that is unique for
the whole run, so the broker's de-duplication never mistakes one request for a retry of another.
Nothing is retried: error replies and requests without a reply in ``timeout`` seconds are counted
as errors, by kind.

Keys: request ``j`` of a single-key op uses key index ``j``; request ``j`` of a batch op (``mget``,
``mset``) uses key indices ``j*batch .. j*batch+batch-1``. With a keyspace (``-r``) every index is
drawn at random from ``[0, keyspace)`` instead. Key index ``i`` is ``b"key:"`` and ``i`` zero-padded
to ``key_size`` bytes. A read phase (get, mget, exists) first writes (untimed) whatever keys it will
read that earlier phases of the same run have not written, so reads hit.

Phases run in the order given; the processes start each phase together (a barrier) and the
throughput of a phase is its successful requests over the time from the first process's start to
the last process's last reply.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import queue
import random
import signal
import threading
import time
import traceback
import uuid
from array import array
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import click
import msgpack
import zmq

from protocol.frames import C_FINAL, C_REQUEST, MDPC, MMI_SERVICE, SERVICE

OPS: tuple[str, ...] = ("put", "get", "mget", "mset", "delete", "exists")
READ_OPS = frozenset({"get", "mget", "exists"})
BATCH_OPS = frozenset({"mget", "mset"})
KEY_PREFIX = b"key:"
PREFILL_BATCH = 100  # keys per MSET request while prefilling
PREFILL_WINDOW = 16  # MSET requests in flight per process while prefilling
CHECK_INTERVAL = 0.05  # s between scans for requests that have timed out
READY_TIMEOUT = 10.0  # s to wait for the broker to answer mmi.service with 200
CLIENT_TIMEOUT_KIND = "CLIENT_TIMEOUT"  # no reply at all within the bench's timeout


class BenchError(Exception):
    """The benchmark could not run (no broker, a client process failed, ...)."""


# ---------------------------------------------------------------------------------------------
# Configuration and plan


@dataclass(frozen=True)
class BenchConfig:
    url: str = "tcp://127.0.0.1:5555"
    clients: int = 50
    requests: int = 100_000
    data_size: int = 3
    key_size: int = 16
    keyspace: int = 0  # 0: a new key per request
    tests: tuple[str, ...] = ("put", "get")
    procs: int = 1
    batch: int = 10
    timeout: float = 10.0
    seed: int = 0

    def validate(self) -> None:
        if self.clients < 1 or self.requests < 1 or self.procs < 1 or self.batch < 1:
            raise ValueError("-c, -n, -P and --batch must be at least 1")
        if self.procs > self.clients:
            raise ValueError(f"-P {self.procs} is more than -c {self.clients}: a process needs a request")
        if self.data_size < 0 or self.keyspace < 0 or self.timeout <= 0:
            raise ValueError("-d and -r must not be negative, --timeout must be positive")
        unknown = [t for t in self.tests if t not in OPS]
        if unknown or not self.tests:
            raise ValueError(f"unknown test(s) {','.join(unknown)}; choose from {','.join(OPS)}")
        if len(set(self.tests)) != len(self.tests):
            raise ValueError("each test may be named once in -t")
        need = len(KEY_PREFIX) + len(str(max(self.max_key_index(), 1)))
        if self.key_size < need:
            raise ValueError(f"--key-size {self.key_size} is too small for these keys; need at least {need}")

    def max_key_index(self) -> int:
        """One past the largest key index any phase may use."""
        if self.keyspace:
            return self.keyspace
        return self.requests * (self.batch if any(t in BATCH_OPS for t in self.tests) else 1)


@dataclass(frozen=True)
class Phase:
    op: str
    prefill: tuple[int, int] | None  # key index range to write, untimed, before the phase


def plan_phases(cfg: BenchConfig) -> list[Phase]:
    """The phases in order, each with the keys a read phase must find written."""
    phases: list[Phase] = []
    written = 0  # keys [0, written) are known to exist
    for op in cfg.tests:
        need = cfg.keyspace or cfg.requests * (cfg.batch if op in BATCH_OPS else 1)
        prefill = None
        if op in READ_OPS and written < need:
            prefill = (written, need)
            written = need
        phases.append(Phase(op, prefill))
        if op in ("put", "mset") and not cfg.keyspace:
            written = max(written, need)
        elif op == "delete":
            written = 0
    return phases


def split(total: int, parts: int, index: int) -> int:
    """The share of ``total`` that part ``index`` of ``parts`` takes (shares differ by at most 1)."""
    return total // parts + (1 if index < total % parts else 0)


def make_key(index: int, key_size: int) -> bytes:
    return KEY_PREFIX + str(index).zfill(key_size - len(KEY_PREFIX)).encode()


# ---------------------------------------------------------------------------------------------
# Results


@dataclass
class ProcResult:
    """What one process measured in one phase. Latencies in microseconds."""

    op: str
    proc: int
    start: float  # time.monotonic(); CLOCK_MONOTONIC is shared by the processes of a host
    end: float
    latencies_us: array = field(default_factory=lambda: array("q"))
    ok: int = 0
    misses: int = 0  # get/mget/exists: keys not found; delete: keys that did not exist
    errors: dict[str, int] = field(default_factory=dict)


@dataclass
class OpSummary:
    op: str
    requests: int
    ok: int
    errors: int
    errors_by_kind: dict[str, int]
    misses: int
    keys_per_request: int
    seconds: float
    ops_per_sec: float
    keys_per_sec: float
    avg_ms: float
    min_ms: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float


def percentile(sorted_values: list[int], q: float) -> int:
    """Nearest-rank percentile of an ascending list (0 for an empty one)."""
    if not sorted_values:
        return 0
    rank = max(1, -(-len(sorted_values) * q // 100))  # ceil
    return sorted_values[int(rank) - 1]


def summarize(op: str, parts: list[ProcResult], keys_per_request: int) -> OpSummary:
    lat = sorted(v for p in parts for v in p.latencies_us)
    errors: dict[str, int] = {}
    for p in parts:
        for kind, n in p.errors.items():
            errors[kind] = errors.get(kind, 0) + n
    ok = sum(p.ok for p in parts)
    n_err = sum(errors.values())
    seconds = max(p.end for p in parts) - min(p.start for p in parts)
    rate = ok / seconds if seconds > 0 else 0.0
    ms = 1000.0
    return OpSummary(
        op=op,
        requests=ok + n_err,
        ok=ok,
        errors=n_err,
        errors_by_kind=dict(sorted(errors.items())),
        misses=sum(p.misses for p in parts),
        keys_per_request=keys_per_request,
        seconds=round(seconds, 4),
        ops_per_sec=round(rate, 1),
        keys_per_sec=round(rate * keys_per_request, 1),
        avg_ms=round(sum(lat) / len(lat) / ms, 3) if lat else 0.0,
        min_ms=round(lat[0] / ms, 3) if lat else 0.0,
        p50_ms=round(percentile(lat, 50) / ms, 3),
        p95_ms=round(percentile(lat, 95) / ms, 3),
        p99_ms=round(percentile(lat, 99) / ms, 3),
        max_ms=round(lat[-1] / ms, 3) if lat else 0.0,
    )


# ---------------------------------------------------------------------------------------------
# One client process: a DEALER with pipelined requests


class Sync(Protocol):
    def wait(self, timeout: float | None = None) -> int: ...


@dataclass(frozen=True)
class Request:
    header: dict[str, Any]
    values: list[bytes]


class Pipeline:
    """One DEALER socket with up to ``window`` requests in flight, matched to replies by ``id``."""

    def __init__(self, ctx: zmq.Context, url: str, window: int, timeout: float) -> None:
        self.window = window
        self.timeout = timeout
        self.cid = uuid.uuid4().bytes
        self.next_id = 1
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, max(1000, 2 * window))
        self.sock.setsockopt(zmq.RCVHWM, max(1000, 2 * window))
        self.sock.connect(url)
        self.packer = msgpack.Packer(use_bin_type=True)

    def close(self) -> None:
        self.sock.close(linger=0)

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
    ) -> None:
        """Send ``count`` requests keeping ``window`` (default: the pipeline's) in flight; append
        each latency (us) to ``latencies`` and count failures by kind in ``errors``."""
        window = window or self.window
        sock = self.sock
        packer = self.packer
        inflight: dict[int, int] = {}  # request id -> send time, ns
        deadlines: deque[tuple[float, int]] = deque()  # (monotonic deadline, id), in send order
        timeout_ns = int(self.timeout * 1e9)
        sent = 0
        next_check = time.monotonic() + CHECK_INTERVAL
        now_ns = time.perf_counter_ns
        unpack = msgpack.unpackb
        while sent < count or inflight:
            while sent < count and len(inflight) < window:
                req = next(requests)
                rid = self.next_id
                self.next_id += 1
                req.header["id"] = rid
                req.header["cid"] = self.cid
                req.header["retry"] = False  # never resent: spare the broker the look-up of earlier attempts
                sock.send_multipart([MDPC, C_REQUEST, SERVICE, packer.pack(req.header), *req.values])
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
                    header = unpack(frames[3], raw=False)
                    t0 = inflight.pop(header.get("id"), None)
                    if t0 is None:
                        if header.get("id") is None and not header.get("ok"):
                            raise BenchError(f"the broker refused a request: {header}")
                        continue  # a reply after its request timed out: already counted
                    if t1 - t0 > timeout_ns:  # answered, but later than the timeout: as if unanswered
                        errors[CLIENT_TIMEOUT_KIND] = errors.get(CLIENT_TIMEOUT_KIND, 0) + 1
                        continue
                    if latencies is not None:
                        latencies.append((t1 - t0) // 1000)
                    if header.get("ok"):
                        on_reply(header)
                    else:
                        kind = str(header.get("code", "UNKNOWN"))
                        errors[kind] = errors.get(kind, 0) + 1
            now = time.monotonic()
            if now >= next_check:
                next_check = now + CHECK_INTERVAL
                while deadlines and deadlines[0][0] <= now:
                    _, rid = deadlines.popleft()
                    if inflight.pop(rid, None) is not None:
                        errors[CLIENT_TIMEOUT_KIND] = errors.get(CLIENT_TIMEOUT_KIND, 0) + 1


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
            keys = [make_key(i, cfg.key_size) for i in self._indices(j * per, per)]
            if op == "put":
                yield Request({"op": op, "key": keys[0]}, [self.value])
            elif op in ("get", "exists", "delete"):
                yield Request({"op": op, "key": keys[0]}, [])
            elif op == "mget":
                yield Request({"op": op, "keys": keys}, [])
            else:  # mset
                yield Request({"op": op, "keys": keys}, [self.value] * len(keys))

    def prefill_requests(self, lo: int, hi: int) -> Iterator[Request]:
        """MSETs writing this process's share of key indices ``[lo, hi)``."""
        step = PREFILL_BATCH * self.cfg.procs
        for start in range(lo + self.proc * PREFILL_BATCH, hi, step):
            keys = [make_key(i, self.cfg.key_size) for i in range(start, min(start + PREFILL_BATCH, hi))]
            yield Request({"op": "mset", "keys": keys}, [self.value] * len(keys))

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


def prefill_count(lo: int, hi: int, procs: int, proc: int) -> int:
    """How many prefill MSETs process ``proc`` sends for key indices ``[lo, hi)``."""
    step = PREFILL_BATCH * procs
    return len(range(lo + proc * PREFILL_BATCH, hi, step))


def run_process(cfg: BenchConfig, proc: int, sync: Sync, emit: Callable[[tuple[Any, ...]], None]) -> None:
    """Everything one client process does: each phase's prefill, the barrier, the timed run."""
    ctx = zmq.Context()
    pipe = Pipeline(ctx, cfg.url, split(cfg.clients, cfg.procs, proc), cfg.timeout)
    try:
        pipe.wait_ready(cfg.url)
        work = Workload(cfg, proc)
        for phase in plan_phases(cfg):
            if phase.prefill is not None:
                lo, hi = phase.prefill
                errors: dict[str, int] = {}
                pipe.run(work.prefill_requests(lo, hi), prefill_count(lo, hi, cfg.procs, proc),
                         lambda _h: None, None, errors, window=PREFILL_WINDOW)
                if errors:
                    raise BenchError(f"prefill of {phase.op} failed: {errors}")
            sync.wait(timeout=max(60.0, cfg.timeout * 2))
            count = split(cfg.requests, cfg.procs, proc)
            result = ProcResult(phase.op, proc, time.monotonic(), 0.0)
            work.ok = work.misses = 0
            pipe.run(work.requests(phase.op), count, work.judge(phase.op), result.latencies_us,
                     result.errors)
            result.end = time.monotonic()
            result.ok, result.misses = work.ok, work.misses
            emit(("result", result))
    finally:
        pipe.close()
        ctx.term()


def _child_main(cfg: BenchConfig, proc: int, barrier: Any, results: Any) -> None:
    """Entry point of a client process (``-P`` > 1)."""
    try:
        run_process(cfg, proc, barrier, results.put)
        results.put(("done", proc))
    except KeyboardInterrupt:
        barrier.abort()
    except threading.BrokenBarrierError:
        results.put(("done", proc))  # another process failed and said so
    except BaseException as e:  # reported to the parent, which fails the run
        barrier.abort()
        message = str(e) if isinstance(e, BenchError) else traceback.format_exc()
        results.put(("error", proc, message))


# ---------------------------------------------------------------------------------------------
# The parent: run the processes, gather each phase, report


class Collector:
    """Gathers the per-process results of each phase and reports a phase once all are in."""

    def __init__(self, cfg: BenchConfig, report: Callable[[OpSummary], None]) -> None:
        self.cfg = cfg
        self.report = report
        self.pending: dict[int, list[ProcResult]] = {}
        self.seen: dict[int, int] = {}  # proc -> phases reported
        self.summaries: list[OpSummary] = []

    def add(self, result: ProcResult) -> None:
        index = self.seen.get(result.proc, 0)
        self.seen[result.proc] = index + 1
        parts = self.pending.setdefault(index, [])
        parts.append(result)
        if len(parts) == self.cfg.procs:
            del self.pending[index]
            summary = summarize(result.op, parts, self.cfg.batch if result.op in BATCH_OPS else 1)
            self.summaries.append(summary)
            self.report(summary)


def run_bench(cfg: BenchConfig, report: Callable[[OpSummary], None] = lambda s: None) -> list[OpSummary]:
    """Run every phase; ``report`` is called as each phase completes. Raises BenchError."""
    cfg.validate()
    collector = Collector(cfg, report)
    if cfg.procs == 1:
        run_process(cfg, 0, threading.Barrier(1), lambda msg: collector.add(msg[1]))
        return collector.summaries
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(cfg.procs)
    results = ctx.Queue()
    children = [ctx.Process(target=_child_main, args=(cfg, i, barrier, results), daemon=True)
                for i in range(cfg.procs)]
    for child in children:
        child.start()
    try:
        _gather(children, results, collector)
    finally:
        for child in children:
            if child.is_alive():
                child.terminate()
        for child in children:
            child.join(timeout=5)
    return collector.summaries


def _gather(children: list[Any], results: Any, collector: Collector) -> None:
    done: set[int] = set()
    while len(done) < len(children):
        try:
            msg = results.get(timeout=0.5)
        except queue.Empty:
            dead = [i for i, c in enumerate(children) if i not in done and not c.is_alive()]
            if dead:
                code = children[dead[0]].exitcode
                raise BenchError(f"client process {dead[0]} exited with code {code}") from None
            continue
        if msg[0] == "result":
            collector.add(msg[1])
        elif msg[0] == "done":
            done.add(msg[1])
        else:
            raise BenchError(f"client process {msg[1]} failed: {msg[2]}")


# ---------------------------------------------------------------------------------------------
# Output


def format_summary(s: OpSummary, cfg: BenchConfig) -> str:
    """One phase in the manner of redis-benchmark's summary."""
    batch = f", {s.keys_per_request} keys per request" if s.keys_per_request > 1 else ""
    keys = f"keyspace {cfg.keyspace}" if cfg.keyspace else "a new key per request"
    lines = [
        f"====== {s.op.upper()} ======",
        f"  {s.requests} requests completed in {s.seconds:.2f} seconds",
        f"  {cfg.clients} parallel requests in flight ({cfg.procs} client process"
        f"{'es' if cfg.procs > 1 else ''})",
        f"  {cfg.data_size} bytes payload, {cfg.key_size} bytes keys, {keys}{batch}",
        "",
        "  throughput summary: "
        + f"{s.ops_per_sec:.2f} requests per second"
        + (f" ({s.keys_per_sec:.2f} keys per second)" if s.keys_per_request > 1 else ""),
        "  latency summary (msec):",
        f"  {'avg':>9} {'min':>9} {'p50':>9} {'p95':>9} {'p99':>9} {'max':>9}",
        f"  {s.avg_ms:9.3f} {s.min_ms:9.3f} {s.p50_ms:9.3f} {s.p95_ms:9.3f} {s.p99_ms:9.3f} {s.max_ms:9.3f}",
    ]
    if s.misses:
        lines.append(f"  not found: {s.misses}")
    if s.errors:
        kinds = ", ".join(f"{k}={v}" for k, v in s.errors_by_kind.items())
        lines.append(f"  ERRORS: {s.errors} of {s.requests} requests failed ({kinds})")
    else:
        lines.append("  errors: 0")
    return "\n".join(lines) + "\n"


def format_table(summaries: list[OpSummary]) -> str:
    rows = [("op", "ops/s", "p50 ms", "p99 ms", "max ms", "errors")]
    rows += [(s.op, f"{s.ops_per_sec:.0f}", f"{s.p50_ms:.3f}", f"{s.p99_ms:.3f}", f"{s.max_ms:.3f}",
              str(s.errors)) for s in summaries]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.rjust(widths[i]) if i else c.ljust(widths[i]) for i, c in enumerate(r))
                     for r in rows)


def to_json(cfg: BenchConfig, summaries: list[OpSummary]) -> str:
    total_errors = sum(s.errors for s in summaries)
    doc = {
        "config": {**asdict(cfg), "tests": list(cfg.tests)},
        "ops": {s.op: asdict(s) for s in summaries},
        "errors": total_errors,
        "ok": total_errors == 0,
    }
    return json.dumps(doc, indent=2)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run_cli(cfg: BenchConfig, as_json: bool) -> None:
    """``zkv bench``: run, print each phase as it completes (or one JSON object), exit 1 on errors."""
    try:
        cfg.validate()
    except ValueError as e:
        raise click.UsageError(str(e)) from None

    def report(summary: OpSummary) -> None:
        if not as_json:
            click.echo(format_summary(summary, cfg))

    previous = signal.signal(signal.SIGTERM, _interrupt)  # stop the client processes on SIGTERM too
    try:
        summaries = run_bench(cfg, report)
    except BenchError as e:
        raise click.ClickException(str(e)) from None
    except KeyboardInterrupt:
        click.echo("zkv bench: interrupted", err=True)
        raise SystemExit(130) from None
    finally:
        signal.signal(signal.SIGTERM, previous)
    if as_json:
        click.echo(to_json(cfg, summaries))
    elif len(summaries) > 1:
        click.echo(format_table(summaries))
    failed = [s for s in summaries if s.errors]
    if failed:
        detail = "; ".join(f"{s.op}: {s.errors} of {s.requests} ({s.errors_by_kind})" for s in failed)
        click.echo(f"zkv bench: the run had errors: {detail}", err=True)
        raise SystemExit(1)
