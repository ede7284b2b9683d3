"""A linearizability failure explained to a person: the op at which no valid order remains and
the ops around it (client/cli/linearizability.py finds it)."""

from __future__ import annotations

import math

from client.cli.history import Op, writes


def show(v: bytes | None) -> str:
    s = repr(v)
    return s if len(s) <= 40 else s[:37] + "..."


def fmt(o: Op, t0: float) -> str:
    if o.kind == "put":
        what = f"put {show(o.value)}"
    elif o.kind == "get":
        what = f"get -> {show(o.value)}"
    elif o.kind == "cas":
        what = f"cas {show(o.expected)} -> {show(o.value)}" + ("" if o.swapped is not False else " (refused)")
    else:
        what = "delete" + ("" if o.deleted is None else f" (existed={o.deleted})")
    end = "?" if o.outcome != "ok" or o.complete is None else f"{o.complete - t0:+.6f}"
    return f"p{o.process:<3} {what:<50} [{o.invoke - t0:+.6f}, {end}] {o.outcome}"


def _window(live: list[Op], culprits: list[Op], t_fail: float) -> tuple[list[Op], int]:
    """The culprits, ops concurrent with them, the latest ops finished before they began, writers of values read.

    Returns the ops by invoke time and how many older unknown writes were left out."""
    pre = [o for o in live if o.invoke <= t_fail]
    begin = min(c.invoke for c in culprits)
    done = [o for o in pre if o.outcome == "ok" and o.complete is not None and o.complete < begin]
    latest_invoke = max((o.invoke for o in done), default=-math.inf)
    # finished before the culprit began and not followed by another such op: the states it may start from
    frontier = [o for o in done if o.complete is not None and o.complete >= latest_invoke]
    start = min(o.invoke for o in frontier + culprits)
    chosen = {id(o): o for o in frontier + culprits}
    for o in pre:
        if (o.outcome == "ok" and o.complete is not None and o.complete >= begin) or \
                (o.outcome == "unknown" and o.invoke >= start):
            chosen[id(o)] = o
    read = {o.value for o in chosen.values() if o.kind == "get" and o.value is not None}
    read |= {o.expected for o in chosen.values() if o.kind == "cas" and o.expected is not None}
    for o in live:
        if writes(o) and o.value in read:
            chosen[id(o)] = o
    omitted = sum(1 for o in pre if o.outcome == "unknown" and id(o) not in chosen)
    return sorted(chosen.values(), key=lambda o: (o.invoke, o.process)), omitted


def culprits_at(live: list[Op], t_fail: float, culprit: Op | None) -> list[Op]:
    """The ops whose return at ``t_fail`` left no valid order (the sweep names one, ``culprit``)."""
    culprits = [o for o in live if o.outcome == "ok" and o.complete == t_fail]
    return culprits or ([culprit] if culprit is not None else [])


def explain(key: bytes, live: list[Op], t_fail: float, culprits: list[Op], t0: float) -> str:
    """Why ``key``'s history is not linearizable: no valid order remains once ``culprits`` return
    at ``t_fail``; the ops around them."""
    window, omitted = _window(live, culprits, t_fail)
    marked = {id(o) for o in culprits}
    lines = [
        f"key {key!r}: not linearizable. Its history has a valid order until {t_fail - t0:+.6f} s, when "
        f"{'this op completes' if len(culprits) == 1 else 'these ops complete'} and none remains:",
        *(f"    {fmt(c, t0)}" for c in culprits),
        "  ops around it (concurrent with it, the latest finished before it began, writers of values read):",
        *(f"    {fmt(o, t0)}" + ("   <- first failure" if id(o) in marked else "") for o in window[:40]),
    ]
    if len(window) > 40:
        lines.append(f"    ... and {len(window) - 40} more")
    if omitted > 0:
        lines.append(f"  (+{omitted} older unknown writes not shown)")
    return "\n".join(lines)
