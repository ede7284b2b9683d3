"""broker/budget.py: the bytes a client connection has not taken, from trackers handed in."""

from __future__ import annotations

from dataclasses import dataclass

from broker.budget import ERROR_ALLOWANCE, TRACK_BYTES, ReplyBudget, Verdict
from protocol.frames import C_FINAL, MDPC, SERVICE, pack, unpack

MIB = 1 << 20


@dataclass
class FakeTracker:
    done: bool = False


def _send(b: ReplyBudget, ident: bytes, size: int) -> FakeTracker | None:
    t = FakeTracker() if b.wants_tracker(ident, size) else None
    b.sent(ident, size, t)
    return t


def test_unread_large_replies_are_refused_past_the_limit_and_served_again_once_read() -> None:
    b = ReplyBudget(10 * MIB)
    trackers = []
    for _ in range(2):
        assert b.admit(b"c", 4 * MIB) is Verdict.SEND
        trackers.append(_send(b, b"c", 4 * MIB))
    assert b.held(b"c") == 8 * MIB
    assert b.admit(b"c", 4 * MIB) is Verdict.REFUSE
    assert b.admit(b"other", 4 * MIB) is Verdict.SEND  # per connection
    trackers[0].done = True  # type: ignore[union-attr]
    assert b.held(b"c") == 4 * MIB and b.admit(b"c", 4 * MIB) is Verdict.SEND


def test_a_reply_over_the_limit_passes_when_nothing_tracked_is_held() -> None:
    b = ReplyBudget(1 * MIB)
    _send(b, b"c", 100)  # small replies, untracked
    assert b.admit(b"c", 8 * MIB) is Verdict.SEND
    _send(b, b"c", 8 * MIB)
    assert b.admit(b"c", 100) is Verdict.DROP  # (8 MiB held: past the error allowance too)


def test_small_replies_are_counted_through_a_tracker_every_track_bytes() -> None:
    b = ReplyBudget(MIB)
    tracked = [t for t in (_send(b, b"c", 1000) for _ in range(200)) if t is not None]
    assert len(tracked) == 200 * 1000 // TRACK_BYTES
    assert b.held(b"c") == 200 * 1000
    for t in tracked:
        t.done = True
    assert b.held(b"c") < TRACK_BYTES  # the tail after the last tracker


def test_past_the_error_allowance_replies_are_dropped() -> None:
    b = ReplyBudget(MIB)
    _send(b, b"c", MIB + ERROR_ALLOWANCE + 1)
    assert b.admit(b"c", 10) is Verdict.DROP


def test_the_refusal_carries_the_request_id() -> None:
    b = ReplyBudget(MIB)
    frames = [MDPC, C_FINAL, SERVICE, pack({"id": 42, "ok": True}), b"v"]
    out = b.refusal(b"c", frames)
    hdr = unpack(out[3])
    assert out[:3] == [MDPC, C_FINAL, SERVICE] and len(out) == 4
    assert hdr["id"] == 42 and hdr["code"] == "UNAVAILABLE" and "--max-client-bytes" in hdr["message"]
    assert unpack(b.refusal(b"c", [MDPC, C_FINAL, b"mmi.service", b"200"])[3])["id"] is None


def test_forgotten_and_idle_connections_are_pruned() -> None:
    b = ReplyBudget(MIB)
    t = _send(b, b"gone", MIB)
    b.forget(b"gone")
    assert b.held(b"gone") == 0 and t is not None
    for i in range(4096):
        b.sent(b"x%d" % i, 10, None)
    assert len(b.connections) < 4096
