"""Active brokers (issue 15): PUT and GET throughput with 1, 2 and 3 brokers leading the slot
groups, side by side in one run, and the CPU each broker spends per request.

    python bench/active.py                      # 1, 2, 3 brokers; about 3 minutes
    python bench/active.py --pin                # the same with each process pinned to a core (taskset)
    python bench/active.py --brokers 1,3 --seconds 5 --json out.json

Each configuration is a fresh cluster in a temporary directory on loopback free ports: one etcd
member, N brokers with ``--groups`` (default 6) and the default lease, three workers (RF=3, W=2,
1024 slots, fsync on every commit, the product's heartbeats: bench/core.py's settings). The load
is ``--loaders`` processes, each with one DEALER per broker and ``--window`` requests in flight,
sending each key to its group's leader by the slot map (``mmi.slots``) as the Python client does:
``--seconds`` of PUTs of 100 B values to fresh keys, then as long of GETs of those keys. Nothing
is retried; an error reply counts as an error. CPU per request is the brokers' utime + stime
over the phase (/proc) divided by the requests answered.

With ``--pin`` every broker and worker is pinned to one core, round robin over the cores
(``taskset -c``), the loaders too: on a machine with fewer cores than processes this shows the
contention, not the design's scaling; docs/benchmarks.md says which was measured.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

import zmq  # noqa: E402

from client.slotmap import SlotMap  # noqa: E402
from protocol.frames import C_FINAL, C_REQUEST, MDPC, MMI_SLOTS, SERVICE, pack, unpack  # noqa: E402
from tests.support.cluster import wait_for  # noqa: E402
from tests.support.ha import EtcdCluster, HaCluster  # noqa: E402


def fetch_map(url: str) -> SlotMap:
    """The slot map of an active broker; of a broker without groups (``--groups 1``, the baseline:
    one leader, standbys), one group led by the leader etcd names (``ZKV_BENCH_LEADER``)."""
    if os.environ.get("ZKV_BENCH_LEADER"):
        return SlotMap(1024, 1, {0: os.environ["ZKV_BENCH_LEADER"]}, 0)
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(url)
    try:
        s.send_multipart([MDPC, C_REQUEST, MMI_SLOTS, b""])
        if not s.poll(3000):
            raise RuntimeError(f"{url}: no answer to mmi.slots")
        return SlotMap.from_record(unpack(s.recv_multipart()[3]))
    finally:
        s.close()


def loader(urls: list[str], op: str, seconds: float, window: int, tag: str, keys: int, out: Any) -> None:
    """One load process: ``op`` for ``seconds``, each request to its key's group leader."""
    smap = fetch_map(urls[0])
    ctx = zmq.Context()
    socks: dict[str, zmq.Socket] = {}
    for url in set(smap.leaders.values()):
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(url)
        socks[url] = s
    poller = zmq.Poller()
    for s in socks.values():
        poller.register(s, zmq.POLLIN)
    cid = uuid.uuid4().bytes
    value = b"x" * 100
    rid, in_flight, done, errors, i = 0, 0, 0, 0, 0
    deadline = time.monotonic() + seconds

    def send() -> None:
        nonlocal rid, in_flight, i
        key = f"{tag}:{i % keys if op == 'get' else i}".encode()
        i += 1
        rid += 1
        url = smap.leader_for(key)
        assert url is not None
        hdr = {"id": rid, "op": op, "key": key, "cid": cid}
        socks[url].send_multipart([MDPC, C_REQUEST, SERVICE, pack(hdr), *([value] if op == "put" else [])])
        in_flight += 1

    while time.monotonic() < deadline:
        while in_flight < window:
            send()
        for s, _ in poller.poll(1000):
            while True:
                try:
                    frames = s.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                if frames[1] != C_FINAL:
                    continue
                in_flight -= 1
                done += 1
                if not unpack(frames[3]).get("ok"):
                    errors += 1
    out.put({"done": done, "errors": errors, "sent": i})
    ctx.destroy(linger=0)


def phase(cluster: HaCluster, op: str, args: argparse.Namespace, cpus: list[str]) -> dict[str, Any]:
    from bench.core import process_jiffies

    brokers = [p.popen.pid for p in cluster.broker_procs() if p.popen is not None]
    workers = [cluster.procs[f"w{i}"].popen.pid for i in range(1, 4)]
    q: mp.Queue = mp.Queue()
    urls = [cluster.broker_endpoints[n][0] for n in cluster.broker_endpoints]
    procs = [mp.Process(target=loader, args=(urls, op, args.seconds, args.window, f"l{j}", args.keys, q))
             for j in range(args.loaders)]
    b0, w0, t0 = process_jiffies(brokers), process_jiffies(workers), time.monotonic()
    for j, p in enumerate(procs):
        p.start()
        if cpus:
            subprocess.run(["taskset", "-cp", cpus[j % len(cpus)], str(p.pid)], capture_output=True, check=False)
    results = [q.get(timeout=args.seconds + 60) for _ in procs]
    for p in procs:
        p.join(30)
    elapsed = time.monotonic() - t0
    b1, w1 = process_jiffies(brokers), process_jiffies(workers)
    done = sum(r["done"] for r in results)
    tick = os.sysconf("SC_CLK_TCK")
    return {"op": op, "requests": done, "errors": sum(r["errors"] for r in results), "seconds": round(elapsed, 2),
            "rps": round(done / elapsed), "broker_us_per_req": round((b1 - b0) / tick / max(done, 1) * 1e6, 1),
            "worker_us_per_req": round((w1 - w0) / tick / max(done, 1) * 1e6, 1)}


def run(n: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    root = Path(tempfile.mkdtemp(prefix="zkv-active-"))
    etcd = EtcdCluster(root / "etcd").start()
    cluster = HaCluster(root / "zkv", etcd=etcd, brokers=n, slots=1024, heartbeat=None, request_timeout=None,
                        map_size=None, cwd=REPO,
                        broker_args=["--groups", str(args.groups)] if args.groups > 1 else [])
    cpus = [str(c) for c in sorted(os.sched_getaffinity(0))] if args.pin else []
    try:
        cluster.start_broker()
        for i in range(1, 4):
            cluster.start_worker(f"w{i}")
        urls = [cluster.broker_endpoints[b][0] for b in cluster.broker_endpoints]

        def served() -> bool:
            if args.groups == 1:  # one leader, standbys: the leader key names it
                leader = cluster.leader()
                if leader is None:
                    return False
                os.environ["ZKV_BENCH_LEADER"] = leader["value"]["frontend"]
                return True
            try:
                m = fetch_map(urls[0])
            except Exception:
                return False
            return len(m.leaders) == args.groups and len(set(m.leaders.values())) == n

        os.environ.pop("ZKV_BENCH_LEADER", None)
        wait_for(served, 90, 0.5, f"{args.groups} groups led by {n} brokers")
        time.sleep(3.0)  # every group's slots formed and recovered (the map says who leads, not that)
        if cpus:
            for j, p in enumerate([*cluster.broker_procs(), *(cluster.procs[f"w{i}"] for i in range(1, 4))]):
                assert p.popen is not None
                subprocess.run(["taskset", "-acp", cpus[j % len(cpus)], str(p.popen.pid)], capture_output=True,
                               check=False)
        rows = []
        for op in ("put", "get"):
            row = {"brokers": n, "groups": args.groups, "pinned": bool(cpus), **phase(cluster, op, args, cpus)}
            print(json.dumps(row), flush=True)
            rows.append(row)
        return rows
    finally:
        cluster.stop()
        etcd.stop()
        shutil.rmtree(root, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--brokers", default="1,2,3")
    ap.add_argument("--groups", type=int, default=6)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--loaders", type=int, default=2)
    ap.add_argument("--window", type=int, default=100)
    ap.add_argument("--keys", type=int, default=20_000, help="GETs cycle over the first KEYS keys each loader put")
    ap.add_argument("--pin", action="store_true")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    rows = [r for n in (int(x) for x in args.brokers.split(",")) for r in run(n, args)]
    print(f"{'brokers':>7} {'groups':>6} {'op':>4} {'req/s':>8} {'errors':>6} {'broker µs/req':>14} "
          f"{'worker µs/req':>14}")
    for r in rows:
        print(f"{r['brokers']:>7} {r['groups']:>6} {r['op']:>4} {r['rps']:>8} {r['errors']:>6} "
              f"{r['broker_us_per_req']:>14} {r['worker_us_per_req']:>14}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
