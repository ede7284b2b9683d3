"""``zkv``: one command for running and using a cluster.

Every option can also be set through an environment variable ``ZKV_<OPTION>`` (for example
``ZKV_BROKER``, ``ZKV_DATA``).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import click

from protocol.errors import ZkvError
from protocol.logs import configure_logging

# Exit codes: 1 generic failure, 2 usage (click), 3 not found, 4 not enough replicas,
# 5 timeout or unavailable.
EXIT_NOT_FOUND = 3


def _exit_code(err: ZkvError) -> int:
    from protocol.errors import ErrorCode

    return {ErrorCode.NOT_ENOUGH_REPLICAS: 4, ErrorCode.TIMEOUT: 5, ErrorCode.UNAVAILABLE: 5}.get(err.code, 1)


class ZkvCommandError(click.ClickException):
    def __init__(self, err: ZkvError) -> None:
        super().__init__(f"{err.code.value}: {err}")
        self.exit_code = _exit_code(err)


@click.group(context_settings={"auto_envvar_prefix": "ZKV", "help_option_names": ["-h", "--help"]})
@click.option("--log-json", is_flag=True, help="Log JSON lines instead of key=value.")
@click.option("--log-level", default="info", show_default=True)
@click.version_option(package_name="zkv")
def main(log_json: bool, log_level: str) -> None:
    """zkv: a sharded, replicated key-value store (ZeroMQ broker, LMDB workers)."""
    configure_logging(json=log_json, level=log_level)


@main.command()
@click.option("--data", default="./data/broker", show_default=True, help="Metadata directory (LMDB).")
@click.option("--frontend", default="tcp://127.0.0.1:5555", show_default=True, help="Clients connect here.")
@click.option("--backend", default="tcp://127.0.0.1:5556", show_default=True, help="Workers connect here.")
@click.option("--replication", default="tcp://127.0.0.1:5557", show_default=True,
              help="Replication PUB endpoint.")
@click.option("--slots", default=1024, show_default=True, help="Hash slots (fixed when the cluster forms).")
@click.option("--rf", default=3, show_default=True, help="Replicas per slot.")
@click.option("-w", "--write-quorum", "w", default=2, show_default=True,
              help="Replicas that must have a write on disk before it is acknowledged.")
@click.option("--heartbeat", default=1.0, show_default=True, help="Heartbeat interval, seconds.")
@click.option("--request-timeout", default=5.0, show_default=True, help="Seconds before a request times out.")
@click.option("--max-value", default=64 * 1024 * 1024, show_default=True,
              help="Largest value sent in one request (put, mset), bytes.")
@click.option("--max-stream", default=4 * 1024 * 1024 * 1024, show_default=True,
              help="Largest streamed value (put_stream, zkv put --file), bytes.")
@click.option("--stream-idle", default=60.0, show_default=True,
              help="Seconds without a chunk before an unfinished streamed put is aborted and its chunks freed.")
@click.option("--grace", default=30.0, show_default=True,
              help="Seconds a dead worker keeps its slots before they get new replicas.")
@click.option("--initial-workers", default=0, show_default=True,
              help="Workers to wait for before the cluster forms (at least RF).")
@click.option("--auto-rebalance/--no-auto-rebalance", default=True, show_default=True,
              help="Move slots to joining workers without waiting for `zkv rebalance`.")
@click.option("--move-concurrency", default=4, show_default=True, help="Slot moves in flight at once.")
@click.option("--copy-rate", default=64, show_default=True,
              help="MiB/s of snapshot data relayed for moves and repairs (the throttle).")
def broker(data: str, frontend: str, backend: str, replication: str, slots: int, rf: int, w: int,
           heartbeat: float, request_timeout: float, max_value: int, max_stream: int, stream_idle: float,
           grace: float, initial_workers: int, auto_rebalance: bool, move_concurrency: int, copy_rate: int) -> None:
    """Run the broker (the master)."""
    from broker.core import BrokerConfig
    from broker.server import BrokerEndpoints, BrokerServerConfig, run_broker

    if not 1 <= w <= rf:
        raise click.BadParameter("need 1 <= W <= RF", param_hint="-w")
    run_broker(BrokerServerConfig(
        data_dir=data,
        endpoints=BrokerEndpoints(frontend, backend, replication),
        core=BrokerConfig(slots=slots, rf=rf, w=w, heartbeat=heartbeat, request_timeout=request_timeout,
                          max_value=max_value, max_stream=max_stream, stream_idle=stream_idle,
                          grace=grace, initial_workers=initial_workers,
                          auto_rebalance=auto_rebalance, move_concurrency=move_concurrency,
                          copy_rate=copy_rate * 1024 * 1024),
    ))


@main.command()
@click.option("--id", "worker_id", required=True, help="Stable worker id (keep it across restarts).")
@click.option("--data", required=True, help="Data directory (LMDB).")
@click.option("--broker", default="tcp://127.0.0.1:5556", show_default=True, help="Broker backend.")
@click.option("--replication", default="tcp://127.0.0.1:5557", show_default=True,
              help="Broker replication PUB.")
@click.option("--heartbeat", default=1.0, show_default=True, help="Heartbeat interval, seconds.")
@click.option("--map-size", default=1 << 36, show_default=True, help="LMDB map size, bytes.")
@click.option("--test-drop-replication", default="", hidden=True,
              help="Test hook: drop replication messages (every=N or prob=P).")
@click.option("--test-clock-skew-ms", default=0, hidden=True, help="Test hook: offset this worker's clock.")
def worker(worker_id: str, data: str, broker: str, replication: str, heartbeat: float, map_size: int,
           test_drop_replication: str, test_clock_skew_ms: int) -> None:
    """Run a storage worker."""
    from worker.server import WorkerConfig, run_worker

    run_worker(WorkerConfig(worker_id=worker_id, data_dir=data, broker=broker, replication=replication,
                            heartbeat=heartbeat, map_size=map_size,
                            drop_replication=test_drop_replication, clock_skew_ms=test_clock_skew_ms))


def _client(url: str, timeout: float) -> Any:
    from client.client import Client

    return Client(url, timeout=timeout, attempt_timeout=min(timeout, 6.0))


url_option = click.option("--url", default="tcp://127.0.0.1:5555", show_default=True, envvar="ZKV_URL",
                          help="Broker frontend.")
timeout_option = click.option("--timeout", default=10.0, show_default=True, help="Seconds, retries included.")


@main.command()
@url_option
@timeout_option
@click.option("--ttl", type=int, default=None, help="Time to live, milliseconds.")
@click.argument("key")
@click.argument("value", required=False)
@click.option("--file", "file_", type=click.File("rb"), help="Read the value from a file ('-' = stdin).")
def put(url: str, timeout: float, ttl: int | None, key: str, value: str | None, file_: Any) -> None:
    """Store VALUE (or --file) under KEY. A file is streamed in chunks (any size up to the
    broker's --max-stream), with a progress bar on a terminal for large ones."""
    if (value is None) == (file_ is None):
        raise click.UsageError("give either VALUE or --file")
    with _client(url, timeout) as c:
        try:
            if file_ is None:
                version = c.put(key, value.encode(), ttl=ttl)  # type: ignore[union-attr]
            else:
                with _progress(_file_size(file_), "put") as bar:
                    version = c.put_stream(key, file_, ttl=ttl, progress=bar.update)
        except ZkvError as e:
            raise ZkvCommandError(e) from None
    click.echo(f"OK version={version}")


PROGRESS_MIN_BYTES = 8 << 20  # smaller transfers show no progress bar


def _file_size(f: Any) -> int | None:
    try:
        return os.fstat(f.fileno()).st_size or None
    except (OSError, AttributeError, ValueError):
        return None


class _NoProgress:
    def update(self, n: int) -> None:
        pass

    def __enter__(self) -> _NoProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def _progress(total: int | None, label: str) -> Any:
    """A progress bar on stderr for a large transfer to or from a terminal user."""
    if total is None or total < PROGRESS_MIN_BYTES or not sys.stderr.isatty():
        return _NoProgress()
    return click.progressbar(length=total, label=label, file=sys.stderr, show_pos=False, show_percent=True,
                             show_eta=True)


@main.command()
@url_option
@timeout_option
@click.argument("key")
@click.option("-o", "--output", type=click.File("wb"), help="Write the value to a file.")
def get(url: str, timeout: float, key: str, output: Any) -> None:
    """Print the value of KEY, or write it to a file with -o (exit code 3 if it does not exist).
    Large values are streamed in chunks, never held whole in memory."""
    out = output or click.get_binary_stream("stdout")
    with _client(url, timeout) as c:
        try:
            stream = c.get_stream(key)
            if stream is None:
                click.echo(f"(not found) {key}", err=True)
                sys.exit(EXIT_NOT_FOUND)
            with _progress(stream.size if output is not None else None, "get") as bar:
                for chunk in stream:
                    out.write(chunk)
                    bar.update(len(chunk))
        except ZkvError as e:
            raise ZkvCommandError(e) from None
    if output is None and sys.stdout.isatty():
        out.write(b"\n")


@main.command(name="del")
@url_option
@timeout_option
@click.argument("key")
def delete(url: str, timeout: float, key: str) -> None:
    """Delete KEY (exit code 3 if it did not exist)."""
    with _client(url, timeout) as c:
        try:
            existed = c.delete(key)
        except ZkvError as e:
            raise ZkvCommandError(e) from None
    if existed is None:
        click.echo("deleted (an earlier attempt did it; whether the key existed is unknown)")
        return
    click.echo("deleted" if existed else "(not found)")
    if not existed:
        sys.exit(EXIT_NOT_FOUND)


def _human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return str(n)


@main.command()
@url_option
@timeout_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def status(url: str, timeout: float, as_json: bool) -> None:
    """Show workers, slots and replication state."""
    with _client(url, timeout) as c:
        try:
            st = c.status()
        except ZkvError as e:
            raise ZkvCommandError(e) from None
    if as_json:
        click.echo(json.dumps(st, indent=2, default=lambda b: b.hex()))
        return
    click.echo(f"epoch {st['epoch']}  slots {st['slots']}  RF {st['rf']}  W {st['w']}  "
               f"formed {'yes' if st['formed'] else 'no'}  committed writes {st['committed_writes']}")
    rows = [("WORKER", "STATE", "LAST HEARTBEAT", "SLOTS", "KEYS", "DISK")]
    for w in st["workers"]:
        ago = "-" if w["last_heartbeat_ago"] is None else f"{w['last_heartbeat_ago']:.1f}s ago"
        state = w["state"] + (" draining" if w.get("draining") else "")
        rows.append((w["id"], state, ago, str(w["slots"]), str(w["keys"]), _human_bytes(w["disk_bytes"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        click.echo("  ".join(c.ljust(widths[i]) for i, c in enumerate(r)).rstrip())
    for m in st["moves"]:
        eta = "-" if m["eta_s"] is None else f"{m['eta_s']:.0f}s"
        click.echo(f"move slot {m['slot']}: {m['from']} -> {m['to']} ({m['reason']}, {m['state']}) "
                   f"{m['keys_copied']}/{m['keys_total']} keys {_human_bytes(m['bytes_copied'])}/"
                   f"{_human_bytes(m['bytes_total'])} {_human_bytes(m['rate_bytes_per_s'])}/s ETA {eta}")
    if st["misplaced_slots"]:
        click.echo(f"slots to move: {st['misplaced_slots']}")
    under = st["under_replicated_slots"]
    click.echo(f"under-replicated slots: {len(under)}" + (f" ({_slot_ranges(under)})" if under else ""))
    if st["recovering_slots"]:
        click.echo(f"recovering slots: {st['recovering_slots']}")


@main.command()
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
def bench(url: str, clients: int, requests: int, data_size: int, key_size: int, keyspace: int, tests: str,
          batch: int, procs: int, timeout: float, as_json: bool) -> None:
    """Benchmark a cluster in the manner of redis-benchmark."""
    from client.bench import BenchConfig, run_cli

    run_cli(BenchConfig(url=url, clients=clients, requests=requests, data_size=data_size, key_size=key_size,
                        keyspace=keyspace, tests=tuple(t.strip() for t in tests.split(",") if t.strip()),
                        procs=procs, batch=batch, timeout=timeout), as_json)


def _admin(url: str, timeout: float, cmd: str, worker: str | None = None) -> dict[str, Any]:
    with _client(url, timeout) as c:
        try:
            reply = c.admin(cmd, worker)
        except ZkvError as e:
            raise ZkvCommandError(e) from None
    if not reply.get("ok"):
        raise click.ClickException(str(reply.get("message")))
    click.echo(reply["message"])
    return reply


def _wait_for_moves(url: str, timeout: float, done: Any, label: str) -> None:
    """Show a progress bar of slots still to move until ``done(status)``."""
    import time

    with _client(url, timeout) as c:
        st = c.status()
        total = max(st["misplaced_slots"], 1)
        with click.progressbar(length=total, label=label, show_eta=True, show_percent=True) as bar:
            shown = 0
            while True:
                st = c.status()
                remaining = st["misplaced_slots"]
                if remaining > total:
                    total = bar.length = remaining
                target = total - remaining
                if target > shown:
                    bar.update(target - shown)
                    shown = target
                if done(st):
                    bar.update(total - shown)
                    break
                time.sleep(0.5)


@main.command()
@url_option
@timeout_option
@click.option("--wait", is_flag=True, help="Show progress until every slot has left the worker.")
@click.argument("worker")
def drain(url: str, timeout: float, wait: bool, worker: str) -> None:
    """Move every slot away from WORKER (before taking it out)."""
    _admin(url, timeout, "drain", worker)
    if wait:
        def drained(st: dict[str, Any]) -> bool:
            w = next(w for w in st["workers"] if w["id"] == worker)
            return w["slots"] == 0 and w["learning"] == 0
        _wait_for_moves(url, timeout, drained, f"draining {worker}")
        click.echo(f"{worker} holds no slots: stop it, then `zkv remove {worker}`")


@main.command()
@url_option
@timeout_option
@click.argument("worker")
def undrain(url: str, timeout: float, worker: str) -> None:
    """Let WORKER take slots again."""
    _admin(url, timeout, "undrain", worker)


@main.command()
@url_option
@timeout_option
@click.argument("worker")
def remove(url: str, timeout: float, worker: str) -> None:
    """Take a drained, stopped WORKER out of the cluster's metadata."""
    _admin(url, timeout, "remove", worker)


@main.command()
@url_option
@timeout_option
@click.option("--wait", is_flag=True, help="Show progress until every slot is where placement wants it.")
def rebalance(url: str, timeout: float, wait: bool) -> None:
    """Move slots so that every worker holds its share (minimal movement)."""
    _admin(url, timeout, "rebalance")
    if wait:
        _wait_for_moves(url, timeout, lambda st: st["misplaced_slots"] == 0 and not st["moves"], "rebalancing")
        click.echo("balanced")


def _slot_ranges(slots: list[int]) -> str:
    out: list[str] = []
    start = prev = None
    for s in sorted(slots):
        if start is None:
            start = prev = s
        elif s == prev + 1:  # type: ignore[operator]
            prev = s
        else:
            out.append(f"{start}-{prev}" if start != prev else str(start))
            start = prev = s
    if start is not None:
        out.append(f"{start}-{prev}" if start != prev else str(start))
    text = ",".join(out)
    return text if len(text) < 80 else text[:77] + "..."


# -- scan and watch ------------------------------------------------------------------------------


def _text(b: bytes) -> str:
    """Bytes as one printable field: UTF-8, with other bytes and tabs or line breaks escaped."""
    return b.decode("utf-8", errors="backslashreplace").translate(_ESCAPES)


_ESCAPES = str.maketrans({"\n": "\\n", "\t": "\\t", "\r": "\\r"})


@main.command()
@url_option
@timeout_option
@click.argument("prefix", default="")
@click.option("--limit", type=int, default=None, help="Print at most this many keys (default: all).")
@click.option("--keys-only", is_flag=True, help="Print the keys alone; values are not fetched.")
@click.option("--page-size", default=1000, show_default=True, help="Keys per request (1 to 10,000).")
def scan(url: str, timeout: float, prefix: str, limit: int | None, keys_only: bool, page_size: int) -> None:
    """Print the keys starting with PREFIX in key order, one per line: KEY<TAB>VALUE (escaped)."""
    if limit is not None and limit < 1:
        raise click.BadParameter("must be at least 1", param_hint="--limit")
    printed = 0
    with _client(url, timeout) as c:
        try:
            for item in c.scan(prefix, limit=min(page_size, limit or page_size), values=not keys_only):
                click.echo(_text(item.key) if keys_only else f"{_text(item.key)}\t{_text(item.value or b'')}")
                printed += 1
                if limit is not None and printed >= limit:
                    break
        except ZkvError as e:
            raise ZkvCommandError(e) from None


@main.command()
@url_option
@timeout_option
@click.argument("prefix", default="")
def watch(url: str, timeout: float, prefix: str) -> None:
    """Print each committed change of keys starting with PREFIX until interrupted, one per line:
    KIND<TAB>KEY<TAB>VERSION[<TAB>VALUE]. KIND is put, delete, ttl, expired, or resync (changes
    were missed: re-read with `zkv scan`). Reconnects and resumes by itself; Ctrl-C ends it."""
    import signal

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    stream = None
    try:
        with _client(url, timeout) as c:
            stream = c.watch(prefix)
            for ev in stream:
                line = f"{ev.kind}\t{_text(ev.key)}\t{ev.version}"
                if ev.kind == "put" and ev.stream is not None:
                    line += f"\t(streamed value, {ev.stream.size} bytes)"
                elif ev.kind == "put":
                    line += f"\t{_text(ev.value or b'')}"
                elif ev.kind == "ttl":
                    line += f"\texpire_at={ev.expire_at}"
                click.echo(line)
    except KeyboardInterrupt:
        pass  # the end the user asked for (Ctrl-C, SIGTERM): exit 0
    except ZkvError as e:
        raise ZkvCommandError(e) from None
    finally:
        if stream is not None:
            # A second signal while closing must not turn a clean stop into an error exit.
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            try:
                stream.close()
            except ZkvError:
                pass


if __name__ == "__main__":
    main()
