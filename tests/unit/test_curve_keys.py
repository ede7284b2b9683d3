"""The key directory (protocol/curve.py): what ``zkv keys`` writes, with which modes, what the
broker reads from it, and the protected-mode address check (broker/cli.py)."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
import zmq.auth

from protocol import curve
from protocol.sockets import loopback


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_init_makes_the_broker_pair_and_an_admin_client(tmp_path: Path) -> None:
    d = tmp_path / "keys"
    admin = curve.init(d)
    assert admin == d / "clients" / "admin.key"
    assert _mode(d / curve.BROKER_SECRET) == 0o600 and _mode(admin) == 0o600 and _mode(d) == 0o700
    keys = curve.load_directory(d)
    creds = curve.load_credentials(admin)
    assert creds.broker_public == keys.public and creds.kind == "client" and creds.role == "admin"
    assert keys.clients[creds.public].role == "admin" and not keys.workers
    # Standard ZeroMQ certificates: zmq.auth reads them.
    assert zmq.auth.load_certificate(admin) == (creds.public, creds.secret)
    assert zmq.auth.load_certificate(d / curve.BROKER_SECRET) == (keys.public, keys.secret)
    assert zmq.auth.load_certificate(d / curve.BROKER_KEY) == (keys.public, None)
    with pytest.raises(curve.KeysError, match="already holds a broker key"):
        curve.init(d)
    assert curve.load_directory(d).public == keys.public  # unchanged


def test_add_and_revoke(tmp_path: Path) -> None:
    d = tmp_path / "keys"
    curve.init(d)
    w1 = curve.add(d, curve.WORKER, "w1")
    reader = curve.add(d, curve.CLIENT, "reader", "read")
    assert _mode(w1) == 0o600 and _mode(reader) == 0o600
    keys = curve.load_directory(d)
    w1c, rc = curve.load_credentials(w1), curve.load_credentials(reader)
    assert keys.workers[w1c.public].name == "w1" and keys.clients[rc.public].role == "read"
    assert w1c.broker_public == keys.public and w1c.kind == "worker" and w1c.name == "w1"
    # The public side holds no secret (the broker's machine needs only it and broker.key_secret).
    for p in (d / "public").rglob("*.key"):
        assert "secret-key" not in p.read_text()
    # A name is used once, by one worker or one client.
    for kind, name in ((curve.WORKER, "w1"), (curve.CLIENT, "w1"), (curve.WORKER, "reader")):
        with pytest.raises(curve.KeysError, match="registered already"):
            curve.add(d, kind, name, "read")
    assert [(p.kind, p.name, p.role) for p in curve.listing(d)] == [
        ("worker", "w1", ""), ("client", "admin", "admin"), ("client", "reader", "read")]
    assert len(curve.revoke(d, "reader")) == 2 and not reader.exists()
    assert rc.public not in curve.load_directory(d).clients
    assert curve.revoke(d, "reader") == []
    curve.add(d, curve.CLIENT, "reader", "write")  # the name is free again, with a new key
    assert curve.load_credentials(reader).public != rc.public


@pytest.mark.parametrize("name", ["", "-x", "a/b", "../w1", "a b", "x" * 65, "é"])
def test_bad_names_are_refused(tmp_path: Path, name: str) -> None:
    curve.init(tmp_path)
    with pytest.raises(curve.KeysError, match="bad name"):
        curve.add(tmp_path, curve.WORKER, name)


def test_bad_roles_and_files(tmp_path: Path) -> None:
    with pytest.raises(curve.KeysError, match="zkv keys init"):
        curve.add(tmp_path / "none", curve.WORKER, "w1")
    curve.init(tmp_path)
    with pytest.raises(curve.KeysError, match="bad role"):
        curve.add(tmp_path, curve.CLIENT, "c", "root")
    with pytest.raises(curve.KeysError, match="cannot read"):
        curve.load_credentials(tmp_path / "missing.key")
    with pytest.raises(curve.KeysError, match="not a zkv credentials file"):
        curve.load_credentials(tmp_path / curve.BROKER_SECRET)
    bad = 'metadata\n    role = "read"\ncurve\n    public-key = "x"\n'
    (tmp_path / "public" / "clients" / "bad.key").write_text(bad)
    with pytest.raises(curve.KeysError, match="no valid public-key"):
        curve.load_directory(tmp_path)


def test_roles_include_the_ones_below() -> None:
    assert curve.role_includes("admin", "write") and curve.role_includes("write", "read")
    assert curve.role_includes("read", "read") and not curve.role_includes("read", "write")
    assert not curve.role_includes("write", "admin") and not curve.role_includes("", "read")


@pytest.mark.parametrize(("endpoint", "local"), [
    ("tcp://127.0.0.1:5000", True), ("tcp://127.9.9.9:5000", True), ("tcp://[::1]:5000", True),
    ("tcp://localhost:5000", True), ("ipc:///tmp/zkv.sock", True), ("inproc://x", True),
    ("tcp://0.0.0.0:5000", False), ("tcp://*:5000", False), ("tcp://[::]:5000", False),
    ("tcp://10.0.0.5:5000", False), ("tcp://eth0:5000", False), ("tcp://db.example.com:5000", False),
    ("udp://127.0.0.1:5000", False),
])
def test_protected_mode_knows_loopback(endpoint: str, local: bool) -> None:
    assert loopback(endpoint) is local
