"""The bare relay: how fast can Python + ZeroMQ move a request and its reply on this machine?

    python bench/relay.py [--seconds 5] [--window 200] [--workers 1] [--payload 100] [--json]

Three kinds of processes on loopback, each its own Python interpreter:

- a proxy: ``zmq.proxy(ROUTER frontend, DEALER backend)``; libzmq moves every message, no Python
  code runs per message (the GIL is released inside ``zmq_proxy``);
- ``--workers`` echo workers: one DEALER each, connected to the backend; per message one
  ``recv_multipart`` and one ``send_multipart`` of the same frames (the envelope stays intact);
- one client process: one DEALER connected to the frontend that keeps ``--window`` requests in
  flight, matches replies to requests by an 8-byte id and records each latency.

The client loop has the shape of ``zkv bench``'s (client/cli/bench_load.py ``Pipeline.run``: one process,
one DEALER, fill the window, ``poll``, drain with ``recv_multipart(NOBLOCK)``, a dict of send
times); it sends ``[id, payload]`` (``--payload`` bytes, 100 by default) where ``zkv bench`` sends
``[MDPC02, 0x01, "kv", msgpack header]`` and unpacks a msgpack reply header. So the relay is the
floor of "one Python client, one hop through a broker, one Python server", without any key-value
work, msgpack, or routing decisions in Python.

The run counts replies received during ``--seconds`` after ``--warmup`` seconds (default 0.5);
latency is from sending a request to receiving its reply, in the client, as in ``zkv bench``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from array import array
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
REPO = HERE.parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def percentile(sorted_values: list[int], q: float) -> int:
    """Nearest-rank percentile, as in client/cli/bench_plan.py."""
    if not sorted_values:
        return 0
    rank = max(1, -(-len(sorted_values) * q // 100))
    return sorted_values[int(rank) - 1]


# ---------------------------------------------------------------------------------------------
# The three roles (each runs in its own process)


def role_proxy(frontend: str, backend: str) -> None:
    import zmq

    ctx = zmq.Context()
    front = ctx.socket(zmq.ROUTER)
    back = ctx.socket(zmq.DEALER)
    for s in (front, back):
        s.setsockopt(zmq.SNDHWM, 100_000)
        s.setsockopt(zmq.RCVHWM, 100_000)
        s.setsockopt(zmq.LINGER, 0)
    front.bind(frontend)
    back.bind(backend)
    try:
        zmq.proxy(front, back)
    except (KeyboardInterrupt, zmq.ContextTerminated):
        pass


def role_echo(backend: str) -> None:
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.SNDHWM, 100_000)
    sock.setsockopt(zmq.RCVHWM, 100_000)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(backend)
    recv, send = sock.recv_multipart, sock.send_multipart
    try:
        while True:
            send(recv())
    except KeyboardInterrupt:
        pass


def role_client(frontend: str, seconds: float, window: int, payload: int, warmup: float) -> dict[str, Any]:
    """Keep ``window`` requests in flight for ``warmup + seconds``; figures of the last ``seconds``."""
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, max(1000, 2 * window))
    sock.setsockopt(zmq.RCVHWM, max(1000, 2 * window))
    sock.connect(frontend)
    body = os.urandom(payload)
    # Wait until a request goes round (the proxy and a worker are up).
    deadline = time.monotonic() + 20
    while True:
        sock.send_multipart([b"\x00" * 8, body])
        if sock.poll(500):
            sock.recv_multipart()
            break
        if time.monotonic() > deadline:
            raise RuntimeError("the relay did not answer within 20 s")
    while sock.poll(200):  # drop late answers to the probes
        sock.recv_multipart()

    now_ns = time.perf_counter_ns
    inflight: dict[bytes, int] = {}
    latencies = array("q")
    next_id = 1
    done = 0
    t_start = now_ns()
    t_measure = t_start + int(warmup * 1e9)
    t_end = t_measure + int(seconds * 1e9)
    measuring = False
    while True:
        while len(inflight) < window:
            rid = next_id.to_bytes(8, "little")
            next_id += 1
            sock.send_multipart([rid, body])
            inflight[rid] = now_ns()
        if sock.poll(50):
            while True:
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                t1 = now_ns()
                t0 = inflight.pop(frames[0], None)
                if t0 is None or len(frames) != 2 or len(frames[1]) != payload:
                    continue
                if measuring:
                    latencies.append((t1 - t0) // 1000)
                    done += 1
        t = now_ns()
        if not measuring and t >= t_measure:
            measuring = True
            t_measure = t
        elif measuring and t >= t_end:
            break
    elapsed = (now_ns() - t_measure) / 1e9
    sock.close(linger=0)
    ctx.term()
    lat = sorted(latencies)
    ms = 1000.0
    return {
        "replies": done,
        "seconds": round(elapsed, 4),
        "ops_per_sec": round(done / elapsed, 1) if elapsed > 0 else 0.0,
        "p50_ms": round(percentile(lat, 50) / ms, 3),
        "p99_ms": round(percentile(lat, 99) / ms, 3),
        "max_ms": round(lat[-1] / ms, 3) if lat else 0.0,
        "window": window,
        "payload": payload,
    }


# ---------------------------------------------------------------------------------------------
# The whole measurement


def _spawn(args: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, str(HERE), *args], cwd=REPO, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    for p in procs:
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def run_relay(seconds: float = 5.0, window: int = 200, workers: int = 1, payload: int = 100,
              warmup: float = 0.5) -> dict[str, Any]:
    """Start the proxy and the echo workers, run the client process, stop everything.

    Returns the client's figures (``ops_per_sec``, ``p50_ms``, ``p99_ms``, ``max_ms``, ...) plus
    ``workers``."""
    frontend = f"tcp://127.0.0.1:{free_port()}"
    backend = f"tcp://127.0.0.1:{free_port()}"
    procs = [_spawn(["proxy", "--frontend", frontend, "--backend", backend])]
    try:
        procs += [_spawn(["echo", "--backend", backend]) for _ in range(workers)]
        client = _spawn(["client", "--frontend", frontend, "--seconds", str(seconds), "--window", str(window),
                         "--payload", str(payload), "--warmup", str(warmup)])
        procs.append(client)
        out, err = client.communicate(timeout=seconds + warmup + 60)
        if client.returncode != 0:
            raise RuntimeError(f"relay client failed ({client.returncode}): {err.decode(errors='replace')}")
        result: dict[str, Any] = json.loads(out)
        result["workers"] = workers
        return result
    finally:
        _stop(procs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("role", nargs="?", default="run", choices=["run", "proxy", "echo", "client"])
    parser.add_argument("--frontend")
    parser.add_argument("--backend")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=0.5)
    parser.add_argument("--window", type=int, default=200, help="requests in flight")
    parser.add_argument("--workers", type=int, default=1, help="echo worker processes")
    parser.add_argument("--payload", type=int, default=100, help="request and reply payload, bytes")
    parser.add_argument("--json", action="store_true")
    opts = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    if opts.role == "proxy":
        role_proxy(opts.frontend, opts.backend)
    elif opts.role == "echo":
        role_echo(opts.backend)
    elif opts.role == "client":
        print(json.dumps(role_client(opts.frontend, opts.seconds, opts.window, opts.payload, opts.warmup)))
    else:
        r = run_relay(opts.seconds, opts.window, opts.workers, opts.payload, opts.warmup)
        if opts.json:
            print(json.dumps(r))
        else:
            print(f"relay: {r['ops_per_sec']:,.0f} req/s  p50 {r['p50_ms']:.3f} ms  p99 {r['p99_ms']:.3f} ms  "
                  f"max {r['max_ms']:.3f} ms  (window {r['window']}, {r['workers']} echo worker(s), "
                  f"{r['payload']} B payload, {r['seconds']:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
