"""The broker core's authorization, sans I/O: the role the server passes with each client message,
and the worker id a worker's key is registered for (broker/roles.py, core.on_client / on_worker)."""

from __future__ import annotations

from typing import Any

import pytest

from protocol.frames import (
    C_REQUEST,
    MDPC,
    MDPW,
    MMI_ADMIN,
    MMI_SERVICE,
    MMI_STATUS,
    SERVICE,
    W_HEARTBEAT,
    W_READY,
    pack,
    unpack,
)
from tests.support.sim import SimCluster

pytestmark = pytest.mark.timeout(60)

READS: list[tuple[str, dict[str, Any], list[bytes]]] = [
    ("get", {"key": b"k"}, []), ("exists", {"key": b"k"}, []), ("mget", {"keys": [b"k"]}, []),
    ("ttl", {"key": b"k"}, []),
]
WRITES: list[tuple[str, dict[str, Any], list[bytes]]] = [
    ("put", {"key": b"k"}, [b"v"]), ("delete", {"key": b"k"}, []), ("mset", {"keys": [b"k"]}, [b"v"]),
    ("expire", {"key": b"k", "ttl": 1000}, []),
]


def _kv(sim: SimCluster, op: str, fields: dict[str, Any], values: list[bytes], role: str | None) -> dict[str, Any]:
    sim.broker.on_client(b"c9", [MDPC, C_REQUEST, SERVICE, pack({"op": op, "id": 7, **fields}), *values], role=role)
    sim.settle()
    got = sim.reply(b"c9", 7)
    assert got is not None, op
    sim.replies.pop(b"c9", None)
    sim.reply_values.pop(b"c9", None)
    return got[0]


def _mmi(sim: SimCluster, service: bytes, body: bytes, role: str | None) -> bytes:
    sim.broker.on_client(b"c8", [MDPC, C_REQUEST, service, body], role=role)
    ready = sim.broker.ready()
    [(identity, frames)] = ready.client
    return frames[3]


def test_each_role_allows_its_requests_and_refuses_the_rest(sim: SimCluster) -> None:
    assert sim.put(b"k", b"v0")["ok"]
    for op, fields, values in READS:
        for role in ("read", "write", "admin", None):
            hdr = _kv(sim, op, fields, values, role)
            assert hdr["ok"] or hdr["code"] != "FORBIDDEN", (op, role, hdr)
        hdr = _kv(sim, op, fields, values, "")  # a revoked key
        assert hdr["code"] == "FORBIDDEN" and "not registered" in hdr["message"]
    for op, fields, values in WRITES:
        hdr = _kv(sim, op, fields, values, "read")
        assert hdr == {"id": 7, "ok": False, "code": "FORBIDDEN",
                       "message": f"{op} needs role write; this client's key has role read"}
        for role in ("write", "admin", None):
            assert _kv(sim, op, fields, values, role)["ok"], (op, role)


def test_a_refused_write_changes_nothing(sim: SimCluster) -> None:
    assert sim.put(b"k", b"v0")["ok"]
    sim.broker.on_client(b"c9", [MDPC, C_REQUEST, SERVICE, pack({"op": "put", "id": 1, "key": b"k"}), b"v1"],
                         role="read")
    ready = sim.broker.ready()
    assert not ready.replication and not ready.workers and not ready.metadata
    assert sim.get(b"k") == b"v0"


def test_admin_needs_the_admin_role(sim: SimCluster) -> None:
    body = pack({"cmd": "drain", "worker": "w1"})
    for role in ("read", "write", ""):
        answer = unpack(_mmi(sim, MMI_ADMIN, body, role))
        assert answer["ok"] is False and answer["code"] == "FORBIDDEN" and "needs role admin" in answer["message"]
    assert not sim.broker.workers["w1"].draining
    assert unpack(_mmi(sim, MMI_STATUS, b"", "read"))["formed"]
    assert _mmi(sim, MMI_SERVICE, SERVICE, "read") == b"200"
    assert _mmi(sim, MMI_SERVICE, SERVICE, "") == b"403"
    answer = unpack(_mmi(sim, MMI_ADMIN, pack({"cmd": "reload_keys"}), "admin"))
    assert answer == {"ok": False, "message": "this broker runs without a key directory (--keys)"}
    assert unpack(_mmi(sim, MMI_ADMIN, pack({"cmd": "undrain", "worker": "w1"}), "admin"))["ok"]


def test_a_worker_speaks_only_as_the_id_its_key_names(sim: SimCluster) -> None:
    info = {"id": "w9", "data_id": b"d" * 16, "process": b"p" * 16, "positions": []}
    sim.broker.on_worker(b"intruder", [MDPW, W_READY, SERVICE, pack(info)], key_name="w2")
    ready = sim.broker.ready()
    assert ready.workers == [(b"intruder", [MDPW, b"\x06"])] and not ready.metadata  # DISCONNECT only
    assert "w9" not in sim.broker.workers
    sim.broker.on_worker(b"w9-conn", [MDPW, W_READY, SERVICE, pack(info)], key_name="w9")
    assert sim.broker.workers["w9"].alive  # its own key
    # A registered worker whose key is revoked is dropped at its next message.
    sim.broker.ready()
    sim.broker.on_worker(b"w9-conn", [MDPW, W_HEARTBEAT], key_name="")
    assert not sim.broker.workers["w9"].alive
    assert sim.broker.ready().workers == [(b"w9-conn", [MDPW, b"\x06"])]
