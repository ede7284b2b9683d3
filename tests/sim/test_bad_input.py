"""Malformed messages the fuzzing of issue 12 found: each is refused (an error reply, or a
DISCONNECT for a worker) and nothing else changes; none can stop the broker."""

from __future__ import annotations

from typing import Any

import pytest

from protocol.frames import MDPW, SERVICE, W_ACK, W_EXPIRED, W_HEARTBEAT, W_NACK, W_READY, W_SNAPSHOT_PART, pack
from tests.support.sim import SimCluster

pytestmark = pytest.mark.timeout(60)


def _ready(info: dict[str, Any]) -> list[bytes]:
    return [MDPW, W_READY, SERVICE, pack(info)]


GOOD = {"id": "w9", "data_id": b"d" * 16, "process": b"p" * 16, "positions": []}


@pytest.mark.parametrize("info", [
    {**GOOD, "id": ""},  # crashed the broker: lmdb.BadValsizeError when the metadata was written
    {**GOOD, "id": "w" * 512},  # likewise (over LMDB's key size)
    {**GOOD, "id": 7},  # converted with str()
    {**GOOD, "id": "w\x001"},  # an id with NUL registered
    {**GOOD, "id": "w 1"},
    {**GOOD, "data_id": 30_000_000},  # bytes(30000000): 30 MB of metadata
    {**GOOD, "data_id": b""},
    {**GOOD, "process": 2**31},
    {**GOOD, "positions": [[0, "1", 2]]},
    {**GOOD, "positions": [[0, 1]]},
    {**GOOD, "positions": [[0, 1, -1]]},
    {**GOOD, "positions": [[0, True, 2]]},
    {**GOOD, "keys": "many"},
    {"data_id": b"d" * 16},  # no id
])
def test_a_malformed_ready_is_refused_and_registers_nothing(sim: SimCluster, info: dict[str, Any]) -> None:
    before = set(sim.broker.workers)
    sim.broker.on_worker(b"intruder", _ready(info))
    ready = sim.broker.ready()
    assert ready.workers == [(b"intruder", [MDPW, b"\x06"])]  # DISCONNECT, and nothing else
    assert not ready.metadata.workers and set(sim.broker.workers) == before
    assert sim.put(b"k", b"v")["ok"] and sim.get(b"k") == b"v"


@pytest.mark.parametrize(("cmd", "body"), [
    (W_ACK, [pack({"pos": [], "snap": 2**31})]),  # bytes(2**31): 2 GiB
    (W_ACK, [pack({"pos": [["1", "2", "3"]]})]),
    (W_ACK, [pack({"pos": [[0, 1, -1]]})]),
    (W_ACK, [pack({"pos": [[0, 1]]})]),
    # Each of these, if taken, would make the broker count w1 as holding nothing in slot 0.
    (W_ACK, [pack({"pos": [[0, True, 5]]})]),
    (W_ACK, [pack({"pos": [[0, 1, 2**63]]})]),
    (W_ACK, [pack({"pos": [[0, 1, 5.0]]})]),
    (W_ACK, [pack({"pos": [], "res": [[0, 1, 5]]})]),
    (W_ACK, [b"\xc1"]),
    (W_SNAPSHOT_PART, [pack({"token": 2**31, "part": 0})]),  # stalled the broker ~1 s per message
    (W_SNAPSHOT_PART, [pack({"token": b"t", "part": "0"})]),
    (W_EXPIRED, [pack({"keys": [[0, 2**31, 1, 1]]})]),
    (W_EXPIRED, [pack({"keys": "all"})]),
    (W_NACK, [pack({"slot": "0", "epoch": 1, "seq": 1})]),
    (W_HEARTBEAT, [pack({"keys": "x"})]),
    (W_HEARTBEAT, [pack([1, 2])]),
])
def test_a_malformed_worker_message_changes_nothing(sim: SimCluster, cmd: bytes, body: list[bytes]) -> None:
    w = sim.workers["w1"]
    keys_before = sim.broker.workers["w1"].keys
    applied_before = {s: dict(slot.applied) for s, slot in sim.broker.slots.items()}
    sim.broker.on_worker(w.identity, [MDPW, cmd, *body])
    assert sim.broker.workers["w1"].alive and sim.broker.workers["w1"].keys == keys_before
    assert {s: dict(slot.applied) for s, slot in sim.broker.slots.items()} == applied_before
    assert not sim.broker.replicas.transfers
    assert sim.put(b"k", b"v")["ok"] and sim.get(b"k") == b"v"


@pytest.mark.parametrize("if_absent", [0, 1, {}, "", []])
def test_if_absent_must_be_a_boolean(sim: SimCluster, if_absent: Any) -> None:
    assert sim.put(b"k", b"first")["ok"]
    hdr = sim.put(b"k", b"second", if_absent=if_absent)  # 0 and {} overwrote unconditionally
    assert hdr["ok"] is False and hdr["code"] == "BAD_REQUEST" and "if_absent" in hdr["message"], hdr
    assert sim.get(b"k") == b"first"


@pytest.mark.parametrize("info", [
    {**GOOD, "id": "w1", "data_id": 7},  # malformed: refused before anything is looked at
    {**GOOD, "id": "w2", "data_id": b"other"},  # w2 is alive on another connection, with other data
])
def test_a_refused_ready_from_a_registered_worker_leaves_it_lost(sim: SimCluster, info: dict[str, Any]) -> None:
    """The refusal is a DISCONNECT (register again): the worker of that connection used to stay
    alive, answering reads and counting for W on a connection the broker had refused."""
    w1 = sim.workers["w1"]
    sim.broker.on_worker(w1.identity, _ready(info))
    ready = sim.broker.ready()
    assert (w1.identity, [MDPW, b"\x06"]) in ready.workers
    assert not sim.broker.workers["w1"].alive and w1.identity not in sim.broker.state.by_identity
    assert sim.broker.workers["w2"].alive  # the id it named is untouched
    sim.advance(1.0)  # the real worker registers again, as it does on DISCONNECT
    assert sim.broker.workers["w1"].alive
    assert sim.put(b"k", b"v")["ok"] and sim.get(b"k") == b"v"


def test_a_scan_answer_with_integer_keys_fails_the_page(sim: SimCluster) -> None:
    """keys [1000] became bytes(1000), a key of 1000 NULs, in the page (2**31: a 2 GiB key)."""
    from protocol.frames import C_REQUEST, MDPC

    assert sim.put(b"s1", b"v")["ok"]
    sim.broker.on_client(b"c1", [MDPC, C_REQUEST, SERVICE, pack({"id": 77, "op": "scan", "prefix": b"s"})])
    sim.broker.reads.end_turn()
    token = next(iter(sim.broker.scans.tokens))
    wid = sim.broker.scans.tokens[token].asked[token][0]
    sim.broker.state.ready.workers.clear()  # the workers never see the request; one answers nonsense
    sim.broker.scans.on_answer(wid, token, [pack({"ok": True, "keys": [1000], "versions": [1], "applied": [],
                                                  "complete": True}), b"v"])
    sim.settle()
    got = sim.reply(b"c1", 77)
    assert got is not None and got[0]["ok"] is False and got[0]["code"] == "INTERNAL", got


@pytest.mark.parametrize("name", ["keys", "bytes", "total_keys", "total_bytes"])
def test_a_snapshot_part_s_counters_must_be_integers(name: str) -> None:
    from broker.worker_messages import decode_worker

    with pytest.raises(ValueError, match=name):
        decode_worker(W_SNAPSHOT_PART, [pack({"token": b"t", "part": 0, name: "3"})])


@pytest.mark.parametrize("op", [["get"], {"a": 1}, 1.5, None])
def test_an_op_of_any_type_is_answered(sim: SimCluster, op: Any) -> None:
    """An op that is a list or a map raised TypeError (unhashable) in the decoder: no reply at all
    (found by tests/integration/test_fuzz.py)."""
    hdr, _ = sim.call(op, key=b"k")  # type: ignore[arg-type]
    assert hdr["ok"] is False and hdr["code"] == "UNKNOWN_COMMAND", hdr
