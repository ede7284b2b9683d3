"""Read leases, the worker's side: which slots it may answer reads of without the broker, what
it knows is committed, and the direct reads it holds back (docs/architecture.md, "Read leases").

A lease is the broker's promise that no write of the slot commits without this worker (broker/
leases.py). The worker counts it from *before* it sent the request, by its monotonic clock, for
``LEASE_SHARE`` of what the broker counts from when it handled the request: it stops answering
before the broker stops waiting for it, whatever the delays, as long as the two clocks run at
rates within 1 - LEASE_SHARE of each other.

A direct read is one frame, its msgpack header ``{op: "get", id, key}``; its answer is the
header and the value (docs/protocol.md §1.15: no MDP envelope, which would triple the frames each
side sends and receives, the largest cost of a read here). It is answered from the worker's
store, then the lease is checked (so the read's state is one the lease covered), and the answer
is sent only once the version it shows (for a miss: the slot's applied seq) is known to be
committed; until then it is held, at most ``HOLD_MAX`` seconds, then refused (NOT_LEASED: the
client asks the broker).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from protocol.errors import ErrorCode
from protocol.frames import W_LEASE_REQUEST, pack, unpack
from protocol.limits import MAX_KEY_BYTES
from protocol.replication import slot_for_key
from worker.store import SlotStore

LEASE_SHARE = 0.8  # of the broker's lease time that the worker counts
HOLD_MAX = 0.4  # s a direct read may wait for its version to be known committed (clients wait 0.5 s)
REQUEST_TTL = 10.0  # s after which an unanswered lease request is forgotten

Reply = tuple[bytes, list[bytes]]  # (client identity, frames after it)


@dataclass(slots=True)
class HeldRead:
    identity: bytes
    rid: int
    need: int  # the committed seq the answer waits for
    since: float
    frames: list[bytes]  # the answer, ready to send


def not_leased(rid: Any, why: str) -> list[bytes]:
    return [pack({"id": rid, "ok": False, "code": ErrorCode.NOT_LEASED.value,
                  "message": f"read this key through the broker: {why}"})]


class ReadLeases:
    def __init__(self, store: SlotStore) -> None:
        self.store = store
        self.slots = 0  # the cluster's slot count (from a grant); 0: unknown, nothing is served
        self._ids = itertools.count(1)
        self.sent: dict[int, float] = {}  # lease request id -> when it was about to be sent
        self.until: dict[int, float] = {}  # slot -> when this worker stops answering it (own clock)
        self.committed: dict[int, int] = {}  # slot -> highest committed seq known (this epoch)
        self.held: dict[int, list[HeldRead]] = {}
        self.lease = 0.0  # the broker's lease seconds, as its last grant said
        self.replies: list[Reply] = []  # direct read answers to send
        self.served = 0

    # -- leases ------------------------------------------------------------------------------------

    def request(self, now: float) -> list[bytes]:
        """A lease request's frames (after MDPW02); ``now`` must not be later than its send."""
        for rid, t in list(self.sent.items()):
            if now - t > REQUEST_TTL:
                del self.sent[rid]
        rid = next(self._ids)
        self.sent[rid] = now
        return [W_LEASE_REQUEST, pack({"id": rid})]

    def on_grant(self, info: dict[str, Any], epoch: int | None, servable: Callable[[int], bool]) -> None:
        """``servable``: whether the worker has the slot's data now (assigned, no snapshot being
        installed); a grant for another slot gives nothing (the broker would not have sent it, but
        this does not lean on message order)."""
        rid = info.get("id")
        sent = self.sent.pop(rid, None) if type(rid) is int else None
        if sent is None or epoch is None or info.get("epoch") != epoch:
            return  # not ours, or from another broker incarnation than the one registered with
        self.lease = float(info["lease"])
        self.slots = int(info["slot_count"])
        end = sent + LEASE_SHARE * self.lease
        for s, c in zip(info["slots"], info["committed"], strict=True):
            if not servable(s):
                continue
            if end > self.until.get(s, 0.0):
                self.until[s] = end
            self.learn(s, c)

    def holds(self, slot: int, now: float) -> bool:
        return self.until.get(slot, 0.0) > now

    def held_now(self, now: float) -> int:
        """How many slots this worker may answer reads of now (metrics)."""
        return sum(1 for until in self.until.values() if until > now)

    def drop(self, slot: int) -> None:
        """The slot's data is going (unassigned, or replaced by a snapshot): answer nothing more of it.
        Reads already held were read under the lease and may still be answered."""
        self.until.pop(slot, None)

    def reset(self, why: str) -> None:
        """A new registration: the next broker incarnation may write other history at the same seqs,
        so nothing known of the old one counts."""
        self.until.clear()
        self.committed.clear()
        self.sent.clear()
        for reads in self.held.values():
            self._refuse_all(reads, why)
        self.held.clear()

    # -- what is committed ---------------------------------------------------------------------------

    def learn(self, slot: int, seq: int) -> None:
        if seq <= self.committed.get(slot, 0):
            return
        self.committed[slot] = seq
        held = self.held.get(slot)
        if held:
            keep = []
            for h in held:
                if h.need <= seq:
                    self.replies.append((h.identity, h.frames))
                    self.served += 1
                else:
                    keep.append(h)
            if keep:
                self.held[slot] = keep
            else:
                del self.held[slot]

    def on_committed(self, flat: list[Any]) -> None:
        """W_COMMITTED's body: [slot, seq, slot, seq, ...]."""
        for i in range(0, len(flat) - 1, 2):
            if type(flat[i]) is int and type(flat[i + 1]) is int:  # (not bool)
                self.learn(flat[i], flat[i + 1])

    def expire_held(self, now: float) -> None:
        for slot, reads in list(self.held.items()):
            late = [h for h in reads if now - h.since > HOLD_MAX]
            if late:
                self._refuse_all(late, "its version was not known to be committed in time")
                reads[:] = [h for h in reads if now - h.since <= HOLD_MAX]
                if not reads:
                    del self.held[slot]

    def _refuse_all(self, reads: list[HeldRead], why: str) -> None:
        for h in reads:
            self.replies.append((h.identity, not_leased(h.rid, why)))

    # -- direct reads --------------------------------------------------------------------------------

    def on_read(self, identity: bytes, frames: list[bytes], now: float, clock: Callable[[], float]) -> None:
        """One client request from the reads endpoint (``frames`` after the identity)."""
        rid = None
        try:
            if len(frames) != 1:
                raise ValueError("expected one frame: the request's header")
            hdr = unpack(frames[0])
            if not isinstance(hdr, dict):
                raise ValueError("the header must be a map")
            rid = hdr.get("id")
            if type(rid) is not int:
                rid = None
                raise ValueError("id must be an integer")
            key = hdr.get("key")
            if hdr.get("op") != "get" or not isinstance(key, bytes) or not 0 < len(key) <= MAX_KEY_BYTES:
                raise ValueError(f"only get of a key of 1 to {MAX_KEY_BYTES} bytes is served here")
        except Exception as e:  # a malformed request gets an error answer, nothing else
            self.replies.append((identity, [pack(
                {"id": rid, "ok": False, "code": ErrorCode.BAD_REQUEST.value, "message": str(e)})]))
            return
        if not self.slots:
            self._refuse(identity, rid, "this worker holds no lease")
            return
        slot = slot_for_key(key, self.slots)
        if not self.holds(slot, now):
            self._refuse(identity, rid, f"this worker holds no lease on slot {slot}")
            return
        r = self.store.read([(slot, key)], 0)[0]  # now=0: a key with a TTL is found, and refused below
        if not self.holds(slot, clock()):
            # Checked after the read: the state read is one the lease covered.
            self._refuse(identity, rid, f"the lease on slot {slot} ran out")
            return
        if r.found and (r.expire_at or r.streamed):
            self._refuse(identity, rid, "its expiry is decided by the broker's clock" if r.expire_at
                         else "it is a streamed value")
            return
        hdr_out: dict[str, Any] = {"id": rid, "ok": True, "found": r.found}
        if r.found:
            hdr_out["version"] = r.version
        answer = [pack(hdr_out), *([r.value] if r.found else [])]
        if r.version <= self.committed.get(slot, 0):
            self.replies.append((identity, answer))
            self.served += 1
        else:
            self.held.setdefault(slot, []).append(HeldRead(identity, rid, r.version, now, answer))

    def _refuse(self, identity: bytes, rid: Any, why: str) -> None:
        self.replies.append((identity, not_leased(rid, why)))
