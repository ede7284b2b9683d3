"""Active brokers (etcd mode, ``--groups N``): the cores of the slot groups this broker leads, and
the answers for the groups it does not. Messages in, Readies out, like ``BrokerCore``.

Each group this broker leads has a ``BrokerCore`` of its own, exactly the core of one leader
restricted to the group's slots (``BrokerConfig.group``): its own epoch (the create revision of
``groups/G/leader``), its own metadata in etcd under ``groups/G/``, its own recovery. A
handover or a failover of one group is a failover of that core alone; the others go on.

- A client message is decoded once, here, and given to the core of its group (a key's group is
  ``slot % groups``; a scan or a watch names its ``group``; every key of an MGET or MSET must be
  of one group). A group this broker does not lead gets ``NOT_LEADER`` naming the group's
  leader and the map's revision, like Redis Cluster's MOVED (docs/protocol.md §1.14).
- ``mmi.slots`` answers the slot map: which frontend leads each group.
- A worker registers once per group, on a connection of its own, saying which group in READY;
  its later messages go to that group's core. A READY for a group led elsewhere gets the
  standby's DISCONNECT naming that group's leader; a READY without a group (a worker that does
  not know the cluster has groups) gets DISCONNECT ``{reason: "groups", groups: N}``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

from broker.core import BrokerCore
from broker.leadership import LeaderInfo
from broker.messages import (
    ClientMessage,
    DumpRequest,
    Invalid,
    KvRequest,
    Limits,
    MmiRequest,
    ScanRequest,
    WatchRequest,
    decode_client,
)
from broker.ready import Ready
from broker.roles import forbidden_message, needed_role
from protocol.curve import role_includes
from protocol.errors import ErrorCode
from protocol.frames import (
    C_FINAL,
    MDPC,
    MDPW,
    MMI_ADMIN,
    MMI_SERVICE,
    MMI_SLOTS,
    MMI_STATUS,
    W_DISCONNECT,
    W_READY,
    pack,
    unpack,
)
from protocol.replication import slot_for_key

log = structlog.get_logger("zkv.broker")


@dataclass(frozen=True)
class GroupMap:
    """Every group's leader as the election last read them; the revision only grows (a new
    leader's key is created at a higher etcd revision than any before it)."""

    slots: int
    groups: int
    leaders: dict[int, LeaderInfo] = field(default_factory=dict)

    @property
    def revision(self) -> int:
        return max((info.epoch for info in self.leaders.values()), default=0)

    def record(self) -> dict[str, Any]:
        """``mmi.slots``' answer (client/slotmap.py ``SlotMap.from_record`` reads it)."""
        return {"slots": self.slots, "groups": self.groups, "revision": self.revision,
                "leaders": {str(g): info.frontend for g, info in sorted(self.leaders.items())}}


def request_group(msg: ClientMessage, slots: int, groups: int) -> int:
    """The group whose leader serves ``msg``; Invalid when it spans groups or names none."""
    if isinstance(msg, KvRequest):
        found = {slot_for_key(k, slots) % groups for k in msg.keys}
        if len(found) != 1:
            raise Invalid(ErrorCode.BAD_REQUEST, f"keys of {len(found)} slot groups in one request: this cluster "
                          f"has {groups} groups, each led by its own broker; send each group's keys to its "
                          "leader (mmi.slots, docs/protocol.md §1.14)", msg.rid)
        return found.pop()
    if isinstance(msg, ScanRequest | WatchRequest):
        if msg.group is None or msg.group >= groups:
            raise Invalid(ErrorCode.BAD_REQUEST, f"this cluster has {groups} slot groups, each led by its own "
                          f"broker: a {type(msg).__name__.removesuffix('Request').lower()} names its group "
                          f"(0 to {groups - 1}) and goes to that group's leader (docs/protocol.md §1.14)",
                          msg.rid)
        return msg.group
    assert isinstance(msg, DumpRequest)
    return msg.slot % groups


class ActiveCores:
    def __init__(self, limits: Limits, slots: int, groups: int,
                 status: Callable[[], dict[str, Any]]) -> None:
        """``status``: builds mmi.status's answer (the process knows its election and name)."""
        self.limits = limits
        self.map = GroupMap(slots, groups)
        self.cores: dict[int, BrokerCore] = {}
        self.worker_groups: dict[bytes, int] = {}  # a worker connection -> the group it registered for
        self.status = status
        self.ready = Ready()  # this process's own answers (NOT_LEADER, mmi, bad messages)
        self.redirected = 0  # requests answered NOT_LEADER, for status

    def take_ready(self) -> Ready:
        ready, self.ready = self.ready, Ready()
        return ready

    # -- clients -------------------------------------------------------------------------------

    def on_client(self, identity: bytes, frames: list[bytes], role: str | None = None) -> None:
        try:
            msg = decode_client(frames, self.limits)
        except Invalid as e:
            self._error(identity, e.service, e.rid, e.code, str(e))
            return
        if isinstance(msg, MmiRequest):
            self._on_mmi(identity, msg, role)
            return
        try:
            group = request_group(msg, self.map.slots, self.map.groups)
        except Invalid as e:
            # With the map's size and revision: a client without the map fetches it and splits.
            self._reply(identity, b"kv", {"id": e.rid, "ok": False, "code": e.code.value, "message": str(e),
                                          "groups": self.map.groups, "revision": self.map.revision})
            return
        core = self.cores.get(group)
        if core is not None:
            core.on_message(identity, msg, role)
            return
        self.redirected += 1
        leader = self.map.leaders.get(group)
        self._reply(identity, b"kv", {
            "id": msg.rid, "ok": False, "code": ErrorCode.NOT_LEADER.value,
            "message": f"slot group {group} is led by {leader.frontend if leader else 'no broker yet'}",
            "leader": leader.frontend if leader else None, "group": group, "revision": self.map.revision})

    def _on_mmi(self, identity: bytes, msg: MmiRequest, role: str | None) -> None:
        if role is not None and not role_includes(role, needed_role(msg)):
            body = pack({"ok": False, "code": ErrorCode.FORBIDDEN.value, "message": forbidden_message(msg, role)})
        elif msg.service == MMI_SERVICE:
            body = b"200" if any(c.serving() for c in self.cores.values()) else b"404"
        elif msg.service == MMI_STATUS:
            body = pack(self.status())
        elif msg.service == MMI_SLOTS:
            body = pack(self.map.record())
        elif msg.service == MMI_ADMIN:
            body = pack(self._admin(msg.body))
        else:
            body = b"501"
        self.ready.reply(identity, [MDPC, C_FINAL, msg.service, body])

    def _admin(self, body: bytes) -> dict[str, Any]:
        """An operator command for the groups this broker leads: each group's core keeps its own
        workers' roles and moves, so a drain, undrain, remove or rebalance is done by every one
        (a client sends it to every group's leader, docs/protocol.md §1.14); a move, by the core
        of its slot's group; reload_keys once for the process."""
        try:
            cmd = unpack(body)
        except ValueError as e:
            return {"ok": False, "message": f"bad admin request: {e}"}
        if not isinstance(cmd, dict):
            return {"ok": False, "message": "expected a map"}
        if not self.cores:
            return {"ok": False, "code": ErrorCode.NOT_LEADER.value, "message": "this broker leads no slot group now",
                    "groups": {}}
        cores = sorted(self.cores.items())
        if cmd.get("cmd") == "reload_keys":
            cores = cores[:1]
        elif cmd.get("cmd") == "move" and isinstance(cmd.get("slot"), int):
            group = cmd["slot"] % self.map.groups
            if group not in self.cores:
                leader = self.map.leaders.get(group)
                return {"ok": False, "code": ErrorCode.NOT_LEADER.value, "group": group,
                        "leader": leader.frontend if leader else None,
                        "message": f"slot {cmd['slot']}'s group {group} is led by "
                                   f"{leader.frontend if leader else 'no broker yet'}"}
            cores = [(group, self.cores[group])]
        answers: dict[int, dict[str, Any]] = {}
        for group, core in cores:
            try:
                answers[group] = core.admin(cmd)
            except Exception as e:  # a bug: an answer all the same, the other groups still done
                log.exception("admin_failed", group=group)
                answers[group] = {"ok": False, "message": f"internal error: {type(e).__name__}"}
        return {"ok": all(a.get("ok") for a in answers.values()),
                "message": "; ".join(f"group {g}: {a.get('message', '')}" for g, a in answers.items()),
                "groups": {str(g): a for g, a in answers.items()}}

    def _error(self, identity: bytes, service: bytes, rid: Any, code: ErrorCode, message: str) -> None:
        self._reply(identity, service, {"id": rid, "ok": False, "code": code.value, "message": message})

    def _reply(self, identity: bytes, service: bytes, header: dict[str, Any]) -> None:
        self.ready.reply(identity, [MDPC, C_FINAL, service, pack(header)])

    # -- workers -------------------------------------------------------------------------------

    def on_worker(self, identity: bytes, frames: list[bytes], key_name: str | None = None) -> None:
        if len(frames) < 2 or frames[0] != MDPW:
            return
        if frames[1] == W_READY:
            group = _ready_group(frames[2:])
            if group is None or group >= self.map.groups:
                self.worker_groups.pop(identity, None)
                self.ready.to_worker(identity, [W_DISCONNECT, pack({"reason": "groups", "groups": self.map.groups})])
                return
            self.worker_groups[identity] = group
        group = self.worker_groups.get(identity)
        core = self.cores.get(group) if group is not None else None
        if core is not None:
            core.on_worker(identity, frames, key_name)
        elif frames[1] != W_DISCONNECT:
            leader = self.map.leaders.get(group) if group is not None else None
            self.ready.to_worker(identity, [W_DISCONNECT, pack({
                "reason": "standby", "leader": leader.backend if leader else None,
                "replication": leader.replication if leader else None, "groups": self.map.groups,
                **({"group": group} if group is not None else {})})])


def _ready_group(body: list[bytes]) -> int | None:
    """The group a READY registers for (None: it names none, or it is malformed: the core of no
    group sees it, and the worker is told the cluster's groups)."""
    try:
        info = unpack(body[1])
    except (IndexError, ValueError):
        return None
    group = info.get("group") if isinstance(info, dict) else None
    return group if isinstance(group, int) and not isinstance(group, bool) and group >= 0 else None
