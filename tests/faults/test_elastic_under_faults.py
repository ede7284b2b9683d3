"""Elastic membership under faults: workers join, drain and leave, slots move at random, and the
source and the target of a move are killed halfway, all while the register workload of the
fault-injection suite runs; afterwards the history must be linearizable, no acknowledged write
lost, every slot back to RF replicas and the slots balanced.

The scenario (one test, seeded; ``ZKV_ELASTIC_SEED=<n>`` replays the choices, not the timing):

1. A cluster of four workers (w1..w4), 256 slots, RF=3, W=2, heartbeats 0.3 s, ``--copy-rate 4``
   (MiB/s; as the broker stands it only delays snapshots of more than one ~1 MiB part). Four, not
   three: four remain after the drains, so balance means something (with three workers and RF=3
   every worker holds every slot). Prefilled with 3000 keys of 4 KiB, four 64 KiB keys in each
   slot the workload writes, and two "big" slots of about 2.6 MiB (three snapshot parts each), so
   a move of a big slot is in flight, half copied, for a second or more, long enough to be caught
   by polling ``status()["moves"]``.
2. ``client.cli.workload`` (10 clients on 8 keys) starts and runs until everything has settled; a
   mover thread issues random ``admin move`` commands (a random slot, 60 % of them among the
   workload's slots, from a random live worker to another) throughout, as TiDB's Jepsen test
   shuffles regions.
3. w5 and w6 join; auto-rebalance moves slots to them. A move to w5 or w6 is caught half copied
   and its *target* is SIGKILLed (the broker must abandon the move), and restarted later.
4. w1 and w2 are drained. A move away from one of them is caught half copied and its *source* is
   SIGKILLed (the move must complete anyway), and restarted later.
5. Once w1 and w2 hold nothing, they are stopped (SIGTERM) and removed.
6. Random moves stop, ``rebalance``, wait until no slot is misplaced and no move is in flight,
   then the workload stops; final reads; checks:

- the history is linearizable and no acknowledged write is lost (``client.cli.linearizability``);
- every slot has RF replicas (no under-replicated slot; per-worker slot counts sum to RF x slots);
- the slots are balanced within 10 % across the remaining workers (w3..w6);
- every prefilled key reads back its value;
- on disk, after SIGTERM: every key is held by exactly RF workers, the ones placement names, with
  the value the final read returned; the removed workers hold nothing;
- the faults happened: the target kill hit a move in flight and the broker abandoned it, the source
  kill hit a move in flight and the move finished after it, at least ``MIN_RANDOM_MOVES`` random
  moves ran; no product process exited on its own.

A failing run writes its history to ``history.jsonl`` and the broker's move events to
``move_events.log`` in the test's temporary directory, and names the seed and the fault timeline.
"""

from __future__ import annotations

import os
import random
import re
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from broker.placement import replicas_for_slot
from client import Client
from client.cli.history import Op
from client.cli.linearizability import check_history
from client.cli.lost_writes import lost_writes
from client.cli.workload import Workload, WorkloadConfig, dump_history, summarize
from protocol.replication import slot_for_key
from tests.support.cluster import Cluster, wait_for
from tests.support.helpers import copies, keys_in_slot

pytestmark = pytest.mark.timeout(240)

SEED = int(os.environ.get("ZKV_ELASTIC_SEED") or random.SystemRandom().randrange(1 << 31))
SLOTS = 256
RF = 3
INITIAL = ["w1", "w2", "w3", "w4"]
JOINING = ["w5", "w6"]
DRAINED = ["w1", "w2"]
REMAINING = ["w3", "w4", "w5", "w6"]
COPY_RATE_MIB = 4  # --copy-rate: snapshot bytes the broker relays per second, all moves together
MOVE_CONCURRENCY = 4
PREFILL_KEYS = 3000
PREFILL_VALUE = 4096
BIG_SLOTS = 2
BIG_KEYS = 40  # per big slot
BIG_VALUE = 64 * 1024  # 40 x 64 KiB: three snapshot parts of about 1 MiB
HOT_KEYS = 4  # extra 64 KiB keys in each slot of the workload
MIN_RANDOM_MOVES = 40
HOT_SHARE = 0.6  # of the random moves, on a slot the workload writes
RANDOM_PHASE = 10.0  # s of random moves on the four remaining workers (they also run during joins and drains)
MIN_OK_OPS = 1000
BALANCE = 0.10
CHECK_TIME_LIMIT = 15.0  # s per key for the linearizability check
KILL_DOWN = (1.0, 2.5)  # s a killed target stays down once its move ended (the broker notices in 0.9 s)
MOVE_EVENTS = ("move_started", "move_finished", "move_abandoned", "snapshot_transfer", "snapshot_transfer_failed",
               "snapshot_transfer_stalled", "worker_lost", "worker_ready", "worker_removed", "no_snapshot_donor")


# -- the broker's log -----------------------------------------------------------------------------

_LINE = re.compile(r"^(\S+Z) \[\s*(\w+)\s*\] (\S+)\s*(.*)$")
_FIELD = re.compile(r"""(\w+)=('(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*"|\S+)""")


@dataclass
class LogEvent:
    wall: float  # time.time() of the log line
    event: str
    fields: dict[str, str]
    line: str


def log_events(path: Path, names: tuple[str, ...] | None = None) -> list[LogEvent]:
    """The structlog console lines of a log file, parsed (``names``: keep only these events)."""
    out = []
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return out
    for line in text.splitlines():
        m = _LINE.match(line)
        if not m or (names is not None and m.group(3) not in names):
            continue
        fields = {k: v.strip("'\"") for k, v in _FIELD.findall(m.group(4))}
        try:
            wall = datetime.fromisoformat(m.group(1)).timestamp()
        except ValueError:
            continue
        out.append(LogEvent(wall, m.group(3), fields, line))
    return out


# -- faults and random moves ----------------------------------------------------------------------


@dataclass
class Fault:
    kind: str  # "kill_target" | "kill_source"
    worker: str
    move: dict[str, Any]  # the move in flight as status() showed it just before the kill
    donor: str | None  # the worker the broker was copying the slot from (log), if known
    killed_at: float  # time.monotonic()
    killed_wall: float
    in_flight_after_kill: bool = False  # status() right after the kill still lists the move
    outcome: str = ""  # what became of the move: "abandoned: <reason>" / "finished after <s>" / ...
    outcome_after: float | None = None  # s from the kill to that outcome
    restarted_at: float | None = None

    def describe(self, t0: float) -> str:
        m = self.move
        back = f"{self.restarted_at - t0:7.2f}" if self.restarted_at is not None else "      ?"
        after = f" {self.outcome_after:.2f} s after the kill" if self.outcome_after is not None else ""
        return (f"{self.killed_at - t0:7.2f} .. {back}  {self.kind:<11} {self.worker}: slot {m['slot']} "
                f"{m['from']}->{m['to']} ({m['reason']}, {m['bytes_copied']}/{m['bytes_total']} B copied, "
                f"donor {self.donor}), still in flight after the kill: {self.in_flight_after_kill}; "
                f"{self.outcome}{after}")


@dataclass
class Membership:
    """Which workers the test considers running (the mover only uses these) and which may receive."""

    up: set[str]
    no_target: set[str] = field(default_factory=set)  # draining: the broker refuses moves to them
    lock: threading.Lock = field(default_factory=threading.Lock)


class RandomMover(threading.Thread):
    """Moves one replica of a random slot between random live workers every ``period`` seconds."""

    def __init__(self, url: str, members: Membership, hot_slots: list[int], seed: int, period: float) -> None:
        super().__init__(name="random-mover", daemon=True)
        self.url, self.members, self.hot_slots, self.period = url, members, hot_slots, period
        self.rng = random.Random(seed)
        self.stopping = threading.Event()
        self.moves: list[tuple[float, int, str, str]] = []  # (monotonic, slot, from, to)
        self.refused: Counter[str] = Counter()
        self.crashed: BaseException | None = None

    def run(self) -> None:
        try:
            with Client(self.url, timeout=3.0, attempt_timeout=1.5) as c:
                while not self.stopping.wait(self.rng.uniform(0.5, 1.5) * self.period):
                    self._one(c)
        except BaseException as e:  # noqa: BLE001 - reported by stop()
            self.crashed = e

    def _one(self, c: Client) -> None:
        for _ in range(40):  # the test does not know the slot map: guess, the broker refuses wrong guesses
            with self.members.lock:
                sources = sorted(self.members.up)
                targets = sorted(self.members.up - self.members.no_target)
                if len(sources) < 2 or not targets:
                    return
                hot = self.rng.random() < HOT_SHARE
                slot = self.rng.choice(self.hot_slots) if hot else self.rng.randrange(SLOTS)
                src, dst = self.rng.choice(sources), self.rng.choice(targets)
                if src == dst:
                    continue
                try:
                    r = c.admin("move", slot=slot, from_=src, to=dst)
                except Exception as e:  # noqa: BLE001 - a slow broker: try again later
                    self.refused[f"error:{type(e).__name__}"] += 1
                    return
            if r.get("ok"):
                self.moves.append((time.monotonic(), slot, src, dst))
                return
            msg = str(r.get("message", ""))
            self.refused["already moving" if "already moving" in msg else "does not hold" if "does not hold" in msg
                         else "cannot take" if "cannot take" in msg else msg[:40]] += 1

    def stop(self) -> None:
        self.stopping.set()
        self.join(10)
        assert not self.is_alive(), "random mover did not stop"
        if self.crashed is not None:
            raise AssertionError(f"random mover crashed: {self.crashed!r}")


# -- helpers --------------------------------------------------------------------------------------


def quick_status(cluster: Cluster, timeout: float = 2.0) -> dict[str, Any] | None:
    try:
        with Client(cluster.frontend, timeout=timeout) as c:
            return c.status()
    except Exception:  # noqa: BLE001 - a busy broker: the caller polls again
        return None


def admin(cluster: Cluster, cmd: str, worker: str | None = None, **fields: Any) -> dict[str, Any]:
    with Client(cluster.frontend, timeout=10.0) as c:
        return c.admin(cmd, worker, **fields)


def pick_big_slots(avoid: set[int]) -> list[int]:
    """Slots that move both when w5 and w6 join (the six-worker placement names one of them) and when
    w1 and w2 are drained (it names one of those too)."""
    six = INITIAL + JOINING
    out = []
    for s in range(SLOTS):
        target = set(replicas_for_slot(s, six, RF))
        if s not in avoid and target & set(JOINING) and target & set(DRAINED):
            out.append(s)
        if len(out) == BIG_SLOTS:
            return out
    raise AssertionError("no big slot candidates")


def half_copied(m: dict[str, Any]) -> bool:
    return m["state"] == "copying" and 0 < m["bytes_copied"] < m["bytes_total"]


def same_move(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return (a["slot"], a["from"], a["to"]) == (b["slot"], b["from"], b["to"])


def donor_of(broker_log: Path, move: dict[str, Any]) -> str | None:
    """The donor of the latest snapshot transfer of the move's slot to its target (broker log)."""
    ts = [e for e in log_events(broker_log, ("snapshot_transfer",))
          if e.fields.get("slot") == str(move["slot"]) and e.fields.get("to") == move["to"]]
    return ts[-1].fields.get("donor") if ts else None


def ops_during_moves(history: list[Op], events: list[LogEvent]) -> int:
    """Ok operations that overlapped a move of their key's slot (move_started .. its end, broker log)."""
    offset = time.time() - time.monotonic()  # monotonic -> wall
    spans: dict[int, list[tuple[float, float]]] = {}
    open_: dict[tuple[str, str, str], float] = {}
    for e in events:
        k = (e.fields.get("slot", ""), e.fields.get("add", ""), e.fields.get("remove", ""))
        if e.event == "move_started":
            open_[k] = e.wall
        elif e.event in ("move_finished", "move_abandoned") and k in open_:
            spans.setdefault(int(k[0]), []).append((open_.pop(k), e.wall))
    n = 0
    for op in history:
        if op.outcome != "ok" or op.complete is None:
            continue
        a, b = op.invoke + offset, op.complete + offset
        if any(a <= end and start <= b for start, end in spans.get(slot_for_key(op.key, SLOTS), [])):
            n += 1
    return n


# -- the test -------------------------------------------------------------------------------------


def test_elastic_cluster_under_faults(cluster_factory: Callable[..., Cluster], tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    seed = SEED
    with capsys.disabled():
        print(f"\n[elastic] seed={seed} (ZKV_ELASTIC_SEED={seed} replays the choices)")
    rng = random.Random(seed)
    test_started = time.monotonic()
    cluster = cluster_factory(workers=len(INITIAL), slots=SLOTS, rf=RF, w=2, heartbeat=0.3, request_timeout=3.0,
                              broker_args=["--initial-workers", str(len(INITIAL)), "--copy-rate", str(COPY_RATE_MIB),
                                           "--move-concurrency", str(MOVE_CONCURRENCY), "--grace", "60"])
    cluster.env["ZKV_LOG_LEVEL"] = "debug"  # the move and snapshot events this test reads are debug lines
    cluster.start()
    broker_log = cluster.root / "logs" / "broker.log"

    # -- prefill ---------------------------------------------------------------------------------
    wcfg = WorkloadConfig(keys=8, duration=180.0, max_ops=60000, think=0.03,
                          mix=(("put", 0.4), ("get", 0.35), ("delete", 0.25)))
    workload = Workload(cluster.frontend, wcfg, seed)
    hot_slots = sorted({slot_for_key(k, SLOTS) for k in workload.keys})
    big_slots = pick_big_slots(set(hot_slots))
    prefill: dict[bytes, bytes] = {}
    for i in range(PREFILL_KEYS):
        prefill[f"pre-{i}".encode()] = (f"{i:08d}".encode() * (PREFILL_VALUE // 8))
    for s in big_slots:
        for j, k in enumerate(keys_in_slot(s, SLOTS, BIG_KEYS, f"big{s}-")):
            prefill[k] = bytes([65 + j % 26]) * BIG_VALUE
    for s in hot_slots:  # the workload's slots take a while to copy too: writes go on during their moves
        for j, k in enumerate(keys_in_slot(s, SLOTS, HOT_KEYS, f"hot{s}-")):
            prefill[k] = bytes([97 + j % 26]) * BIG_VALUE
    with Client(cluster.frontend, timeout=30.0, attempt_timeout=10.0) as c:
        items = list(prefill.items())
        for i in range(0, len(items), 100):
            c.mset(dict(items[i:i + 100]))

    # -- processes the test takes down on purpose; anything else that stops is a finding -----------
    expected_down: set[str] = set()
    unexpected_exits: list[str] = []

    def check_exits() -> None:
        for name, p in cluster.procs.items():
            if p.popen is not None and not p.running and name not in expected_down:
                unexpected_exits.append(f"{name} exited by itself with code {p.popen.returncode}:\n{p.log_tail(30)}")
                expected_down.add(name)  # reported once

    members = Membership(up=set(INITIAL))
    mover = RandomMover(cluster.frontend, members, hot_slots, seed + 1, period=0.3)
    faults: list[Fault] = []
    phases: list[tuple[float, str]] = []
    fallback_moves: list[str] = []

    def phase(name: str) -> None:
        phases.append((time.monotonic(), name))

    def wait_or_explain(cond: Callable[[], Any], timeout: float, what: str) -> None:
        """wait_for, and if it times out: the status, the timeline and the broker's events of the slots
        still moving (a move that never completes is a product bug; this is its evidence)."""
        try:
            wait_for(cond, timeout, 0.2, what)
        except AssertionError as e:
            st = quick_status(cluster, 5.0) or {}
            moving = {str(m["slot"]) for m in st.get("moves", [])}
            evs = [ev.line for ev in log_events(broker_log, MOVE_EVENTS) if ev.fields.get("slot") in moving]
            t0 = t_workload or test_started
            raise AssertionError(
                f"{e} (seed={seed}; logs in {cluster.root / 'logs'})\nmoves in flight: {st.get('moves')}\n"
                f"workers: {st.get('workers')}\nmisplaced: {st.get('misplaced_slots')} under-replicated: "
                f"{st.get('under_replicated_slots')}\ntimeline (s since the workload started):\n"
                + "\n".join(f"  {t - t0:7.2f}  {n}" for t, n in phases) + "\n"
                + "\n".join("  " + f.describe(t0) for f in faults)
                + "\nbroker events of the slots still moving (last 60):\n" + "\n".join(evs[-60:])) from None

    def kill(wid: str) -> None:
        with members.lock:
            members.up.discard(wid)
            expected_down.add(wid)
            cluster.procs[wid].kill()

    def restart(wid: str) -> None:
        with members.lock:
            cluster.start_worker(wid)
            expected_down.discard(wid)
        cluster.wait_worker_state(wid, "alive", 20)
        with members.lock:
            members.up.add(wid)

    def catch_move(ok: Callable[[dict[str, Any]], bool], prefer: Callable[[dict[str, Any]], bool],
                   timeout: float) -> dict[str, Any] | None:
        """A move in flight, half copied, that ``ok`` accepts (``prefer``-red ones during the first half)."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            check_exits()
            st = quick_status(cluster)
            if st:
                cands = [m for m in st["moves"] if half_copied(m) and ok(m)]
                picky = time.monotonic() - started < timeout / 2
                best = [m for m in cands if prefer(m)] if picky else cands
                if best:
                    return best[0]
            time.sleep(0.03)
        return None

    def force_big_move(sources: list[str], targets: list[str]) -> None:
        """If no planner move was caught half copied in time: move a big slot by hand."""
        with members.lock:
            up = set(members.up)
        for s in big_slots:
            for src in [w for w in sources if w in up]:
                for dst in [w for w in targets if w in up and w not in members.no_target]:
                    if src != dst and admin(cluster, "move", slot=s, from_=src, to=dst).get("ok"):
                        fallback_moves.append(f"slot {s} {src}->{dst}")
                        return

    def kill_halfway(kind: str, ok: Callable[[dict[str, Any]], bool], sources: list[str], targets: list[str]
                     ) -> Fault:
        """Catch a half-copied move that ``ok`` accepts and SIGKILL its target (kill_target) or its
        source (kill_source); retried if the move turns out to have ended before the kill landed. If
        none is caught in time, a big slot is moved by hand from ``sources`` to ``targets`` and a move
        of a big slot between those is the one caught."""
        victim_role = {"kill_target": "to", "kill_source": "from"}
        for attempt in range(4):
            prefer: Callable[[dict[str, Any]], bool] = (lambda m: True) if kind == "kill_target" else \
                (lambda m: donor_of(broker_log, m) == m["from"])  # the source is also the donor
            m = catch_move(ok, prefer, 12.0)
            if m is None:
                force_big_move(sources, targets)
                m = catch_move(lambda m: m["slot"] in big_slots and m["from"] in sources and m["to"] in targets
                               and m[victim_role[kind]] in members.up, lambda m: True, 15.0)
            assert m is not None, f"{kind}: no move in flight was ever seen half copied: {quick_status(cluster)}"
            victim = m["to"] if kind == "kill_target" else m["from"]
            donor = donor_of(broker_log, m)
            kill(victim)
            f = Fault(kind, victim, m, donor, time.monotonic(), time.time())
            st = wait_for(lambda: quick_status(cluster), 10, 0.05, "status after the kill")
            f.in_flight_after_kill = any(same_move(x, m) for x in st["moves"])
            faults.append(f)
            if f.in_flight_after_kill:
                return f
            f.outcome = "missed: the move had ended before the kill (retrying)"
            time.sleep(1.0)
            restart(victim)
            f.restarted_at = time.monotonic()
            phase(f"retry {kind} (attempt {attempt + 2})")
        raise AssertionError(f"{kind}: every kill landed after its move ended: {faults}")

    def move_outcome(f: Fault, timeout: float) -> LogEvent | None:
        """The broker's move_finished / move_abandoned of the fault's move, logged after the kill."""
        m = f.move

        def find() -> LogEvent | None:
            for e in log_events(broker_log, ("move_finished", "move_abandoned")):
                if (e.wall >= f.killed_wall - 0.05 and e.fields.get("slot") == str(m["slot"])
                        and e.fields.get("add") == m["to"] and e.fields.get("remove") == m["from"]):
                    return e
            return None

        try:
            return wait_for(find, timeout, 0.1, "the move's end")
        except AssertionError:
            return None

    t_workload = 0.0
    ops: list[Op] = []
    try:
        with workload:
            t_workload = time.monotonic()
            mover.start()
            time.sleep(1.5)

            # -- two workers join; the target of a move to one of them dies halfway ----------------
            phase("w5, w6 join")
            for wid in JOINING:
                with members.lock:
                    cluster.start_worker(wid)
            for wid in JOINING:
                cluster.wait_worker_state(wid, "alive", 20)
                with members.lock:
                    members.up.add(wid)
            phase("kill a target")
            f = kill_halfway("kill_target", lambda m: m["to"] in JOINING and m["to"] in members.up,
                             INITIAL, JOINING)
            ended = move_outcome(f, 10.0)
            f.outcome = (f"{ended.event}: {ended.fields.get('reason', '')}" if ended
                         else "the move neither finished nor was abandoned within 10 s")
            f.outcome_after = ended.wall - f.killed_wall if ended else None
            time.sleep(rng.uniform(*KILL_DOWN))
            restart(f.worker)
            f.restarted_at = time.monotonic()

            # -- two workers drain; the source of a move away from one of them dies halfway -------
            phase("drain w1, w2")
            with members.lock:
                members.no_target |= set(DRAINED)
            for wid in DRAINED:
                r = admin(cluster, "drain", wid)
                assert r["ok"], r
            phase("kill a source")
            f = kill_halfway("kill_source", lambda m: m["from"] in DRAINED and m["from"] in members.up,
                             DRAINED + REMAINING, REMAINING)
            ended = move_outcome(f, 30.0)  # the source stays down until its move has ended
            f.outcome = (f"{ended.event}{': ' + ended.fields['reason'] if 'reason' in ended.fields else ''}"
                         if ended else "the move neither finished nor was abandoned within 30 s of the kill")
            f.outcome_after = ended.wall - f.killed_wall if ended else None
            time.sleep(rng.uniform(0.2, 1.0))
            restart(f.worker)
            f.restarted_at = time.monotonic()

            # -- the drained workers are stopped and removed ---------------------------------------
            phase("wait for the drains")

            def drained() -> bool:
                check_exits()
                st = quick_status(cluster)
                return bool(st) and all(w["slots"] == 0 and w["learning"] == 0
                                        for w in st["workers"] if w["id"] in DRAINED)

            wait_or_explain(drained, 60, "w1 and w2 drained")
            phase("stop and remove w1, w2")
            for wid in DRAINED:
                with members.lock:
                    members.up.discard(wid)
                    expected_down.add(wid)
                rc = cluster.procs[wid].terminate()
                assert rc == 0, f"{wid} exited with {rc} after SIGTERM:\n{cluster.procs[wid].log_tail()}"
            for wid in DRAINED:
                cluster.wait_worker_state(wid, "dead", 20)
                r = admin(cluster, "remove", wid)
                assert r["ok"], r

            # -- random moves go on a while, then everything settles under the workload ----------
            phase("random moves on the remaining workers")
            wait_for(lambda: len(mover.moves) >= MIN_RANDOM_MOVES and time.monotonic() - phases[-1][0] > RANDOM_PHASE,
                     60, 0.2, f"{MIN_RANDOM_MOVES} random moves")
            mover.stop()
            phase("rebalance and settle")
            admin(cluster, "rebalance")

            def settled() -> bool:
                check_exits()
                st = quick_status(cluster)
                return bool(st) and st["misplaced_slots"] == 0 and not st["moves"] \
                    and not st["under_replicated_slots"] and st["recovering_slots"] == 0 \
                    and {w["id"] for w in st["workers"] if w["state"] == "alive"} == set(REMAINING) \
                    and all(w["behind_slots"] == 0 for w in st["workers"])

            wait_or_explain(settled, 60, "no slot misplaced, no move in flight, every slot fully replicated")
            time.sleep(1.0)  # the workload runs on the settled placement a moment
            phase("workload stops")
            workload.stop()
            ops = workload.join()
    finally:
        mover.stopping.set()
    run_s = time.monotonic() - t_workload

    # -- final reads, the history check ------------------------------------------------------------
    final_ops, final = workload.final_reads()
    history = ops + final_ops
    check_started = time.monotonic()
    result = check_history(history, time_limit=CHECK_TIME_LIMIT)
    lost = lost_writes(history, final)
    check_s = time.monotonic() - check_started
    st = cluster.status()
    counts = summarize(history)
    held = {w["id"]: w["slots"] for w in st["workers"]}
    mean = RF * SLOTS / len(REMAINING)
    spread = max(abs(n - mean) / mean for n in held.values()) if held else 1.0
    events = log_events(broker_log, MOVE_EVENTS)
    ev_counts = Counter(e.event for e in events)
    manual_started = sum(1 for e in events if e.event == "move_started" and e.fields.get("reason") == "manual")
    t_kill = next((f for f in faults if f.kind == "kill_target" and f.in_flight_after_kill), None)
    s_kill = next((f for f in faults if f.kind == "kill_source" and f.in_flight_after_kill), None)

    h0 = min((op.invoke for op in history), default=t_workload)
    during_moves = ops_during_moves(history, events)
    summary = (f"[elastic] seed={seed} slots_moved={st['slots_moved']} moves_started={ev_counts['move_started']} "
               f"random_moves={len(mover.moves)} (hot slots {sum(1 for m in mover.moves if m[1] in hot_slots)}) "
               f"manual_moves_started={manual_started} moves_abandoned={st['moves_abandoned']} "
               f"snapshots={st['snapshots_sent']} replays={st['replays_sent']} "
               f"faults={dict(Counter(f.kind for f in faults))} ops={len(history)} checked={result.ops_checked} "
               f"ok={counts.get('ok', 0)} fail={counts.get('fail', 0)} unknown={counts.get('unknown', 0)} "
               f"ops_on_moving_slots={during_moves} "
               f"lost_writes={len(lost)} lost_by_reads={len(result.lost_writes)} linearizable={result.ok} "
               f"slots={held} spread={spread:.3f} run={run_s:.1f}s check={check_s:.1f}s "
               f"total={time.monotonic() - test_started:.1f}s")
    with capsys.disabled():
        print(summary)
        print(f"[elastic] ops by kind/outcome: {dict(sorted(counts.items()))}; client errors: "
              f"{dict(sorted(workload.errors.items()))}; mover refusals: {dict(mover.refused)}")
        print("[elastic] timeline (s since the first invocation):")
        for t, name in phases:
            print(f"  {t - h0:7.2f}  {name}")
        for f in faults:
            print("  " + f.describe(h0))
        if fallback_moves:
            print(f"  big-slot moves made by hand because no planner move was caught half copied: {fallback_moves}")

    def evidence() -> str:
        wall0 = datetime.fromtimestamp(time.time() - (time.monotonic() - h0), UTC).strftime("%H:%M:%S.%f")
        hist_path = tmp_path / "history.jsonl"
        dump_history(hist_path, history, workload.details, h0)
        ev_path = tmp_path / "move_events.log"
        ev_path.write_text("\n".join(e.line for e in events) + "\n")
        bad_keys = {op.key for op in lost + result.lost_writes}
        for text in result.failures:
            bad_keys |= {k for k in workload.keys if repr(k) in text}
        lines = []
        for k in sorted(bad_keys):
            s = slot_for_key(k, SLOTS)
            lines.append(f"  broker events of slot {s} ({k!r}):")
            lines += ["    " + e.line for e in events if e.fields.get("slot") == str(s)][-40:]
            for wid in INITIAL + JOINING:  # when each worker really installed the slot (vs. move_finished)
                installs = [e.line for e in log_events(cluster.root / "logs" / f"{wid}.log", ("snapshot_installed",))
                            if e.fields.get("slot") == str(s)]
                lines += [f"    {wid}: {line}" for line in installs[-10:]]
        return (f"\nseed={seed}; history in {hist_path}; move events in {ev_path}; logs in {cluster.root / 'logs'}; "
                f"+0 s (first invocation) = {wall0} UTC in the logs\ntimeline:\n"
                + "\n".join(f"  {t - h0:7.2f}  {n}" for t, n in phases) + "\n"
                + "\n".join("  " + f.describe(h0) for f in faults) + "\n" + "\n".join(lines))

    why = evidence() if (not result.ok or lost or len(final) != len(workload.keys)) else ""

    # -- correctness -------------------------------------------------------------------------------
    check_exits()
    assert not unexpected_exits, "processes exited on their own:\n" + "\n".join(unexpected_exits)
    assert len(final) == len(workload.keys), \
        f"final reads failed: {[(op, workload.details.get(op)) for op in final_ops if op.outcome != 'ok']}{why}"
    assert result.ok, "history not linearizable:\n" + "\n".join(result.failures[:5]) + \
        f"\nlost by reads: {result.lost_writes[:10]}{why}"
    assert lost == [], f"{len(lost)} acknowledged writes lost: {lost[:10]}{why}"
    assert counts.get("ok", 0) >= MIN_OK_OPS, f"only {counts.get('ok', 0)} ok operations: {counts}"
    for kind in ("put", "get", "delete"):
        assert counts.get(f"{kind}_ok", 0) > 0, f"no successful {kind}: {counts}"
    with Client(cluster.frontend, timeout=30.0, attempt_timeout=10.0) as c:
        keys = list(prefill)
        for i in range(0, len(keys), 200):
            got = c.mget(keys[i:i + 200])
            wrong = [k for k, v in zip(keys[i:i + 200], got, strict=True) if v != prefill[k]]
            assert not wrong, f"prefilled keys lost or changed: {wrong[:10]}"

    # -- replication and balance -------------------------------------------------------------------
    assert [w["id"] for w in st["workers"]] == REMAINING, st["workers"]
    assert not st["under_replicated_slots"], st["under_replicated_slots"]
    assert st["misplaced_slots"] == 0 and not st["moves"], st["moves"]
    assert sum(held.values()) == RF * SLOTS, f"slot replicas: {held} (want {RF * SLOTS} in all)"
    assert all(w["learning"] == 0 and not w["draining"] for w in st["workers"]), st["workers"]
    assert max(held.values()) <= mean * (1 + BALANCE) and min(held.values()) >= mean * (1 - BALANCE), \
        f"slots not balanced within {BALANCE:.0%} of the mean {mean:.0f}: {held}"

    # -- the faults really happened ----------------------------------------------------------------
    assert t_kill is not None, f"no target was killed while its move was in flight: {faults}"
    assert t_kill.outcome.startswith("move_abandoned") and f"target {t_kill.worker} lost" in t_kill.outcome, \
        f"the move whose target was killed was not abandoned for it: {t_kill.describe(h0)}"
    assert st["moves_abandoned"] >= 1, st["moves_abandoned"]
    assert s_kill is not None, f"no source was killed while its move was in flight: {faults}"
    assert s_kill.outcome.startswith("move_finished"), \
        f"the move whose source was killed did not complete: {s_kill.describe(h0)}"
    assert len(mover.moves) >= MIN_RANDOM_MOVES, (len(mover.moves), dict(mover.refused))
    assert any(m[1] in hot_slots for m in mover.moves), "no random move of a slot the workload writes"
    assert during_moves >= 20, f"only {during_moves} ok operations overlapped a move of their slot"
    assert st["slots_moved"] >= 400, st["slots_moved"]  # ~270 for the joins, ~240 for the drains

    # -- on disk: every key on exactly RF workers, where placement puts it, with the final value -------
    for wid in REMAINING:
        expected_down.add(wid)
        rc = cluster.procs[wid].terminate()
        assert rc == 0, f"{wid} exited with {rc} after SIGTERM:\n{cluster.procs[wid].log_tail()}"
    count, per_worker = copies(cluster, INITIAL + JOINING)
    want_value: dict[bytes, bytes | None] = {**prefill, **final}
    problems = []
    for key, value in want_value.items():
        s = slot_for_key(key, SLOTS)
        holders = {wid for wid, recs in per_worker.items() if (s, key) in recs}
        want = set(replicas_for_slot(s, REMAINING, RF)) if value is not None else set()
        if holders != want:
            problems.append(f"{key!r} (slot {s}) on {sorted(holders)}, placement says {sorted(want)}")
        for wid in holders:
            if per_worker[wid][(s, key)][2] != value:
                problems.append(f"{wid} holds {key!r}={per_worker[wid][(s, key)][2][:40]!r}, expected "
                                f"{None if value is None else value[:40]!r}")
    extra = [k for k in count if k not in want_value]
    assert not extra, f"keys on disk nobody wrote: {extra[:10]}"
    assert not problems, f"{len(problems)} on-disk problems:\n" + "\n".join(problems[:20])
    assert all(n == RF for k, n in count.items()), Counter(count.values())
    for wid in DRAINED:
        assert not per_worker[wid], f"removed worker {wid} still holds {len(per_worker[wid])} records"
