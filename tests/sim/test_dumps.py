"""Backup dumps in the sans-I/O cores (tests/support/sim.py): every part of a slot's dump comes from
one cut even while the slot is written; a part is held until the cut's position commits; a dump
whose worker is lost, or a malformed dump request, fails with an answer."""

from __future__ import annotations

from typing import Any

from protocol.frames import W_ACK
from tests.support.helpers import keys_in_slot
from tests.support.sim import SimCluster

BIG = 400_000  # bytes per value: three of them make a dump of two parts (parts are ~1 MiB)


def dump(sim: SimCluster, slot: int, part: int = 0, prev: dict[str, Any] | None = None) -> dict[str, Any]:
    fields: dict[str, Any] = {"slot": slot, "part": part}
    if prev is not None:
        fields.update({"dump": prev["dump"], "worker": prev["worker"]})
    hdr, frames = sim.call("dump", **fields)
    hdr["frames"] = frames
    return hdr


def values(hdr: dict[str, Any]) -> dict[bytes, bytes]:
    return {bytes(item[1]): f for item, f in zip(hdr["items"], hdr["frames"], strict=True) if item[0] == "v"}


def test_all_parts_come_from_one_cut_while_the_slot_is_written(sim: SimCluster) -> None:
    slot = 3
    keys = keys_in_slot(slot, sim.slots, 3)
    for i, k in enumerate(keys):
        assert sim.put(k, bytes([i]) * BIG)["ok"]
    first = dump(sim, slot)
    assert first["ok"] and not first["last"], first
    cut = first["seq"]
    assert cut == max(sim.positions(slot).values())[1]
    # Written after the cut: the dump must not see it.
    for k in keys:
        assert sim.put(k, b"later")["ok"]
    assert sim.call("delete", key=keys[0])[0]["ok"]
    seen = values(first)
    part, prev = 1, first
    while not prev["last"]:
        prev = dump(sim, slot, part, prev)
        assert prev["ok"], prev
        assert (prev["epoch"], prev["seq"]) == (first["epoch"], cut)
        seen.update(values(prev))
        part += 1
    assert seen == {k: bytes([i]) * BIG for i, k in enumerate(keys)}
    # A retry of the last part gets the same answer again; one part too far is refused.
    again = dump(sim, slot, part - 1, first)
    assert again["ok"] and values(again) == values(prev)
    assert dump(sim, slot, part + 1, first)["code"] == "UNAVAILABLE"
    # A fresh dump sees the new state.
    fresh = dump(sim, slot)
    assert fresh["seq"] > cut
    assert {bytes(i[1]) for i in fresh["items"]} == set(keys[1:])


def test_a_part_is_held_until_its_cut_commits(sim: SimCluster) -> None:
    slot = 5
    k = keys_in_slot(slot, sim.slots, 1)[0]
    sim.put(k, b"old")
    holding = True
    sim.intercept = lambda wid, frames: holding and frames[0] == W_ACK  # replicas apply, nobody's ACK arrives
    rid = sim.send(b"c1", "put", [b"new"], key=k)
    sim.settle()
    assert sim.reply(b"c1", rid) is None  # not committed
    drid = sim.send(b"c1", "dump", slot=slot, part=0)
    sim.settle()
    assert sim.reply(b"c1", drid) is None  # the cut holds "new", which could still be lost
    holding = False
    sim.release()
    hdr, frames = sim.reply(b"c1", drid)  # type: ignore[misc]
    assert hdr["ok"] and sim.reply(b"c1", rid) is not None
    assert dict(zip([bytes(i[1]) for i in hdr["items"]], frames, strict=True)) == {k: b"new"}


def test_a_lost_worker_and_bad_requests_fail_the_dump(sim: SimCluster) -> None:
    slot = 7
    for i, k in enumerate(keys_in_slot(slot, sim.slots, 3)):
        sim.put(k, bytes([i]) * BIG)
    first = dump(sim, slot)
    assert not first["last"]
    sim.kill_worker(first["worker"])
    sim.advance(5.0)  # declared dead
    r = dump(sim, slot, 1, first)
    assert r["ok"] is False and r["code"] == "UNAVAILABLE" and "dump slot 7 again" in r["message"]
    assert dump(sim, slot)["ok"]  # from the start, from another replica
    assert sim.call("dump", slot=sim.slots, part=0)[0]["code"] == "BAD_REQUEST"
    assert sim.call("dump", slot=slot, part=1)[0]["code"] == "BAD_REQUEST"  # no dump named
    assert sim.call("dump", slot=slot, part=1, dump=b"\x00" * 16, worker="w1")[0]["code"] == "UNAVAILABLE"
