"""The attacks of issue 12, each tried with a raw ZeroMQ socket against a broker with CURVE keys
(``Cluster(keys=True)``: ``--keys``, workers and clients with their credentials), and refused.

Each test also shows that it can see the attack succeed: the same socket, given a registered key
(or pointed at a broker without keys), gets through. An attacker knows the broker's public key
(it is public); only a registered key pair gets a connection.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import zmq
from zmq.utils.monitor import recv_monitor_message

from client import AsyncClient, Client, Forbidden, NoReply, NotEnoughReplicas
from protocol import curve
from protocol.frames import C_REQUEST, MDPC, MDPW, MMI_SERVICE, SERVICE, W_ACK, W_DISCONNECT, W_READY, pack
from tests.support.cluster import ZKV, Cluster, free_port, wait_for

pytestmark = pytest.mark.timeout(120)

SILENCE = 2.0  # s a refused socket is watched for anything at all


def _socket(kind: int, url: str, keys: curve.Credentials | None, subscribe: bool = False) -> zmq.Socket:
    sock = zmq.Context.instance().socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    if keys is not None:
        keys.apply(sock)
    if subscribe:
        sock.setsockopt(zmq.SUBSCRIBE, b"")
    sock.connect(url)
    return sock


def _stranger(cluster: Cluster, kind: str = curve.CLIENT) -> curve.Credentials:
    """A key pair nobody registered, with the broker's (public) key: what an attacker can have."""
    public, secret = zmq.curve_keypair()
    broker = curve.load_directory(cluster.key_dir).public
    return curve.Credentials("stranger", kind, public, secret, broker)


def _creds(path: Path) -> curve.Credentials:
    return curve.load_credentials(path)


def _handshake(url: str, keys: curve.Credentials | None, kind: int = zmq.DEALER) -> str:
    """What becomes of a connection to ``url``: "accepted", "refused" (ZAP said no) or "failed"."""
    sock = zmq.Context.instance().socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    if keys is not None:
        keys.apply(sock)
    monitor = sock.get_monitor_socket()
    try:
        sock.connect(url)
        deadline = time.monotonic() + SILENCE
        while (left := deadline - time.monotonic()) > 0:
            if not monitor.poll(int(left * 1000) + 1):
                continue
            event = recv_monitor_message(monitor)["event"]
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                return "accepted"
            if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                return "refused"
            if event in (zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL):
                return "failed"
        return "nothing"
    finally:
        sock.disable_monitor()
        monitor.close(linger=0)
        sock.close(linger=0)


def _ask(url: str, keys: curve.Credentials | None, frames: list[bytes], wait: float = SILENCE) -> list[bytes] | None:
    """Send ``frames`` on a fresh DEALER; the first reply, or None within ``wait`` s."""
    sock = _socket(zmq.DEALER, url, keys)
    try:
        sock.send_multipart(frames)
        return sock.recv_multipart() if sock.poll(int(wait * 1000)) else None
    finally:
        sock.close(linger=0)


def _get(key: bytes) -> list[bytes]:
    return [MDPC, C_REQUEST, SERVICE, pack({"op": "get", "id": 1, "key": key})]


def _ready(wid: str) -> list[bytes]:
    return [MDPW, W_READY, SERVICE, pack({"id": wid, "data_id": b"forged-data-id-0", "process": b"p" * 16,
                                          "positions": []})]


def _broker_log(cluster: Cluster) -> str:
    return cluster.procs["broker"].log_tail(400)


@pytest.fixture
def secured(cluster_factory: Any) -> Cluster:
    return cluster_factory(keys=True).start()


# -- clients ---------------------------------------------------------------------------------------


def test_a_client_without_a_registered_key_gets_nothing_and_the_broker_lives(secured: Cluster,
                                                                           cluster_factory: Any) -> None:
    secured.client().put(b"secret", b"value")
    # Before: a broker without keys answers anyone.
    open_cluster = cluster_factory().start()
    assert _ask(open_cluster.frontend, None, _get(b"x")) is not None
    # After: no keys at all, or a key pair nobody registered: no connection, no answer.
    assert _handshake(secured.frontend, None) == "failed"
    assert _handshake(secured.frontend, _stranger(secured)) == "refused"
    assert _ask(secured.frontend, None, _get(b"secret")) is None
    assert _ask(secured.frontend, _stranger(secured), _get(b"secret")) is None
    assert _ask(secured.frontend, _stranger(secured), [MDPC, C_REQUEST, MMI_SERVICE, SERVICE]) is None
    # The library and the CLI say so (the CLI at once, in one line).
    with pytest.raises(NoReply), Client(secured.frontend, timeout=1.0, attempt_timeout=0.5) as c:
        c.get(b"secret")
    env = {k: v for k, v in secured.env.items() if k != curve.CREDENTIALS_ENV}
    r = subprocess.run([*ZKV, "get", "--url", secured.frontend, "secret"], capture_output=True, env=env, timeout=30)
    assert r.returncode == 7 and b"refused a client without credentials" in r.stderr, r.stderr
    # The broker lives and serves its registered clients.
    assert secured.procs["broker"].running
    assert secured.client().get(b"secret") == b"value"
    assert "connection_refused_unknown_key" in _broker_log(secured)


def test_roles_read_write_admin(secured: Cluster) -> None:
    reader = secured.client(credentials=secured.add_client_key("reader", "read"))
    writer = secured.client(credentials=secured.add_client_key("writer", "write"))
    admin = secured.client()
    writer.put(b"k", b"v1")
    assert reader.get(b"k") == b"v1" and reader.exists(b"k") and reader.mget([b"k"]) == [b"v1"]
    assert [i.key for i in reader.scan(b"")] == [b"k"]
    reader.status()
    with pytest.raises(Forbidden, match="put needs role write; this client's key has role read"):
        reader.put(b"k", b"v2")
    with pytest.raises(Forbidden):
        reader.delete(b"k")
    with pytest.raises(Forbidden, match="mmi.admin needs role admin; this client's key has role write"):
        writer.admin("rebalance")
    for cmd in ("drain", "undrain", "remove"):
        with pytest.raises(Forbidden):
            writer.admin(cmd, "w1")
    assert admin.admin("rebalance")["ok"]
    assert admin.get(b"k") == b"v1"  # nothing the refused requests asked for happened
    assert not any(w["draining"] for w in admin.status()["workers"])
    r = secured.zkv("drain", "--url", secured.frontend, "--credentials",
                    str(secured.key_dir / "clients" / "writer.key"), "w1")
    assert r.returncode == 7 and b"FORBIDDEN: mmi.admin needs role admin" in r.stderr, r.stderr


def test_a_revoked_client_is_refused_from_its_next_request_after_sighup(secured: Cluster) -> None:
    path = secured.add_client_key("bob", "write")
    bob_keys = _creds(path)  # revoking deletes the file: keep what bob holds
    bob = secured.client(credentials=bob_keys, timeout=3.0, attempt_timeout=1.0)
    bob.put(b"bob", b"1")
    assert secured.zkv("keys", "revoke", str(secured.key_dir), "bob").returncode == 0
    bob.put(b"bob", b"2")  # not reloaded yet: still registered as far as the broker knows
    secured.procs["broker"].signal(signal.SIGHUP)
    wait_for(lambda: "keys_reloaded" in _broker_log(secured), 10, 0.1, "the broker rereading its keys")
    with pytest.raises(Forbidden, match="not registered"):
        bob.put(b"bob", b"3")  # on its open connection
    assert _handshake(secured.frontend, bob_keys) == "refused"  # and no new one
    assert secured.client().get(b"bob") == b"2"
    # The admin command does the same as SIGHUP.
    carol_keys = _creds(secured.add_client_key("carol", "read"))
    carol = secured.client(credentials=carol_keys)
    assert carol.get(b"bob") == b"2"
    secured.zkv("keys", "revoke", str(secured.key_dir), "carol")
    r = secured.zkv("reload-keys", "--url", secured.frontend)
    assert r.returncode == 0 and b"keys reloaded" in r.stdout, r.stderr
    with pytest.raises(Forbidden):
        carol.get(b"bob")


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_client_whose_handshake_is_refused_on_reconnect_gets_an_error_not_a_hang(secured: Cluster,
                                                                                   kind: str) -> None:
    """A connected client is revoked and the broker restarts: its reconnection is refused at the
    CURVE handshake, and libzmq then drops the DEALER's queue, so a send on it would block for
    ever. The request must end within the client's timeout, with an error."""
    path = secured.add_client_key("dave", "write")
    dave_keys = _creds(path)
    holder: dict[str, Any] = {}

    def run() -> None:
        try:
            if kind == "sync":
                c = secured.client(credentials=dave_keys, timeout=3.0, attempt_timeout=1.0)
                c.put(b"dave", b"1")
                holder["ready"].set()
                holder["go"].wait(60)
                c.put(b"dave", b"2")
            else:
                async def main() -> None:
                    async with AsyncClient(secured.frontend, credentials=dave_keys, timeout=3.0,
                                           attempt_timeout=1.0) as c:
                        await c.put(b"dave", b"1")
                        holder["ready"].set()
                        await asyncio.get_running_loop().run_in_executor(None, holder["go"].wait, 60)
                        await c.put(b"dave", b"2")

                asyncio.run(main())
            holder["result"] = "written"
        except Exception as e:  # noqa: BLE001 - the outcome is what the test checks
            holder["result"] = e

    holder["ready"], holder["go"] = threading.Event(), threading.Event()
    t = threading.Thread(target=run, daemon=True)
    t.start()
    assert holder["ready"].wait(30), holder
    assert secured.zkv("keys", "revoke", str(secured.key_dir), "dave").returncode == 0
    broker = secured.procs["broker"]
    broker.signal(signal.SIGTERM)
    assert broker.popen is not None and broker.popen.wait(15) == 0
    secured.start_broker()
    secured.wait_ready(30)
    time.sleep(1.0)  # the client's socket reconnects and is refused meanwhile
    began = time.monotonic()
    holder["go"].set()
    t.join(20)
    assert not t.is_alive(), "the request hung on a connection refused at the handshake"
    assert isinstance(holder["result"], NoReply), holder["result"]
    assert time.monotonic() - began < 10


# -- workers ---------------------------------------------------------------------------------------


def test_a_subscriber_without_a_worker_key_receives_nothing(secured: Cluster) -> None:
    anonymous = _socket(zmq.SUB, secured.replication, None, subscribe=True)
    stranger = _socket(zmq.SUB, secured.replication, _stranger(secured, curve.WORKER), subscribe=True)
    w1 = _socket(zmq.SUB, secured.replication, _creds(secured.worker_credentials("w1")), subscribe=True)
    client_key = _socket(zmq.SUB, secured.replication, _creds(secured.credentials), subscribe=True)  # admin's
    try:
        time.sleep(0.5)  # let the subscriptions that can be made be made
        c = secured.client()
        for i in range(50):
            c.put(b"k%d" % i, b"secret-value")
        # Before (what a registered worker's key sees): the stream, in clear to its holder.
        assert w1.poll(5000), "a registered worker key should receive the replication stream"
        for sock in (anonymous, stranger, client_key):
            assert not sock.poll(500), "an unregistered subscriber received replication data"
    finally:
        for sock in (anonymous, stranger, w1, client_key):
            sock.close(linger=0)
    assert _handshake(secured.replication, _stranger(secured, curve.WORKER), zmq.SUB) == "refused"
    assert _handshake(secured.replication, _creds(secured.worker_credentials("w2")), zmq.SUB) == "accepted"


def test_a_worker_with_an_unregistered_key_cannot_join(secured: Cluster, tmp_path: Path) -> None:
    # Credentials made in a copy of the key directory: the right broker key, but a worker key the
    # broker never registered.
    copy = tmp_path / "copy"
    shutil.copytree(secured.key_dir, copy)
    forged = curve.add(copy, curve.WORKER, "w4")
    secured.start_worker("w4", extra=["--credentials", str(forged)])
    assert _ask(secured.backend, None, _ready("w5")) is None  # and a raw READY without keys
    assert _ask(secured.backend, _stranger(secured, curve.WORKER), _ready("w6")) is None
    time.sleep(2.0)
    assert [w["id"] for w in secured.status()["workers"]] == ["w1", "w2", "w3"]
    secured.procs["w4"].kill()
    # Registered, the same worker joins: the refusal above was the key's.
    secured.start_worker("w4", data=secured.root / "w4-registered", name="w4-registered")
    wait_for(lambda: "w4" in secured.alive_workers(), 20, 0.1, "w4 registered and alive")


def test_a_ready_for_w1_from_w2s_key_is_refused(secured: Cluster) -> None:
    secured.procs["w1"].kill()
    secured.wait_worker_state("w1", "dead")
    w2_keys = _creds(secured.worker_credentials("w2"))
    reply = _ask(secured.backend, w2_keys, _ready("w1"), wait=5.0)
    assert reply == [MDPW, W_DISCONNECT]
    assert "worker_id_not_its_key_refused" in _broker_log(secured)
    time.sleep(1.0)
    states = {w["id"]: w["state"] for w in secured.status()["workers"]}
    assert states == {"w1": "dead", "w2": "alive", "w3": "alive"}
    # The worker CLI refuses such credentials before it starts.
    r = secured.zkv("worker", "--id", "w1", "--data", str(secured.root / "x"), "--broker", secured.backend,
                    "--credentials", str(secured.worker_credentials("w2")))
    assert r.returncode == 1 and b"not of worker 'w1'" in r.stderr, r.stderr
    # Its own key: w1 is back.
    secured.start_worker("w1")
    secured.wait_worker_state("w1", "alive")


def test_a_forged_ack_from_an_unregistered_peer_never_counts(secured: Cluster) -> None:
    for w in ("w2", "w3"):
        secured.procs[w].kill()
        secured.wait_worker_state(w, "dead")
    stranger = _stranger(secured, curve.WORKER)
    assert _handshake(secured.backend, stranger) == "refused"  # it cannot even connect
    forger = _socket(zmq.DEALER, secured.backend, stranger)
    try:
        forger.send_multipart(_ready("w2"))
        for seq in range(1, 50):
            forger.send_multipart([MDPW, W_ACK, pack({"pos": [[s, 1, seq] for s in range(secured.slots)]})])
        with pytest.raises(NotEnoughReplicas):  # W=2 and one real replica: no acknowledged write
            secured.client().put(b"k", b"v")
        assert not forger.poll(200)
    finally:
        forger.close(linger=0)


def test_a_revoked_worker_is_dropped_and_cannot_come_back(secured: Cluster) -> None:
    assert secured.zkv("keys", "revoke", str(secured.key_dir), "w3").returncode == 0
    secured.procs["broker"].signal(signal.SIGHUP)
    secured.wait_worker_state("w3", "dead")  # at its next message (a heartbeat)
    time.sleep(1.5)
    assert secured.alive_workers() == {"w1", "w2"}
    assert "worker_key_revoked" in _broker_log(secured)


# -- protected mode --------------------------------------------------------------------------------


def test_without_keys_the_broker_will_not_listen_beyond_loopback(tmp_path: Path) -> None:
    public = f"tcp://0.0.0.0:{free_port()}"
    local = [f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"]
    args = [*ZKV, "broker", "--data", str(tmp_path / "b"), "--frontend", public, "--backend", local[0],
            "--replication", local[1]]
    r = subprocess.run(args, capture_output=True, timeout=30)
    lines = r.stderr.decode().strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1, r.stderr
    assert lines[0].startswith(f"Error: refusing to listen on {public} (frontend) without --keys")
    assert "--insecure" in lines[0]
    assert not (tmp_path / "b").exists()  # nothing was started
    r = subprocess.run([*args[:-4], "--frontend", local[0], "--backend", "tcp://*:0"], capture_output=True, timeout=30)
    assert r.returncode == 1 and b"refusing to listen on tcp://*:0 (backend)" in r.stderr, r.stderr
    # --insecure and --keys pass the check: this one then fails to bind an address this machine
    # does not have (so that the test listens on no interface but loopback).
    elsewhere = f"tcp://192.0.2.1:{free_port()}"  # TEST-NET-1: on no machine
    keys = tmp_path / "keys"
    curve.init(keys)
    for extra in (["--insecure"], ["--keys", str(keys)]):
        r = subprocess.run([*args[:-4], "--frontend", elsewhere, "--backend", local[0], "--replication", local[1],
                            *extra], capture_output=True, timeout=30)
        assert r.returncode == 1 and f"cannot listen on {elsewhere} (frontend)".encode() in r.stderr, r.stderr
