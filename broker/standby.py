"""What a broker answers while it does not lead (etcd mode): nothing is done, everyone is sent on.

Every kv request gets ``NOT_LEADER`` naming the leader's frontend (docs/protocol.md §1.13); an
MMI request gets its service's own form of the same; every worker message gets DISCONNECT naming
the leader's backend and replication endpoints. Messages in, a Ready out, like the core.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from broker.leadership import LeaderInfo
from broker.messages import Invalid, Limits, MmiRequest, decode_client
from broker.ready import Ready
from protocol.errors import ErrorCode
from protocol.frames import C_FINAL, MDPC, MDPW, MMI_ADMIN, MMI_SERVICE, MMI_STATUS, W_DISCONNECT, pack


class Standby:
    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.ready = Ready()
        self.answered = 0  # requests sent on to the leader, for status

    def take_ready(self) -> Ready:
        ready, self.ready = self.ready, Ready()
        return ready

    def on_client(self, identity: bytes, frames: list[bytes], leader: LeaderInfo | None,
                  status: Callable[[], dict[str, Any]]) -> None:
        """``status``: builds mmi.status's answer, only when that is what was asked."""
        where = f"the leader is {leader.frontend}" if leader else "no leader is elected yet"
        message = f"this broker is a standby: {where}"
        try:
            msg = decode_client(frames, self.limits)
        except Invalid as e:
            self._reply(identity, e.service, {"id": e.rid, "ok": False, "code": e.code.value, "message": str(e)})
            return
        self.answered += 1
        if isinstance(msg, MmiRequest):
            if msg.service == MMI_SERVICE:
                body = b"404"  # not served here
            elif msg.service == MMI_STATUS:
                body = pack(status())
            elif msg.service == MMI_ADMIN:
                body = pack({"ok": False, "code": ErrorCode.NOT_LEADER.value, "message": message,
                             "leader": leader.frontend if leader else None})
            else:
                body = b"501"
            self.ready.reply(identity, [MDPC, C_FINAL, msg.service, body])
            return
        self._reply(identity, b"kv", {"id": msg.rid, "ok": False, "code": ErrorCode.NOT_LEADER.value,
                                      "message": message, "leader": leader.frontend if leader else None})

    def on_worker(self, identity: bytes, frames: list[bytes], leader: LeaderInfo | None) -> None:
        if len(frames) >= 2 and frames[0] == MDPW and frames[1] == W_DISCONNECT:
            return
        self.ready.to_worker(identity, [W_DISCONNECT, pack({
            "reason": "standby", "leader": leader.backend if leader else None,
            "replication": leader.replication if leader else None})])

    def _reply(self, identity: bytes, service: bytes, header: dict[str, Any]) -> None:
        self.ready.reply(identity, [MDPC, C_FINAL, service, pack(header)])
