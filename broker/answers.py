"""The answer to a data request once it is complete: one function per op, from a table.

``results`` hold, per key, what the replicas said: for reads ``(found, version, value,
expire_at, streamed)``, for writes whose answer depends on the replicas ``[flag, version before]``
(the flag: existed / the condition held / STREAM_INCOMPLETE), otherwise True.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from broker.replies import manifest_field, reply
from broker.requests import Request
from broker.state import BrokerState
from protocol.errors import ErrorCode
from protocol.frames import pack_values
from protocol.limits import STREAM_INCOMPLETE
from protocol.replication import COND_NONE

Header = dict[str, Any]


def answer(state: BrokerState, req: Request, identity: bytes) -> None:
    """Send the request's answer to ``identity`` (the waiter: a retry may have taken it over)."""
    header, values = ANSWERS[req.op](state, req)
    if req.packed_reply:
        header["packed"] = True
        values = pack_values(values)
    reply(state, identity, header, values)


def answer_depends_on_replicas(req: Request) -> bool:
    """Does the answer say what the replicas found (so it must be kept for a retry)?"""
    return req.op in ("delete", "expire", "put_commit") or req.cond != COND_NONE


def _streamed(result: tuple[Any, ...]) -> bool:
    return len(result) > 4 and bool(result[4])


def _refused_write(req: Request) -> Header | None:
    """A conditional write whose condition failed, or a stream commit that found chunks missing."""
    if req.op == "put_commit" and req.results[0][0] == STREAM_INCOMPLETE:
        return {"id": req.id, "ok": False, "code": ErrorCode.STREAM_INCOMPLETE.value,
                "message": "the stream's chunks are not all there (aborted after being idle "
                           "or cut short?); nothing was written"}
    if req.cond != COND_NONE and not req.results[0][0]:
        return {"id": req.id, "ok": False, "code": ErrorCode.CONDITION_FAILED.value,
                "message": "the condition did not hold; nothing was written", "version": req.results[0][1] or None}
    return None


def _put(state: BrokerState, req: Request) -> tuple[Header, list[bytes]]:
    return _refused_write(req) or {"id": req.id, "ok": True, "version": req.parts[0][2]}, []


def _delete(state: BrokerState, req: Request) -> tuple[Header, list[bytes]]:
    refused = _refused_write(req)
    if refused:
        return refused, []
    existed = req.results[0][0]
    return {"id": req.id, "ok": True, "deleted": None if existed is None else bool(existed)}, []


def _put_chunk(state: BrokerState, req: Request) -> tuple[Header, list[bytes]]:
    return {"id": req.id, "ok": True, "index": req.index}, []


def _put_abort(state: BrokerState, req: Request) -> tuple[Header, list[bytes]]:
    return {"id": req.id, "ok": True}, []


def _expire(state: BrokerState, req: Request) -> tuple[Header, list[bytes]]:
    applied = req.results[0][0]
    return {"id": req.id, "ok": True, "applied": bool(applied), "version": req.parts[0][2] if applied else None}, []


def _mset(state: BrokerState, req: Request) -> tuple[Header, list[bytes]]:
    return {"id": req.id, "ok": True, "count": len(req.keys)}, []


def _ttl(state: BrokerState, req: Request) -> tuple[Header, list[bytes]]:
    found, _version, _value, expire_at = req.results[0][:4]
    hdr: Header = {"id": req.id, "ok": True, "found": found}
    if found:
        hdr["ttl"] = max(expire_at - state.wall_ms(), 0) if expire_at else None
    return hdr, []


def _get(state: BrokerState, req: Request) -> tuple[Header, list[bytes]]:
    found, version, value, _ = req.results[0][:4]
    hdr: Header = {"id": req.id, "ok": True, "found": found}
    if found:
        hdr["version"] = version
    if found and _streamed(req.results[0]):
        hdr["stream"] = manifest_field(value)
        return hdr, []
    return hdr, [value] if found else []


def _exists(state: BrokerState, req: Request) -> tuple[Header, list[bytes]]:
    return {"id": req.id, "ok": True, "exists": req.results[0][0]}, []


def _mget(state: BrokerState, req: Request) -> tuple[Header, list[bytes]]:
    hdr: Header = {"id": req.id, "ok": True, "found": [r[0] for r in req.results],
                   "versions": [r[1] if r[0] else 0 for r in req.results]}
    streams = {i: manifest_field(r[2]) for i, r in enumerate(req.results) if r[0] and _streamed(r)}
    if streams:
        hdr["streams"] = streams
    return hdr, [r[2] if r[0] and i not in streams else b"" for i, r in enumerate(req.results)]


ANSWERS: dict[str, Callable[[BrokerState, Request], tuple[Header, list[bytes]]]] = {
    "put": _put, "put_commit": _put, "delete": _delete, "put_chunk": _put_chunk, "put_abort": _put_abort,
    "expire": _expire, "mset": _mset, "ttl": _ttl, "get": _get, "exists": _exists, "mget": _mget,
}
