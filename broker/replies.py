"""How the broker's answers to clients are framed (MDP/0.2 client side, service ``kv``)."""

from __future__ import annotations

from typing import Any

from broker.state import BrokerState
from protocol.errors import ErrorCode
from protocol.frames import C_FINAL, C_PARTIAL, MDPC, SERVICE, pack
from protocol.replication import Manifest

INVALID_INPUT = frozenset({ErrorCode.BAD_REQUEST, ErrorCode.UNKNOWN_COMMAND, ErrorCode.KEY_TOO_LARGE,
                           ErrorCode.VALUE_TOO_LARGE})


def reply(state: BrokerState, identity: bytes, header: dict[str, Any], values: list[bytes] | None = None,
          service: bytes = SERVICE) -> None:
    state.latency.end(identity, header)
    state.ready.reply(identity, [MDPC, C_FINAL, service, pack(header), *(values or [])])


def partial(state: BrokerState, identity: bytes, header: dict[str, Any], values: list[bytes]) -> None:
    state.ready.reply(identity, [MDPC, C_PARTIAL, SERVICE, pack(header), *values])


def error(state: BrokerState, identity: bytes, rid: int | None, code: ErrorCode, message: str,
          service: bytes = SERVICE) -> None:
    state.stats["bad_requests" if code in INVALID_INPUT else "rejected_requests"] += 1
    reply(state, identity, {"id": rid, "ok": False, "code": code.value, "message": message}, service=service)


def manifest_field(value: bytes) -> dict[str, Any]:
    """How a reply describes a streamed value (read it with get_chunks)."""
    m = Manifest.decode(value)
    return {"stream": m.stream, "chunks": m.chunks, "size": m.size}
