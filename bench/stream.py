"""Streamed values: move one large value in and out of a local cluster and measure the peak
memory of the broker and of each worker while it happens.

    python bench/stream.py --size-mib 1024          # 1 GiB, the figure in docs/benchmarks.md

Peak memory is sampled every 20 ms from /proc/PID/status: ``RssAnon`` is the process's own memory
(heap, ZeroMQ buffers), which the streaming design keeps bounded; LMDB's mapped pages show as
``RssFile`` (the page cache mapped into the worker) and are reported apart.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.core import bench_cluster  # noqa: E402
from client.client import Client  # noqa: E402

MIB = 1 << 20


def rss_kib(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name in ("RssAnon", "RssFile", "VmHWM"):
                out[name] = int(rest.split()[0])
    return out


class PeakSampler(threading.Thread):
    """Highest RssAnon / RssFile of each process, sampled until stopped."""

    def __init__(self, pids: dict[str, int], interval: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.pids, self.interval = pids, interval
        self.peak: dict[str, dict[str, int]] = {n: {"RssAnon": 0, "RssFile": 0} for n in pids}
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            for name, pid in self.pids.items():
                try:
                    r = rss_kib(pid)
                except OSError:
                    continue
                for k in ("RssAnon", "RssFile"):
                    self.peak[name][k] = max(self.peak[name][k], r.get(k, 0))
            time.sleep(self.interval)

    def stop(self) -> dict[str, dict[str, int]]:
        self.stopped.set()
        self.join()
        return self.peak


def write_random_file(path: Path, size: int) -> str:
    h = hashlib.sha256()
    block = os.urandom(MIB)
    with open(path, "wb") as f:
        left, i = size, 0
        while left > 0:
            # Every MiB differs (the counter) without paying for os.urandom of the whole size.
            part = (i.to_bytes(8, "big") + block[8:])[: min(MIB, left)]
            f.write(part)
            h.update(part)
            left -= len(part)
            i += 1
    return h.hexdigest()


def run(size_mib: int, workdir: Path) -> dict:
    src, dst = workdir / "value.in", workdir / "value.out"
    digest = write_random_file(src, size_mib * MIB)
    cluster = bench_cluster(workdir / "cluster")
    cluster.start(timeout=60.0)
    try:
        baseline = {n: rss_kib(p) for n, p in cluster.pids().items()}
        sampler = PeakSampler(cluster.pids())
        sampler.start()
        with Client(cluster.frontend, timeout=60.0) as kv, open(src, "rb") as f:
            t0 = time.monotonic()
            version = kv.put_stream(b"big-value", f)
            t_put = time.monotonic() - t0
            h = hashlib.sha256()
            t0 = time.monotonic()
            stream = kv.get_stream(b"big-value")
            assert stream is not None
            with open(dst, "wb") as out:
                for chunk in stream:
                    out.write(chunk)
                    h.update(chunk)
            t_get = time.monotonic() - t0
        peak = sampler.stop()
    finally:
        cluster.stop()
    if h.hexdigest() != digest:
        raise SystemExit("the value read back differs from the value written")
    return {
        "size_mib": size_mib, "version": version,
        "put_s": round(t_put, 2), "put_mib_s": round(size_mib / t_put, 1),
        "get_s": round(t_get, 2), "get_mib_s": round(size_mib / t_get, 1),
        "baseline_rss_anon_mib": {n: round(b["RssAnon"] / 1024, 1) for n, b in baseline.items()},
        "peak_rss_anon_mib": {n: round(p["RssAnon"] / 1024, 1) for n, p in peak.items()},
        "peak_rss_file_mib": {n: round(p["RssFile"] / 1024, 1) for n, p in peak.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--dir", default=None, help="work directory (default: a temporary one)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        result = run(args.size_mib, Path(d))
    if args.json:
        print(json.dumps(result))
        return
    print(f"value {result['size_mib']} MiB: put {result['put_s']} s ({result['put_mib_s']} MiB/s), "
          f"get {result['get_s']} s ({result['get_mib_s']} MiB/s); read back identical")
    print(f"{'process':10} {'RssAnon idle':>13} {'RssAnon peak':>13} {'RssFile peak':>13}")
    for name in result["peak_rss_anon_mib"]:
        print(f"{name:10} {result['baseline_rss_anon_mib'][name]:>10} MiB {result['peak_rss_anon_mib'][name]:>9} MiB"
              f" {result['peak_rss_file_mib'][name]:>9} MiB")


if __name__ == "__main__":
    main()
