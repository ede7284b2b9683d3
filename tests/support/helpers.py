"""Small helpers shared by the integration tests: raw protocol frames, worker LMDB inspection,
a background writer, key pickers."""

from __future__ import annotations

import struct
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import lmdb
import zmq

from client import Client
from client.dealers import client_credentials
from protocol.errors import ZkvError
from protocol.frames import C_FINAL, C_REQUEST, MDPC, SERVICE, pack, unpack
from protocol.replication import slot_for_key
from tests.support.cluster import Cluster
from worker.records import decode_record

# -- raw frames -----------------------------------------------------------------------------------


class RawPeer:
    """A bare DEALER on the broker frontend: sends exactly the frames a test gives it (with the
    ZKV_CREDENTIALS keys when set, as in a ZKV_TEST_CURVE run). With ``slow``, it takes next to
    nothing off the wire until it calls ``recv`` (a receive queue of one message, a 4 KiB socket
    buffer): replies it does not read stay on the broker's side."""

    def __init__(self, url: str, slow: bool = False) -> None:
        self.ctx = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        if slow:
            self.sock.setsockopt(zmq.RCVHWM, 1)
            self.sock.setsockopt(zmq.RCVBUF, 4096)
        credentials = client_credentials(None)
        if credentials is not None:
            credentials.apply(self.sock)
        self.sock.connect(url)

    def close(self) -> None:
        self.sock.close(linger=0)

    def __enter__(self) -> RawPeer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, *frames: bytes) -> None:
        self.sock.send_multipart(list(frames))

    def recv(self, timeout: float = 5.0) -> list[bytes]:
        if not self.sock.poll(int(timeout * 1000)):
            raise AssertionError(f"no reply within {timeout}s")
        return self.sock.recv_multipart()

    def call(self, *frames: bytes, timeout: float = 5.0) -> list[bytes]:
        self.send(*frames)
        return self.recv(timeout)

    def kv(self, header: dict[str, Any], values: list[bytes] | None = None, timeout: float = 10.0
           ) -> tuple[dict[str, Any], list[bytes]]:
        """A well-framed kv request with ``header`` (packed here); returns (reply header, values)."""
        reply = self.call(MDPC, C_REQUEST, SERVICE, pack(header), *(values or []), timeout=timeout)
        assert reply[:3] == [MDPC, C_FINAL, SERVICE], reply[:3]
        return unpack(reply[3]), reply[4:]


def rss_anon(pid: int) -> int:
    """A process's anonymous resident memory (heap, libzmq's queues), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no RssAnon for pid {pid}")


def settled_rss(pid: int, quiet: float = 1.0, timeout: float = 30.0) -> int:
    """RssAnon once it has not grown (by more than 256 KiB) for ``quiet`` seconds: the process
    has taken in what it will (the broker has queued the replies it holds)."""
    last, since, deadline = rss_anon(pid), time.monotonic(), time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.2)
        now = rss_anon(pid)
        if now > last + (1 << 18):
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return now
    return rss_anon(pid)


def error_header(reply: list[bytes], service: bytes | None = SERVICE) -> dict[str, Any]:
    """Check ``reply`` is an MDP/0.2 FINAL error reply (of ``service`` unless None); return its header."""
    assert len(reply) >= 4, reply
    assert reply[0] == MDPC and reply[1] == C_FINAL, reply[:2]
    if service is not None:
        assert reply[2] == service, reply[2]
    hdr = unpack(reply[3])
    assert isinstance(hdr, dict), hdr
    assert hdr["ok"] is False, hdr
    assert isinstance(hdr.get("message"), str) and hdr["message"], hdr
    return hdr


# -- worker LMDB ----------------------------------------------------------------------------------


def worker_records(path: Path) -> dict[tuple[int, bytes], tuple[int, int, bytes]]:
    """Every record in a stopped worker's LMDB: (slot, user key) -> (version, expire_at, value)."""
    env = lmdb.open(str(path), readonly=True, lock=False, max_dbs=4, map_size=1 << 30)
    try:
        db = env.open_db(b"data", create=False)
        out = {}
        with env.begin(db=db) as txn:
            for sk, rec in txn.cursor():
                (slot,) = struct.unpack_from(">H", sk)
                r = decode_record(rec)
                out[(slot, r.long_key or bytes(sk[2:]))] = (r.version, r.expire_at, r.value)
        return out
    finally:
        env.close()


def worker_expiry_entries(path: Path) -> int:
    """Entries in a stopped worker's expiry index."""
    env = lmdb.open(str(path), readonly=True, lock=False, max_dbs=4, map_size=1 << 30)
    try:
        db = env.open_db(b"expiry", create=False)
        with env.begin() as txn:
            return txn.stat(db)["entries"]
    finally:
        env.close()


def copies(cluster: Cluster, wids: list[str]) -> tuple[Counter, dict[str, dict]]:
    """How many of the (stopped) workers hold each user key, and every worker's records."""
    count: Counter = Counter()
    per_worker = {}
    for wid in wids:
        recs = worker_records(cluster.worker_dir(wid))
        per_worker[wid] = recs
        for slot, key in recs:
            assert slot == slot_for_key(key, cluster.slots), f"{wid}: {key!r} stored under slot {slot}"
            count[key] += 1
    return count, per_worker


def terminate(cluster: Cluster, *names: str) -> None:
    """SIGTERM each named process and require exit code 0."""
    for name in names:
        rc = cluster.procs[name].terminate()
        assert rc == 0, f"{name} exited with {rc} after SIGTERM:\n{cluster.procs[name].log_tail()}"


def worker_keys(cluster: Cluster) -> dict[str, int]:
    return {w["id"]: w["keys"] for w in cluster.status()["workers"]}


def keys_in_slot(slot: int, slots: int, n: int, prefix: str = "k") -> list[bytes]:
    out: list[bytes] = []
    i = 0
    while len(out) < n:
        k = f"{prefix}{i}".encode()
        if slot_for_key(k, slots) == slot:
            out.append(k)
        i += 1
    return out


# -- a background writer --------------------------------------------------------------------------


class Writer(threading.Thread):
    """Puts fresh keys ``<prefix><n>`` one after another with its own Client until stopped.

    ``acked``: key -> (value, version) for every write the client saw acknowledged;
    ``failed``: (key, value, error) for every write that raised (outcome unknown or refused)."""

    def __init__(self, url: str, prefix: str, timeout: float = 15.0, attempt_timeout: float = 4.0) -> None:
        super().__init__(daemon=True)
        self.url, self.prefix = url, prefix
        self.timeout, self.attempt_timeout = timeout, attempt_timeout
        self.acked: dict[bytes, tuple[bytes, int]] = {}
        self.failed: list[tuple[bytes, bytes, ZkvError]] = []
        self.ack_times: list[float] = []
        self.stopping = threading.Event()
        self.crashed: BaseException | None = None

    def run(self) -> None:
        try:
            with Client(self.url, timeout=self.timeout, attempt_timeout=self.attempt_timeout) as c:
                n = 0
                while not self.stopping.is_set():
                    key = f"{self.prefix}{n:06d}".encode()
                    value = key * 8
                    try:
                        version = c.put(key, value)
                    except ZkvError as e:
                        self.failed.append((key, value, e))
                    else:
                        self.acked[key] = (value, version)
                        self.ack_times.append(time.monotonic())
                    n += 1
        except BaseException as e:  # noqa: BLE001 - reported by stop()
            self.crashed = e

    def acks_after(self, t: float) -> int:
        return sum(1 for x in list(self.ack_times) if x > t)

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=self.timeout + 5)
        assert not self.is_alive(), "writer thread did not stop"
        if self.crashed is not None:
            raise AssertionError(f"writer thread crashed: {self.crashed!r}")

    def __enter__(self) -> Writer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self.join(timeout=self.timeout + 5)


def worker_stream_entries(path: Path) -> tuple[int, int]:
    """(stored chunks, open streams) in a worker's LMDB; safe while the worker runs (a reader)."""
    env = lmdb.open(str(path), readonly=True, max_dbs=8, map_size=1 << 30)
    try:
        blobs = env.open_db(b"blobs", create=False)
        staged = env.open_db(b"staged", create=False)
        with env.begin() as txn:
            return txn.stat(blobs)["entries"], txn.stat(staged)["entries"]
    finally:
        env.close()
