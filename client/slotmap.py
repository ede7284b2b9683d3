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
from typing import Any

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
