"""Routing with several active brokers (issue 15; sans-I/O, not yet used by the clients): which
broker leads each key's slot group, how a multi-key request splits over the brokers, and how
the scan pages of several brokers merge into one page in key order.

A ``SlotMap`` is what a client caches: the slot count, the group count, each group's leader
(its frontend) and the map's revision (it only grows). A reply ``NOT_LEADER`` naming a higher
revision makes the client fetch the map again (Redis Cluster's MOVED, docs/architecture.md,
"Active brokers").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from protocol.replication import slot_for_key


@dataclass(frozen=True)
class SlotMap:
    slots: int
    groups: int
    leaders: dict[int, str]  # group -> the leader's frontend; a group without a leader is absent
    revision: int

    def group_of(self, key: bytes) -> int:
        return slot_for_key(key, self.slots) % self.groups

    def leader_for(self, key: bytes) -> str | None:
        """The frontend to send ``key``'s requests to; None while its group has no leader."""
        return self.leaders.get(self.group_of(key))

    def split(self, keys: Sequence[bytes]) -> dict[str | None, list[int]]:
        """The indices of ``keys`` by the broker that leads them (None: no leader known), in
        their order: an MGET or MSET sends each share to its broker and puts the answers back
        by index."""
        out: dict[str | None, list[int]] = {}
        for i, k in enumerate(keys):
            out.setdefault(self.leader_for(k), []).append(i)
        return out

    def newer_than(self, revision: int) -> bool:
        return self.revision > revision

    def by_group(self, keys: Sequence[bytes]) -> dict[int, list[int]]:
        """The indices of ``keys`` by group, in their order: what one request may carry."""
        out: dict[int, list[int]] = {}
        for i, k in enumerate(keys):
            out.setdefault(self.group_of(k), []).append(i)
        return out

    def learn(self, group: int, leader: str | None) -> SlotMap:
        """This map with ``group``'s leader as a NOT_LEADER named it (None: not known)."""
        leaders = {g: url for g, url in self.leaders.items() if g != group}
        if leader:
            leaders[group] = leader
        return SlotMap(self.slots, self.groups, leaders, self.revision)

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> SlotMap:
        """From the map a broker answers (``{"slots", "groups", "leaders": {"G": url}, "revision"}``);
        ValueError if it is not one."""
        try:
            slots, groups, revision = int(record["slots"]), int(record["groups"]), int(record["revision"])
            leaders = {int(g): str(url) for g, url in dict(record.get("leaders") or {}).items()}
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"not a slot map: {e}") from None
        if slots < 1 or not 1 <= groups <= slots or any(not 0 <= g < groups for g in leaders):
            raise ValueError(f"not a slot map: {slots} slots, {groups} groups, leaders of {sorted(leaders)}")
        return cls(slots, groups, leaders, revision)

    def record(self) -> dict[str, Any]:
        return {"slots": self.slots, "groups": self.groups, "revision": self.revision,
                "leaders": {str(g): url for g, url in sorted(self.leaders.items())}}


Share = tuple[Sequence[int], dict[str, Any], Sequence[Any]]


def merge_split(n: int, parts: Sequence[Share]) -> tuple[dict[str, Any], list[Any]]:
    """One reply of a multi-key request from the replies of its shares (one per group): each
    share's indices into the ``n`` keys, its header and its value frames (one per key, or none).
    A header list as long as its share's keys is per key and goes back by index, as do the
    indices of ``streams``; ``count`` is summed; any other field is the first share's."""
    header: dict[str, Any] = dict(parts[0][1]) if parts else {}
    values: list[Any] = [None] * n
    per_key: dict[str, list[Any]] = {}
    streams: dict[int, Any] = {}  # an MGET's streamed values, by index into the whole request
    for indices, hdr, frames in parts:
        for name, field in hdr.items():
            if isinstance(field, list) and len(field) == len(indices):
                merged = per_key.setdefault(name, [None] * n)
                for i, x in zip(indices, field, strict=True):
                    merged[i] = x
        for i, manifest in (hdr.get("streams") or {}).items():
            streams[indices[int(i)]] = manifest
        for i, x in zip(indices, frames, strict=False):
            values[i] = x
    header.update(per_key)
    header.pop("streams", None)
    if streams:
        header["streams"] = streams
    if any("count" in hdr for _, hdr, _ in parts):  # an MSET's keys written: every share's
        header["count"] = sum(int(hdr.get("count") or 0) for _, hdr, _ in parts)
    return header, values if any(len(frames) for _, _, frames in parts) else []


def merge_pages(pages: Sequence[tuple[Sequence[Any], bool]], limit: int) -> tuple[list[Any], bool]:
    """One scan page from the pages of several brokers (each sorted by ``.key``, each with its
    ``more``), all asked with the same prefix, ``start_after`` and ``limit``.

    Only keys up to the smallest last key of a page that has more can be returned: beyond it,
    that broker may hold keys not yet seen. So the merged page is every item up to that bound,
    in key order, at most ``limit`` of them; ``more`` is true if anything was left out or any
    broker has more. The next page starts after the last key returned, on every broker again.
    """
    bounds = [items[-1].key for items, more in pages if more and items]
    if any(more and not items for items, more in pages):
        raise ValueError("a page that has more must hold at least one key")
    bound = min(bounds) if bounds else None
    merged = sorted((it for items, _ in pages for it in items if bound is None or it.key <= bound),
                    key=lambda it: it.key)
    cut = len(merged) > limit
    merged = merged[:limit]
    more = cut or any(more for _, more in pages)
    return merged, more


class _Entry(NamedTuple):
    key: bytes
    version: int
    value: Any
    stream: Any  # the manifest field of a streamed value (docs/protocol.md §1.8), or None


def merge_scans(parts: Sequence[tuple[dict[str, Any], Sequence[Any]]], limit: int) -> tuple[dict[str, Any], list[Any]]:
    """One scan reply from every group's reply to the same page request (``merge_pages``' rule).
    A page with ``more`` but no keys counts as complete, as it does for one broker (nothing
    could follow it: ``next_start``)."""
    pages = []
    with_values = any(len(frames) for _, frames in parts)
    for hdr, frames in parts:
        streams = {int(i): m for i, m in (hdr.get("streams") or {}).items()}
        keys = [bytes(k) for k in hdr["keys"]]
        items = [_Entry(k, int(v), frames[i] if with_values else None, streams.get(i))
                 for i, (k, v) in enumerate(zip(keys, hdr["versions"], strict=True))]
        pages.append((items, bool(hdr.get("more")) and bool(items)))
    merged, more = merge_pages(pages, limit)
    header: dict[str, Any] = {**(parts[0][0] if parts else {}), "keys": [e.key for e in merged],
                              "versions": [e.version for e in merged], "more": more}
    header.pop("streams", None)
    streams = {i: e.stream for i, e in enumerate(merged) if e.stream is not None}
    if streams:
        header["streams"] = streams
    return header, [e.value for e in merged] if with_values else []
