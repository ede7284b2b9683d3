"""A concurrent register workload for linearizability checking.

``Workload`` runs ``clients`` threads, each with its own ``Client`` (clients are not thread-safe),
on a small key space so operations on the same key overlap. Each thread picks a key and an
operation (put / get / delete, and cas when the mix names it) at random (seeded), writes a value never
written before (``b"<process>-<n>"``), and records every operation as a ``client.cli.linearizability.Op``:

- ``invoke`` / ``complete``: ``time.monotonic()`` just before the call and just after it returned;
- ``outcome``: ``ok`` when the call returned; ``fail`` when it raised ``NotEnoughReplicas`` or
  ``InvalidRequest`` (the request was definitely not applied); ``unknown`` (``complete=None``) for
  anything else, ``ZkvTimeout`` and ``Unavailable`` after the client's retries in particular: such a
  write may take effect at any time after its invocation, or never.
- a cas is a ``get_versioned`` (recorded as a get) then ``put(if_version=<its version>)``, or
  ``put(if_absent=True)`` when the key was missing; ``ConditionFailed`` is an ok, refused cas. Values
  are unique, so the version read names the value read: the cas compares with that value.

The run is bounded both in operations (``max_ops`` over all threads) and in time (``duration``;
a call in flight when time runs out finishes within the client's own ``timeout``), and stops by
itself. ``final_reads`` reads every key once more after the faults are healed; those reads are
part of the history too.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from client import Client
from client.cli.history import Op
from protocol.errors import ConditionFailed, InvalidRequest, NotEnoughReplicas

# Errors after which the request was certainly not applied; every other error leaves a write's
# outcome unknown.
DEFINITE_FAILURES: tuple[type[BaseException], ...] = (NotEnoughReplicas, InvalidRequest)


@dataclass
class WorkloadConfig:
    clients: int = 10
    keys: int = 8
    duration: float = 30.0  # s: no new operation starts after this
    max_ops: int = 6000  # over all clients
    mix: tuple[tuple[str, float], ...] = (("put", 0.45), ("get", 0.45), ("delete", 0.10))
    think: float = 0.1  # s: each client pauses uniform(0, think) between operations (about 15 ops/s each)
    timeout: float = 4.0  # Client(timeout=...): the most one call may take, retries included
    attempt_timeout: float = 1.5  # a retry (same request number) after this long without a reply
    key_prefix: str = "reg-"

    def key_names(self) -> list[bytes]:
        return [f"{self.key_prefix}{i}".encode() for i in range(self.keys)]


def classify(exc: BaseException) -> str:
    return "fail" if isinstance(exc, DEFINITE_FAILURES) else "unknown"


def run_op(c: Client, process: int, key: bytes, kind: str, value: bytes | None,
           errors: Counter[str] | None = None, details: dict[Op, str] | None = None) -> Op:
    """Perform one operation and record it (never raises for a client error). A failed operation's
    error (class and message) goes into ``details``."""
    invoke = time.monotonic()
    try:
        if kind == "put":
            assert value is not None
            c.put(key, value)
            return Op(process=process, key=key, kind="put", value=value, invoke=invoke,
                      complete=time.monotonic(), outcome="ok")
        if kind == "get":
            got = c.get(key)
            return Op(process=process, key=key, kind="get", value=got, invoke=invoke,
                      complete=time.monotonic(), outcome="ok")
        if kind == "delete":
            existed = c.delete(key)
            return Op(process=process, key=key, kind="delete", value=None, invoke=invoke,
                      complete=time.monotonic(), outcome="ok", deleted=existed)
        raise ValueError(f"unknown operation {kind!r}")
    except Exception as e:  # noqa: BLE001 - every client error is an outcome to record
        return _failed(process, key, kind, value if kind == "put" else None, invoke, e, errors, details)


def run_cas(c: Client, process: int, key: bytes, value: bytes, errors: Counter[str] | None = None,
            details: dict[Op, str] | None = None) -> list[Op]:
    """A compare-and-set from the value just read: the read (a get) and the cas, as recorded ops."""
    invoke = time.monotonic()
    try:
        found = c.get_versioned(key)
    except Exception as e:  # noqa: BLE001 - every client error is an outcome to record
        return [_failed(process, key, "get", None, invoke, e, errors, details)]
    read = Op(process=process, key=key, kind="get", value=None if found is None else found[0], invoke=invoke,
              complete=time.monotonic(), outcome="ok")
    expected = None if found is None else found[0]
    invoke = time.monotonic()
    try:
        if found is None:
            c.put(key, value, if_absent=True)
        else:
            c.put(key, value, if_version=found[1])
        swapped = True
    except ConditionFailed:
        swapped = False
    except Exception as e:  # noqa: BLE001
        return [read, _failed(process, key, "cas", value, invoke, e, errors, details, expected)]
    return [read, Op(process=process, key=key, kind="cas", value=value, invoke=invoke, complete=time.monotonic(),
                     outcome="ok", expected=expected, swapped=swapped)]


def _failed(process: int, key: bytes, kind: str, value: bytes | None, invoke: float, e: Exception,
            errors: Counter[str] | None, details: dict[Op, str] | None, expected: bytes | None = None) -> Op:
    done = time.monotonic()
    if errors is not None:
        errors[f"{kind}:{type(e).__name__}"] += 1
    outcome = classify(e)
    op = Op(process=process, key=key, kind=kind, value=value, invoke=invoke,
            complete=done if outcome == "fail" else None, outcome=outcome, expected=expected)
    if details is not None:
        details[op] = f"{type(e).__name__}: {e} (after {done - invoke:.3f}s)"
    return op


@dataclass
class Workload:
    url: str
    cfg: WorkloadConfig = field(default_factory=WorkloadConfig)
    seed: int = 0
    client_factory: Callable[..., Client] = Client

    def __post_init__(self) -> None:
        self.keys = self.cfg.key_names()
        self.stop_event = threading.Event()
        self._errors: list[Counter[str]] = [Counter() for _ in range(self.cfg.clients + 1)]
        self._details: list[dict[Op, str]] = [{} for _ in range(self.cfg.clients + 1)]
        self.crashes: list[str] = []
        self.started_at = 0.0
        self.finished_at = 0.0
        self._deadline = 0.0
        self._lock = threading.Lock()
        self._issued = 0
        self._per_thread: list[list[Op]] = [[] for _ in range(self.cfg.clients)]
        self._threads: list[threading.Thread] = []

    # -- running --------------------------------------------------------------------------------

    def start(self) -> Workload:
        self.started_at = time.monotonic()
        self._deadline = self.started_at + self.cfg.duration
        for p in range(self.cfg.clients):
            t = threading.Thread(target=self._run_client, args=(p,), name=f"workload-{p}", daemon=True)
            self._threads.append(t)
            t.start()
        return self

    def _ticket(self) -> bool:
        with self._lock:
            if self._issued >= self.cfg.max_ops:
                return False
            self._issued += 1
            return True

    def _run_client(self, process: int) -> None:
        rng = random.Random(f"{self.seed}/{process}")
        kinds = [k for k, _ in self.cfg.mix]
        weights = [w for _, w in self.cfg.mix]
        out = self._per_thread[process]
        n = 0
        try:
            with self.client_factory(self.url, timeout=self.cfg.timeout,
                                     attempt_timeout=self.cfg.attempt_timeout) as c:
                while not self.stop_event.is_set() and time.monotonic() < self._deadline and self._ticket():
                    key = rng.choice(self.keys)
                    kind = rng.choices(kinds, weights)[0]
                    value = None
                    if kind in ("put", "cas"):
                        n += 1
                        value = f"{process}-{n}".encode()
                    if kind == "cas":
                        assert value is not None
                        out.extend(run_cas(c, process, key, value, self._errors[process], self._details[process]))
                    else:
                        out.append(run_op(c, process, key, kind, value, self._errors[process],
                                          self._details[process]))
                    if self.cfg.think > 0:
                        # Spaces operations out (keeps the history a size the checker handles);
                        # wakes at once on stop.
                        self.stop_event.wait(rng.uniform(0, self.cfg.think))
        except BaseException as e:  # noqa: BLE001 - reported by join()
            self.crashes.append(f"client {process}: {e!r}")

    def stop(self) -> None:
        self.stop_event.set()

    def join(self, timeout: float | None = None) -> list[Op]:
        """Wait for every client to finish (they stop by themselves); returns the history."""
        limit = timeout if timeout is not None else self.cfg.duration + self.cfg.timeout + 30
        deadline = time.monotonic() + limit
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        alive = [t.name for t in self._threads if t.is_alive()]
        self.finished_at = time.monotonic()
        if alive:
            self.stop()
            raise AssertionError(f"workload clients still running after {limit:.0f}s: {alive}")
        if self.crashes:
            raise AssertionError(f"workload clients crashed: {self.crashes}")
        return self.ops()

    def __enter__(self) -> Workload:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        for t in self._threads:
            t.join(self.cfg.timeout + 5)

    @property
    def errors(self) -> Counter[str]:
        """Client errors by ``<kind>:<exception>`` over all clients."""
        return sum(self._errors, Counter())

    @property
    def details(self) -> dict[Op, str]:
        """The error of every operation that did not succeed."""
        return {op: d for ds in self._details for op, d in ds.items()}

    def ops(self) -> list[Op]:
        return [op for ops in self._per_thread for op in ops]

    # -- after the faults -----------------------------------------------------------------------

    def final_reads(self, timeout: float = 20.0) -> tuple[list[Op], dict[bytes, bytes | None]]:
        """Read every key once (as one more process, after everything healed).

        Returns the reads (ok ones go into the history) and the final state of every key; a key
        whose final read failed is missing from the state, and the failed read is returned too."""
        process = self.cfg.clients
        ops: list[Op] = []
        final: dict[bytes, bytes | None] = {}
        with self.client_factory(self.url, timeout=timeout, attempt_timeout=min(4.0, timeout)) as c:
            for key in self.keys:
                op = run_op(c, process, key, "get", None, self._errors[process], self._details[process])
                ops.append(op)
                if op.outcome == "ok":
                    final[key] = op.value
        return ops, final


def summarize(ops: list[Op]) -> dict[str, int]:
    """Counts by outcome and by ``<kind>_<outcome>``."""
    counts: Counter[str] = Counter()
    for op in ops:
        counts[op.outcome] += 1
        counts[f"{op.kind}_{op.outcome}"] += 1
    return dict(counts)


def dump_history(path: Path, ops: list[Op], details: dict[Op, str], t0: float) -> None:
    """One JSON line per op, by invocation; times also as seconds since ``t0``; errors of failed ops."""
    with path.open("w") as f:
        for op in sorted(ops, key=lambda o: o.invoke):
            d: dict[str, object] = asdict(op)
            d["key"] = op.key.decode(errors="replace")
            d["value"] = None if op.value is None else op.value.decode(errors="replace")
            d["expected"] = None if op.expected is None else op.expected.decode(errors="replace")
            d["t_invoke"] = round(op.invoke - t0, 6)
            d["t_complete"] = None if op.complete is None else round(op.complete - t0, 6)
            if op in details:
                d["error"] = details[op]
            f.write(json.dumps(d) + "\n")


def load_history(path: Path) -> list[Op]:
    """The ops of a history written by ``dump_history`` (keys and values as UTF-8 text)."""
    ops: list[Op] = []
    with path.open() as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
                ops.append(Op(process=int(d["process"]), key=d["key"].encode(), kind=d["kind"],
                              value=None if d.get("value") is None else d["value"].encode(),
                              invoke=float(d["invoke"]),
                              complete=None if d.get("complete") is None else float(d["complete"]),
                              outcome=d["outcome"], deleted=d.get("deleted"),
                              expected=None if d.get("expected") is None else d["expected"].encode(),
                              swapped=d.get("swapped")))
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise ValueError(f"{path}:{n}: not a history line ({e})") from None
    return ops
