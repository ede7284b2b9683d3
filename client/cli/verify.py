"""``zkv verify``: run a seeded register workload against a live cluster and check its history for
linearizability and lost acknowledged writes (client/cli/workload.py runs it,
client/cli/linearizability.py checks it; the project's fault tests use the same two), or check a
history saved earlier (``--check FILE``).

The keys are fresh (``verify:<run id>:<n>``, so every key starts absent) and deleted at the end.
"""

from __future__ import annotations

import functools
import secrets
import time
from collections import Counter
from pathlib import Path

import click

from client import Client
from client.cli.common import connect, credentials, url_option
from client.cli.history import Op
from client.cli.linearizability import CheckResult, check_history
from client.cli.lost_writes import lost_writes
from client.cli.workload import Workload, WorkloadConfig, dump_history, load_history, summarize
from protocol.errors import ZkvError

EXIT_VIOLATION = 6  # the history is not linearizable, or an acknowledged write was lost
MIX = (("put", 0.35), ("get", 0.35), ("delete", 0.10), ("cas", 0.20))


@click.command()
@url_option
@click.option("--duration", default=30.0, show_default=True, help="Seconds the workload runs.")
@click.option("--clients", default=8, show_default=True, help="Concurrent clients (threads, one connection each).")
@click.option("--keys", default=10, show_default=True, help="Keys they share (few keys: more overlap).")
@click.option("--seed", default=0, show_default=True, help="Seeds each client's choice of keys and operations.")
@click.option("--history", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the history here (JSON lines, one operation each).")
@click.option("--check", "check_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Check this saved history instead of running a workload.")
@click.option("--op-timeout", default=4.0, show_default=True,
              help="Seconds one operation may take, retries included; after it the outcome is unknown.")
@click.option("--check-time", default=60.0, show_default=True,
              help="Seconds of checking per key at most (a key not decided in time fails).")
def verify(url: str, duration: float, clients: int, keys: int, seed: int, history: Path | None,
           check_file: Path | None, op_timeout: float, check_time: float) -> None:
    """Check the cluster for linearizability: CLIENTS clients put, get, delete and compare-and-set
    KEYS keys (unique values) for DURATION seconds; every key's history must be linearizable and
    no acknowledged write lost. Run it while you break the cluster. Exits 6 on a violation."""
    if check_file is not None:
        try:
            ops = load_history(check_file)
        except ValueError as e:
            raise click.ClickException(str(e)) from None
        click.echo(f"history {check_file}: {len(ops)} operations")
        _report(check_history(ops, time_limit=check_time), [], ops)
        return
    cfg = WorkloadConfig(clients=clients, keys=keys, duration=duration, max_ops=10**9, mix=MIX,
                         timeout=op_timeout, attempt_timeout=min(1.5, op_timeout),
                         key_prefix=f"verify:{secrets.token_hex(4)}:")
    wl = Workload(url, cfg, seed, client_factory=functools.partial(Client, credentials=credentials()))
    click.echo(f"running {clients} clients on {keys} keys ({cfg.key_prefix}*) for {duration:g} s, seed {seed}")
    started = time.monotonic()
    with wl:
        ops = wl.join()
    final_ops, final = wl.final_reads(timeout=max(op_timeout, 10.0))
    ops += [o for o in final_ops if o.outcome == "ok"]
    elapsed = time.monotonic() - started
    counts = summarize(ops)
    click.echo(f"operations: {len(ops)} in {elapsed:.1f} s ({len(ops) / max(elapsed, 1e-9):.0f}/s): "
               f"{counts.get('ok', 0)} ok, {counts.get('fail', 0)} failed, {counts.get('unknown', 0)} unknown")
    click.echo("by kind: " + ", ".join(f"{k} {counts.get(f'{k}_ok', 0)}" for k in ("put", "get", "delete", "cas")))
    _errors(wl.errors)
    if history is not None:
        dump_history(history, ops, wl.details, wl.started_at)
        click.echo(f"history written to {history}")
    if len(final) < len(wl.keys):
        click.echo(f"final reads: {len(wl.keys) - len(final)} keys could not be read; not judged for lost writes")
    _cleanup(url, wl.keys)
    _report(check_history(ops, time_limit=check_time), lost_writes(ops, final), ops)


def _errors(errors: Counter[str]) -> None:
    if not errors:
        click.echo("errors: none")
        return
    click.echo("errors: " + ", ".join(f"{k} {n}" for k, n in errors.most_common()))


def _cleanup(url: str, keys: list[bytes]) -> None:
    try:
        with connect(url, 10.0) as c:
            for k in keys:
                c.delete(k)
    except ZkvError as e:
        click.echo(f"could not delete the workload's keys: {e}")


def _report(result: CheckResult, lost_final: list[Op], ops: list[Op]) -> None:
    lost = {id(o): o for o in result.lost_writes + lost_final}
    click.echo(f"checked {result.keys_checked} keys, {result.ops_checked} operations")
    for failure in result.failures:
        click.echo(failure)
    t0 = min((o.invoke for o in ops), default=0.0)
    for o in lost.values():
        click.echo(f"lost acknowledged write: key {o.key!r} {o.kind} {o.value!r} "
                   f"[{o.invoke - t0:+.3f} s, {(o.complete or o.invoke) - t0:+.3f} s]")
    if result.ok and not lost:
        click.echo("verdict: linearizable, no acknowledged write lost")
        return
    click.echo(f"verdict: VIOLATION ({len(result.failures)} keys not linearizable, {len(lost)} lost writes)")
    raise SystemExit(EXIT_VIOLATION)
