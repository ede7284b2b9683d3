"""Faults injected into a running cluster, repeatedly and at random (seeded), while a workload runs.

``FaultCluster`` is a ``Cluster`` that can put workers in network namespaces (``tests/support/netns.py``):
clients reach the broker frontend on 127.0.0.1, workers reach its backend and replication
endpoints on the lab's service address; every worker keeps its extra flags (the replication-drop
test hook) across restarts.

``Nemesis`` is a thread that, until its time is up, repeatedly waits a random gap and injects a
fault, which it heals after a random hold:

==================  ================================================================================
``kill_worker``     SIGKILL a worker's process group, keep it down a while, restart it (same --id,
                    same --data, same flags)
``pause_worker``    SIGSTOP a worker for 1.5-3.5 heartbeat timeouts (3 heartbeats), then SIGCONT
``kill_broker``     SIGKILL the broker, keep it down a while, restart it (same data directory)
``partition``       take a namespaced worker's host-side veth down, then up
==================  ================================================================================

Each round injects every enabled kind once, in a random order, so a run of a few rounds is sure to
have injected each kind. With ``max_active > 1`` faults overlap (each on a different process: a
worker killed while another is paused, the broker killed while a worker is cut off, ...); with 1
they come one after another, and before each the nemesis waits (bounded) until every worker is
alive again. The replication-drop hook (``--test-drop-replication every=N`` on one
worker) runs for the whole run; ``drop_estimate`` counts the messages it dropped from the
worker's applied count (every N-th message received is dropped).

Whatever happens, ``stop()`` heals everything: SIGCONT to every worker, every link up, the broker
and every worker running.
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from client import Client
from tests.support.cluster import Cluster, Proc, free_port
from tests.support.netns import NetLab

FAULT_KINDS = ("kill_worker", "pause_worker", "kill_broker", "partition")


# -- a cluster whose workers may live in network namespaces -----------------------------------------


@dataclass
class NetnsProc(Proc):
    """A zkv process started inside a network namespace (``ip netns exec`` execs it: same pid)."""

    netns: str = ""

    def start(self) -> None:
        log = open(self.log_path, "ab")
        self.popen = subprocess.Popen(
            ["ip", "netns", "exec", self.netns, sys.executable, "-m", "client.cli", *self.args],
            stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True,
        )
        log.close()


@dataclass
class FaultCluster(Cluster):
    """``Cluster`` plus per-worker flags kept across restarts and, with ``lab``, workers in namespaces.

    With a lab, the broker frontend stays on ``host`` (127.0.0.1, for the test's clients) and the
    backend and replication endpoints bind the lab's service address, which the workers in
    namespaces reach through their own links and the others through the host's local routes."""

    worker_extra: dict[str, list[str]] = field(default_factory=dict)
    lab: NetLab | None = None
    netns_workers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        self.closed = False  # set by stop_all: a nemesis thread still running must not start anything
        if self.lab is not None:
            addr = self.lab.service_addr
            assert addr, "NetLab.setup() first"
            self.backend = f"tcp://{addr}:{free_port(addr)}"
            self.replication = f"tcp://{addr}:{free_port(addr)}"
            if not self.keys:
                # The lab's address is a veth private to this host, but not loopback: without
                # keys the broker would refuse it (protected mode).
                self.broker_args = [*self.broker_args, "--insecure"]
            for wid in self.netns_workers:
                if wid not in self.lab.hosts:
                    self.lab.add_host(wid)
        else:
            assert not self.netns_workers, "namespaced workers need a NetLab"

    def start_broker(self) -> Proc:
        if self.closed:
            raise RuntimeError("cluster stopped")
        return super().start_broker()

    def stop_all(self) -> None:
        self.closed = True
        super().stop_all()

    def worker_ids(self) -> list[str]:
        return [f"w{i}" for i in range(1, self.workers + 1)]

    def start_worker(self, wid: str, extra: list[str] | None = None, data: Path | None = None,
                     prefix: list[str] | None = None) -> Proc:
        if self.closed:
            raise RuntimeError("cluster stopped")
        if extra is None:
            extra = self.worker_extra.get(wid, [])
        if self.lab is None or wid not in self.lab.hosts:
            return super().start_worker(wid, extra, data)
        args = ["worker", "--id", wid, "--data", str(data or self.worker_dir(wid)), "--broker", self.backend,
                "--replication", self.replication, "--heartbeat", str(self.heartbeat),
                "--map-size", str(1 << 30), *self.reads_flag(wid, self.lab.hosts[wid].addr), *extra]
        if self.keys and "--credentials" not in args:
            args += ["--credentials", str(self.worker_credentials(wid))]
        p = NetnsProc(wid, args, self.root / "logs" / f"{wid}.log", self.env, netns=self.lab.hosts[wid].name)
        self.procs[wid] = p
        p.start()
        return p

    def quick_status(self, timeout: float = 1.0) -> dict[str, Any] | None:
        """The broker's status, or None if it does not answer within ``timeout``."""
        try:
            with Client(self.frontend, timeout=timeout, credentials=self.credentials) as c:
                return c.status()
        except Exception:  # noqa: BLE001 - a broker that is down or restarting
            return None

    def fully_replicated(self) -> bool:
        st = self.quick_status()
        if not st:
            return False
        workers = st["workers"]
        return (st["formed"] and st["recovering_slots"] == 0 and not st["under_replicated_slots"]
                and {w["id"] for w in workers if w["state"] == "alive"} == set(self.worker_ids())
                and all(w["behind_slots"] == 0 for w in workers))


# -- the nemesis ----------------------------------------------------------------------------------


@dataclass
class FaultEvent:
    kind: str
    target: str
    start: float  # time.monotonic()
    end: float | None = None
    detail: str = ""

    def describe(self, t0: float) -> str:
        end = f"{self.end - t0:7.2f}" if self.end is not None else "      ?"
        return f"{self.start - t0:7.2f} .. {end}  {self.kind:<13} {self.target:<7} {self.detail}"


@dataclass
class NemesisConfig:
    kinds: tuple[str, ...] = FAULT_KINDS
    duration: float = 30.0  # s: no fault starts later than this after start()
    gap: tuple[float, float] = (0.5, 2.0)  # s of quiet before each fault
    max_active: int = 1  # faults in place at once (on different processes); 1 = one after another
    settle_timeout: float = 8.0  # s to wait, when no fault is in place, for every worker to be alive again
    worker_down: tuple[float, float] = (0.3, 2.5)
    pause_timeouts: tuple[float, float] = (1.5, 3.5)  # hold a pause this many heartbeat timeouts
    broker_down: tuple[float, float] = (0.2, 1.5)
    partition_hold: tuple[float, float] = (1.5, 4.0)
    drop_worker: str | None = None  # the worker started with --test-drop-replication every=drop_every
    drop_every: int = 0


class Nemesis(threading.Thread):
    def __init__(self, cluster: FaultCluster, cfg: NemesisConfig, seed: int) -> None:
        super().__init__(name="nemesis", daemon=True)
        for kind in cfg.kinds:
            assert kind in FAULT_KINDS, kind
        if "partition" in cfg.kinds:
            assert cluster.lab is not None and cluster.lab.hosts, "partitions need workers in namespaces"
        self.cluster = cluster
        self.cfg = cfg
        self.seed = seed
        self.rng = random.Random(seed)  # used by the nemesis thread only: kinds, targets, durations
        self.events: list[FaultEvent] = []
        self.unexpected_exits: list[str] = []
        self.settle_timeouts = 0
        self.max_overlap = 0
        self.crashed: BaseException | None = None
        self.stop_event = threading.Event()
        self._killed: set[str] = set()  # processes this nemesis took down (their exit is expected)
        self._busy: set[str] = set()  # targets of the faults in place
        self._fault_threads: list[threading.Thread] = []
        self._lock = threading.RLock()
        # Replication-drop accounting: the drop worker's applied count per process lifetime.
        self._drop_applied_now = 0
        self._drop_applied_done = 0
        self._repairs_by_epoch: dict[int, int] = {}
        self.started_at = 0.0

    # -- bookkeeping ----------------------------------------------------------------------------

    def counts(self) -> Counter[str]:
        c: Counter[str] = Counter(e.kind for e in self.events)
        if self.cfg.drop_worker:
            c["drop_replication"] = self.drop_estimate()
        return c

    def drop_estimate(self) -> int:
        """Replication messages the drop hook dropped (estimated: the hook drops every N-th message
        the worker receives, and it applies about as many as it receives, replays included)."""
        if not self.cfg.drop_worker or not self.cfg.drop_every:
            return 0
        return (self._drop_applied_done + self._drop_applied_now) // self.cfg.drop_every

    def repairs_seen(self) -> int:
        """Replays and snapshots the broker sent (summed over its incarnations, as sampled)."""
        return sum(self._repairs_by_epoch.values())

    def sample(self, st: dict[str, Any] | None = None) -> dict[str, Any] | None:
        st = st if st is not None else self.cluster.quick_status()
        if not st:
            return None
        with self._lock:
            epoch = int(st.get("epoch", 0))
            repairs = int(st.get("replays_sent", 0)) + int(st.get("snapshots_sent", 0))
            self._repairs_by_epoch[epoch] = max(self._repairs_by_epoch.get(epoch, 0), repairs)
            for w in st["workers"]:
                if w["id"] == self.cfg.drop_worker and w["state"] == "alive":
                    self._drop_applied_now = max(self._drop_applied_now, int(w.get("applied", 0)))
        return st

    def timeline(self, t0: float | None = None) -> str:
        t0 = self.started_at if t0 is None else t0
        return "\n".join(e.describe(t0) for e in sorted(self.events, key=lambda e: e.start))

    # -- the loop -------------------------------------------------------------------------------

    def run(self) -> None:
        self.started_at = time.monotonic()
        deadline = self.started_at + self.cfg.duration
        queue: list[str] = []
        try:
            while not self.stop_event.is_set():
                if not self._busy:
                    self._settle()
                if self.stop_event.wait(self.rng.uniform(*self.cfg.gap)) or time.monotonic() >= deadline:
                    break
                while len(self._busy) >= self.cfg.max_active and not self.stop_event.is_set():
                    self.stop_event.wait(0.05)
                if not queue:
                    queue = list(self.cfg.kinds)
                    self.rng.shuffle(queue)
                kind = queue[-1]
                target = self._pick_target(kind)
                if target is None:
                    continue  # every possible target is already faulted: try again after a gap
                queue.pop()
                hold = self.rng.uniform(*self._hold_range(kind))
                self._check_exits()
                with self._lock:
                    self._busy.add(target)
                    self.max_overlap = max(self.max_overlap, len(self._busy))
                if self.cfg.max_active == 1:
                    self._run_fault(kind, target, hold)
                else:
                    t = threading.Thread(target=self._run_fault, args=(kind, target, hold), daemon=True,
                                         name=f"nemesis-{kind}-{target}")
                    self._fault_threads.append(t)
                    t.start()
        except BaseException as e:  # noqa: BLE001 - reported by stop()
            self.crashed = e
        finally:
            for t in self._fault_threads:
                t.join(30)
            try:
                self.heal_all()
            except BaseException as e:  # noqa: BLE001
                self.crashed = self.crashed or e

    def stop(self, timeout: float = 60.0) -> None:
        """Stop injecting, heal everything, and wait for the thread."""
        self.stop_event.set()
        self.join(timeout)
        if self.is_alive():
            raise AssertionError("nemesis did not stop")
        self.heal_all()
        if self.crashed is not None:
            raise AssertionError(f"nemesis crashed: {self.crashed!r}") from self.crashed

    def _hold(self, seconds: float) -> None:
        """Keep a fault in place (cut short when the nemesis is stopped)."""
        self.stop_event.wait(seconds)

    def _settle(self) -> None:
        """Wait (bounded) until every worker is alive again, noting processes that died on their own."""
        self._check_exits()
        deadline = time.monotonic() + self.cfg.settle_timeout
        want = set(self.cluster.worker_ids())
        while not self.stop_event.is_set():
            st = self.sample()
            if st and {w["id"] for w in st["workers"] if w["state"] == "alive"} >= want:
                return
            if time.monotonic() > deadline:
                self.settle_timeouts += 1
                return
            self.stop_event.wait(0.1)

    def _check_exits(self) -> None:
        """A product process that exited without the nemesis killing it is a finding; restart it."""
        with self._lock:
            for name, p in list(self.cluster.procs.items()):
                if p.popen is None or p.running or name in self._killed:
                    continue
                self.unexpected_exits.append(f"{name} exited by itself with code {p.popen.returncode}:\n"
                                             f"{p.log_tail(30)}")
                self._restart(name)

    def _restart(self, name: str) -> None:
        if name == "broker":
            self.cluster.start_broker()
        else:
            self.cluster.start_worker(name)
        self._killed.discard(name)

    def _pick_target(self, kind: str) -> str | None:
        with self._lock:
            if kind == "kill_broker":
                options = ["broker"]
            elif kind == "partition":
                assert self.cluster.lab is not None
                options = sorted(self.cluster.lab.hosts)
            else:
                options = [w for w in self.cluster.worker_ids() if self.cluster.procs[w].running]
            options = [o for o in options if o not in self._busy]
        return self.rng.choice(options) if options else None

    def _hold_range(self, kind: str) -> tuple[float, float]:
        if kind == "kill_worker":
            return self.cfg.worker_down
        if kind == "pause_worker":
            timeout = self.cluster.heartbeat * 3  # a peer silent for 3 heartbeats is dead
            return self.cfg.pause_timeouts[0] * timeout, self.cfg.pause_timeouts[1] * timeout
        if kind == "kill_broker":
            return self.cfg.broker_down
        return self.cfg.partition_hold

    def _run_fault(self, kind: str, target: str, hold: float) -> None:
        try:
            getattr(self, f"_{kind}")(target, hold)
        except BaseException as e:  # noqa: BLE001 - reported by stop()
            self.crashed = self.crashed or e
        finally:
            with self._lock:
                self._busy.discard(target)

    def _begin(self, kind: str, target: str, detail: str = "") -> FaultEvent:
        ev = FaultEvent(kind, target, time.monotonic(), detail=detail)
        with self._lock:
            self.events.append(ev)
        return ev

    # -- faults ---------------------------------------------------------------------------------

    def _kill_worker(self, wid: str, down: float) -> None:
        if wid == self.cfg.drop_worker:
            self.sample()
        with self._lock:
            ev = self._begin("kill_worker", wid, f"SIGKILL, down {down:.1f}s")
            self._killed.add(wid)
            self.cluster.procs[wid].kill()
            if wid == self.cfg.drop_worker:
                self._drop_applied_done += self._drop_applied_now
                self._drop_applied_now = 0
        self._hold(down)
        with self._lock:
            self._restart(wid)
            ev.end = time.monotonic()

    def _pause_worker(self, wid: str, hold: float) -> None:
        ev = self._begin("pause_worker", wid, f"SIGSTOP {hold:.1f}s")
        self.cluster.procs[wid].signal(signal.SIGSTOP)
        try:
            self._hold(hold)
        finally:
            self.cluster.procs[wid].signal(signal.SIGCONT)
            ev.end = time.monotonic()

    def _kill_broker(self, target: str, down: float) -> None:
        self.sample()
        with self._lock:
            ev = self._begin("kill_broker", target, f"SIGKILL, down {down:.1f}s")
            self._killed.add("broker")
            self.cluster.procs["broker"].kill()
        self._hold(down)
        with self._lock:
            self._restart("broker")
            ev.end = time.monotonic()

    def _partition(self, wid: str, hold: float) -> None:
        lab = self.cluster.lab
        assert lab is not None
        ev = self._begin("partition", wid, f"link {lab.hosts[wid].host_if} down {hold:.1f}s")
        lab.link_down(wid)
        try:
            self._hold(hold)
        finally:
            lab.link_up(wid)
            ev.end = time.monotonic()

    # -- healing --------------------------------------------------------------------------------

    def heal_all(self) -> None:
        """SIGCONT every worker, every link up, every process running (idempotent)."""
        with self._lock:
            for wid in self.cluster.worker_ids():
                p = self.cluster.procs.get(wid)
                if p is not None and p.running:
                    p.signal(signal.SIGCONT)
            lab = self.cluster.lab
            if lab is not None:
                for label in lab.hosts:
                    if not lab.link_is_up(label):
                        lab.link_up(label)
            self._check_exits()
            broker = self.cluster.procs.get("broker")
            if broker is not None and not broker.running:
                self._restart("broker")
            for wid in self.cluster.worker_ids():
                p = self.cluster.procs.get(wid)
                if p is not None and not p.running:
                    self._restart(wid)
            for ev in self.events:
                if ev.end is None:
                    ev.end = time.monotonic()
