"""Routing by slot group with active brokers (docs/protocol.md §1.14), written once for both
clients: where a request goes, what a refusal teaches, how a multi-key request or a scan splits
over the groups and how the answers merge. Sans-I/O: ``Client`` and ``AsyncClient`` fetch the
map (``mmi.slots``) when a ``Router`` says so and move the frames.

Without active brokers nothing here does anything: the router has no map until a broker's
reply names a slot group, and a request without a map goes wherever the broker list says.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from client.commands import Reply
from client.slotmap import SlotMap, merge_scans, merge_split
from protocol.frames import pack, unpack
from protocol.limits import DEFAULT_SCAN_LIMIT

SPLIT_OPS = {"mget": False, "mset": True}  # multi-key ops split by slot group: op -> carries values


class Redirect(NamedTuple):
    """A NOT_LEADER of an active broker: the group asked for, its leader (None: none now) and
    the revision of the map the broker answered from."""

    group: int
    leader: str | None
    revision: int


class Part(NamedTuple):
    """One group's share of a split request."""

    header: dict[str, Any]
    values: list[bytes] | None


class AdminPlan(NamedTuple):
    """Where an operator command goes with active brokers: every broker that leads a group (a
    move: its slot's group's leader); ``groups``: those it must be done for; ``leaderless``:
    those no broker leads now."""

    urls: list[str]
    groups: list[int]
    leaderless: list[int]


class Split(NamedTuple):
    """A request split by slot group: send every part (in any order, concurrently if the client
    can) and give the answers, in the parts' order, to ``merge``."""

    parts: list[Part]
    merge: Callable[[Sequence[Reply]], Reply]


def _header(reply: list[bytes]) -> dict[str, Any] | None:
    try:
        hdr = unpack(reply[0])
    except (IndexError, ValueError):
        return None
    return hdr if isinstance(hdr, dict) else None


def _keys(header: dict[str, Any]) -> list[bytes]:
    if "key" in header:
        return [header["key"]]
    return list(header.get("keys") or [])


class Router:
    def __init__(self) -> None:
        # Known once a broker's reply named a slot group; replaced, never mutated.
        self.slot_map: SlotMap | None = None

    def group_of(self, header: dict[str, Any]) -> int | None:
        m = self.slot_map
        if m is None:
            return None
        if "group" in header:
            return int(header["group"])
        keys = _keys(header)
        return m.group_of(keys[0]) if keys else None

    def target(self, header: dict[str, Any]) -> str | None:
        """The broker to send this request to: its group's leader, when the map knows it."""
        group = self.group_of(header)
        return None if group is None or self.slot_map is None else self.slot_map.leaders.get(group)

    def forget(self, header: dict[str, Any], at: str) -> None:
        """No reply from ``at`` to this request: if the map names ``at`` as its group's leader,
        forget it, so that the next attempt goes where the broker list's failover rules say,
        whose NOT_LEADER names the group's new leader once there is one."""
        group = self.group_of(header)
        if group is not None and self.slot_map is not None and self.slot_map.leaders.get(group) == at:
            self.slot_map = self.slot_map.learn(group, None)

    def redirect(self, reply: list[bytes]) -> Redirect | None:
        """The redirect in a reply: a NOT_LEADER that names a slot group, else None."""
        hdr = _header(reply)
        if hdr is None or hdr.get("code") != "NOT_LEADER" or not isinstance(hdr.get("group"), int):
            return None
        leader = hdr.get("leader") if isinstance(hdr.get("leader"), str) else None
        return Redirect(hdr["group"], leader or None, int(hdr.get("revision") or 0))

    def needs_map(self, redirect: Redirect) -> bool:
        """Fetch the whole map before following ``redirect``: none yet, or the broker's is newer."""
        return self.slot_map is None or redirect.revision > self.slot_map.revision

    def follow(self, redirect: Redirect, hops: int = 1) -> bool:
        """Note the leader ``redirect`` names; True if the request is to be resent at once (to
        that leader), False to back off: no leader now (a handover), no map to be had, or
        ``hops`` (the leaders this request has followed in a row, this one included) more than
        the brokers leading groups: brokers whose maps lag a handover may name each other."""
        m = self.slot_map
        if m is None:
            return False
        if m.leaders.get(redirect.group) != redirect.leader:
            self.slot_map = m = m.learn(redirect.group, redirect.leader)
        if hops > max(len(set(m.leaders.values())), 1):
            return False
        return bool(m.leaders.get(redirect.group))

    def spans_groups(self, reply: list[bytes]) -> bool:
        """A BAD_REQUEST refusing a request over several slot groups (it names the cluster's
        ``groups``) while this client has no map: fetch it, then split the request."""
        hdr = _header(reply)
        return (self.slot_map is None and hdr is not None and hdr.get("code") == "BAD_REQUEST"
                and isinstance(hdr.get("groups"), int))

    def install(self, reply: list[bytes] | None) -> None:
        """Take the map from an ``mmi.slots`` reply (none, 501 or malformed: keep what is known;
        an older map than ours, from a fetch that finished late: ours)."""
        if reply is None or not reply or reply[0] == b"501":
            return
        try:
            m = SlotMap.from_record(unpack(reply[0]))
        except ValueError:
            return
        if self.slot_map is None or m.revision >= self.slot_map.revision:
            self.slot_map = m

    def split(self, op: str, header: dict[str, Any], values: list[bytes] | None) -> Split | None:
        """The parts of a request that spans slot groups: an MGET or MSET whose keys fall in
        several (one part per group, the answers put back in the keys' order), or a scan not
        naming its group (every group scans its own slots, the pages merge in key order).
        None: send it whole (no map, one group, or its keys in one)."""
        m = self.slot_map
        if m is None or m.groups < 2:
            return None
        if op == "scan" and "group" not in header:
            limit = int(header.get("limit", DEFAULT_SCAN_LIMIT))
            return Split([Part({**header, "group": g}, None) for g in range(m.groups)],
                         lambda replies: merge_scans(replies, limit))
        if op not in SPLIT_OPS:
            return None
        keys = _keys(header)
        shares = m.by_group(keys)
        if len(shares) < 2:
            return None
        indices = list(shares.values())
        parts = [Part({**header, "keys": [keys[i] for i in share]},
                      [values[i] for i in share] if SPLIT_OPS[op] and values else None) for share in indices]
        return Split(parts, lambda replies: merge_split(
            len(keys), [(share, hdr, frames) for share, (hdr, frames) in zip(indices, replies, strict=True)]))

    def admin_plan(self, body: bytes) -> AdminPlan | None:
        """The brokers an ``mmi.admin`` command is sent to; None without slot groups (the one
        broker, or the leader, as ever). Each group's leader keeps its own workers' roles and
        moves, so a drain, undrain, remove or rebalance goes to all of them."""
        m = self.slot_map
        if m is None or m.groups < 2:
            return None
        try:
            cmd = unpack(body)
        except ValueError:
            return None  # the broker answers what is wrong with it
        groups = list(range(m.groups))
        if isinstance(cmd, dict) and cmd.get("cmd") == "move" and isinstance(cmd.get("slot"), int):
            groups = [cmd["slot"] % m.groups]
        urls = sorted({m.leaders[g] for g in groups if g in m.leaders})
        return AdminPlan(urls, groups, [g for g in groups if g not in m.leaders])


def merge_admin(plan: AdminPlan, replies: dict[str, list[bytes] | None]) -> list[bytes]:
    """One ``mmi.admin`` answer from every broker's (``{ok, message, groups: {G: answer}}``): ok
    only if every group was done."""
    groups: dict[str, Any] = {}
    problems: list[str] = [f"group {g} has no leader now: try again" for g in plan.leaderless]
    for url, reply in replies.items():
        answer = _header(reply) if reply else None
        if answer is None:
            problems.append(f"no answer from {url}")
            continue
        groups.update(answer.get("groups") or {})
        if not answer.get("groups"):
            problems.append(f"{url}: {answer.get('message', 'refused')}")
    # A broker answers for the groups it leads when the command comes, which may be fewer than
    # the map said (a handover since): a group nobody answered for was not done.
    problems += [f"group {g}: no answer from its leader (a handover?): try again" for g in plan.groups
                 if str(g) not in groups and g not in plan.leaderless]
    ok = not problems and all(a.get("ok") for a in groups.values())
    message = "; ".join([*problems, *(f"group {g}: {a.get('message', '')}" for g, a in sorted(
        groups.items(), key=lambda ga: int(ga[0])))])
    return [pack({"ok": ok, "message": message, "groups": groups})]
