"""zkv beside its peers, in one run on this machine: a 3-node etcd cluster, Redis, the bare relay.

    python bench/peers.py                       # everything (about 5 minutes), table + docs/benchmarks.md + PNG
    python bench/peers.py --quick               # shorter runs, no etcd (its check takes 60 s), no doc update
    python bench/peers.py --out docs/benchmarks.md --plots docs/img

Starts, on loopback with free ports and temporary directories (always removed, also on Ctrl-C,
SIGTERM or failure):

- a zkv cluster (bench/core.py's bench_cluster: one broker, 1024 slots, RF=3, W=2, three workers,
  fsync on every worker commit) driven by ``zkv bench`` (one client process, as bench/core.py);
- a 3-node etcd cluster (Debian's ``etcd-server``) measured by ``etcdctl check perf --load=xl``
  (256-byte keys, 1 KiB values, 1000 clients, 60 s; every write is a raft commit fsynced by a
  majority);
- ``redis-server`` (Debian's ``redis-server``) without persistence (``--save '' --appendonly no``: the
  ceiling of a single-process, in-memory, non-replicated store) and, as a durable single-node
  reference, with ``--appendonly yes --appendfsync always``; measured by ``redis-benchmark --csv``;
- the bare relay of bench/relay.py (``zmq.proxy`` ROUTER->DEALER, one Python echo worker, one
  Python client keeping requests in flight).

The workloads are interleaved (relay, zkv GET, Redis, zkv PUT, etcd, zkv PUT, zkv MSET/MGET,
relay again, durable Redis) so that every system sees the same machine. It prints one table and
the three targets of issue 6, and (unless --quick or --no-doc) writes the table, the command, the
date and a plot between ``<!-- peers:begin -->`` and ``<!-- peers:end -->`` in docs/benchmarks.md.
Missing peers are reported with the apt command that installs them; what can run still runs.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

import core  # noqa: E402  (bench/core.py)
import relay  # noqa: E402  (bench/relay.py)

from tests.support.cluster import Cluster, free_port  # noqa: E402

APT_INSTALL = "apt-get update && apt-get install -y etcd-server etcd-client redis-server redis-tools"
BEGIN, END = "<!-- peers:begin -->", "<!-- peers:end -->"
NOT_INSTALLED = "not installed"

# The targets of issue 6.
PUT_FACTOR = 4.0  # zkv PUT writes/s >= 4 x etcd's, and zkv's slowest PUT below etcd's slowest
GET_FACTOR = 0.6  # zkv GET req/s >= 0.6 x the bare relay's
# keys/s of a 1,000-key MSET and MGET. Issue 16 set MSET's at 110,000, not 300,000: three fsynced
# copies of every key on two cores cap a durable MSET near 220,000 keys/s before any networking
# (py-lmdb's putmulti of 1,000 at 330,000 puts/s); an MGET reads one copy.
BATCH_KEYS = {"mset.zkv": 110_000, "mget.zkv": 300_000}
HOT_KEYS = 20_000  # the keyspace of the hot-key GET row
READ_LEASE = 2.0  # s: the read leases of the "get.zkv.lease" row's cluster (zkv broker --read-lease)


# ---------------------------------------------------------------------------------------------
# Measurements, the table and the document (pure functions)


@dataclass
class Measurement:
    """One row of the table. ``rate`` is None when the system could not be measured (``note`` says why)."""

    id: str  # e.g. "put.zkv.c1000"; targets look rows up by id
    workload: str
    system: str
    rate: float | None
    unit: str  # "writes/s", "req/s", "keys/s"
    p50_ms: float | None = None
    p99_ms: float | None = None
    max_ms: float | None = None
    note: str = ""
    background_cpu: float | None = None  # share of both cores other programs used meanwhile


@dataclass
class TargetResult:
    name: str
    required: str
    measured: str
    ratio: float | None
    met: bool | None  # None: could not be evaluated


def by_id(rows: list[Measurement]) -> dict[str, Measurement]:
    return {r.id: r for r in rows}


def _rate(rows: dict[str, Measurement], key: str) -> float | None:
    r = rows.get(key)
    return r.rate if r is not None and r.rate else None


def evaluate_targets(rows: list[Measurement]) -> list[TargetResult]:
    """The three targets of issue 6 from the measured rows."""
    m = by_id(rows)
    out: list[TargetResult] = []
    etcd = m.get("put.etcd")
    for zid in ("put.zkv.c1000", "put.zkv.best"):
        z = m.get(zid)
        if z is None:
            continue
        label = next((w.strip() for w in z.system.split(",") if w.strip().startswith("c=")), zid)
        if z.rate and etcd is not None and etcd.rate:
            ratio = z.rate / etcd.rate
            slower = z.max_ms is not None and etcd.max_ms is not None and z.max_ms < etcd.max_ms
            out.append(TargetResult(
                f"PUT vs etcd ({label})", f">= {PUT_FACTOR:g}x etcd writes/s and slowest < etcd's",
                f"{z.rate:,.0f} vs {etcd.rate:,.0f} writes/s; slowest {z.max_ms:.0f} vs {etcd.max_ms:.0f} ms",
                ratio, ratio >= PUT_FACTOR and slower))
        else:
            out.append(TargetResult(f"PUT vs etcd ({label})", f">= {PUT_FACTOR:g}x etcd writes/s",
                                    "etcd not measured" if z.rate else "zkv not measured", None, None))
    for zid, label in (("get.zkv", "GET vs bare relay"), ("get.zkv.hot", "GET vs bare relay (hot keys)"),
                       ("get.zkv.lease", "GET vs bare relay (read leases)")):
        z, r = _rate(m, zid), _rate(m, "get.relay")
        if z and r:
            out.append(TargetResult(label, f">= {GET_FACTOR:g}x relay req/s",
                                    f"{z:,.0f} vs {r:,.0f} req/s", z / r, z / r >= GET_FACTOR))
        elif zid == "get.zkv" or z:
            out.append(TargetResult(label, f">= {GET_FACTOR:g}x relay req/s", "not measured", None, None))
    for key, label in (("mset.zkv", "MSET"), ("mget.zkv", "MGET")):
        z, target = _rate(m, key), BATCH_KEYS[key]
        out.append(TargetResult(f"{label} keys/s", f">= {target:,} keys/s",
                                f"{z:,.0f} keys/s" if z else "not measured",
                                z / target if z else None, (z >= target) if z else None))
    return out


def _ms(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.2f}" if v < 100 else f"{v:,.0f}"


def _rate_cell(r: Measurement) -> str:
    return f"{r.rate:,.0f}" if r.rate else (r.note.split(";")[0] if r.note else "-")


def vs_target(r: Measurement, rows: dict[str, Measurement]) -> str:
    """The "vs target" cell of a zkv row: its ratio to what its target compares it with."""
    if not r.rate:
        return ""
    if r.id.startswith("put.zkv"):
        e = _rate(rows, "put.etcd")
        return f"{r.rate / e:.2f}x etcd (target {PUT_FACTOR:g}x)" if e else "etcd not measured"
    if r.id in ("get.zkv", "get.zkv.hot", "get.zkv.lease"):
        b = _rate(rows, "get.relay")
        return f"{r.rate / b:.2f}x relay (target {GET_FACTOR:g}x)" if b else "relay not measured"
    if r.id in ("mset.zkv", "mget.zkv"):
        return f"{r.rate / BATCH_KEYS[r.id]:.2f}x of {BATCH_KEYS[r.id] // 1000}k keys/s"
    return ""


def format_table(rows: list[Measurement]) -> str:
    """The markdown table of every row, in order."""
    m = by_id(rows)
    lines = ["| workload | system | rate | unit | p50 ms | p99 ms | max ms | vs target | notes |",
             "|---|---|---:|---|---:|---:|---:|---|---|"]
    for r in rows:
        note = r.note if r.rate else ";".join(r.note.split(";")[1:]).strip()
        if r.background_cpu is not None:
            bg = f"background CPU {r.background_cpu:.0%}"
            note = f"{note}; {bg}" if note else bg
        rate = f"**{_rate_cell(r)}**" if r.rate and r.system.startswith("zkv") else _rate_cell(r)
        lines.append(f"| {r.workload} | {r.system} | {rate} | {r.unit} | {_ms(r.p50_ms)} | {_ms(r.p99_ms)} "
                     f"| {_ms(r.max_ms)} | {vs_target(r, m)} | {note} |")
    return "\n".join(lines)


def format_targets(results: list[TargetResult]) -> str:
    lines = ["| target | required | measured | ratio | met |", "|---|---|---|---:|---|"]
    for t in results:
        ratio = f"{t.ratio:.2f}" if t.ratio is not None else "-"
        met = "n/a" if t.met is None else ("**yes**" if t.met else "no")
        lines.append(f"| {t.name} | {t.required} | {t.measured} | {ratio} | {met} |")
    return "\n".join(lines)


def render_section(rows: list[Measurement], *, command: str, date: str, machine: str,
                   plots: list[str], extra: str = "") -> str:
    """The markdown between the markers: command, date, the table, the targets, the plots."""
    parts = [
        BEGIN,
        f"Measured {date} with `{command}` ({machine}). One run; all systems on the same two cores, "
        "interleaved in this order: relay, zkv GET, Redis, zkv PUT c=1000, etcd, zkv PUT at `--put-c`, zkv "
        "MSET/MGET, relay again, durable Redis. The machine is shared with other developers' test suites; "
        "\"background CPU\" is the share of both cores that other programs used during that row.",
        "",
        format_table(rows),
        "",
        "Targets of issue 6:",
        "",
        format_targets(evaluate_targets(rows)),
        "",
    ]
    if extra:
        parts += [extra, ""]
    parts += [f"![{Path(p).stem}]({p})" for p in plots]
    parts.append(END)
    return "\n".join(parts)


def replace_section(text: str, section: str, begin: str = BEGIN, end: str = END,
                    heading: str = "## zkv beside etcd, Redis and the bare relay (`bench/peers.py`)") -> str:
    """``text`` with what lies between the markers replaced by ``section`` (which includes them);
    appended under ``heading`` if the markers are absent."""
    i, j = text.find(begin), text.find(end)
    if i != -1 and j != -1 and j > i:
        return text[:i] + section + text[j + len(end):]
    return text.rstrip("\n") + f"\n\n{heading}\n\n{section}\n"


# ---------------------------------------------------------------------------------------------
# Parsing the peers' outputs (pure functions)


def parse_check_perf(text: str) -> dict[str, float]:
    """``etcdctl check perf`` (3.4) output: throughput (writes/s), slowest request and stddev (s).

    It prints e.g. ``FAIL: Throughput too low: 4812 writes/s``, ``Slowest request took too long:
    0.672637s`` and ``PASS: Stddev is 0.094318s`` (after a progress bar on the same stream)."""
    out: dict[str, float] = {}
    if m := re.search(r"Throughput[^\d]*?([\d.]+)\s*writes/s", text):
        out["writes_per_sec"] = float(m.group(1))
    if m := re.search(r"Slowest request took[^\d]*?([\d.]+)s", text):
        out["slowest_s"] = float(m.group(1))
    if m := re.search(r"Stddev[^\d]*?([\d.]+)s", text):
        out["stddev_s"] = float(m.group(1))
    out["pass"] = float(bool(re.search(r"^PASS\s*$", text, re.M)))
    return out


def parse_redis_csv(text: str) -> dict[str, dict[str, float]]:
    """``redis-benchmark --csv``: {test: {"rps", "p50_ms", "p99_ms", "max_ms", ...}}."""
    out: dict[str, dict[str, float]] = {}
    lines = [ln for ln in text.splitlines() if ln.startswith('"')]
    for row in csv.DictReader(io.StringIO("\n".join(lines))):
        if row.get("test") == "test":
            continue
        out[row["test"]] = {"rps": float(row["rps"]), "avg_ms": float(row["avg_latency_ms"]),
                            "p50_ms": float(row["p50_latency_ms"]), "p99_ms": float(row["p99_latency_ms"]),
                            "max_ms": float(row["max_latency_ms"])}
    return out


# ---------------------------------------------------------------------------------------------
# Peers: processes on loopback


def missing(binaries: list[str]) -> list[str]:
    return [b for b in binaries if shutil.which(b) is None]


def _killpg(p: subprocess.Popen[bytes]) -> None:
    if p.poll() is None:
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


@contextmanager
def etcd_cluster(root: Path, nodes: int = 3) -> Iterator[tuple[str, list[subprocess.Popen[bytes]]]]:
    """``nodes`` etcd members on loopback, data under ``root``; yields (endpoints, processes)."""
    ports = [(free_port(), free_port()) for _ in range(nodes)]
    initial = ",".join(f"e{i}=http://127.0.0.1:{peer}" for i, (_, peer) in enumerate(ports))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for i, (client, peer) in enumerate(ports):
            log = open(root / f"etcd{i}.log", "wb")
            procs.append(subprocess.Popen(
                ["etcd", "--name", f"e{i}", "--data-dir", str(root / f"etcd{i}"),
                 "--listen-client-urls", f"http://127.0.0.1:{client}",
                 "--advertise-client-urls", f"http://127.0.0.1:{client}",
                 "--listen-peer-urls", f"http://127.0.0.1:{peer}",
                 "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
                 "--initial-cluster", initial, "--initial-cluster-state", "new",
                 "--initial-cluster-token", f"zkv-bench-{os.getpid()}"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
            log.close()
        endpoints = ",".join(f"127.0.0.1:{c}" for c, _ in ports)
        deadline = time.monotonic() + 30
        while True:
            h = subprocess.run(["etcdctl", f"--endpoints={endpoints}", "endpoint", "health"],
                               capture_output=True, text=True, timeout=30)
            if h.returncode == 0:
                break
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                raise RuntimeError(f"etcd cluster not healthy: {h.stdout} {h.stderr}")
            time.sleep(0.5)
        yield endpoints, procs
    finally:
        for p in procs:
            _killpg(p)


@contextmanager
def redis_server(root: Path, durable: bool) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    port = free_port()
    persist = ["--appendonly", "yes", "--appendfsync", "always"] if durable else ["--appendonly", "no"]
    log = open(root / f"redis-{port}.log", "wb")
    p = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(root),
                          "--save", "", *persist, "--daemonize", "no"],
                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    try:
        deadline = time.monotonic() + 10
        while subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True,
                             text=True).stdout.strip() != "PONG":
            if time.monotonic() > deadline or p.poll() is not None:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.1)
        yield port, p
    finally:
        _killpg(p)


def redis_benchmark(port: int, *args: str) -> dict[str, dict[str, float]]:
    proc = subprocess.run(["redis-benchmark", "-p", str(port), "--csv", *args], capture_output=True, text=True,
                          timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"redis-benchmark failed: {proc.stderr.strip()}")
    return parse_redis_csv(proc.stdout)


# ---------------------------------------------------------------------------------------------
# CPU accounting (what other programs took while a row ran)


class CpuWatch:
    """Background CPU share during a measurement: machine busy time minus our processes' time.

    With ``quiet_wait`` > 0, each measurement first waits (at most that long) for the machine to
    be at least 85 % idle over one second (bench/core.py's ``wait_quiet``)."""

    def __init__(self, pids: Callable[[], list[int]], quiet_wait: float = 0.0) -> None:
        self.pids = pids
        self.quiet_wait = quiet_wait

    @contextmanager
    def measure(self) -> Iterator[dict[str, float]]:
        if self.quiet_wait > 0:
            core.wait_quiet(self.quiet_wait)
        pids = self.pids()
        busy0, total0 = core.machine_jiffies()
        ours0 = core.process_jiffies(pids) + core.children_jiffies()
        out: dict[str, float] = {}
        yield out
        busy1, total1 = core.machine_jiffies()
        ours1 = core.process_jiffies(pids) + core.children_jiffies()
        out["background"] = max(0.0, ((busy1 - busy0) - (ours1 - ours0)) / max(1, total1 - total0))


# ---------------------------------------------------------------------------------------------
# The run


@dataclass
class Plan:
    quick: bool = False
    etcd: bool = True
    redis: bool = True
    put_best_c: int = 200
    get_c: int = 200
    relay_seconds: float = 5.0
    scale: float = 1.0
    quiet_wait: float = 30.0  # s to wait for an idle machine before each measurement


def zkv_bench(cluster: Cluster, test: str, c: int, n: int, d: int, batch: int = 1,
              key_size: int = 256, keyspace: int = 0) -> dict[str, Any]:
    """``zkv bench --json`` against ``cluster``; returns the ops."""
    args = ["bench", "--url", cluster.frontend, "-t", test, "-c", str(c), "-n", str(n), "-d", str(d),
            "--key-size", str(key_size), "-P", "1", "--json"]
    if batch > 1:
        args += ["-b", str(batch)]
    if keyspace:
        args += ["-r", str(keyspace)]
    proc = subprocess.run([*core.ZKV, *args], cwd=REPO, capture_output=True, text=True, timeout=900)
    if proc.returncode not in (0, 1) or not proc.stdout.strip():
        raise RuntimeError(f"zkv bench {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
    ops: dict[str, Any] = json.loads(proc.stdout)["ops"]
    return ops


def _zkv_row(rid: str, workload: str, system: str, figures: dict[str, Any], keys: bool, bg: float,
             cmd: str) -> Measurement:
    rate = figures["keys_per_sec"] if keys else figures["ops_per_sec"]
    note = f"`{cmd}`"
    if figures["errors"]:
        note += f"; {figures['errors']} errors {figures['errors_by_kind']}"
    if keys:
        note += f"; {figures['ops_per_sec']:,.0f} requests/s"
    return Measurement(rid, workload, system, rate, "keys/s" if keys else ("writes/s" if "PUT" in workload
                       else "req/s"), figures["p50_ms"], figures["p99_ms"], figures["max_ms"], note, bg)


def run_all(plan: Plan, root: Path, log: Callable[[str], None]) -> list[Measurement]:
    rows: list[Measurement] = []
    s = plan.scale
    have_etcd = not missing(["etcd", "etcdctl"])
    have_redis = not missing(["redis-server", "redis-benchmark", "redis-cli"])
    PUT_W = "PUT 256 B key, 1 KiB value"
    GET_W = "GET 256 B key, 100 B value"
    MSET_W = "MSET 256 B keys, 100 B values"
    MGET_W = "MGET 256 B keys, 100 B values"
    relay_runs: list[dict[str, Any]] = []

    cluster = core.bench_cluster(root / "zkv")
    extra: list[int] = []
    watch = CpuWatch(lambda: list(cluster.pids().values()) + extra, plan.quiet_wait)
    try:
        cluster.start(timeout=60.0)
        log(f"zkv cluster up: {cluster.frontend}")

        # --- GET: the relay, zkv, Redis
        with watch.measure() as cpu:
            relay_runs.append(relay.run_relay(plan.relay_seconds, plan.get_c, 1, 100))
        relay_runs[-1]["background"] = cpu["background"]
        log(f"relay #1: {relay_runs[-1]['ops_per_sec']:,.0f} req/s")

        n = int(60_000 * s)
        with watch.measure() as cpu:
            ops = zkv_bench(cluster, "get", plan.get_c, n, 100)
        rows.append(_zkv_row("get.zkv", GET_W, f"zkv c={plan.get_c}", ops["get"], False, cpu["background"],
                             f"zkv bench -t get -c {plan.get_c} -n {n} -d 100 --key-size 256"))
        log(f"zkv get: {ops['get']['ops_per_sec']:,.0f} req/s")
        # The same reads over 20,000 keys drawn at random, so most keys are read again: what the
        # leader's read cache answers (broker/read_cache.py). The row above reads every key once.
        with watch.measure() as cpu:
            ops = zkv_bench(cluster, "get", plan.get_c, n, 100, keyspace=HOT_KEYS)
        rows.append(_zkv_row("get.zkv.hot", GET_W, f"zkv c={plan.get_c}, {HOT_KEYS:,} keys", ops["get"], False,
                             cpu["background"],
                             f"zkv bench -t get -c {plan.get_c} -n {n} -d 100 --key-size 256 -r {HOT_KEYS}"))
        log(f"zkv get (hot keys): {ops['get']['ops_per_sec']:,.0f} req/s")
        # The same reads on a cluster with read leases: the lease holders answer them, not the broker.
        leased = core.bench_cluster(root / "zkv-leases", read_lease=READ_LEASE)
        pids_of = watch.pids
        watch.pids = lambda: list(leased.pids().values())
        try:
            leased.start(timeout=60.0)
            with watch.measure() as cpu:
                ops = zkv_bench(leased, "get", plan.get_c, n, 100)
        finally:
            leased.stop()
            watch.pids = pids_of
        rows.append(_zkv_row("get.zkv.lease", GET_W, f"zkv c={plan.get_c}, read leases {READ_LEASE:g} s", ops["get"],
                             False, cpu["background"],
                             f"zkv bench -t get -c {plan.get_c} -n {n} -d 100 --key-size 256 (broker --read-lease "
                             f"{READ_LEASE:g}, workers --reads)"))
        log(f"zkv get (read leases): {ops['get']['ops_per_sec']:,.0f} req/s, "
            f"{ops['get'].get('direct', 0):,} read from lease holders")

        redis_rows: list[Measurement] = []
        if have_redis and plan.redis:
            with redis_server(root, durable=False) as (port, rp):
                extra[:] = [rp.pid]
                rn = str(int(200_000 * s))
                with watch.measure() as cpu:
                    r = redis_benchmark(port, "-t", "set,get", "-d", "100", "-c", "50", "-n", rn, "-r", "100000")
                g = r["GET"]
                redis_rows.append(Measurement("get.redis", GET_W, "Redis, in memory, c=50", g["rps"], "req/s",
                                              g["p50_ms"], g["p99_ms"], g["max_ms"],
                                              f"`redis-benchmark -t set,get -d 100 -c 50 -n {rn} -r 100000`; "
                                              "16 B keys", cpu["background"]))
                with watch.measure() as cpu:
                    r = redis_benchmark(port, "-t", "get", "-d", "100", "-c", "50", "-P", "16", "-n",
                                        str(int(1_000_000 * s)), "-r", "100000")
                g = r["GET"]
                redis_rows.append(Measurement("batch.redis.pget", MGET_W, "Redis, in memory, pipelined GET -P 16",
                                              g["rps"], "keys/s", g["p50_ms"], g["p99_ms"], g["max_ms"],
                                              "`redis-benchmark -t get -d 100 -c 50 -P 16`; 16 B keys",
                                              cpu["background"]))
                with watch.measure() as cpu:
                    r = redis_benchmark(port, "-t", "set", "-d", "1024", "-c", "50", "-n", rn, "-r", "1000000")
                g = r["SET"]
                redis_rows.append(Measurement("put.redis", PUT_W, "Redis, in memory, c=50", g["rps"], "writes/s",
                                              g["p50_ms"], g["p99_ms"], g["max_ms"],
                                              f"`redis-benchmark -t set -d 1024 -c 50 -n {rn} -r 1000000`; "
                                              "16 B keys, not durable", cpu["background"]))
                with watch.measure() as cpu:
                    r = redis_benchmark(port, "-t", "mset", "-d", "100", "-c", "50", "-n", str(int(100_000 * s)),
                                        "-r", "1000000")
                (name, g), = r.items()
                redis_rows.append(Measurement("mset.redis", MSET_W, "Redis, in memory, MSET x10 c=50",
                                              g["rps"] * 10, "keys/s", g["p50_ms"], g["p99_ms"], g["max_ms"],
                                              f"`redis-benchmark -t mset -d 100 -c 50`; {g['rps']:,.0f} "
                                              "requests/s of 10 keys; 16 B keys", cpu["background"]))
                extra.clear()
            log("redis in-memory done")

        # --- PUT: zkv c=1000, etcd, zkv best c
        n = int(60_000 * s)
        with watch.measure() as cpu:
            ops = zkv_bench(cluster, "put", 1000, n, 1024)
        rows.append(_zkv_row("put.zkv.c1000", PUT_W, "zkv RF=3 W=2 fsync, c=1000", ops["put"], False,
                             cpu["background"], f"zkv bench -t put -c 1000 -n {n} -d 1024 --key-size 256"))
        log(f"zkv put c=1000: {ops['put']['ops_per_sec']:,.0f} writes/s")

        etcd_sys = "etcd 3-node, 1000 clients"
        if not have_etcd:
            rows.append(Measurement("put.etcd", PUT_W, etcd_sys, None, "writes/s", note=f"{NOT_INSTALLED}; "
                                    f"`{APT_INSTALL}`"))
        elif not plan.etcd:
            rows.append(Measurement("put.etcd", PUT_W, etcd_sys, None, "writes/s", note="skipped (--quick)"))
        else:
            with etcd_cluster(root) as (endpoints, eprocs):
                extra[:] = [p.pid for p in eprocs]
                with watch.measure() as cpu:
                    proc = subprocess.run(["etcdctl", f"--endpoints={endpoints}", "check", "perf", "--load=xl"],
                                          capture_output=True, text=True, timeout=300)
                extra.clear()
            perf = parse_check_perf(proc.stdout + proc.stderr)
            if "writes_per_sec" not in perf:
                raise RuntimeError(f"could not parse etcdctl check perf: {proc.stdout[-500:]} {proc.stderr[-500:]}")
            rows.append(Measurement("put.etcd", PUT_W, etcd_sys, perf["writes_per_sec"], "writes/s", None, None,
                                    perf["slowest_s"] * 1000,
                                    f"`etcdctl check perf --load=xl` (60 s); stddev {perf['stddev_s'] * 1000:.0f} ms;"
                                    " p50/p99 not reported by check perf", cpu["background"]))
            log(f"etcd: {perf['writes_per_sec']:,.0f} writes/s, slowest {perf['slowest_s']:.3f} s")

        n = int(40_000 * s)
        c = plan.put_best_c
        with watch.measure() as cpu:
            ops = zkv_bench(cluster, "put", c, n, 1024)
        rows.append(_zkv_row("put.zkv.best", PUT_W, f"zkv RF=3 W=2 fsync, c={c}", ops["put"], False,
                             cpu["background"], f"zkv bench -t put -c {c} -n {n} -d 1024 --key-size 256"))
        log(f"zkv put c={c}: {ops['put']['ops_per_sec']:,.0f} writes/s")

        # --- MSET / MGET (the MGET phase reads what the MSET phase wrote: no prefill)
        n = int(100 * s) or 1
        with watch.measure() as cpu:
            ops = zkv_bench(cluster, "mset,mget", 4, n, 100, batch=1000)
        cmd = f"zkv bench -t mset,mget -b 1000 -c 4 -n {n} -d 100 --key-size 256"
        rows.append(_zkv_row("mset.zkv", MSET_W, "zkv RF=3 W=2 fsync, x1000 c=4", ops["mset"], True,
                             cpu["background"], cmd))
        rows.append(_zkv_row("mget.zkv", MGET_W, "zkv, x1000 c=4", ops["mget"], True, cpu["background"], cmd))
        log(f"zkv mset {ops['mset']['keys_per_sec']:,.0f} keys/s, mget {ops['mget']['keys_per_sec']:,.0f} keys/s")

        with watch.measure() as cpu:
            relay_runs.append(relay.run_relay(plan.relay_seconds, plan.get_c, 1, 100))
        relay_runs[-1]["background"] = cpu["background"]
        log(f"relay #2: {relay_runs[-1]['ops_per_sec']:,.0f} req/s")

        if have_redis and plan.redis:
            with redis_server(root, durable=True) as (port, rp):
                extra[:] = [rp.pid]
                rn = str(int(100_000 * s))
                with watch.measure() as cpu:
                    r = redis_benchmark(port, "-t", "set", "-d", "1024", "-c", "1000", "-n", rn, "-r", "1000000")
                extra.clear()
            g = r["SET"]
            redis_rows.append(Measurement("put.redis.durable", PUT_W, "Redis, 1 node, appendfsync always, c=1000",
                                          g["rps"], "writes/s", g["p50_ms"], g["p99_ms"], g["max_ms"],
                                          f"`redis-benchmark -t set -d 1024 -c 1000 -n {rn}`; fsync per event-loop"
                                          " turn, not replicated; 16 B keys", cpu["background"]))
            log("redis durable done")
        elif not have_redis:
            for rid, w, unit in (("put.redis", PUT_W, "writes/s"), ("get.redis", GET_W, "req/s"),
                                 ("mset.redis", MSET_W, "keys/s")):
                redis_rows.append(Measurement(rid, w, "Redis", None, unit, note=f"{NOT_INSTALLED}; `{APT_INSTALL}`"))
    finally:
        cluster.stop()

    best = max(relay_runs, key=lambda r: r["ops_per_sec"])
    others = ", ".join(f"{r['ops_per_sec']:,.0f}" for r in relay_runs)
    relay_row = Measurement("get.relay", GET_W.replace("GET 256 B key, ", "echo "), "bare relay (zmq.proxy, 1 echo "
                            f"worker), window {plan.get_c}", best["ops_per_sec"], "req/s", best["p50_ms"],
                            best["p99_ms"], best["max_ms"], f"`python bench/relay.py --window {plan.get_c}`; best of "
                            f"runs before and after: {others}", best["background"])
    order = ["put.zkv.c1000", "put.zkv.best", "put.etcd", "put.redis.durable", "put.redis",
             "get.zkv", "get.zkv.hot", "get.zkv.lease", "get.relay", "get.redis", "mset.zkv", "mset.redis", "mget.zkv",
             "batch.redis.pget"]
    allrows = rows + redis_rows + [relay_row]
    allrows.sort(key=lambda r: order.index(r.id) if r.id in order else len(order))
    return allrows


# ---------------------------------------------------------------------------------------------
# Plot


def plot_rows(rows: list[Measurement], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [("PUT (writes/s)", "put."), ("GET (req/s)", "get."), ("MSET / MGET (keys/s)", ("mset.", "mget.",
                                                                                                "batch."))]
    fig, axes = plt.subplots(3, 1, figsize=(10, 9.5))
    for ax, (title, prefix) in zip(axes, groups, strict=True):
        sel = [r for r in rows if r.id.startswith(prefix) and r.rate]
        labels = [r.system if r.id.startswith(("put", "get")) else f"{r.workload.split()[0]}: {r.system}"
                  for r in sel]
        colors = ["tab:blue" if r.system.startswith("zkv") else "tab:gray" for r in sel]
        ax.barh(range(len(sel)), [r.rate for r in sel], color=colors)
        ax.set_yticks(range(len(sel)), [textwrap.fill(x, 48) for x in labels], fontsize=8)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_title(title, fontsize=10)
        for i, r in enumerate(sel):
            ax.text(r.rate, i, f" {r.rate:,.0f}", va="center", fontsize=7)
        if prefix == "put.":
            e = next((r.rate for r in sel if r.id == "put.etcd"), None)
            if e:
                ax.axvline(PUT_FACTOR * e, color="tab:red", ls="--", lw=1, label=f"target {PUT_FACTOR:g}x etcd")
                ax.legend(fontsize=7, loc="lower right")
        elif prefix == "get.":
            b = next((r.rate for r in sel if r.id == "get.relay"), None)
            if b:
                ax.axvline(GET_FACTOR * b, color="tab:red", ls="--", lw=1, label=f"target {GET_FACTOR:g}x relay")
                ax.legend(fontsize=7, loc="lower right")
        else:
            for key, style in (("mset.zkv", "--"), ("mget.zkv", ":")):
                ax.axvline(BATCH_KEYS[key], color="tab:red", ls=style, lw=1,
                           label=f"{key.split('.')[0].upper()} target {BATCH_KEYS[key]:,} keys/s")
            ax.legend(fontsize=7, loc="lower right")
        ax.margins(x=0.25)
    fig.suptitle("zkv (blue) beside etcd, Redis and the bare ZeroMQ relay, one run, 2 shared cores (log scale)",
                 fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short runs, skip etcd, do not write the doc")
    parser.add_argument("--no-etcd", action="store_true")
    parser.add_argument("--no-doc", action="store_true", help="print the table only")
    parser.add_argument("--out", default=str(REPO / "docs" / "benchmarks.md"))
    parser.add_argument("--plots", default=str(REPO / "docs" / "img"))
    parser.add_argument("--put-c", type=int, default=200, help="the 'best' PUT concurrency (besides c=1000)")
    parser.add_argument("--get-c", type=int, default=200, help="GET requests in flight, also the relay's window")
    parser.add_argument("--json", help="also write the rows as JSON to this file")
    parser.add_argument("--quiet-wait", type=float, default=30.0,
                        help="seconds to wait for an idle machine before each measurement (0: do not wait)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    opts = parser.parse_args()
    signal.signal(signal.SIGTERM, _interrupt)

    absent = missing(["etcd", "etcdctl", "redis-server", "redis-benchmark", "redis-cli"])
    if absent:
        print(f"not installed: {', '.join(absent)}; install with:\n  {APT_INSTALL}\n"
              "(running what can run; those rows are marked 'not installed')", file=sys.stderr)
    load = os.getloadavg()[0]
    if load > 0.5:
        print(f"warning: load average {load:.2f} before the run", file=sys.stderr)
    plan = Plan(quick=opts.quick, etcd=not (opts.quick or opts.no_etcd), put_best_c=opts.put_c, get_c=opts.get_c,
                relay_seconds=2.0 if opts.quick else 5.0, scale=0.2 if opts.quick else 1.0,
                quiet_wait=0.0 if opts.quick else opts.quiet_wait)
    root = Path(tempfile.mkdtemp(prefix="zkv-peers-"))
    started = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - started:6.1f}s] {msg}", file=sys.stderr, flush=True)

    try:
        rows = run_all(plan, root, log)
    except KeyboardInterrupt:
        print("interrupted; every process stopped", file=sys.stderr)
        return 130
    finally:
        if opts.keep:
            print(f"kept {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)

    print(format_table(rows))
    print()
    print(format_targets(evaluate_targets(rows)))
    if opts.json:
        Path(opts.json).write_text(json.dumps([asdict(r) for r in rows], indent=2))
    if opts.quick or opts.no_doc:
        return 0
    out = Path(opts.out)
    plots_dir = Path(opts.plots)
    png = plots_dir / "peers.png"
    plot_rows(rows, png)
    rel = os.path.relpath(png, out.parent)
    cmd = "python bench/peers.py" + (f" --put-c {opts.put_c}" if opts.put_c != 200 else "") + (
        f" --get-c {opts.get_c}" if opts.get_c != 200 else "")
    section = render_section(rows, command=cmd, date=dt.date.today().isoformat(), machine=core.machine_facts(),
                             plots=[rel])
    out.write_text(replace_section(out.read_text() if out.exists() else "# Benchmarks\n", section))
    print(f"\nwrote {out} and {png}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
