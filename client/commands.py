"""Every client command, written once: the request it sends and how its reply is read.

``Client`` (sync) and ``AsyncClient`` (asyncio) differ only in how they move frames; both call
these functions, so they behave the same and raise the same exceptions.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, BinaryIO, NamedTuple

from protocol.errors import (
    ConditionFailed,
    ErrorCode,
    InvalidRequest,
    KeyNotFound,
    ValueChanged,
    ValueTooLarge,
    ZkvError,
    ZkvTimeout,
    error_from_reply,
)
from protocol.frames import C_PARTIAL, pack, unpack
from protocol.limits import DEFAULT_CHUNK_BYTES, MAX_CHUNK_BYTES

Key = bytes | str
Reply = tuple[dict[str, Any], list[bytes]]

# Error replies after which the same request (same client id and request number) is sent again.
RESEND = frozenset({ErrorCode.TIMEOUT, ErrorCode.UNAVAILABLE})
BACKOFF_FIRST, BACKOFF_MAX = 0.05, 1.0


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
    An empty ``op`` needs no request at all (``parse`` gives the answer)."""

    op: str
    header: dict[str, Any]
    parse: Callable[[dict[str, Any], list[bytes]], Any]
    values: list[bytes] = field(default_factory=list)


# Requests carrying more value bytes than this are checked against the broker's --max-value before
# they are sent: a frame far over the limit makes the broker's socket drop the connection (libzmq
# MAXMSGSIZE) instead of answering, and the client would only see a timeout.
CHECK_SIZE_ABOVE = 8 << 20


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
    return error_from_reply(str(rh.get("code")), str(rh.get("message", "")))


class Attempts:
    """The retry rules of one kv request, shared by both clients (they only move the frames):
    every attempt sends the same id and client id, marked as a retry after the first; a missing
    reply, TIMEOUT or UNAVAILABLE means try again after a backoff until ``timeout`` runs out."""

    def __init__(self, url: str, op: str, rid: int, cid: bytes, header: dict[str, Any], values: list[bytes],
                 timeout: float, attempt_timeout: float) -> None:
        self.url, self.rid, self.timeout, self.attempt_timeout = url, rid, timeout, attempt_timeout
        # "retry": false on the first attempt spares the broker a look-up of earlier attempts.
        self.header = {"op": op, "id": rid, "cid": cid, "retry": False, **header}
        self.body = [pack(self.header), *values]
        self.deadline = time.monotonic() + timeout
        self.backoff = BACKOFF_FIRST
        self.sent = 0
        self.last_error: ZkvError | None = None

    def next(self) -> tuple[list[bytes], float]:
        """The frames of the next attempt and how long it may wait; raises when time is up."""
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise self.last_error or ZkvTimeout(f"no reply from {self.url} within {self.timeout}s")
        if self.sent:
            self.header["retry"] = True
            self.body[0] = pack(self.header)
        self.sent += 1
        return self.body, min(left, self.attempt_timeout)

    def no_reply(self) -> None:
        self.last_error = ZkvTimeout(f"no reply from {self.url} within {self.timeout}s")

    def answer(self, reply: list[bytes]) -> Reply | float:
        """The reply if it is final; raises a final error; else seconds to wait before resending."""
        rh = unpack(reply[0])
        if rh.get("ok"):
            return rh, reply[1:]
        err = error_for(rh)
        if err.code not in RESEND:
            raise err
        self.last_error = err
        wait = min(self.backoff, max(0.0, self.deadline - time.monotonic()))
        self.backoff = min(self.backoff * 2, BACKOFF_MAX)
        return wait


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


def scan_page(prefix: Key = b"", start_after: Key | None = None, limit: int = 1000, values: bool = True) -> Call:
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


# -- watch -------------------------------------------------------------------------------------

WATCH_KEEPALIVE = 2.0  # s between keepalives (the broker drops a watch after 10 s without one)
WATCH_SILENCE = 4.0  # s without any message (the broker sends progress every second): resume


class WatchEvent(NamedTuple):
    """A committed change: ``put`` (value set), ``delete``, ``ttl`` (TTL changed, value kept),
    ``expired`` (the TTL ran out, the key is gone), or ``resync`` (the broker could not replay
    what happened since the cursor: re-read with scan; later events follow the new cursor)."""

    kind: str
    key: bytes
    value: bytes | None  # put only
    version: int  # the change's seq in its slot: the key's version after a put or ttl
    expire_at: int  # ms since the epoch by the broker's clock, 0 = none (put, ttl)
    slot: int
    # A put of a streamed value carries no value (``value`` is None) but where its chunks are:
    # read it with get_stream (it raises ValueChanged if the key was rewritten since).
    stream: StreamInfo | None = None


class WatchSession:
    """The rules of one watch, shared by both clients (they only move frames): open it, keep it
    alive, check the message counter, keep the cursor, and resume from the cursor after a lost
    message, a silence, a broker restart or a retryable error."""

    def __init__(self, prefix: Key = b"", since: dict[str, Any] | None = None) -> None:
        self.prefix = key_bytes(prefix)
        self.cursor = since  # {"c": cluster id, "s": [seq per slot]}: opaque, pass it back as since
        self.rid = 0
        self.n = 0
        self.open_at: float | None = 0.0  # when to (re)open the watch; None while it is open
        self.last_heard = self.last_keepalive = 0.0
        self.backoff = BACKOFF_FIRST
        self.ended = False

    def due(self, now: float, next_id: Callable[[], int]) -> tuple[str, list[bytes]] | None:
        """What to send now: ("open", body) on a fresh socket, ("send", body), or None."""
        if self.ended:
            return None
        if self.open_at is None and now - self.last_heard > WATCH_SILENCE:
            self._resume(now, 0.0)
        if self.open_at is not None:
            if now < self.open_at:
                return None
            self.rid, self.n, self.open_at = next_id(), 0, None
            self.last_heard = self.last_keepalive = now
            hdr: dict[str, Any] = {"op": "watch", "id": self.rid, "prefix": self.prefix}
            if self.cursor is not None:
                hdr["since"] = self.cursor
            return "open", [pack(hdr)]
        if now - self.last_keepalive >= WATCH_KEEPALIVE:
            self.last_keepalive = now
            return "send", [pack({"op": "watch", "id": self.rid, "keepalive": True})]
        return None

    def wait(self, now: float) -> float:
        """Seconds until ``due`` has something to do."""
        if self.open_at is not None:
            return max(self.open_at - now, 0.0)
        return max(min(self.last_heard + WATCH_SILENCE, self.last_keepalive + WATCH_KEEPALIVE) - now, 0.0)

    def cancel(self) -> list[bytes]:
        self.ended = True
        return [pack({"op": "watch", "id": self.rid, "cancel": True})]

    def _resume(self, now: float, delay: float) -> None:
        self.open_at = now + delay

    def received(self, command: bytes, frames: list[bytes], now: float) -> list[WatchEvent]:
        """A message from the broker (``command`` PARTIAL or FINAL, ``frames`` = header, values)."""
        rh = unpack(frames[0])
        if self.open_at is not None or rh.get("id") != self.rid:
            return []  # an earlier subscription's message
        self.last_heard = now
        if command == C_PARTIAL:
            if rh.get("n") != self.n + 1:
                self._resume(now, 0.0)  # a message was lost (a full queue): resume from the cursor
                return []
            self.n += 1
            self.backoff = BACKOFF_FIRST
            events = []
            streams = rh.get("streams") or {}
            for i, ((kind, key, slot, seq, expire_at), value) in enumerate(zip(rh["events"], frames[1:], strict=True)):
                m = streams.get(i)
                if m is not None:
                    info = StreamInfo(seq, int(m["size"]), bytes(m["stream"]), int(m["chunks"]))
                    events.append(WatchEvent(kind, bytes(key), None, seq, expire_at, slot, info))
                else:
                    events.append(WatchEvent(kind, bytes(key), value if kind == "put" else None, seq, expire_at, slot))
                if self.cursor is not None:
                    self.cursor["s"][slot] = max(self.cursor["s"][slot], seq)
            if "cursor" in rh:
                self.cursor = rh["cursor"]
            return events
        if rh.get("ok"):
            if rh.get("resync"):
                self.cursor = rh["cursor"]
                self._resume(now, 0.0)
                return [WatchEvent("resync", b"", None, 0, 0, -1)]
            self.ended = True  # cancelled
            return []
        err = error_for(rh)
        if err.code not in RESEND:
            self.ended = True
            raise err
        self._resume(now, self.backoff)
        self.backoff = min(self.backoff * 2, BACKOFF_MAX)
        return []


# ---------------------------------------------------------------------------------------------
# Streamed values (docs/protocol.md §1.8): written as chunks under a stream id, then committed;
# read in batches of chunks, each batch a request answered by PARTIALs and a FINAL.


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


class ChunkBatch:
    """Collects the PARTIALs of one get_chunks request (a resend may repeat some: kept once)."""

    def __init__(self, info: StreamInfo, first: int, count: int) -> None:
        self.info, self.first, self.count = info, first, count
        self.chunks: dict[int, bytes] = {}

    def on_partial(self, rh: dict[str, Any], frames: list[bytes]) -> None:
        i = rh.get("index")
        if isinstance(i, int) and self.first <= i < self.first + self.count and frames:
            self.chunks.setdefault(i, frames[0])

    def take(self) -> list[bytes]:
        """The batch's chunks in order; raises ValueChanged if the value was replaced meanwhile."""
        got = [self.chunks.get(i) for i in range(self.first, self.first + self.count)]
        if any(c is None for c in got):
            raise ValueChanged("the streamed value was replaced or deleted while being read; read it again")
        return got  # type: ignore[return-value]


def batches(info: StreamInfo, credit: int) -> Iterator[ChunkBatch]:
    for first in range(0, info.chunks, credit):
        yield ChunkBatch(info, first, min(credit, info.chunks - first))


class StreamPut:
    """A value read from a file object and written in chunks. A value that fits in one chunk is
    written by a plain put (``single``); a larger one by ``chunk_calls`` then ``commit``."""

    def __init__(self, key: Key, fileobj: BinaryIO, chunk_size: int = DEFAULT_CHUNK_BYTES, ttl: int | None = None,
                 if_version: int | None = None, if_absent: bool = False,
                 progress: Callable[[int], None] | None = None) -> None:
        if not 0 < chunk_size <= MAX_CHUNK_BYTES:
            raise InvalidRequest(f"chunk_size must be 1 to {MAX_CHUNK_BYTES} bytes")
        self.key, self.file, self.chunk_size = key_bytes(key), fileobj, chunk_size
        self.ttl, self.if_version, self.if_absent = ttl, if_version, if_absent
        self.progress = progress
        self.stream = uuid.uuid4().bytes
        self.size = 0
        self.chunks = 0
        first = self._read()
        self._next = self._read()
        self.single: Call | None = None
        if not self._next:
            self.single = put(self.key, first, ttl, if_version, if_absent)
            self._first = b""
        else:
            self._first = first

    def _read(self) -> bytes:
        data = self.file.read(self.chunk_size)
        if not isinstance(data, bytes | bytearray | memoryview):
            raise InvalidRequest("put_stream needs a file opened in binary mode")
        return bytes(data)

    def chunk_calls(self) -> Iterator[Call]:
        """One put_chunk per chunk, reading the file as they are asked for."""
        data, self._first = self._first, b""
        while data:
            index = self.chunks
            self.chunks += 1
            self.size += len(data)
            n = len(data)
            yield Call("put_chunk", {"key": self.key, "stream": self.stream, "index": index},
                       lambda _rh, _v, n=n: self._done(n), [data])
            data, self._next = self._next, (self._read() if self._next else b"")

    def _done(self, n: int) -> None:
        if self.progress is not None:
            self.progress(n)

    def commit(self) -> Call:
        hdr: dict[str, Any] = {"key": self.key, "stream": self.stream, "chunks": self.chunks, "size": self.size}
        if self.ttl is not None:
            hdr["ttl"] = self.ttl
        if self.if_version is not None:
            hdr["if_version"] = self.if_version
        if self.if_absent:
            hdr["if_absent"] = True
        return Call("put_commit", hdr, lambda rh, _v: int(rh["version"]))

    def abort(self) -> Call:
        return Call("put_abort", {"key": self.key, "stream": self.stream}, lambda _rh, _v: None)


class ValueStream:
    """A value being read: iterate it for its chunks, or ``read()`` it like a file."""

    def __init__(self, info: StreamInfo, chunks: Iterator[bytes]) -> None:
        self.version, self.size = info.version, info.size
        self._chunks = chunks
        self._buf = b""

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        # Not a generator: a loop that stops early must not close the chunks for the next one.
        if self._buf:
            buf, self._buf = self._buf, b""
            return buf
        return next(self._chunks)

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            return b"".join(self)
        while len(self._buf) < n:
            nxt = next(self._chunks, None)
            if nxt is None:
                break
            self._buf += nxt
        out, self._buf = self._buf[:n], self._buf[n:]
        return out
