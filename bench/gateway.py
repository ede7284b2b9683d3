"""The HTTP gateway beside the native client and beside nginx (issue 14's benchmark).

    python bench/gateway.py                    # about 2 minutes
    python bench/gateway.py --duration 20 --json gateway.json

One cluster (3 workers, 1024 slots, RF=3 W=2, fsync on every commit) and one ``zkv gateway`` in
a temporary directory, on loopback free ports. For GET and PUT of 100 B and 1 KiB values, in one
run and in this order:

* ``wrk`` (Debian's) against the gateway: ``-t 2 -c CONN -d DURATION --latency``; PUTs write
  distinct keys (a Lua counter per connection), GETs read 1,000 keys written first;
* ``zkv bench`` (the native Python client, the same concurrency) against the broker;
* ``wrk`` against nginx serving a static file of the same size: the ceiling of an HTTP front on
  this machine (nginx does nothing but send a file from the page cache).

Prints requests/s, p50 and p99 of each, and the gateway's ratio to the native client. Every
process is stopped and the directory removed at the end, on failure or on Ctrl-C.

``--profile`` also samples the gateway with py-spy during each of its wrk runs and prints where
its time goes (bench/hotspots.py's tables: inclusive and self shares of the sampled time).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hotspots import PY_SPY, summarize_collapsed, top_table  # noqa: E402

from client.client import Client  # noqa: E402
from tests.support.cluster import ZKV, Cluster, free_port  # noqa: E402

PUT_LUA = """
local body = string.rep("x", {size})
local n = 0
request = function()
  n = n + 1
  return wrk.format("PUT", "/v1/kv/wrk-" .. tostring(math.random(1, 1000000000)) .. "-" .. n, nil, body)
end
"""
GET_LUA = """
request = function()
  return wrk.format("GET", "/v1/kv/get-{size}-" .. tostring(math.random(0, 999)))
end
"""
STATIC_LUA = """
request = function()
  return wrk.format("GET", "/v{size}.bin")
end
"""


def wrk(url: str, script: str, conns: int, duration: int, root: Path) -> dict[str, Any]:
    lua = root / f"s{abs(hash(script))}.lua"
    lua.write_text(script)
    out = subprocess.run(["wrk", "-t", "2", "-c", str(conns), "-d", f"{duration}s", "--latency", "-s", str(lua), url],
                         capture_output=True, text=True, timeout=duration + 60)
    text = out.stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))  # type: ignore[union-attr]

    def pct(p: str) -> float:
        m = re.search(rf"^\s+{p}%\s+([\d.]+)(us|ms|s)\s*$", text, re.M)
        assert m, text
        return float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)]

    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    errors = re.search(r"Socket errors: (.*)", text)
    return {"rps": rps, "p50_ms": pct("50"), "p99_ms": pct("99"), "non2xx": int(non2xx.group(1)) if non2xx else 0,
            "socket_errors": errors.group(1) if errors else ""}


def native(frontend: str, op: str, size: int, conns: int, n: int) -> dict[str, Any]:
    out = subprocess.run([*ZKV, "bench", "--url", frontend, "-t", op, "-c", str(conns), "-n", str(n), "-d", str(size),
                          "-P", "1", "--json"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    row = json.loads(out.stdout)["ops"][op]
    return {"rps": row["ops_per_sec"], "p50_ms": row["p50_ms"], "p99_ms": row["p99_ms"], "errors": row["errors"]}


def nginx(root: Path, sizes: list[int]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    www = root / "www"
    www.mkdir()
    for size in sizes:
        (www / f"v{size}.bin").write_bytes(b"x" * size)
    conf = root / "nginx.conf"
    conf.write_text(f"""
worker_processes 1;
pid {root}/nginx.pid;
error_log {root}/nginx.err;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  client_body_temp_path {root}/b; proxy_temp_path {root}/p; fastcgi_temp_path {root}/f;
  uwsgi_temp_path {root}/u; scgi_temp_path {root}/s;
  server {{ listen 127.0.0.1:{port}; root {www}; }}
}}
""")
    p = subprocess.Popen(["nginx", "-c", str(conf), "-g", "daemon off;"])
    time.sleep(0.5)
    return p, f"http://127.0.0.1:{port}"


def profile(pid: int, seconds: int, out: Path) -> subprocess.Popen:
    """py-spy sampling ``pid`` for the next ``seconds`` (idle samples left out), collapsed stacks."""
    return subprocess.Popen([PY_SPY, "record", "-p", str(pid), "-d", str(seconds), "-r", "200", "-f", "raw",
                             "-o", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=int, default=10, help="s per wrk run")
    ap.add_argument("--conns", type=int, default=50)
    ap.add_argument("--native-n", type=int, default=20000, help="requests per zkv bench run")
    ap.add_argument("--json", default="")
    ap.add_argument("--profile", action="store_true", help="py-spy the gateway during its wrk runs")
    args = ap.parse_args()
    for tool in ("wrk", "nginx"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is not installed (Debian: apt-get install {tool})")
    root = Path(tempfile.mkdtemp(prefix="zkv-bench-gw-"))
    cluster = Cluster(root / "c", slots=1024, heartbeat=None, request_timeout=None)
    ngx: subprocess.Popen | None = None
    rows: list[dict[str, Any]] = []
    try:
        cluster.start(timeout=60)
        gw = cluster.start_gateway()
        ngx, static = nginx(root, [100, 1024])
        with Client(cluster.frontend) as c:
            for size in (100, 1024):
                c.mset([(b"get-%d-%d" % (size, i), b"v" * size) for i in range(1000)])
        for op in ("get", "put"):
            for size in (100, 1024):
                script = (GET_LUA if op == "get" else PUT_LUA).format(size=size)
                spy = profile(cluster.pids()["gateway"], args.duration, root / f"{op}-{size}.txt") \
                    if args.profile else None
                row = {"op": op, "size": size,
                       "gateway": wrk(gw, script, args.conns, args.duration, root),
                       "native": native(cluster.frontend, op, size, args.conns, args.native_n),
                       "nginx_static": wrk(static, STATIC_LUA.format(size=size), args.conns, args.duration, root)
                       if op == "get" else None}
                rows.append(row)
                g, n = row["gateway"], row["native"]
                line = (f"{op.upper()} {size:>5} B  gateway {g['rps']:>8,.0f} req/s p50 {g['p50_ms']:.2f} p99 "
                        f"{g['p99_ms']:.2f} ms (non-2xx {g['non2xx']})  native {n['rps']:>8,.0f} req/s p50 "
                        f"{n['p50_ms']:.2f} p99 {n['p99_ms']:.2f} ms  ratio {g['rps'] / n['rps']:.2f}")
                if row["nginx_static"]:
                    s = row["nginx_static"]
                    line += f"  nginx static {s['rps']:>8,.0f} req/s p99 {s['p99_ms']:.2f} ms"
                print(line, flush=True)
                if spy is not None:
                    spy.wait(args.duration + 60)
                    self_c, total_c, n = summarize_collapsed((root / f"{op}-{size}.txt").read_text())
                    busy = n / (200 * args.duration)  # samples of a busy thread: py-spy leaves idle ones out
                    inner = Counter({f: v for f, v in total_c.items() if v < 0.9 * n})  # not the loop's frames
                    print(f"gateway, {op.upper()} {size} B: {n} samples, busy {busy:.0%} of the run"
                          f"\ninclusive\n{top_table(inner, n, 20)}"
                          f"\nself\n{top_table(self_c, n, 12)}\n", flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=2))
    finally:
        if ngx is not None:
            ngx.terminate()
            ngx.wait(10)
        cluster.stop_all()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
