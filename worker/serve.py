"""Answers to the broker's read requests (get, exists, mget, ttl, scan, get_chunks), from
committed state only: each answer also says how far each slot it read has been applied, so the
broker can hold it back until that position is committed."""

from __future__ import annotations

from collections.abc import Iterable

from protocol.frames import W_FINAL, W_PARTIAL, pack, pack_values, unpack
from protocol.limits import MAX_CHUNKS_PER_READ, SCAN_MAX_BYTES
from worker.donor import Dumps
from worker.records import Position
from worker.store import SlotStore


def answer(store: SlotStore, body: list[bytes], dumps: Dumps, now: float) -> list[list[bytes]]:
    """The messages (after the MDPW02 header) answering one REQUEST (``body``: the frames after
    its command, ``[token, b"", request]``): PARTIALs, then its FINAL. A backup dump's part is
    read from the dump's own read transaction (``dumps``)."""
    token = body[0]
    partials: list[list[bytes]] = []
    try:
        req = unpack(body[2])
        if req.get("op") == "chunks":
            partials, reply = serve_chunks(store, token, req)
        elif req.get("op") == "dump":
            reply = dumps.part(req, now)
        else:
            reply = serve_read(store, req)
    except Exception as e:  # a malformed read request gets an error answer, nothing else
        reply = [pack({"ok": False, "code": "BAD_REQUEST", "message": str(e)})]
    return [*partials, [W_FINAL, token, b"", *reply]]


def applied_field(positions: Iterable[tuple[int, Position]]) -> list[list[int]]:
    """A read or scan answer's ``applied``: [slot, seq, epoch] of each slot, the state it read."""
    return [[s, p.seq, p.epoch] for s, p in positions]


def serve_read(store: SlotStore, req: dict) -> list[bytes]:
    """A miss reports the slot's applied seq as its version."""
    if req.get("op") == "scan":
        return serve_scan(store, req)
    slots_keys = [(int(s), bytes(k)) for s, k in req["keys"]]
    results = store.read(slots_keys, int(req["now"]), with_values=req.get("op") != "exists")
    hdr = {
        "ok": True,
        "found": [r.found for r in results],
        "versions": [r.version for r in results],
        "expire": [r.expire_at for r in results],
        # What this replica holds of each slot asked about: a slot it lost since the broker
        # chose it (dropped after a move) shows a position below what the broker counted, one
        # holding an old leader's writes that recovery did not adopt a position off its history.
        "applied": applied_field((s, store.position(s)) for s in {s for s, _ in slots_keys}),
    }
    if any(r.streamed for r in results):
        hdr["streamed"] = [r.streamed for r in results]  # their value frame is the manifest
    if len(results) > 1 and req.get("packed") is True:
        # An MGET's values in one frame: one send here, one receive in the broker. Only when the
        # broker asks: a broker that does not know the packed form reads one frame per key.
        hdr["packed"] = True
        return [pack(hdr), *pack_values([r.value for r in results])]
    return [pack(hdr), *[r.value for r in results]]


def serve_chunks(store: SlotStore, token: bytes, req: dict) -> tuple[list[list[bytes]], list[bytes]]:
    """Chunks of a streamed value, one PARTIAL each, as many as the request's credit allows,
    then the FINAL's body: how many were sent (fewer than asked: the end, or the value is gone)."""
    slot, first, count = int(req["slot"]), int(req["first"]), int(req["count"])
    stream = bytes(req["stream"])
    if first < 0 or not 0 < count <= MAX_CHUNKS_PER_READ:
        raise ValueError(f"first must be >= 0 and count 1..{MAX_CHUNKS_PER_READ}")
    chunks = store.read_chunks(slot, stream, first, count)
    partials = [[W_PARTIAL, token, b"", pack({"index": first + i}), c] for i, c in enumerate(chunks)]
    return partials, [pack({"ok": True, "sent": len(chunks)})]


def serve_scan(store: SlotStore, req: dict) -> list[bytes]:
    """One worker's share of a scan page: its slots' matching entries merged in key order,
    and each slot's applied seq (the broker holds the page until those are committed)."""
    prefix, start_after = bytes(req["prefix"]), req.get("start_after")
    with_values = bool(req.get("values", True))
    res = store.scan([int(s) for s in req["slots"]], prefix,
                     None if start_after is None else bytes(start_after), int(req["limit"]),
                     int(req["now"]), with_values, int(req.get("max_bytes", SCAN_MAX_BYTES)))
    hdr = {"ok": True, "keys": [e.key for e in res.entries], "versions": [e.version for e in res.entries],
           "complete": res.complete, "applied": applied_field(res.applied.items())}
    if with_values and any(e.streamed for e in res.entries):
        hdr["streamed"] = [e.streamed for e in res.entries]  # their value frame is the manifest
    return [pack(hdr), *([e.value for e in res.entries] if with_values else [])]
