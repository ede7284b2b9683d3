"""Failover time in etcd mode (issue 11): from the leader's death to the first acknowledged write.

    python bench/failover.py                          # 20 SIGKILLs of the leader; about 4 minutes
    python bench/failover.py --fault pause            # SIGSTOP past the lease instead (then SIGCONT)
    python bench/failover.py --failovers 2 --json out.json

One cluster in a temporary directory, on loopback free ports: one etcd member, ``--brokers``
brokers (b1, b2, ...) with the default lease (3 s TTL, renewed every 0.5 s, acted on until 0.75 s
before it ends), three workers given every broker (1024 slots, RF=3, W=2, fsync on every commit,
the product's heartbeats and request timeout: bench/core.py's ``bench_cluster`` settings). A light
background write load (``--load-interval``; one client, 100 B values) runs throughout, so each
failover happens under traffic; its errors and its longest stall across each failover are recorded.

Each round finds the leader in etcd, makes one write through it with the probe client (a
long-lived ``Client`` given every broker's frontend, as an application's would be, with
``--attempt-timeout``: by default the client's own), then at t0 SIGKILLs the leader (or SIGSTOPs
it) and measures from t0:

* **leader**: until etcd holds a new leader key (a higher epoch), polled every 20 ms;
* **first write**: until the probe's next ``put``, sent at t0 to the dead leader's connection,
  is acknowledged (the client moves on by itself: the figure the issue asks for);
* **all slots**: until the new leader's status shows every slot recovered (each needs RF - W + 1
  = 2 replicas' reports), polled every 50 ms;
* **load stall**: the background load's longest time without an acknowledgement, from its last
  one before t0 until the round ends.

Then the killed broker is restarted (a paused one is resumed, no sooner than 2 x TTL after t0);
the round waits until it answers as a standby naming the new leader and every slot is fully
replicated again, and lets the cluster settle ``--settle`` s before the next round.

Why three brokers by default: it is the usual deployment (as Patroni's and Sentinel's three
nodes), and it makes the measured path the one a real client takes: when the leader dies there is
still a choice of successors racing for the key, and the client's list holds a dead broker and a
standby that is not the new leader, so its search (the next URL on silence, a standby's
``NOT_LEADER`` naming the leader) is part of the figure; and while the killed broker restarts a
standby still exists. ``--brokers 2`` measures the minimal pair.

Prints one row per failover, then min, p50, p90 and max of each measure; ``--json FILE`` writes
everything. Every process is stopped and the directory removed on success, failure, Ctrl-C or
SIGTERM (``--keep`` keeps data and logs).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

import core  # noqa: E402  (bench/core.py)

from broker.leadership import DEFAULT_MARGIN, DEFAULT_RENEW_EVERY, DEFAULT_TTL  # noqa: E402
from client import Client  # noqa: E402
from client.retry import DEFAULT_ATTEMPT_TIMEOUT  # noqa: E402
from tests.support.cluster import wait_for  # noqa: E402
from tests.support.ha import EtcdCluster, HaCluster  # noqa: E402

MEASURES = ("leader_s", "write_s", "all_slots_s", "load_gap_s")
LABELS = {"leader_s": "new leader in etcd", "write_s": "first acknowledged write",
          "all_slots_s": "every slot serving", "load_gap_s": "background load's stall"}


@dataclass
class Round:
    n: int
    fault: str
    old: str  # the broker killed or paused
    new: str = ""  # its successor, as etcd names it
    at: float = 0.0  # wall clock of t0 (to find the round in the processes' logs)
    old_epoch: int = 0  # the leader key's create revision before, and after
    new_epoch: int = 0
    leader_s: float | None = None
    write_s: float | None = None
    all_slots_s: float | None = None
    load_gap_s: float | None = None
    write_error: str = ""  # the probe's put failed within --write-timeout
    load_errors: dict[str, int] = field(default_factory=dict)  # the load's, during this round


class Load(threading.Thread):
    """One client writing 100 B values one after another, every ``interval`` s; the time of each
    acknowledgement (monotonic) and the errors by kind."""

    def __init__(self, url: str, interval: float, attempt_timeout: float) -> None:
        super().__init__(daemon=True, name="load")
        self.url, self.interval, self.attempt_timeout = url, interval, attempt_timeout
        self.acks: list[float] = []
        self.errors: Counter[str] = Counter()
        self.stop = threading.Event()
        self.lock = threading.Lock()

    def run(self) -> None:
        with Client(self.url, timeout=30.0, attempt_timeout=self.attempt_timeout) as c:
            i = 0
            while not self.stop.is_set():
                try:
                    c.put(b"load:%04d" % (i % 1000), b"v" * 100)
                    with self.lock:
                        self.acks.append(time.monotonic())
                except Exception as e:  # counted: the figure is about stalls, not a crash
                    with self.lock:
                        self.errors[getattr(e, "code", None) or type(e).__name__] += 1
                i += 1
                self.stop.wait(self.interval)

    def longest_gap(self, t0: float, end: float) -> float | None:
        """The longest time between two acknowledgements from the last one before ``t0`` to
        ``end`` (a reply already on its way when the leader died may arrive just after ``t0``: the
        stall is the gap that follows it)."""
        with self.lock:
            before = [a for a in self.acks if a <= t0]
            acks = before[-1:] + [a for a in self.acks if t0 < a <= end]
        if len(acks) < 2 or acks[-1] <= t0:
            return None
        return max(b - a for a, b in zip(acks, acks[1:], strict=False))


def watch_leader(cluster: HaCluster, old_epoch: int, t0: float, out: dict[str, Any], timeout: float) -> None:
    try:
        new = cluster.wait_new_leader(old_epoch, timeout=timeout)
        out["leader_s"] = time.monotonic() - t0
        out["new"] = str(new["value"]["name"])
        out["epoch"] = int(new["create_revision"])
    except AssertionError as e:
        out["error"] = str(e)


def watch_slots(cluster: HaCluster, old_epoch: int, t0: float, out: dict[str, Any], timeout: float) -> None:
    """Until a leader of a later epoch reports every slot recovered (its status, followed from any
    broker of the list)."""
    deadline = t0 + timeout
    with Client(cluster.frontend, timeout=2.0, attempt_timeout=1.0) as c:
        while time.monotonic() < deadline:
            try:
                st = c.status()
            except Exception:
                st = {}
            if st.get("role") != "standby" and int(st.get("epoch") or 0) > old_epoch and st.get("formed") \
                    and st.get("recovering_slots") == 0:
                out["all_slots_s"] = time.monotonic() - t0
                return
            time.sleep(0.05)


def failover(cluster: HaCluster, probe: Client, load: Load | None, n: int, fault: str,
             opts: argparse.Namespace) -> Round:
    old = wait_for(cluster.leader, 30, 0.05, "a leader in etcd")
    name, epoch = str(old["value"]["name"]), int(old["create_revision"])
    probe.put(b"failover-probe", b"before %d" % n)  # the probe's connection is up, to the leader
    proc = cluster.procs[name]
    r = Round(n, fault, name, old_epoch=epoch)
    errors_before = Counter(load.errors) if load else Counter()
    leader: dict[str, Any] = {}
    slots: dict[str, Any] = {}
    t0 = time.monotonic()
    r.at = time.time()
    proc.signal(signal.SIGKILL if fault == "kill" else signal.SIGSTOP)
    watchers = [threading.Thread(target=watch_leader, args=(cluster, epoch, t0, leader, opts.write_timeout),
                                 daemon=True),
                threading.Thread(target=watch_slots, args=(cluster, epoch, t0, slots, opts.write_timeout + 30),
                                 daemon=True)]
    for t in watchers:
        t.start()
    if fault == "kill":
        assert proc.popen is not None
        proc.popen.wait(timeout=10)
    try:
        probe.put(b"failover-probe", b"after %d" % n)
        r.write_s = time.monotonic() - t0
    except Exception as e:
        r.write_error = f"{type(e).__name__}: {e}"[:300]
    for t in watchers:
        t.join(timeout=opts.write_timeout + 40)
    r.leader_s, r.new, r.all_slots_s = leader.get("leader_s"), str(leader.get("new", "")), slots.get("all_slots_s")
    r.new_epoch = int(leader.get("epoch", 0))
    if leader.get("error"):
        raise RuntimeError(f"round {n}: no new leader: {leader['error']}\n{cluster.logs()}")

    if fault == "kill":
        cluster.start_broker(name)
    else:
        time.sleep(max(0.0, t0 + 2 * opts.lease_ttl - time.monotonic()))
        proc.signal(signal.SIGCONT)
    # It stands by, naming the new leader, and every slot is fully replicated again.
    new_front = cluster.broker_endpoints[r.new][0] if r.new in cluster.broker_endpoints else ""
    with Client(cluster.broker_endpoints[name][0], timeout=15.0, attempt_timeout=1.0) as c:
        def standing_by() -> bool:
            try:
                st = c.status()
            except Exception:
                return False
            return st.get("role") == "standby" and st.get("leader") == new_front

        wait_for(standing_by, 60, 0.1, f"{name} standing by behind {r.new}")
    cluster.wait_ready(90)
    if load is not None:
        r.load_gap_s = load.longest_gap(t0, time.monotonic())
        r.load_errors = dict(Counter(load.errors) - errors_before)
    time.sleep(opts.settle)
    return r


def percentile(xs: list[float], q: float) -> float:
    """Nearest rank: the smallest value with at least ``q`` of the values at or below it."""
    s = sorted(xs)
    return s[max(0, math.ceil(q * len(s)) - 1)]


def summary(rounds: list[Round]) -> dict[str, dict[str, float | int]]:
    out: dict[str, dict[str, float | int]] = {}
    for m in MEASURES:
        xs = [float(getattr(r, m)) for r in rounds if getattr(r, m) is not None]
        if xs:
            out[m] = {"n": len(xs), "min": min(xs), "p50": statistics.median(xs), "p90": percentile(xs, 0.9),
                      "max": max(xs)}
    return out


def fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def table(rounds: list[Round], stats: dict[str, dict[str, float | int]]) -> str:
    lines = ["| # | fault | leader | successor | new leader in etcd s | first acknowledged write s "
             "| every slot serving s | load stall s | errors |",
             "|---:|---|---|---|---:|---:|---:|---:|---|"]
    for r in rounds:
        errs = ", ".join(f"{k} {v}" for k, v in sorted(r.load_errors.items()))
        if r.write_error:
            errs = f"probe: {r.write_error}" + (f"; load: {errs}" if errs else "")
        elif errs:
            errs = f"load: {errs}"
        lines.append(f"| {r.n} | {r.fault} | {r.old} | {r.new} | {fmt(r.leader_s)} | {fmt(r.write_s)} "
                     f"| {fmt(r.all_slots_s)} | {fmt(r.load_gap_s)} | {errs} |")
    lines += ["", "| measure (s from the leader's death) | n | min | p50 | p90 | max |",
              "|---|---:|---:|---:|---:|---:|"]
    for m, s in stats.items():
        lines.append(f"| {LABELS[m]} | {s['n']} | {s['min']:.2f} | {s['p50']:.2f} | {s['p90']:.2f} | {s['max']:.2f} |")
    return "\n".join(lines)


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM stops the run like Ctrl-C does: every process is stopped on the way out."""
    raise KeyboardInterrupt


def cpu_ticks_ours() -> int:
    """CPU time of this process and of its reaped children (every cluster process, once stopped)."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    return core.children_jiffies() + round((me.ru_utime + me.ru_stime) * os.sysconf("SC_CLK_TCK"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--failovers", type=int, default=20, help="rounds (the figure the issue asks for: >= 20)")
    ap.add_argument("--fault", choices=("kill", "pause"), default="kill",
                    help="SIGKILL the leader (restarted as a standby), or SIGSTOP it (resumed after 2 x TTL)")
    ap.add_argument("--brokers", type=int, default=3)
    ap.add_argument("--lease-ttl", type=int, default=DEFAULT_TTL, help="brokers' --lease-ttl (s)")
    ap.add_argument("--slots", type=int, default=1024)
    ap.add_argument("--attempt-timeout", type=float, default=DEFAULT_ATTEMPT_TIMEOUT,
                    help="the probe's and the load's Client(attempt_timeout=...); default: the client's own")
    ap.add_argument("--write-timeout", type=float, default=30.0, help="the probe's Client(timeout=...)")
    ap.add_argument("--load-interval", type=float, default=0.02,
                    help="s between the background load's writes; 0 = back to back; negative = no load")
    ap.add_argument("--settle", type=float, default=2.0, help="s of quiet after each round")
    ap.add_argument("--json", metavar="FILE", default="", help="write the rounds and the summary here")
    ap.add_argument("--keep", action="store_true", help="keep data and logs")
    opts = ap.parse_args(argv)
    if opts.brokers < 2:
        ap.error("--brokers: at least 2 (a failover needs a standby)")
    if opts.failovers < 1:
        ap.error("--failovers: at least 1")
    return opts


def run(opts: argparse.Namespace, rounds: list[Round], swallow_interrupt: bool = True) -> dict[str, Any]:
    """Start the cluster, run ``opts.failovers`` rounds (each appended to ``rounds`` when it ends),
    stop every process and remove the directory, also on failure or Ctrl-C; the result. With
    ``swallow_interrupt``, Ctrl-C ends the run early (``complete`` false) instead of raising."""
    root = Path(tempfile.mkdtemp(prefix="zkv-bench-failover-"))
    load_avg = os.getloadavg()[0]
    busy0, total0 = core.machine_jiffies()
    ours0 = cpu_ticks_ours()
    started = time.monotonic()
    etcd = EtcdCluster(root / "etcd")
    cluster = HaCluster(root / "zkv", etcd=etcd, brokers=opts.brokers, lease_ttl=opts.lease_ttl, workers=3, rf=3,
                        w=2, slots=opts.slots, heartbeat=None, request_timeout=None, map_size=None, cwd=REPO)
    load: Load | None = None
    probe: Client | None = None
    complete = False
    try:
        etcd.start()
        cluster.start(timeout=120)
        if opts.load_interval >= 0:
            load = Load(cluster.frontend, opts.load_interval, opts.attempt_timeout)
            load.start()
        probe = Client(cluster.frontend, timeout=opts.write_timeout, attempt_timeout=opts.attempt_timeout)
        time.sleep(opts.settle)
        for n in range(1, opts.failovers + 1):
            r = failover(cluster, probe, load, n, opts.fault, opts)
            rounds.append(r)
            print(f"round {n}: {r.old} -> {r.new}: leader {fmt(r.leader_s)} s, first write {fmt(r.write_s)} s, "
                  f"every slot {fmt(r.all_slots_s)} s, load stall {fmt(r.load_gap_s)} s"
                  + (f", probe error {r.write_error}" if r.write_error else "")
                  + (f", load errors {r.load_errors}" if r.load_errors else ""), file=sys.stderr, flush=True)
        complete = True
    except KeyboardInterrupt:
        print(f"interrupted after {len(rounds)} round(s)", file=sys.stderr)
        if not swallow_interrupt:
            raise
    finally:
        if load is not None:
            load.stop.set()
            load.join(timeout=35)
        if probe is not None:
            probe.close()
        if not complete:
            print(cluster.logs(), file=sys.stderr)
        cluster.stop()
        etcd.stop()
        if opts.keep:
            print(f"data and logs kept in {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)
    busy1, total1 = core.machine_jiffies()
    background = max(0.0, ((busy1 - busy0) - (cpu_ticks_ours() - ours0)) / max(1, total1 - total0))
    return {
        "config": {"fault": opts.fault, "failovers": opts.failovers, "brokers": opts.brokers, "workers": 3,
                   "slots": opts.slots, "rf": 3, "w": 2, "etcd_members": 1, "lease_ttl_s": opts.lease_ttl,
                   "renew_every_s": DEFAULT_RENEW_EVERY, "margin_s": DEFAULT_MARGIN,
                   "attempt_timeout_s": opts.attempt_timeout, "write_timeout_s": opts.write_timeout,
                   "load_interval_s": opts.load_interval if load is not None else None},
        "machine": core.machine_facts(), "load_average_before": load_avg, "background_cpu": round(background, 3),
        "seconds": round(time.monotonic() - started, 1),
        "rounds": [asdict(r) for r in rounds], "summary": summary(rounds),
        "probe_errors": sum(1 for r in rounds if r.write_error),
        "load_writes": len(load.acks) if load else 0, "load_errors": dict(load.errors) if load else {},
        "complete": complete,
    }


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    if shutil.which("etcd") is None:
        print("etcd is not installed (Debian: apt-get install etcd-server)", file=sys.stderr)
        return 2
    rounds: list[Round] = []
    result = run(opts, rounds)
    cfg = result["config"]
    print(f"{len(rounds)} failover(s) by {opts.fault}; {opts.brokers} brokers, 3 workers, {opts.slots} slots, "
          f"RF=3 W=2, lease TTL {opts.lease_ttl} s, client attempt timeout {opts.attempt_timeout} s; "
          f"{result['machine']}; background CPU {result['background_cpu']:.0%}, load average before "
          f"{result['load_average_before']:.2f}; {result['seconds']} s in all")
    if cfg["load_interval_s"] is not None:
        print(f"background load: {result['load_writes']} writes acknowledged, "
              f"errors {result['load_errors'] or 'none'}")
    print()
    print(table(rounds, result["summary"]))
    if opts.json:
        Path(opts.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["complete"] and not result["probe_errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
