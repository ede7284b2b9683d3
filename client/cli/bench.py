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

import multiprocessing as mp
import queue
import signal
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any, Protocol

import click
import zmq

from client.cli.bench_load import Pipeline, Workload, cleanup_count, prefill_count
from client.cli.bench_plan import (
    BATCH_OPS,
    BenchConfig,
    BenchError,
    OpSummary,
    ProcResult,
    format_summary,
    format_table,
    new_prefix,
    plan_phases,
    split,
    summarize,
    to_json,
)
from client.cli.common import credentials, url_option

PREFILL_WINDOW = 16  # MSET requests in flight per process while prefilling


@click.command()
@url_option
@click.option("-c", "--clients", default=50, show_default=True, help="Requests in flight (all processes).")
@click.option("-n", "--requests", default=100_000, show_default=True, help="Requests per test.")
@click.option("-d", "--data-size", default=3, show_default=True, help="Value size, bytes.")
@click.option("--key-size", default=16, show_default=True, help="Key size, bytes (zero-padded).")
@click.option("-r", "--keyspace", default=0, show_default=True,
              help="Draw keys at random from this many (0: a new key per request).")
@click.option("-t", "--tests", default="put,get", show_default=True,
              help="Comma list, run in order: put,get,mget,mset,delete,exists.")
@click.option("-b", "--batch", default=10, show_default=True, help="Keys per MGET/MSET request.")
@click.option("-P", "--procs", default=1, show_default=True, help="Client processes sharing -c.")
@click.option("--timeout", default=10.0, show_default=True, help="Seconds before a request counts as failed.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--prefix", default=None, help="Key prefix (default: a new one per run, such as b3k9x:).")
@click.option("--keep", is_flag=True, help="Leave the run's keys behind (they are deleted otherwise).")
@click.option("--unpacked", is_flag=True,
              help="MSET and MGET values one frame each, as clients before packed (protocol.md 1.2).")
@click.option("--no-direct", is_flag=True,
              help="GETs always through the broker, even when it grants read leases to workers.")
def bench(url: str, clients: int, requests: int, data_size: int, key_size: int, keyspace: int, tests: str,
          batch: int, procs: int, timeout: float, as_json: bool, prefix: str | None, keep: bool,
          unpacked: bool, no_direct: bool) -> None:
    """Benchmark a cluster in the manner of redis-benchmark. Its keys start with a prefix of
    its own and are deleted when it ends, unless --keep."""
    creds = credentials()
    run_cli(BenchConfig(url=url, credentials=creds,
                        clients=clients, requests=requests, data_size=data_size, key_size=key_size,
                        keyspace=keyspace, tests=tuple(t.strip() for t in tests.split(",") if t.strip()),
                        procs=procs, batch=batch, timeout=timeout, prefix=prefix or new_prefix(), keep=keep,
                        packed=not unpacked, direct=not no_direct),
            as_json)


class Sync(Protocol):
    def wait(self, timeout: float | None = None) -> int: ...



def run_process(cfg: BenchConfig, proc: int, sync: Sync, emit: Callable[[tuple[Any, ...]], None]) -> None:
    """Everything one client process does: each phase's prefill, the barrier, the timed run."""
    ctx = zmq.Context()
    pipe = Pipeline(ctx, cfg.url, split(cfg.clients, cfg.procs, proc), cfg.timeout, cfg.credentials,
                    direct=cfg.direct)
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
            served = pipe.direct_served
            pipe.run(work.requests(phase.op), count, work.judge(phase.op), result.latencies_us,
                     result.errors, direct=phase.op == "get")
            result.end = time.monotonic()
            result.ok, result.misses = work.ok, work.misses
            result.direct = pipe.direct_served - served
            emit(("result", result))
        if not cfg.keep:
            failed: dict[str, int] = {}
            pipe.run(work.cleanup_requests(), cleanup_count(cfg, proc), lambda _h: None, None, failed,
                     window=PREFILL_WINDOW)
            if failed:
                raise BenchError(f"deleting the run's keys ({cfg.prefix}*) failed: {failed}")
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
        click.echo(f"zkv bench: interrupted; its keys remain: zkv del --prefix {cfg.prefix}", err=True)
        raise SystemExit(130) from None
    finally:
        signal.signal(signal.SIGTERM, previous)
    if as_json:
        click.echo(to_json(cfg, summaries))
    elif len(summaries) > 1:
        click.echo(format_table(summaries))
    if not as_json:
        click.echo(f"keys {cfg.prefix}* " + ("kept" if cfg.keep else "deleted"), err=True)
    failed = [s for s in summaries if s.errors]
    if failed:
        detail = "; ".join(f"{s.op}: {s.errors} of {s.requests} ({s.errors_by_kind})" for s in failed)
        click.echo(f"zkv bench: the run had errors: {detail}", err=True)
        raise SystemExit(1)
