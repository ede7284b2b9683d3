"""``zkv bench``: what a run does (configuration, phases, keys) and what it reports (summaries,
text in the manner of redis-benchmark, JSON). Nothing here opens a socket; see client/cli/bench.py.
"""

from __future__ import annotations

import json
from array import array
from dataclasses import asdict, dataclass, field

from protocol.curve import Credentials
from protocol.limits import DEFAULT_FRONTEND
from protocol.limits import READ_OPS as PROTOCOL_READ_OPS

OPS: tuple[str, ...] = ("put", "get", "mget", "mset", "delete", "exists")
READ_OPS = PROTOCOL_READ_OPS & frozenset(OPS)  # phases that read, so their keys are written first
BATCH_OPS = frozenset({"mget", "mset"})
KEY_PREFIX = "key:"  # with --prefix key: (a run's default prefix is new_prefix())
PREFIX_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz"


def new_prefix() -> str:
    """A run's own key prefix, ``b`` + 4 random characters + ``:`` (1.7 million of them): short
    enough to leave the default 16-byte keys 10 digits, so that runs do not share keys."""
    import secrets
    return "b" + "".join(secrets.choice(PREFIX_ALPHABET) for _ in range(4)) + ":"


class BenchError(Exception):
    """The benchmark could not run (no broker, a client process failed, ...)."""


# ---------------------------------------------------------------------------------------------
# Configuration and plan


@dataclass(frozen=True)
class BenchConfig:
    url: str = DEFAULT_FRONTEND
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
    prefix: str = KEY_PREFIX  # every key of the run starts with it
    keep: bool = False  # leave the run's keys behind (else they are deleted when it ends)
    credentials: Credentials | None = None  # CURVE keys, for a broker with --keys
    packed: bool = True  # MSET values and MGET answers packed in one frame (docs/protocol.md §1.2)
    direct: bool = True  # GETs read from the workers holding read leases, when the broker grants them

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
        need = len(self.prefix.encode()) + len(str(max(self.max_key_index(), 1)))
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


def make_key(index: int, cfg: BenchConfig) -> bytes:
    prefix = cfg.prefix.encode()
    return prefix + str(index).zfill(cfg.key_size - len(prefix)).encode()


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
    direct: int = 0  # get: answered by a worker's reads endpoint (lease reads), not the broker


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
    direct: int = 0  # get: requests a worker answered directly (lease reads)


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
        direct=sum(p.direct for p in parts),
    )


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
    if s.direct:
        lines.append(f"  read directly from workers (lease reads): {s.direct} of {s.ok}")
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
        # The credentials' name only: the JSON must never carry a secret key.
        "config": {**asdict(cfg), "tests": list(cfg.tests),
                   "credentials": cfg.credentials.name if cfg.credentials else None},
        "ops": {s.op: asdict(s) for s in summaries},
        "errors": total_errors,
        "ok": total_errors == 0,
    }
    return json.dumps(doc, indent=2)
