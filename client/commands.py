"""Every one-request client command, written once: the request it sends and how its reply is read.

``Client`` (sync) and ``AsyncClient`` (asyncio) differ only in how they move frames; both run
these ``Call``s (client/api.py composes them into the public methods), so they behave the same
and raise the same exceptions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from protocol.errors import (
    ConditionFailed,
    ErrorCode,
    InvalidRequest,
    KeyNotFound,
    NotLeader,
    ValueTooLarge,
    ZkvError,
    error_from_reply,
)
from protocol.limits import DEFAULT_SCAN_LIMIT, MAX_CHUNK_BYTES

Key = bytes | str
Reply = tuple[dict[str, Any], list[bytes]]
OnPartial = Callable[[dict[str, Any], list[bytes]], None]


def key_bytes(k: Key) -> bytes:
    if isinstance(k, str):
        return k.encode()
    if isinstance(k, bytes | bytearray | memoryview):
        return bytes(k)
    raise InvalidRequest(f"keys must be bytes or str, not {type(k).__name__}")


def value_bytes(v: Any) -> bytes:
    if isinstance(v, bytes | bytearray | memoryview):
        return bytes(v)
    raise InvalidRequest(f"values must be bytes, not {type(v).__name__}")


@dataclass(frozen=True)
class Call:
    """One command: ``op`` with ``header`` fields and value frames, and its reply parser.
    An empty ``op`` needs no request at all (``parse`` gives the answer). ``on_partial`` gets the
    PARTIAL messages of a request answered in parts (get_chunks)."""

    op: str
    header: dict[str, Any]
    parse: Callable[[dict[str, Any], list[bytes]], Any]
    values: list[bytes] = field(default_factory=list)
    on_partial: OnPartial | None = None


# Requests carrying more value bytes than this are checked against the broker's --max-value before
# they are sent: a frame far over the limit makes the broker's socket drop the connection (libzmq
# MAXMSGSIZE) instead of answering, and the client would only see a timeout. The broker sets that
# size to max(--max-value, MAX_CHUNK_BYTES) + 1 MiB (broker/server.py), so a request with no more
# than MAX_CHUNK_BYTES of values always gets an answer, and only larger ones need the check.
CHECK_SIZE_ABOVE = MAX_CHUNK_BYTES


def needs_size_check(call: Call) -> bool:
    """Whether ``call`` carries enough value bytes to be checked against the broker's limit first."""
    return bool(call.values) and sum(len(v) for v in call.values) > CHECK_SIZE_ABOVE


def oversize(call: Call, max_value: int | None) -> ValueTooLarge | None:
    """The error a request would get for its size, found before sending it (None if it fits)."""
    total = sum(len(v) for v in call.values)
    if max_value is None or total <= max_value:
        return None
    return ValueTooLarge(f"{total} bytes of values in one request; the broker's limit is {max_value} "
                         f"(--max-value): stream large values with put_stream")


def error_for(rh: dict[str, Any]) -> ZkvError:
    """The exception for an error reply header."""
    if rh.get("code") == ErrorCode.CONDITION_FAILED.value:
        return ConditionFailed(str(rh.get("message", "")), version=rh.get("version"))
    if rh.get("code") == ErrorCode.NOT_LEADER.value:
        leader = rh.get("leader")
        return NotLeader(str(rh.get("message", "")), leader=leader if isinstance(leader, str) else None)
    return error_from_reply(str(rh.get("code")), str(rh.get("message", "")))


def put(key: Key, value: bytes, ttl: int | None = None, if_version: int | None = None,
        if_absent: bool = False) -> Call:
    hdr: dict[str, Any] = {"key": key_bytes(key)}
    if ttl is not None:
        hdr["ttl"] = ttl
    if if_version is not None:
        hdr["if_version"] = if_version
    if if_absent:
        hdr["if_absent"] = True
    return Call("put", hdr, lambda rh, _v: int(rh["version"]), [value_bytes(value)])


def get_versioned(key: Key) -> Call:
    """(value, version); a streamed value comes as (StreamInfo, version) for the client to fetch."""
    def parse(rh: dict[str, Any], v: list[bytes]) -> tuple[Any, int] | None:
        if not rh["found"]:
            return None
        return (_streamed(rh) or v[0]), int(rh["version"])

    return Call("get", {"key": key_bytes(key)}, parse)


def get(key: Key) -> Call:
    """The value; a streamed value comes as a StreamInfo for the client to fetch."""
    return Call("get", {"key": key_bytes(key)}, lambda rh, v: (_streamed(rh) or v[0]) if rh["found"] else None)


def _streamed(rh: dict[str, Any], index: int | None = None) -> StreamInfo | None:
    m = rh.get("stream") if index is None else (rh.get("streams") or {}).get(index)
    if m is None:
        return None
    version = rh["version"] if index is None else rh["versions"][index]
    return StreamInfo(int(version), int(m["size"]), bytes(m["stream"]), int(m["chunks"]))


def delete(key: Key, if_version: int | None = None) -> Call:
    hdr: dict[str, Any] = {"key": key_bytes(key)}
    if if_version is not None:
        hdr["if_version"] = if_version
    return Call("delete", hdr, lambda rh, _v: None if rh["deleted"] is None else bool(rh["deleted"]))


def exists(key: Key) -> Call:
    return Call("exists", {"key": key_bytes(key)}, lambda rh, _v: bool(rh["exists"]))


def ttl(key: Key) -> Call:
    k = key_bytes(key)

    def parse(rh: dict[str, Any], _v: list[bytes]) -> int | None:
        if not rh["found"]:
            raise KeyNotFound(f"no key {k[:64]!r}")
        return None if rh["ttl"] is None else int(rh["ttl"])

    return Call("ttl", {"key": k}, parse)


def expire(key: Key, ttl_ms: int | None) -> Call:
    hdr: dict[str, Any] = {"key": key_bytes(key)}
    if ttl_ms is not None:
        hdr["ttl"] = ttl_ms
    return Call("expire", hdr, lambda rh, _v: bool(rh["applied"]))


def mget(keys: Iterable[Key]) -> Call:
    ks = [key_bytes(k) for k in keys]
    if not ks:
        return Call("", {}, lambda _rh, _v: [])
    return Call("mget", {"keys": ks},
                lambda rh, v: [(_streamed(rh, i) or x) if f else None
                               for i, (f, x) in enumerate(zip(rh["found"], v, strict=True))])


def mset(items: Mapping[Key, bytes] | Iterable[tuple[Key, bytes]]) -> Call:
    pairs = list(items.items()) if isinstance(items, Mapping) else list(items)
    if not pairs:
        return Call("", {}, lambda _rh, _v: None)
    return Call("mset", {"keys": [key_bytes(k) for k, _ in pairs]}, lambda _rh, _v: None,
                [value_bytes(v) for _, v in pairs])


# -- scan --------------------------------------------------------------------------------------


class ScanItem(NamedTuple):
    key: bytes
    value: Any  # bytes; None when the scan asked for keys only (StreamInfo from scan_page for a streamed value)
    version: int


class ScanPage(NamedTuple):
    items: list[ScanItem]
    more: bool  # keys after the last one may exist: ask again with start_after = its key


def scan_page(prefix: Key = b"", start_after: Key | None = None, limit: int = DEFAULT_SCAN_LIMIT,
              values: bool = True) -> Call:
    """One page of live keys starting with ``prefix``, above ``start_after``, in key order."""
    hdr: dict[str, Any] = {"prefix": key_bytes(prefix), "limit": limit, "values": values}
    if start_after is not None:
        hdr["start_after"] = key_bytes(start_after)

    def parse(rh: dict[str, Any], vals: list[bytes]) -> ScanPage:
        keys = [bytes(k) for k in rh["keys"]]
        got = [_streamed(rh, i) or v for i, v in enumerate(vals)] if values else [None] * len(keys)
        return ScanPage([ScanItem(k, v, int(q)) for k, v, q in zip(keys, got, rh["versions"], strict=True)],
                        bool(rh["more"]))

    return Call("scan", hdr, parse)


def next_start(page: ScanPage) -> bytes | None:
    """Where the next page starts (its start_after), or None when the scan is complete."""
    return page.items[-1].key if page.more and page.items else None



# -- backup dumps (docs/protocol.md §1.11) ------------------------------------------------------


class DumpEntry(NamedTuple):
    """One live key of a slot's cut: its value (``value``), or, when ``chunks`` > 0, a streamed
    value of ``size`` bytes whose chunks follow as ``bytes`` items."""

    key: bytes
    version: int
    expire_at: int  # ms on the broker's clock, 0 = never
    value: bytes
    size: int = 0
    chunks: int = 0


class SlotCut(NamedTuple):
    """What a slot's dump begins with: the committed position it is a cut at."""

    slot: int
    epoch: int
    seq: int


class DumpPart(NamedTuple):
    cut: SlotCut
    items: list[DumpEntry | bytes]
    last: bool
    dump: bytes
    worker: str


def dump_part(slot: int, part: int = 0, dump: bytes = b"", worker: str = "") -> Call:
    """Part ``part`` of a dump of ``slot``; parts after the first name the dump and worker the
    previous part's answer gave."""
    hdr: dict[str, Any] = {"slot": slot, "part": part}
    if part:
        hdr.update({"dump": dump, "worker": worker})

    def parse(rh: dict[str, Any], frames: list[bytes]) -> DumpPart:
        items: list[DumpEntry | bytes] = []
        for item, frame in zip(rh["items"], frames, strict=True):
            if item[0] == "v":
                items.append(DumpEntry(bytes(item[1]), int(item[2]), int(item[3]), frame))
            elif item[0] == "s":
                items.append(DumpEntry(bytes(item[1]), int(item[2]), int(item[3]), b"", int(item[4]), int(item[5])))
            else:
                items.append(frame)
        return DumpPart(SlotCut(slot, int(rh["epoch"]), int(rh["seq"])), items, bool(rh["last"]),
                        bytes(rh["dump"]), str(rh["worker"]))

    return Call("dump", hdr, parse)


# -- streamed values (docs/protocol.md §1.8): what a get says about them -----------------------


@dataclass(frozen=True)
class StreamInfo:
    """What a get found: the value itself (``inline``) or where its chunks are (streamed)."""

    version: int
    size: int
    stream: bytes = b""
    chunks: int = 0
    inline: bytes | None = None


def stream_info(key: Key) -> Call:
    """A get whose answer says whether the value is streamed (None if the key does not exist)."""

    def parse(rh: dict[str, Any], v: list[bytes]) -> StreamInfo | None:
        if not rh["found"]:
            return None
        m = rh.get("stream")
        if m is None:
            return StreamInfo(int(rh["version"]), len(v[0]), inline=v[0])
        return StreamInfo(int(rh["version"]), int(m["size"]), bytes(m["stream"]), int(m["chunks"]))

    return Call("get", {"key": key_bytes(key)}, parse)


def get_chunks(key: Key, info: StreamInfo, first: int, count: int) -> Call:
    """Chunks ``first..first+count-1`` of a streamed value; they arrive as PARTIALs."""
    return Call("get_chunks", {"key": key_bytes(key), "stream": info.stream, "first": first, "count": count},
                lambda rh, _v: int(rh["next"]))

