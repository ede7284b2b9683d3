"""Read batching, frame sending and the client's size check at their edges: bugs a review found
(each test failed before its fix)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import zmq

from client import commands
from client.client import Client
from protocol.replication import slot_for_key
from protocol.sockets import send_frames
from tests.support.sim import SimCluster


def test_send_frames_refuses_a_bad_frame_before_sending_any(tmp_path: Path) -> None:
    """A frame after the first that raised used to leave the SNDMORE frames queued, and the next
    message sent on the socket (on the broker's ROUTER: another peer's reply) was glued to them."""
    ctx = zmq.Context()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    try:
        a.bind("inproc://r3")
        b.connect("inproc://r3")
        with pytest.raises(TypeError):
            send_frames(a, [b"first", "not bytes"])  # type: ignore[list-item]
        send_frames(a, [b"next"])
        assert b.poll(1000)
        assert b.recv_multipart() == [b"next"]
    finally:
        a.close(0)
        b.close(0)
        ctx.term()


def _offline_client(limits: list[int]) -> tuple[Client, list[str]]:
    c = Client("tcp://127.0.0.1:1")
    sent: list[str] = []
    c.status = lambda: {"max_value": limits[0]}  # type: ignore[method-assign]

    def request(op, header, values):  # type: ignore[no-untyped-def]
        sent.append(op)
        return {"id": 1, "ok": True, "version": 7}, []

    c.request = request  # type: ignore[method-assign]
    return c, sent


def test_the_client_asks_the_current_limit_after_a_broker_restart() -> None:
    """The broker's --max-value was asked once per Client and never again: after the broker was
    restarted with a larger limit, the client still refused requests the broker would take."""
    limits = [16 << 20]
    c, sent = _offline_client(limits)
    try:
        big = b"x" * (20 << 20)
        with pytest.raises(commands.ValueTooLarge):
            c.put(b"k", big)
        limits[0] = 64 << 20  # broker restarted with --max-value 64 MiB
        assert c.put(b"k", big) == 7
        assert sent == ["put"]
    finally:
        c.close()


def test_one_failing_key_does_not_fail_unrelated_reads_batched_in_the_same_turn(sim: SimCluster) -> None:
    """Reads of one turn share one worker REQUEST: a worker error caused by one key (here injected
    for key b"bad") used to fail every other client's read batched with it."""
    sim.put(b"good", b"v")
    s_good = slot_for_key(b"good", sim.slots)
    bad = next(b"bad%d" % i for i in range(10_000)
               if sim.broker.slots[slot_for_key(b"bad%d" % i, sim.slots)].replicas
               == sim.broker.slots[s_good].replicas)
    for w in sim.workers.values():
        store = w.core.store  # type: ignore[union-attr]
        orig = store.read

        def read(slots_keys, now, with_values=True, _orig=orig):  # type: ignore[no-untyped-def]
            if any(k == bad for _, k in slots_keys):
                raise ValueError("corrupt record")
            return _orig(slots_keys, now, with_values)

        store.read = read
    sim.broker._rr = itertools.repeat(0)  # both parts go to the first replica: one batch
    r1 = sim.send(b"c1", "get", key=b"good")
    r2 = sim.send(b"c2", "get", key=bad)
    sim.settle()
    got = sim.reply(b"c1", r1)
    assert got is not None and got[0]["ok"] and got[1] == [b"v"], got
    failed = sim.reply(b"c2", r2)  # the read that fails fails alone, with its cause
    assert failed is not None and failed[0]["ok"] is False and failed[0]["code"] == "INTERNAL", failed
    assert "corrupt record" in failed[0]["message"]
