"""The Node.js test client (tests/integration/node/client.mjs) against three active brokers (issue 15,
``--groups``): it routes by the slot map, as docs/protocol.md §1.14 says a client must.

One Node process runs two rounds of puts, gets, an MSET and an MGET across the groups and a scan in
small pages. Before the first, the map is unknown: one NOT_LEADER teaches it (the client fetches
mmi.slots), and from then on every request goes straight to its group's leader, which the test
checks against Python's ``slot_for_key`` and the brokers' own count of NOT_LEADER answers. Between
the rounds a broker is killed: the second round, on the old map, loses no more than a second on each
of the dead broker's groups, learns the new map from a NOT_LEADER naming a newer revision, and reads
everything back.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from client.slotmap import SlotMap, merge_scans
from protocol.replication import slot_for_key
from tests.integration.test_node_client import node_dir  # noqa: F401  (the npm-installed client: a fixture)
from tests.support.active import agreed_map, broker_status, wait_served
from tests.support.ha import EtcdCluster, HaCluster, stop

pytestmark = pytest.mark.timeout(120)

GROUPS = 6
SLOTS = 48
BROKERS = ["b1", "b2", "b3"]
KEYS = 24  # per round: enough to reach every group


@pytest.fixture
def active(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[HaCluster]:
    etcd = EtcdCluster(tmp_path / "etcd").start()
    cluster = HaCluster(tmp_path / "zkv", etcd=etcd, brokers=3, lease_ttl=3, slots=SLOTS,
                        broker_args=["--groups", str(GROUPS)])
    try:
        yield cluster
    finally:
        stop(cluster, etcd, request)


def frontend(cluster: HaCluster, name: str) -> str:
    return cluster.broker_endpoints[name][0]


def redirected(cluster: HaCluster, names: list[str]) -> int:
    """How many requests these brokers have answered NOT_LEADER."""
    return sum(broker_status(cluster, n)["redirected"] for n in names)


class NodeRun:
    """``node client.mjs --active ... --pause``: a round, a line on stdin, another round."""

    def __init__(self, workdir: Path, args: list[str]) -> None:
        self.proc = subprocess.Popen([shutil.which("node") or "node", "client.mjs", "--active", *args, "--pause"],
                                     cwd=workdir, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)

    def round(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # (the test's timeout bounds a Node client that hangs)
        if not line:
            self.proc.wait(5)
            pytest.fail(f"node failed ({self.proc.returncode}): {self.proc.stderr.read() if self.proc.stderr else ''}")
        return json.loads(line)

    def go_on(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(5)


def check_round(out: dict[str, Any], prefix: str, smap: SlotMap, py_values: list[bytes]) -> None:
    """Every answer right, and every single-key request answered by its group's leader on ``smap``
    (so the client's CRC-32 and groups are Python's)."""
    assert out["map"] == smap.record()
    keys = [f"{prefix}/k{i:02d}" for i in range(KEYS)]
    for i, (put, get) in enumerate(zip(out["puts"], out["gets"], strict=True)):
        leader = smap.leaders[slot_for_key(keys[i].encode(), SLOTS) % GROUPS]
        assert get["group"] == slot_for_key(keys[i].encode(), SLOTS) % GROUPS, get
        assert put["served_by"] == get["served_by"] == leader, (put, get)
        assert get["value"] == f"v{i}" and put["version"] >= 1, (put, get)
    # The keys reached every broker's groups: the requests spread over the three (two) brokers.
    assert {g["served_by"] for g in out["gets"]} == set(smap.leaders.values())
    assert set(out["served"]) == set(smap.leaders.values())
    # MSET and MGET split by group, the answers back in the keys' order (a miss, Python's keys too).
    assert out["mset_count"] == KEYS
    assert out["mget"] == [bytes([i, 0xFF, 0]).hex() for i in range(KEYS)] + [None] + [v.hex() for v in py_values]
    # The scan asked every group in pages of 5 and merged them in key order.
    expected = sorted([(k.encode(), f"v{i}".encode()) for i, k in enumerate(keys)]
                      + [(f"{k}/m".encode(), bytes([i, 0xFF, 0])) for i, k in enumerate(keys)])
    assert out["scan"] == [[k.decode(), v.hex()] for k, v in expected]


def test_node_client_routes_by_the_slot_map_of_active_brokers(node_dir: Path, active: HaCluster) -> None:  # noqa: F811
    cluster = active
    cluster.start_broker()
    for i in range(1, 4):
        cluster.start_worker(f"w{i}")
    wait_served(cluster, BROKERS, GROUPS)
    smap = agreed_map(cluster, BROKERS)
    assert len(set(smap.leaders.values())) == 3

    py_keys = [b"node-active/py%d" % i for i in range(6)]
    with cluster.client(timeout=20.0) as py:
        py.mset({k: b"from python " + k for k in py_keys})
    py_values = [b"from python " + k for k in py_keys]

    # The list starts with a broker that does not lead the first key's group: the first put is refused
    # once (NOT_LEADER), which is how the client learns the map; nothing is refused after that.
    first = slot_for_key(b"node-active/1/k00", SLOTS) % GROUPS
    order = sorted(BROKERS, key=lambda n: frontend(cluster, n) == smap.leaders[first])
    before = redirected(cluster, BROKERS)
    run = NodeRun(node_dir, [",".join(frontend(cluster, n) for n in order), "node-active", *(k.hex() for k in py_keys)])
    try:
        one = run.round()
        check_round(one, "node-active/1", smap, py_values)
        assert one["redirects"] == 1 == redirected(cluster, BROKERS) - before, one["redirects"]

        # b2 dies; its groups move to b1 and b3 (one each: wait_served waits for an even share).
        cluster.procs["b2"].kill()
        survivors = ["b1", "b3"]
        wait_served(cluster, survivors, GROUPS)
        urls = {frontend(cluster, n) for n in survivors}
        new_map = agreed_map(cluster, survivors, urls)
        assert new_map.revision > smap.revision
        before = redirected(cluster, survivors)
        began = time.monotonic()
        run.go_on()
        two = run.round()
        took = time.monotonic() - began
    finally:
        run.close()
    # The old map sent the dead broker's groups to b2: a silence (its link down: about a second each),
    # then the next broker, whose NOT_LEADER named a newer revision: the whole map fetched again.
    check_round(two, "node-active/2", new_map, py_values)
    assert 1 <= two["redirects"] <= 2, two["redirects"]
    assert two["redirects"] == redirected(cluster, survivors) - before
    assert took < 15, f"the second round took {took:.1f} s"

    with cluster.client(timeout=20.0) as py:  # Node's writes, read by Python
        for r in ("1", "2"):
            keys = [f"node-active/{r}/k{i:02d}/m".encode() for i in range(KEYS)]
            assert py.mget(keys) == [bytes([i, 0xFF, 0]) for i in range(KEYS)]


def random_page(rng: random.Random, limit: int) -> dict[str, Any]:
    """One group's scan page: sorted keys over a small alphabet (so groups interleave and share
    prefixes), at most ``limit``; ``more`` also on a short page (one cut by its bytes) and, rarely,
    on an empty one (which counts as complete)."""
    alphabet = b"ab\x00\xff"
    keys = sorted({bytes(rng.choice(alphabet) for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(0, 8))})
    keys = keys[:rng.randint(0, limit)]
    return {"keys": [k.hex() for k in keys], "versions": [rng.randint(1, 99) for _ in keys],
            "more": rng.random() < 0.6, "values": [rng.randbytes(rng.randint(0, 3)).hex() for _ in keys]}


@pytest.mark.timeout(60)
def test_node_slots_and_scan_merges_are_pythons(node_dir: Path) -> None:  # noqa: F811
    """The Node client's CRC-32 slots and merged scan pages are those of protocol/replication.py and
    client/slotmap.py, on random keys and pages: short pages with ``more`` too, which no cluster
    test makes (a page is cut short only past 8 MiB), where the bound of merge_pages matters."""
    rng = random.Random(15)
    keys = [rng.randbytes(rng.randint(1, 40)) for _ in range(300)] + [b"a", b"\xff" * 64, "ключ".encode()]
    slot_cases = [[k.hex(), rng.choice([1, 7, 48, 1024, 16384])] for k in keys]
    scans = []
    for _ in range(300):
        limit = rng.randint(1, 6)
        scans.append({"limit": limit, "parts": [random_page(rng, limit) for _ in range(rng.randint(1, 4))]})
    run = subprocess.run([shutil.which("node") or "node", "client.mjs", "--routing"], cwd=node_dir, text=True,
                         input=json.dumps({"slots": slot_cases, "scans": scans}), capture_output=True, timeout=30)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert out["slots"] == [slot_for_key(bytes.fromhex(k), n) for k, n in slot_cases]
    for case, got in zip(scans, out["scans"], strict=True):
        parts = [({"keys": [bytes.fromhex(k) for k in p["keys"]], "versions": p["versions"], "more": p["more"]},
                  [bytes.fromhex(v) for v in p["values"]]) for p in case["parts"]]
        header, values = merge_scans(parts, case["limit"])
        want = {"keys": [k.hex() for k in header["keys"]], "versions": header["versions"], "more": header["more"],
                "values": [v.hex() for v in values]}
        assert got == want, case
