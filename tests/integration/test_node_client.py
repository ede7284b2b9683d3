"""Drive a real cluster from Node.js with a client written from docs/protocol.md alone.

The JavaScript client lives in tests/integration/node/ (client.mjs and package.json: npm packages ``zeromq`` v6
and ``@msgpack/msgpack``). The test installs them with npm into a folder of its own, runs the
script's scenario against the cluster, checks the JSON it prints, and cross-checks the data with
the Python client in both directions. Over CURVE (docs/protocol.md §1.12) the same client connects
with a credentials file (ZKV_CREDENTIALS), each role is refused what it may not do, and a client
without keys gets no connection.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from protocol import curve
from protocol.curve import CREDENTIALS_ENV
from tests.support.cluster import Cluster, free_port
from tests.support.requirements import missing
from tests.support.standby import FakeBroker

NODE_DIR = Path(__file__).parent / "node"
NPM_INSTALL_TIMEOUT = 240  # s
SCENARIO_TIMEOUT = 120  # s


@pytest.fixture(scope="module")
def node_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Node client copied into a folder of its own, with ``npm install`` run there (once for the
    module). Requested before ``cluster``, so a machine without Node skips before any process starts."""
    workdir = tmp_path_factory.mktemp("node")
    npm, node = shutil.which("npm"), shutil.which("node")
    if npm is None or node is None:
        missing(f"Node.js is not installed (node: {node}, npm: {npm}); the Node client test needs both")
    workdir.mkdir(parents=True, exist_ok=True)
    for name in ("package.json", "client.mjs"):
        shutil.copy2(NODE_DIR / name, workdir / name)
    env = {**os.environ, "npm_config_update_notifier": "false", "npm_config_fund": "false",
           "npm_config_audit": "false"}
    try:
        done = subprocess.run([npm, "install", "--no-audit", "--no-fund", "--loglevel=error"], cwd=workdir,
                              env=env, capture_output=True, text=True, timeout=NPM_INSTALL_TIMEOUT)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"npm install did not finish in {NPM_INSTALL_TIMEOUT}s (no network?): {e.stderr}")
    if done.returncode != 0:
        # No network is a failure, not a skip: the test must run where it is claimed to run.
        pytest.fail(f"npm install failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    for pkg in ("zeromq", "@msgpack/msgpack"):
        assert (workdir / "node_modules" / pkg / "package.json").exists(), f"{pkg} not installed"
    return workdir


def run_node(node_dir: Path, args: list[str], credentials: Path | None) -> dict:
    """Run ``node client.mjs ARGS`` with ZKV_CREDENTIALS set to ``credentials`` (or unset); the JSON
    object it printed last."""
    env = {k: v for k, v in os.environ.items() if k != CREDENTIALS_ENV}
    if credentials is not None:
        env[CREDENTIALS_ENV] = str(credentials)
    try:
        run = subprocess.run([shutil.which("node") or "node", "client.mjs", *args], cwd=node_dir, env=env,
                             capture_output=True, text=True, timeout=SCENARIO_TIMEOUT)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"the Node scenario did not finish in {SCENARIO_TIMEOUT}s: {e.stdout} {e.stderr}")
    assert run.returncode == 0, f"node failed ({run.returncode}):\n{run.stdout}\n{run.stderr}"
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.timeout(300)
def test_node_client_follows_the_protocol_doc(node_dir: Path, cluster: Cluster) -> None:
    check_protocol_scenario(node_dir, cluster, cluster.credentials)


@pytest.mark.timeout(300)
def test_node_client_over_curve(node_dir: Path, cluster_factory) -> None:  # type: ignore[no-untyped-def]
    cluster = cluster_factory(keys=True).start()
    # The whole scenario with a write client's credentials file, as a user would connect.
    check_protocol_scenario(node_dir, cluster, cluster.add_client_key("node-writer", "write"))

    cluster.client().put(b"node-roles/readable", b"for every role")
    readable = b"for every role".hex()
    roles = ["--roles", cluster.frontend, "node-roles"]
    reader = run_node(node_dir, roles, cluster.add_client_key("node-reader", "read"))
    assert reader["role"] == "read"
    assert reader["get"] == {"ok": True, "result": readable}
    assert reader["put"]["ok"] is False and reader["put"]["code"] == "FORBIDDEN"
    assert "write" in reader["put"]["message"], reader["put"]  # names the role needed
    assert reader["mmi_admin"]["ok"] is False and reader["mmi_admin"]["code"] == "FORBIDDEN"

    writer = run_node(node_dir, roles, cluster.add_client_key("node-w2", "write"))
    assert writer["get"] == {"ok": True, "result": readable}
    assert writer["put"]["ok"] is True
    assert writer["mmi_admin"]["ok"] is False and writer["mmi_admin"]["code"] == "FORBIDDEN"
    assert "admin" in writer["mmi_admin"]["message"], writer["mmi_admin"]

    # No credentials: the handshake fails, so nothing is answered, not even a refusal.
    stranger = run_node(node_dir, roles, None)
    assert stranger["role"] is None
    assert stranger["get"]["ok"] is False and stranger["get"]["code"] == "TIMEOUT"
    assert stranger["put"]["ok"] is False and stranger["put"]["code"] == "TIMEOUT"
    assert stranger["mmi_admin"] is None

    # A key pair the broker does not know, with the right broker key: refused at the handshake too.
    forged = cluster.root / "forged.key"
    other = curve.init(cluster.root / "other-keys")  # an admin of another cluster
    assert cluster.credentials is not None
    theirs, ours = (curve.load_credentials(p).broker_public.decode() for p in (other, cluster.credentials))
    forged.write_text(other.read_text().replace(theirs, ours))
    impostor = run_node(node_dir, roles, forged)
    assert impostor["role"] == "admin"
    assert impostor["get"]["code"] == "TIMEOUT" and impostor["put"]["code"] == "TIMEOUT"
    assert impostor["mmi_admin"] is None

    py = cluster.client()
    assert py.get(b"node-roles/by-read") is None  # the refused write changed nothing
    assert py.get(b"node-roles/by-write") is not None
    assert py.get(b"node-roles/by-admin") is None


def check_protocol_scenario(node_dir: Path, cluster: Cluster, credentials: Path | None) -> None:
    """The whole protocol scenario from Node, connecting with ``credentials`` (None: in clear)."""
    # Written by Python, read by Node.
    py = cluster.client()
    py_key = b"node-test/from-python/\x00\xff"
    py_value = bytes(range(256))[::-1] + b"\x00python"
    py_version = py.put(py_key, py_value)
    py_streamed = hashlib.sha256(b"from python").digest() * 40_000  # 1.28 MB in 5 chunks
    py.put_stream(b"node-test/py-streamed", io.BytesIO(py_streamed), chunk_size=256 * 1024)

    prefix = "node-test"
    out = run_node(node_dir, [cluster.frontend, prefix, py_key.hex()], credentials)

    # MMI
    assert out["mmi_service"] == "200"
    assert out["status"] == {"formed": True, "slots": cluster.slots, "alive": 3}

    # put / get / miss / delete
    assert out["text"]["found"] is True
    assert out["text"]["value"] == "hello from node"
    assert out["text"]["version"] == out["text"]["put_version"] >= 1
    assert out["miss"] == {"value": None, "exists": False}
    assert out["exists_before"] is True
    assert out["deleted"] is True
    assert out["after_delete"] == {"value": None, "exists": False, "deleted_again": False}

    # binary values, an empty value, a 1 MiB value, mset/mget with a miss, TTL
    assert out["binary"]["roundtrip"] is True
    assert out["empty"]["found"] is True and out["empty"]["length"] == 0
    assert out["big"]["length"] == 1 << 20 and out["big"]["got_sha256"] == out["big"]["sha256"]
    assert out["mset_count"] == 5
    assert out["mget"] == [bytes([0, 0, 255]).hex(), None, *(bytes([i, 0, 255 - i]).hex() for i in range(1, 5))]
    assert out["scan"] == [[f"{prefix}/m{i}", bytes([i, 0, 255 - i]).hex()] for i in range(5)]
    assert out["ttl"] == {"first": "short-lived", "later": None, "exists": False}

    # exactly-once: the resent first write got its original answer and did not overwrite "second"
    retry = out["retry"]
    assert retry["retry_version"] == retry["first_version"] < retry["second_version"]
    assert retry["value"] == "second"
    cas = out["cas"]
    assert cas["again"] == {"code": "CONDITION_FAILED", "version": cas["v1"]}
    assert cas["v2"] > cas["v1"]
    assert cas["stale"] == {"code": "CONDITION_FAILED", "version": cas["v2"]}
    assert cas["value"] == "v3"

    # streamed values, both ways, and a compare-and-set on one
    st = out["streamed"]
    assert st["got_sha256"] == st["sha256"] and st["got_version"] == st["version"] and st["chunks"] == 7
    assert st["cas"] == {"code": "CONDITION_FAILED", "version": st["version"]}
    assert st["python_sha256"] == hashlib.sha256(py_streamed).hexdigest() and st["python_chunks"] == 5
    node_streamed = py.get_stream(st["key"])
    assert node_streamed is not None and node_streamed.version == st["version"]
    assert hashlib.sha256(node_streamed.read()).hexdigest() == st["sha256"]

    # error replies
    errors = out["errors"]
    assert errors["empty_key"]["code"] == "BAD_REQUEST"
    assert errors["unknown_op"]["code"] == "UNKNOWN_COMMAND"
    assert errors["key_too_large"]["code"] == "KEY_TOO_LARGE"
    assert errors["missing_value"]["code"] == "BAD_REQUEST"
    assert errors["bad_ttl"]["code"] == "BAD_REQUEST"
    assert errors["string_cid"] == {"code": "BAD_REQUEST", "id": 999}
    assert errors["not_msgpack"] == {"code": "BAD_REQUEST", "id": None, "ok": False}
    assert errors["bad_framing"] == {"code": "BAD_REQUEST", "id": None, "ok": False}
    assert errors["unknown_service"] == {"code": "BAD_REQUEST", "id": None}
    assert out["after_errors"] is True

    # Python -> Node
    assert out["python_value"] == py_value.hex()
    assert out["python_version"] == py_version

    # Node -> Python
    bin_key, bin_value = bytes.fromhex(out["binary"]["key"]), bytes.fromhex(out["binary"]["value"])
    assert py.get_versioned(bin_key) == (bin_value, out["binary"]["version"])
    assert py.get(out["empty"]["key"]) == b""
    big = py.get(out["big"]["key"])
    assert big is not None and hashlib.sha256(big).hexdigest() == out["big"]["sha256"]
    assert py.mget([f"{prefix}/m{i}" for i in range(5)]) == [bytes([i, 0, 255 - i]) for i in range(5)]
    assert py.get(f"{prefix}/text") is None
    assert py.get(f"{prefix}/ttl") is None
    assert py.get(f"{prefix}/retry") == b"second"
    assert py.get(f"{prefix}/bad-ttl") is None  # refused requests touch nothing


@pytest.mark.timeout(180)
def test_node_client_follows_the_leader_through_a_list(node_dir: Path, cluster: Cluster) -> None:
    """Given several brokers (docs/protocol.md "Several brokers"), the Node client follows a
    standby's NOT_LEADER to the leader it names, and leaves a URL where nothing listens within
    about a second."""
    standby = FakeBroker(cluster.frontend)
    try:
        out = run_node(node_dir, ["--several", f"{standby.url},{cluster.frontend}", "node-several"],
                       cluster.credentials)
    finally:
        standby.close()
    assert out["value"] == "through the list" and out["served_by"] == cluster.frontend
    assert [h["op"] for h in standby.got] == ["put"]  # refused once, then the leader for good
    assert cluster.client().get_versioned(b"node-several/several") == (b"through the list", out["version"])

    dead = f"tcp://127.0.0.1:{free_port()}"
    out = run_node(node_dir, ["--several", f"{dead},{cluster.frontend}", "node-dead"], cluster.credentials)
    assert out["value"] == "through the list" and out["served_by"] == cluster.frontend
    assert out["put_ms"] < 3000, out  # about FAILOVER_WAIT, not the 6 s attempt timeout
