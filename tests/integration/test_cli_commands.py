"""The data commands of the `zkv` CLI against a real cluster (client/cli/data.py, multi.py, listing.py): CAS, versions,
exists / mget / mset / ttl / expire, binary-safe keys (escapes and --hex), values from stdin,
del --prefix, watch --since, --json everywhere, and `get -o` interrupted mid-way."""

from __future__ import annotations

import io
import json
import queue
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.support.cluster import Cluster, wait_for

pytestmark = pytest.mark.timeout(120)

MIB = 1 << 20


def _run(cluster: Cluster, *args: str, input: bytes | None = None) -> subprocess.CompletedProcess:
    return cluster.zkv(*args, "--url", cluster.frontend, input=input)


def _json_lines(r: subprocess.CompletedProcess) -> list[dict]:
    return [json.loads(line) for line in r.stdout.decode().splitlines()]


def test_compare_and_set_and_versions(cluster: Cluster) -> None:
    r = _run(cluster, "put", "--if-absent", "cas", "one", "--json")
    assert r.returncode == 0, r.stderr
    [put] = _json_lines(r)
    assert put["key"] == "cas" and put["version"] > 0
    r = _run(cluster, "get", "--version", "cas")
    assert r.returncode == 0 and int(r.stdout) == put["version"]
    # The condition fails: nothing written, exit code 6, the current version said.
    r = _run(cluster, "put", "--if-absent", "cas", "two")
    assert r.returncode == 6 and b"CONDITION_FAILED" in r.stderr and str(put["version"]).encode() in r.stderr, r
    r = _run(cluster, "put", "--if-version", str(put["version"] + 1000), "cas", "two")
    assert r.returncode == 6, r
    r = _run(cluster, "put", "--if-version", str(put["version"]), "cas", "two")
    assert r.returncode == 0, r.stderr
    v2 = int(r.stdout.decode().strip().split("=")[1])
    assert cluster.client().get_versioned(b"cas") == (b"two", v2)
    r = _run(cluster, "get", "cas", "--json")
    assert _json_lines(r) == [{"key": "cas", "found": True, "version": v2, "value": "two"}]
    r = _run(cluster, "del", "--if-version", str(put["version"]), "cas")
    assert r.returncode == 6 and cluster.client().get(b"cas") == b"two"
    r = _run(cluster, "del", "--if-version", str(v2), "cas", "--json")
    assert r.returncode == 0 and _json_lines(r) == [{"key": "cas", "deleted": True}]
    r = _run(cluster, "get", "cas", "--json")
    assert r.returncode == 3 and _json_lines(r) == [{"key": "cas", "found": False}]


def test_exists_mget_mset_ttl_expire(cluster: Cluster) -> None:
    r = _run(cluster, "mset", "m:a", "1", "m:b", "two words", "m:c", "3")
    assert r.returncode == 0 and r.stdout == b"OK\n", r
    assert _run(cluster, "mset", "m:a").returncode == 2  # not pairs
    r = _run(cluster, "exists", "m:a", "m:b")
    assert r.returncode == 0 and r.stdout == b"2\n"
    r = _run(cluster, "exists", "m:a", "m:zz", "--json")
    assert r.returncode == 3 and _json_lines(r) == [{"key": "m:a", "exists": True}, {"key": "m:zz", "exists": False}]
    r = _run(cluster, "mget", "m:b", "m:zz", "m:a")
    assert r.returncode == 0 and r.stdout.decode().splitlines() == ["m:b\ttwo words", "m:zz", "m:a\t1"]
    r = _run(cluster, "mget", "m:a", "m:zz", "--json")
    assert _json_lines(r) == [{"key": "m:a", "found": True, "value": "1"},
                              {"key": "m:zz", "found": False, "value": None}]
    r = _run(cluster, "ttl", "m:a")
    assert r.returncode == 0 and r.stdout == b"-1\n"
    r = _run(cluster, "expire", "m:a", "60000")
    assert r.returncode == 0 and r.stdout == b"OK\n"
    r = _run(cluster, "ttl", "m:a", "--json")
    [t] = _json_lines(r)
    assert 0 < t["ttl_ms"] <= 60000 and t["found"] is True
    r = _run(cluster, "expire", "--persist", "m:a", "--json")
    assert r.returncode == 0 and _json_lines(r) == [{"key": "m:a", "found": True}]
    assert _run(cluster, "ttl", "m:a").stdout == b"-1\n"
    assert _run(cluster, "ttl", "m:zz").returncode == 3
    assert _run(cluster, "expire", "m:zz", "100").returncode == 3
    assert _run(cluster, "expire", "m:a").returncode == 2  # neither TTL nor --persist
    r = _run(cluster, "put", "--ttl", "60000", "m:t", "v")
    assert r.returncode == 0 and 0 < int(_run(cluster, "ttl", "m:t").stdout) <= 60000
    r = _run(cluster, "del", "m:b", "m:c", "m:zz")
    assert r.returncode == 0 and r.stdout == b"deleted 2 keys\n"
    assert _run(cluster, "exists", "m:b").stdout == b"0\n"


def test_binary_keys_round_trip_through_escapes_and_hex(cluster: Cluster) -> None:
    c = cluster.client()
    nul, backslash, bad_utf8 = b"bin:a\x00b", b"bin:a\\x00b", b"bin:\xff\n"
    c.mset({nul: b"nul", backslash: b"backslash\\", bad_utf8: b"v\x00"})
    r = _run(cluster, "scan", "bin:")
    lines = r.stdout.decode().splitlines()
    assert lines == ["bin:a\\x00b\tnul", "bin:a\\\\x00b\tbackslash\\\\", "bin:\\xff\\n\tv\\x00"], lines
    # What scan printed is what get, del and the rest read.
    for shown, key in zip(["bin:\\xff\\n", "bin:a\\x00b", "bin:a\\\\x00b"], [bad_utf8, nul, backslash], strict=True):
        r = _run(cluster, "get", shown)
        assert r.returncode == 0 and r.stdout == c.get(key), (shown, r)
    r = _run(cluster, "scan", b"bin:".hex(), "--keys-only", "--hex", "--json")
    assert [d["key"] for d in _json_lines(r)] == [nul.hex(), backslash.hex(), bad_utf8.hex()]
    r = _run(cluster, "scan", b"bin:a".hex(), "--hex", "--keys-only")
    assert r.stdout.decode().splitlines() == [nul.hex(), backslash.hex()]
    r = _run(cluster, "put", "--hex", (b"hex:\x01\x02").hex(), "x")
    assert r.returncode == 0 and c.get(b"hex:\x01\x02") == b"x"
    r = _run(cluster, "get", "bin:a\\q")
    assert r.returncode == 2 and b"backslash" in r.stderr  # an escape that means nothing is refused
    assert _run(cluster, "get", "--hex", "zz").returncode == 2


def test_a_value_from_stdin_when_no_value_is_given(cluster: Cluster) -> None:
    small = bytes(range(256))
    r = _run(cluster, "put", "in:small", input=small)
    assert r.returncode == 0 and r.stdout.startswith(b"OK version="), r
    big = bytes(range(256)) * (12 * 4096)  # 12 MiB: streamed in chunks
    r = _run(cluster, "put", "in:big", "--json", input=big)
    assert r.returncode == 0, r.stderr
    c = cluster.client()
    assert c.get(b"in:small") == small and c.get(b"in:big") == big
    r = _run(cluster, "put", "in:x", "v", "--file", "-", input=b"y")
    assert r.returncode == 2  # VALUE and --file


def test_del_prefix_asks_first(cluster: Cluster) -> None:
    c = cluster.client()
    c.mset({b"dp:%d" % i: b"v" for i in range(25)} | {b"dq:keep": b"v"})
    r = _run(cluster, "del", "--prefix", "dp:", input=b"n\n")
    assert r.returncode == 1 and b"delete 25 keys" in r.stderr, r
    assert len(list(c.scan_keys(b"dp:"))) == 25
    r = _run(cluster, "del", "--prefix", "dp:", input=b"y\n")
    assert r.returncode == 0 and r.stdout.endswith(b"deleted 25 keys\n"), r
    assert list(c.scan_keys(b"dp:")) == [] and c.get(b"dq:keep") == b"v"
    c.mset({b"dp:%d" % i: b"v" for i in range(3)})
    r = _run(cluster, "del", "--prefix", "dp:", "--yes", "--json")
    assert r.returncode == 0 and sorted(d["key"] for d in _json_lines(r)) == ["dp:0", "dp:1", "dp:2"]
    assert _run(cluster, "del", "--prefix", "dp:", "--yes").returncode == 3  # nothing left
    assert _run(cluster, "del", "--prefix", "dp:", "dq:").returncode == 2  # one prefix only


class _Lines:
    """The stdout lines of a `zkv watch` process, as they come."""

    def __init__(self, cluster: Cluster, *args: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "client.cli", "watch", *args, "--url", cluster.frontend],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cluster.env)
        self.lines: queue.Queue[bytes] = queue.Queue()
        threading.Thread(target=lambda: [self.lines.put(line) for line in iter(self.proc.stdout.readline, b"")],  # type: ignore[union-attr]
                         daemon=True).start()

    def first(self, cluster: Cluster, probe: bytes) -> bytes:
        """Put ``probe`` until the watch prints it (until it is open, puts go unseen)."""
        c = cluster.client()

        def seen() -> bytes | None:
            c.put(probe, b"p")
            try:
                return self.lines.get(timeout=0.5)
            except queue.Empty:
                return None

        return wait_for(seen, 20, 0.0, "zkv watch to print a change")

    def stop(self) -> bytes:
        self.proc.send_signal(signal.SIGINT)
        _out, err = self.proc.communicate(timeout=10)
        assert self.proc.returncode == 0, err
        return err

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)


def test_watch_since_resumes_from_the_printed_cursor(cluster: Cluster) -> None:
    c = cluster.client()
    w = _Lines(cluster, "ws:", "--json")
    try:
        first = json.loads(w.first(cluster, b"ws:probe"))
        assert first["kind"] == "put" and first["key"] == "ws:probe" and first["value"] == "p"
        c.put(b"ws:a", b"1")
        while json.loads(w.lines.get(timeout=10))["key"] != "ws:a":
            pass
        err = w.stop()
    finally:
        w.kill()
    cursor = next(line.split()[1] for line in err.decode().splitlines() if line.startswith("cursor: "))
    c.put(b"ws:b", b"2")  # while nobody watches
    c.delete(b"ws:a")
    w = _Lines(cluster, "ws:", "--since", cursor)
    try:
        got = [w.lines.get(timeout=20).decode().rstrip("\n").split("\t") for _ in range(2)]
        # Only what happened since the cursor (ws:a's put is not repeated); in order per key only.
        assert sorted(g[:2] for g in got) == [["delete", "ws:a"], ["put", "ws:b"]], got
        w.stop()
    finally:
        w.kill()
    assert _run(cluster, "watch", "--since", "not-a-cursor").returncode == 2


def test_ctrl_c_during_get_to_a_file_leaves_no_partial_file(cluster: Cluster, tmp_path: Path) -> None:
    """`zkv get -o F` wrote F as it went: Ctrl-C left part of the value under the final name.
    Now it writes a temporary file beside F, renamed when complete; interrupted, it removes it
    and exits 130. The broker is paused once the download is under way, so the interrupt
    lands mid-way whatever the machine's speed."""
    data = bytes(range(256)) * (64 * 1024)  # 16 MiB in 1 MiB chunks
    cluster.client().put_stream(b"large", io.BytesIO(data), chunk_size=MIB)
    where = tmp_path / "downloads"  # tmp_path holds the cluster's directories too
    where.mkdir()
    dest = where / "out.bin"
    proc = subprocess.Popen([sys.executable, "-m", "client.cli", "get", "large", "-o", str(dest),
                             "--url", cluster.frontend, "--timeout", "60"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cluster.env)
    broker = cluster.procs["broker"]
    try:
        def partial() -> list[Path]:
            return [p for p in where.iterdir() if p.name.endswith(".part") and p.stat().st_size > 0]

        wait_for(partial, 30, 0.005, "the download to start")
        broker.signal(signal.SIGSTOP)
        assert not dest.exists()
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=20)
        assert proc.returncode == 130, err
    finally:
        broker.signal(signal.SIGCONT)
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    assert sorted(p.name for p in where.iterdir()) == [], "nothing left: no file, no temporary"
    # Uninterrupted, the file appears whole under its name.
    r = _run(cluster, "get", "large", "-o", str(dest), "--json")
    assert r.returncode == 0, r.stderr
    assert dest.read_bytes() == data and [p.name for p in where.iterdir()] == ["out.bin"]
    assert _json_lines(r)[0]["size"] == len(data)
