"""Lost writes: acknowledged puts whose effect vanished, judged against a final read of every key
(``lost_writes``) or against the history's own reads (``lost_by_reads``, part of ``check_history``)."""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Iterable

from client.cli.history import Op, by_key, writes


def _last_writer(ops: list[Op]) -> dict[bytes | None, float]:
    """Per value: the latest completion of an op that could have written it (+inf if one never answered).

    None maps to the deletes and the initial state (which precedes everything)."""
    last: dict[bytes | None, float] = {None: -math.inf}
    for o in ops:
        if o.outcome == "fail" or o.kind == "get" or (o.kind == "cas" and not writes(o)):
            continue
        t = o.complete if o.outcome == "ok" and o.complete is not None else math.inf
        v = o.value if o.kind in ("put", "cas") else None
        last[v] = max(last.get(v, -math.inf), t)
    return last


def lost_writes(ops: Iterable[Op], final: dict[bytes, bytes | None]) -> list[Op]:
    """Ok puts (and swapped cas) whose value is not the key's final value although every possible writer of that
    final value (a put of it; for None a delete or the initial state) completed before the put was invoked.

    Keys missing from `final` are not judged."""
    lost: list[Op] = []
    for key, kops in by_key(ops).items():
        if key not in final:
            continue
        f = final[key]
        last = _last_writer(kops).get(f, -math.inf)
        lost += [o for o in kops if writes(o) and o.outcome == "ok" and o.value != f and last < o.invoke]
    return sorted(lost, key=lambda o: o.invoke)


def lost_by_reads(ops: list[Op]) -> list[Op]:
    """The same rule with the history's own reads as observations: an ok put p is lost if some ok get invoked
    after p completed returned a value whose every possible writer completed before p was invoked."""
    lost: list[Op] = []
    for kops in by_key(ops).values():
        last = _last_writer(kops)
        gets = sorted((o for o in kops if o.kind == "get" and o.outcome == "ok"), key=lambda o: o.invoke)
        invokes = [g.invoke for g in gets]
        # suffix[j]: the earliest "last possible writer" among gets j.. (the most damning later read)
        suffix = [math.inf] * (len(gets) + 1)
        for j in range(len(gets) - 1, -1, -1):
            suffix[j] = min(suffix[j + 1], last.get(gets[j].value, -math.inf))
        for p in kops:
            if writes(p) and p.outcome == "ok" and p.complete is not None:
                # a read of p's own value has last >= p.complete >= p.invoke, so it never counts here
                if suffix[bisect_right(invokes, p.complete)] < p.invoke:
                    lost.append(p)
    return sorted(lost, key=lambda o: o.invoke)
