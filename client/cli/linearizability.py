"""Linearizability checker for per-key register histories (put / get / delete / compare-and-set), after Wing &
Gong and Lowe.

Search (as in Knossos and porcupine): a key's ops become a doubly linked list of call and return events in time
order (calls first on ties, so touching intervals are concurrent). Depth-first, each call before the first
return is a pending minimal op that may be linearized if the register accepts it; it is unlinked and the walk
restarts at the head; reaching the return of an op not yet linearized means backtrack. The memo holds the
configurations (bitset of linearized ops as an int, register state) already explored without success: what
follows depends only on that pair, so meeting one again prunes it.

Unknown writes are optional with completion +infinity. Exact reductions keep them cheap: unobservable ones are
dropped; an unknown put whose unique value is read is required; same-effect optional writes are
interchangeable, so only the earliest unused one is tried, the memo records how many were used (fewer
dominates), and one is only made right before an op it enables. An enabled read is taken at once, unbranched.

Depth-first search finds a witness fast but refutes slowly (it revisits late configurations once per earlier
variation). When it finds no witness within a budget, a just-in-time sweep (Lowe's JIT linearization, Knossos'
`linear`) decides: in time order it keeps the non-dominated configurations in which every returned op is
linearized; the set empties at the first return that leaves no valid order, which names the op to explain.

Compare-and-set (``cas``): writes ``value`` only if the register holds ``expected`` (None: only if it is empty).
With unique values, zkv's ``put(if_version=N)`` is one: N is the version of the one write of the value read. An
answered cas that swapped needs the register to hold ``expected`` and leaves ``value``; one refused
(``swapped=False``) observes that it held something else. A cas whose outcome is unknown is checked as an
unconditional optional put of its value: that allows more orders than the real op, so it can miss a violation but
never report one that did not happen.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import cast

from client.cli.failure_report import culprits_at, explain, fmt
from client.cli.history import Op, by_key, validate
from client.cli.lost_writes import lost_by_reads


@dataclass
class CheckResult:
    ok: bool
    keys_checked: int
    ops_checked: int
    failures: list[str]  # one human-readable explanation per key that failed (key, a minimal window of ops)
    lost_writes: list[Op]  # acknowledged puts whose effect vanished (client/cli/lost_writes.py)
    # Of each key that is not linearizable (when located): the ops whose return left no valid order.
    culprits: list[Op] = field(default_factory=list)


# -- preparation -------------------------------------------------------------------------------------------------

_PUT, _GET, _DEL, _CAS, _CAS_REFUSED = 0, 1, 2, 3, 4
_KIND_CODE = {"put": _PUT, "get": _GET, "delete": _DEL}
_DEL_ANY, _DEL_EXISTED, _DEL_ABSENT = 0, 1, 2  # precondition of a delete on the register


class _Unread:
    """The state after writing a value that no get ever returns: such values are indistinguishable."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<a value nobody reads>"


_UNREAD = _Unread()
_State = bytes | _Unread | None
_NO_OPTIONAL = object()  # "the last move was not an optional write"


@dataclass
class _Key:
    """One key's ops in the form the searches want; op i is bit i of the linearized-set bitsets."""

    ops: list[Op]
    kind: list[int]
    arg: list[object]  # put: state written; get: value expected; delete: precondition code;
    # cas: (state required, state written); refused cas: the state it saw the register did not hold
    required: list[bool]
    invoke: list[float]
    ret: list[float]  # effective completion: +inf for optional ops
    group: list[int]  # -1, or the id of the interchangeable optional writes this one belongs to
    grank: list[int]  # rank inside its group by invoke order
    group_effect: list[_State]  # the state each group's writes leave
    initial: _State


def _live(ops: Iterable[Op]) -> list[Op]:
    """Drop what cannot matter: failed ops and reads whose answer never arrived."""
    return [o for o in ops if o.outcome == "ok" or (o.outcome == "unknown" and o.kind != "get")]


def _prepare(ops: list[Op], initial: bytes | None) -> _Key:
    # Values some op saw the register hold (gets here are all ok, and so is a swapped cas's expected value),
    # and every value an op compares with: only values never compared are indistinguishable.
    swapped = [o for o in ops if o.kind == "cas" and o.outcome == "ok" and o.swapped]
    refused = [o for o in ops if o.kind == "cas" and o.outcome == "ok" and o.swapped is False]
    read_values = {o.value for o in ops if o.kind == "get"} | {o.expected for o in swapped + refused}
    is_swapped, is_refused = {id(o) for o in swapped}, {id(o) for o in refused}

    def canon(v: bytes | None) -> _State:
        return v if v is None or v in read_values else _UNREAD

    put_count = Counter(o.value for o in ops if o.kind in ("put", "cas"))
    first_read: dict[bytes | None, float] = {}
    for o in ops:
        if o.complete is not None and (o.kind == "get" or id(o) in is_swapped):
            v = o.value if o.kind == "get" else o.expected
            first_read[v] = min(first_read.get(v, math.inf), o.complete)
    # Latest completion of an op that needs the register non-empty / empty: an optional write invoked after it
    # can never serve it.
    # (A refused cas counts as both: anything but its expected value serves it.)
    last_needs_value = max((o.complete for o in ops if o.outcome == "ok" and o.complete is not None and (
        (o.kind == "delete" and o.deleted) or id(o) in is_refused)), default=-math.inf)
    last_needs_empty = max((o.complete for o in ops if o.outcome == "ok" and o.complete is not None and (
        (o.kind == "get" and o.value is None) or (o.kind == "delete" and o.deleted is False)
        or (id(o) in is_swapped and o.expected is None) or (id(o) in is_refused and o.expected is not None))),
        default=-math.inf)

    k = _Key([], [], [], [], [], [], [], [], [], canon(initial))
    groups: dict[_State, int] = {}
    group_size: list[int] = []
    for o in sorted(ops, key=lambda o: o.invoke):
        # An unknown cas is checked as an optional put of its value (see the module's docstring).
        code = _KIND_CODE.get(o.kind, _PUT)
        arg: object
        group = -1
        if o.outcome == "ok" and o.complete is not None and o.kind == "cas":
            required, ret = True, o.complete
            code, arg = (_CAS, (o.expected, canon(o.value))) if o.swapped else (_CAS_REFUSED, o.expected)
        elif o.outcome == "ok" and o.complete is not None:
            required, ret = True, o.complete
            if code == _PUT:
                arg = canon(o.value)
            elif code == _GET:
                arg = o.value
            else:
                arg = {None: _DEL_ANY, True: _DEL_EXISTED, False: _DEL_ABSENT}[o.deleted]
        elif code == _PUT and o.value in first_read and put_count[o.value] == 1 and initial != o.value:
            # Its value was read and nothing else could have written it: it happened, before that read ended.
            # (If that read ended before this put began, the check fails at that read, as it must.)
            required, ret, arg = True, max(o.invoke, first_read[o.value]), o.value
        else:
            effect = canon(o.value) if code == _PUT else None
            if effect is None and last_needs_empty < o.invoke:
                continue
            if effect is _UNREAD and last_needs_value < o.invoke:
                continue
            required, ret = False, math.inf
            arg = effect if code == _PUT else _DEL_ANY
            group = groups.setdefault(effect, len(groups))
            if group == len(group_size):
                group_size.append(0)
                k.group_effect.append(effect)
        k.ops.append(o)
        k.kind.append(code)
        k.arg.append(arg)
        k.required.append(required)
        k.invoke.append(o.invoke)
        k.ret.append(ret)
        k.group.append(group)
        k.grank.append(group_size[group] if group >= 0 else 0)
        if group >= 0:
            group_size[group] += 1
    return k


def _enabled(code: int, a: object, state: object) -> bool:
    if code == _GET:
        return state == a
    if code == _PUT:
        return True
    if code == _CAS:
        return state == cast(tuple[_State, _State], a)[0]
    if code == _CAS_REFUSED:
        return state != a
    return a == _DEL_ANY or (a == _DEL_EXISTED) == (state is not None)


def _after(code: int, a: object, state: _State) -> _State:
    if code == _PUT:
        return cast(_State, a)
    if code == _CAS:
        return cast(tuple[_State, _State], a)[1]
    return state if code in (_GET, _CAS_REFUSED) else None


def _le(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    return all(x <= y for x, y in zip(a, b, strict=True))


# -- the depth-first search --------------------------------------------------------------------------------------


@dataclass
class _Outcome:
    verdict: bool | None  # True linearizable, False not, None out of time or budget
    furthest: Op | None  # the required op with the latest completion the search could not get past


def _search(k: _Key, deadline: float, max_steps: int) -> _Outcome:
    m = len(k.ops)
    remaining = sum(k.required)
    if remaining == 0:
        return _Outcome(True, None)
    # Nodes: 0 = head, 2i+1 = call of op i, 2i+2 = return of op i, 2m+2 = tail (even, like a return).
    tail = 2 * m + 2
    events = sorted([(k.invoke[i], 0, 0, i, 2 * i + 1) for i in range(m)]
                    + [(k.ret[i], 1, 0 if k.required[i] else 1, i, 2 * i + 2) for i in range(m)])
    order = [0] + [ev[4] for ev in events] + [tail]
    nxt = [0] * (tail + 1)
    prv = [0] * (tail + 1)
    for a, b in zip(order, order[1:], strict=False):
        nxt[a] = b
        prv[b] = a

    kind, arg, required, group, grank, effect = k.kind, k.arg, k.required, k.group, k.grank, k.group_effect
    used = [0] * len(effect)  # optional writes of each group linearized so far (always the earliest-invoked ones)
    furthest: list[tuple[float, int]] = [(-math.inf, -1)]  # (completion, op) of the furthest barrier met

    def candidates(state: _State, before_optional: object) -> list[tuple[int, _State]]:
        """The moves worth trying from here, best first: (op, state after it)."""
        e = nxt[0]
        pending: list[int] = []
        optional: list[int] = []
        while e & 1:  # calls before the first return: the pending, minimal ops
            i = e >> 1
            if required[i]:
                pending.append(i)
            elif grank[i] == used[group[i]]:
                optional.append(i)
            e = nxt[e]
        if e != tail and k.ret[(e >> 1) - 1] > furthest[0][0]:
            furthest[0] = (k.ret[(e >> 1) - 1], (e >> 1) - 1)
        if before_optional is not _NO_OPTIONAL:
            # An optional write is only worth making right before an op it enables: anything else could go
            # first, and the write could then be left out.
            return [(i, _after(kind[i], arg[i], state)) for i in pending
                    if _enabled(kind[i], arg[i], state) and not _enabled(kind[i], arg[i], before_optional)]
        for i in pending:
            if kind[i] == _GET and state == arg[i]:
                return [(i, state)]  # reads leave the state alone: take an enabled one now, never branch on it
        out = [(i, _after(kind[i], arg[i], state)) for i in pending if _enabled(kind[i], arg[i], state)]
        for j in optional:  # tried last: not using them first lets the memo prune the paths that do
            eff = effect[group[j]]
            if any(_enabled(kind[i], arg[i], eff) and not _enabled(kind[i], arg[i], state) for i in pending):
                out.append((j, eff))
        return out

    # The memo: configurations fully explored without success, (required ops done, state) -> the `used` vectors
    # they had. Having used fewer optional writes can only help, so one at or below the current vector proves
    # the current configuration fails too.
    failed: dict[tuple[int, _State], list[tuple[int, ...]]] = {}
    state: _State = k.initial
    bits = 0
    before_optional: object = _NO_OPTIONAL
    frames: list[tuple[list[tuple[int, _State]], int, int, _State, object]] = []
    cands = candidates(state, before_optional)
    idx = 0
    steps = 0
    while True:
        steps += 1
        if steps > max_steps or (not steps & 1023 and time.monotonic() > deadline):
            return _Outcome(None, None)
        if idx < len(cands):
            i, new = cands[idx]
            idx += 1
            g = group[i]
            nb = bits | (1 << i) if required[i] else bits
            if g >= 0:
                used[g] += 1
            seen = failed.get((nb, new))
            if seen is not None and any(_le(v, tuple(used)) for v in seen):
                if g >= 0:
                    used[g] -= 1
                continue
            frames.append((cands, idx, i, state, before_optional))
            c, r = 2 * i + 1, 2 * i + 2  # unlink the op's call and return
            nxt[prv[c]] = nxt[c]
            prv[nxt[c]] = prv[c]
            nxt[prv[r]] = nxt[r]
            prv[nxt[r]] = prv[r]
            before_optional = _NO_OPTIONAL if required[i] else state
            state = new
            bits = nb
            if required[i]:
                remaining -= 1
                if remaining == 0:
                    return _Outcome(True, None)
            cands = candidates(state, before_optional)
            idx = 0
            continue
        # every move from here failed: remember it, undo the move that led here, try the next one
        if not frames:
            return _Outcome(False, k.ops[furthest[0][1]] if furthest[0][1] >= 0 else None)
        failed.setdefault((bits, state), []).append(tuple(used))
        cands, idx, i, state, before_optional = frames.pop()
        c, r = 2 * i + 1, 2 * i + 2  # relink in reverse order of unlinking
        nxt[prv[r]] = r
        prv[nxt[r]] = r
        nxt[prv[c]] = c
        prv[nxt[c]] = c
        if required[i]:
            bits ^= 1 << i
            remaining += 1
        else:
            used[group[i]] -= 1


# -- the just-in-time sweep --------------------------------------------------------------------------------------


@dataclass
class _Swept:
    verdict: bool | None  # True linearizable, False not, None out of time
    culprit: Op | None  # the op whose return left no valid configuration
    t_fail: float  # its (effective) completion: the history up to here is the first that is not linearizable


def _keep_minimal(d: dict[tuple[int, _State], list[tuple[int, ...]]], key: tuple[int, _State],
                  v: tuple[int, ...]) -> None:
    vs = d.setdefault(key, [])
    if not any(_le(u, v) for u in vs):
        vs[:] = [u for u in vs if not _le(v, u)] + [v]


def _sweep(k: _Key, deadline: float) -> _Swept:
    m = len(k.ops)
    kind, arg, required, group, effect = k.kind, k.arg, k.required, k.group, k.group_effect
    events = sorted([(k.invoke[i], 0, i) for i in range(m)] + [(k.ret[i], 1, i) for i in range(m) if required[i]])
    pending: list[int] = []  # required ops called and not returned
    invoked = [0] * len(effect)  # optional writes of each group called so far
    # Configurations in which every returned op is linearized: (pending ops linearized early, state) -> minimal
    # vectors of optional writes used per group.
    frontier: dict[tuple[int, _State], list[tuple[int, ...]]] = {(0, k.initial): [(0,) * len(effect)]}
    work = 0
    for _, is_return, i in events:
        if not is_return:
            if required[i]:
                pending.append(i)
            else:
                invoked[group[i]] += 1
            continue
        # Op i returns: extend every configuration just until i is linearized (just in time).
        bit = 1 << i
        reached: dict[tuple[int, _State], list[tuple[int, ...]]] = {}
        todo: list[tuple[int, _State, tuple[int, ...], object]] = []
        for (bits, s), vs in frontier.items():
            for v in vs:
                if bits & bit:
                    _keep_minimal(reached, (bits ^ bit, s), v)
                else:
                    todo.append((bits, s, v, _NO_OPTIONAL))
        seen: dict[tuple[int, _State, object], list[tuple[int, ...]]] = {}
        while todo:
            work += 1
            if not work & 1023 and time.monotonic() > deadline:
                return _Swept(None, None, math.inf)
            bits, s, v, before = todo.pop()
            prior = seen.setdefault((bits, s, before), [])
            if any(_le(u, v) for u in prior):
                continue
            prior.append(v)
            free = [r for r in pending if not bits >> r & 1]
            moves: list[tuple[int, _State, tuple[int, ...], object]] = []
            if before is not _NO_OPTIONAL:  # right after an optional write: only an op it enables
                moves = [(r, _after(kind[r], arg[r], s), v, _NO_OPTIONAL) for r in free
                         if _enabled(kind[r], arg[r], s) and not _enabled(kind[r], arg[r], before)]
            else:
                reads = [r for r in free if kind[r] == _GET and arg[r] == s]
                if reads:  # take an enabled read at once, i itself if it is one
                    moves = [(i if i in reads else reads[0], s, v, _NO_OPTIONAL)]
                else:
                    moves = [(r, _after(kind[r], arg[r], s), v, _NO_OPTIONAL) for r in free
                             if _enabled(kind[r], arg[r], s)]
                    for g, eff in enumerate(effect):
                        if invoked[g] > v[g] and any(_enabled(kind[r], arg[r], eff)
                                                     and not _enabled(kind[r], arg[r], s) for r in free):
                            moves.append((-1, eff, v[:g] + (v[g] + 1,) + v[g + 1:], s))
            for r, s2, v2, before2 in moves:
                if r == i:
                    _keep_minimal(reached, (bits, s2), v2)
                else:
                    todo.append((bits | 1 << r if r >= 0 else bits, s2, v2, before2))
        pending.remove(i)
        if not reached:
            return _Swept(False, k.ops[i], k.ret[i])
        frontier = reached
    return _Swept(True, None, math.inf)


# -- entry point -------------------------------------------------------------------------------------------------


def check_history(ops: Iterable[Op], initial: dict[bytes, bytes | None] | None = None,
                  time_limit: float = 60.0) -> CheckResult:
    """Check every key's history for linearizability as a register, and look for lost acknowledged puts.

    time_limit bounds the work on each key; a key that runs out of time is reported as a failure, never as
    verified. ops_checked counts the ops that enter the check: all but failed ops and reads that never answered."""
    all_ops = list(ops)
    for o in all_ops:
        validate(o)
    initial = initial or {}
    t0 = min((o.invoke for o in all_ops), default=0.0)
    failures: list[str] = []
    culprits: list[Op] = []
    ops_by_key = by_key(all_ops)
    ops_checked = 0
    for key in sorted(ops_by_key):
        live = _live(ops_by_key[key])
        ops_checked += len(live)
        k = _prepare(live, initial.get(key))
        deadline = time.monotonic() + time_limit
        # The depth-first search gets a budget of a few dozen steps per op, plenty to find a witness in a
        # linearizable history; the sweep settles the rest.
        searched = _search(k, deadline, max_steps=40 * len(k.ops) + 20_000)
        if searched.verdict:
            continue
        swept = _sweep(k, deadline)
        if swept.verdict is False:
            found = culprits_at(live, swept.t_fail, swept.culprit)
            culprits += found
            failures.append(explain(key, live, swept.t_fail, found, t0))
        elif swept.verdict is None and searched.verdict is False:
            where = f"; the search could not get past:\n    {fmt(searched.furthest, t0)}" if searched.furthest else ""
            failures.append(f"key {key!r}: not linearizable ({len(live)} ops; locating the first failure ran out "
                            f"of time){where}")
        elif swept.verdict is None:
            failures.append(f"key {key!r}: inconclusive: the linearizability check did not finish within "
                            f"{time_limit} s ({len(live)} ops); not verified")
        elif searched.verdict is False:  # the two algorithms disagree: a bug here, so trust neither
            failures.append(f"key {key!r}: inconclusive: checker bug, the search and the sweep disagree")
    lost = lost_by_reads(all_ops)
    return CheckResult(ok=not failures and not lost, keys_checked=len(ops_by_key), ops_checked=ops_checked,
                       failures=failures, lost_writes=lost, culprits=culprits)
