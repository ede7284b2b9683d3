"""A history of register operations as the workload records them and the checks read them
(client/cli/linearizability.py, client/cli/lost_writes.py, ``zkv verify``)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

KINDS = ("put", "get", "delete", "cas")
OUTCOMES = ("ok", "fail", "unknown")


@dataclass(frozen=True)
class Op:
    process: int  # which client issued it
    key: bytes
    kind: str  # "put" | "get" | "delete" | "cas"
    value: bytes | None  # put, cas: value written (unique per write); get: value read (None = not found); delete: None
    invoke: float  # time.monotonic() when the call started
    complete: float | None  # time.monotonic() when the answer arrived; None when the outcome is unknown
    outcome: str  # "ok" | "fail" (definitely not applied) | "unknown" (may take effect any time after invoke, or never)
    deleted: bool | None = None  # for an ok delete: whether the key existed; None if not known
    expected: bytes | None = None  # cas: the value the register must hold (None: it must be empty)
    swapped: bool | None = None  # for an ok cas: whether it wrote (False: refused, the condition did not hold)


def validate(o: Op) -> None:
    if o.kind not in KINDS:
        raise ValueError(f"bad kind {o.kind!r} in {o}")
    if o.outcome not in OUTCOMES:
        raise ValueError(f"bad outcome {o.outcome!r} in {o}")
    if o.outcome == "ok":
        if o.complete is None:
            raise ValueError(f"an ok op needs a completion time: {o}")
        if o.complete < o.invoke:
            raise ValueError(f"completion before invocation: {o}")
    if o.kind in ("put", "cas") and o.outcome != "fail" and o.value is None:
        raise ValueError(f"a {o.kind} needs a value: {o}")
    if o.kind == "cas" and o.outcome == "ok" and o.swapped is None:
        raise ValueError(f"an ok cas needs swapped (True or False): {o}")


def writes(o: Op) -> bool:
    """Whether ``o`` may have written its value: a put or cas not known to have failed or been refused."""
    return o.kind == "put" or (o.kind == "cas" and o.swapped is not False)


def by_key(ops: Iterable[Op]) -> dict[bytes, list[Op]]:
    out: dict[bytes, list[Op]] = defaultdict(list)
    for o in ops:
        out[o.key].append(o)
    return out
