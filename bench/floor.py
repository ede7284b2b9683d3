"""The physical floor on this machine: what the disk, LMDB and libzmq (through pyzmq) can do with
no zkv code at all, to set beside zkv's figures (docs/benchmarks.md, "The limits").

    python bench/floor.py [--seconds 2] [--json]

Each figure is the best of three runs of ``--seconds`` each, in this process or in two:

- ``fsync``: fsynced LMDB commits per second, one 1 KiB put each, in an environment opened as a
  worker opens its own (``sync=True, metasync=True, writemap=False``), in a directory next to the
  repository's (the disk the benchmarks' clusters use);
- ``lmdb_batch_N``: puts per second in fsynced transactions of N puts (256-byte keys, 100-byte
  values, as the MSET loads), with ``put`` one at a time; ``lmdb_putmulti_1000`` the same with
  ``cursor.putmulti`` (sorted keys), the cheapest way py-lmdb writes;
- ``zmq_msgs``: single-frame 100-byte messages per second from a PUSH to a PULL in another process
  over loopback TCP (one ``send`` and one ``recv`` of Python per message: the floor of one
  Python-level socket message, which zkv pays several times per request);
- ``zmq_multipart``: the same with four-frame messages (``send_multipart``/``recv_multipart``, as
  zkv's client requests: MDP header, command, service, body);
- ``lmdb_get_1000``: gets per second of existing keys, 1,000 per read transaction (an MGET's
  share on one replica);
- ``zmq_roundtrips``: request/reply round trips per second between a DEALER that keeps 200 in
  flight and an echo DEALER in another process: one Python hop, no broker (bench/relay.py adds a
  ``zmq.proxy`` between them);
- ``zmq_frames_in_1000``: frames per second in messages of 1,000 100-byte frames (a 1,000-key
  MGET's reply has one frame per value).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import lmdb
import zmq

REPO = Path(__file__).resolve().parent.parent
KEY_BYTES, VALUE_BYTES = 256, 100
BATCHES = (1, 10, 100, 1000)


def best_of(runs: int, fn: Callable[[], float]) -> float:
    return max(fn() for _ in range(runs))


def open_env(path: Path) -> lmdb.Environment:
    """As a worker opens its own (worker/tables.py): every commit fsynced."""
    return lmdb.open(str(path), map_size=8 << 30, max_dbs=2, sync=True, metasync=True, writemap=False)


def write_batches(env: lmdb.Environment, seconds: float, per_txn: int, value: bytes,
                  putmulti: bool = False) -> int:
    """Write transactions of ``per_txn`` new keys for ``seconds``; the number of keys written."""
    n = 0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        items = [(b"key:%0252d" % (n + i), value) for i in range(per_txn)]
        with env.begin(write=True) as txn:
            if putmulti:
                txn.cursor().putmulti(items)
            else:
                for k, v in items:
                    txn.put(k, v)
        n += per_txn
    return n


def lmdb_rate(root: Path, seconds: float, per_txn: int, value: bytes, putmulti: bool = False) -> float:
    """Puts per second in fsynced transactions of ``per_txn`` puts, in a new environment."""
    path = Path(tempfile.mkdtemp(dir=root))
    env = open_env(path)
    try:
        t0 = time.perf_counter()
        n = write_batches(env, seconds, per_txn, value, putmulti)
        return n / (time.perf_counter() - t0)
    finally:
        env.close()
        shutil.rmtree(path, ignore_errors=True)


def lmdb_get_rate(root: Path, seconds: float, keys: int = 20_000, per_txn: int = 1000) -> float:
    """Gets per second of existing keys in read transactions of ``per_txn`` (MGET's one replica)."""
    path = Path(tempfile.mkdtemp(dir=root))
    env = open_env(path)
    try:
        with env.begin(write=True) as txn:
            txn.cursor().putmulti([(b"key:%0252d" % i, b"v" * VALUE_BYTES) for i in range(keys)])
        batch = [b"key:%0252d" % ((i * 7919) % keys) for i in range(per_txn)]
        n = 0
        t0 = time.perf_counter()
        deadline = t0 + seconds
        while time.perf_counter() < deadline:
            with env.begin() as txn:
                get = txn.get
                for k in batch:
                    if get(k) is None:
                        raise RuntimeError("a key written is missing")
            n += per_txn
        return n / (time.perf_counter() - t0)
    finally:
        env.close()
        shutil.rmtree(path, ignore_errors=True)


def _sink(endpoint: str, kind: int, ready: mp.Event) -> None:  # type: ignore[valid-type]
    """The other process: PULL and count (returns when the sender says stop), or ROUTER and echo."""
    ctx = zmq.Context()
    s = ctx.socket(kind)
    s.linger = 0
    s.connect(endpoint)
    ready.set()
    if kind == zmq.PULL:
        while s.recv_multipart() != [b"stop"]:
            pass
    else:  # DEALER echoing another DEALER's requests
        while True:
            frames = s.recv_multipart()
            if frames[-1] == b"stop":
                break
            s.send_multipart(frames)
    s.close()
    ctx.term()


@contextmanager
def peer(here: int, there: int) -> Iterator[zmq.Socket]:
    """A socket of kind ``here`` bound on loopback, and a process with a socket of kind ``there``
    connected to it (``_sink``). On leaving, "stop" is sent and the process must end cleanly: it
    has taken every message before it."""
    ctx = zmq.Context()
    s = ctx.socket(here)
    s.linger = 0
    port = s.bind_to_random_port("tcp://127.0.0.1")
    ready = mp.Event()
    p = mp.Process(target=_sink, args=(f"tcp://127.0.0.1:{port}", there, ready), daemon=True)
    p.start()
    ready.wait(10)
    try:
        yield s
        s.send_multipart([b"stop"])
        p.join(30)
        if p.exitcode != 0:
            raise RuntimeError(f"the other process did not finish cleanly ({p.exitcode})")
    finally:
        s.close()
        ctx.term()
        if p.is_alive():
            p.kill()


def zmq_push_rate(seconds: float, frames: int, frame_bytes: int = 0) -> float:
    """Messages of ``frames`` frames per second, PUSH here to PULL there; each frame
    ``frame_bytes`` long (0: 100 bytes in all). Timed until the receiver has taken them all."""
    msg = [b"x" * (frame_bytes or 100 // frames)] * frames
    per_loop = 1000 if frames < 100 else 10
    n = 0
    with peer(zmq.PUSH, zmq.PULL) as s:
        send = s.send_multipart if frames > 1 else None
        t0 = time.perf_counter()
        deadline = t0 + seconds
        while time.perf_counter() < deadline:
            for _ in range(per_loop):
                if send is None:
                    s.send(msg[0])
                else:
                    send(msg)
            n += per_loop
    return n / (time.perf_counter() - t0)


def zmq_roundtrip_rate(seconds: float, window: int = 200) -> float:
    """Request/reply round trips per second, ``window`` in flight, to an echo in another process
    (DEALER to DEALER: no envelope, so only the sockets' and Python's cost per message)."""
    msg = [b"x" * 100]
    with peer(zmq.DEALER, zmq.DEALER) as s:
        for _ in range(window):
            s.send_multipart(msg)
        n = 0
        t0 = time.perf_counter()
        deadline = t0 + seconds
        while time.perf_counter() < deadline:
            for _ in range(1000):
                s.recv_multipart()
                s.send_multipart(msg)
            n += 1000
        rate = n / (time.perf_counter() - t0)
    return rate


def measure(seconds: float, root: Path) -> dict[str, float]:
    value_1k, value = b"v" * 1024, b"v" * VALUE_BYTES
    out = {"fsync": best_of(3, lambda: lmdb_rate(root, seconds, 1, value_1k))}
    for n in BATCHES:
        out[f"lmdb_batch_{n}"] = best_of(3, lambda n=n: lmdb_rate(root, seconds, n, value))
    out["lmdb_putmulti_1000"] = best_of(3, lambda: lmdb_rate(root, seconds, 1000, value, putmulti=True))
    out["zmq_msgs"] = best_of(3, lambda: zmq_push_rate(seconds, 1))
    out["zmq_multipart"] = best_of(3, lambda: zmq_push_rate(seconds, 4))
    out["lmdb_get_1000"] = best_of(3, lambda: lmdb_get_rate(root, seconds))
    out["zmq_roundtrips"] = best_of(3, lambda: zmq_roundtrip_rate(seconds))
    # One message of 1,000 100-byte frames, as a 1,000-key MGET's reply is today: frames per second.
    out["zmq_frames_in_1000"] = best_of(3, lambda: zmq_push_rate(seconds, 1000, 100)) * 1000
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--json", action="store_true")
    opts = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="zkv-floor-", dir=REPO.parent))
    try:
        out = measure(opts.seconds, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if opts.json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            print(f"{k:<20} {v:>12,.0f} /s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
