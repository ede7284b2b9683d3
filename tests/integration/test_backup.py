"""``zkv backup`` under write load and ``zkv restore`` into a fresh cluster: every key written
before the backup and not touched during it comes back with its value and TTL; a key written
during it comes back with a value that was written, or not at all; streamed values too. A
damaged file is refused by its checksum; a cluster that holds keys is refused without --force."""

from __future__ import annotations

import io
import re
import threading
import time
from pathlib import Path

import pytest

from client import Client
from protocol.errors import ZkvError
from tests.support.cluster import Cluster

pytestmark = pytest.mark.timeout(180)

BIG = bytes(range(256)) * 12288  # 3 MiB: a streamed value of three chunks


class Overwriter(threading.Thread):
    """Writes ``hot:<i>`` (existing keys) and ``new:<n>`` (fresh ones) until stopped; remembers
    every value it tried to write per key, acknowledged or not."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.tried: dict[bytes, set[bytes]] = {}
        self.stopping = threading.Event()
        self.writes = 0
        self.crashed: BaseException | None = None

    def run(self) -> None:
        try:
            with Client(self.url, timeout=10.0) as c:
                n = 0
                while not self.stopping.is_set():
                    n += 1
                    key = b"hot:%d" % (n % 20) if n % 2 else b"new:%d" % n
                    value = b"during-%d" % n
                    self.tried.setdefault(key, set()).add(value)
                    try:
                        c.put(key, value)
                        self.writes += 1
                    except ZkvError:
                        pass  # its outcome is unknown: either value is allowed
        except BaseException as e:  # noqa: BLE001 - reported by the test
            self.crashed = e


def test_backup_under_load_and_restore(cluster_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    src: Cluster = cluster_factory(slots=64).start()
    c = src.client()
    before = {b"pre:%d" % i: b"value-%d" % i for i in range(400)}
    c.mset(list(before.items()))
    ttl_keys = {b"ttl:%d" % i: b"t%d" % i for i in range(20)}
    for k, v in ttl_keys.items():
        c.put(k, v, ttl=600_000)
    c.put(b"gone", b"x", ttl=1)  # expired before the backup: not in it
    c.put_stream(b"big", io.BytesIO(BIG), chunk_size=1 << 20)
    for i in range(20):
        c.put(b"hot:%d" % i, b"before-%d" % i)
    time.sleep(0.01)

    backup = tmp_path / "cluster.zkvb"
    w = Overwriter(src.frontend)
    w.start()
    try:
        time.sleep(0.3)
        writes_at_start = w.writes
        r = src.zkv("backup", "--url", src.frontend, str(backup), timeout=120)
        writes_during = w.writes - writes_at_start
    finally:
        w.stopping.set()
        w.join(15)
    assert w.crashed is None
    out = r.stdout.decode()
    assert r.returncode == 0, out + r.stderr.decode()
    assert writes_during > 10, "the backup should have run under write load"
    m = re.search(r"64 slots, (\d+) keys \(1 streamed\), (\d+) value bytes, (\d+) bytes in [\d.]+ s; "
                  r"sha256 ([0-9a-f]{64})", out)
    assert m is not None, out
    assert int(m[3]) == backup.stat().st_size
    assert not backup.with_name(backup.name + ".partial").exists()

    dst: Cluster = cluster_factory(slots=16, workers=3).start()  # another slot count: restore uses plain writes
    r = dst.zkv("restore", "--url", dst.frontend, str(backup), timeout=120)
    assert r.returncode == 0, r.stdout.decode() + r.stderr.decode()
    assert f"restored {backup}: {m[1]} keys (1 streamed)" in r.stdout.decode()

    d = dst.client()
    restored = {item.key: item.value for item in d.scan()}
    assert len(restored) == int(m[1])
    for k, v in {**before, **ttl_keys}.items():  # written before, not touched during
        assert restored.get(k) == v, k
    assert b"gone" not in restored
    assert restored[b"big"] == BIG
    for i in range(20):  # existed before and written during: one of the values it had
        k = b"hot:%d" % i
        assert restored[k] in {b"before-%d" % i} | w.tried.get(k, set()), k
    for k in restored:
        if k.startswith(b"new:"):
            assert restored[k] in w.tried[k]
    hot = {b"hot:%d" % i for i in range(20)}
    assert set(restored) <= set(before) | set(ttl_keys) | hot | set(w.tried) | {b"big"}
    # TTLs: absolute, so what is left is at most what the source gave, less the time since
    for k in ttl_keys:
        left = d.ttl(k)
        assert left is not None and 500_000 < left <= 600_000, (k, left)
    assert d.ttl(b"pre:1") is None

    # A cluster that holds keys is refused; --force restores anyway.
    r = dst.zkv("restore", "--url", dst.frontend, str(backup))
    assert r.returncode == 1 and b"not empty" in r.stderr, r.stderr
    r = dst.zkv("restore", "--url", dst.frontend, "--force", str(backup), timeout=120)
    assert r.returncode == 0, r.stderr

    # One flipped byte in the middle: refused by the checksum, nothing restored.
    data = bytearray(backup.read_bytes())
    data[len(data) // 2] ^= 0x01
    bad = tmp_path / "bad.zkvb"
    bad.write_bytes(bytes(data))
    empty: Cluster = cluster_factory(slots=16, workers=3).start()
    r = empty.zkv("restore", "--url", empty.frontend, str(bad))
    assert r.returncode == 1 and b"checksum mismatch" in r.stderr, r.stderr
    assert empty.client().scan_page(limit=1).items == []
