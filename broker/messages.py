"""Client and worker messages, decoded once at the edge into typed, validated objects.

``decode_client`` turns a client's frames into a ``KvRequest``, ``ScanRequest``,
``WatchRequest`` or ``MmiRequest``, or raises ``Invalid`` carrying the error reply's code and
message: a malformed request is refused here, before any part sees it, so refusing it changes
nothing. Checks that depend on the cluster's state (is it formed, is the stream open with this
key, ...) belong to the part that handles the request.

broker/worker_messages.py does the same for the workers' messages.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from protocol.errors import ErrorCode
from protocol.frames import (
    C_REQUEST,
    MDPC,
    SERVICE,
    unpack,
    unpack_values,
)
from protocol.limits import (
    DEFAULT_SCAN_LIMIT,
    MAX_CHUNK_BYTES,
    MAX_CHUNKS_PER_READ,
    MAX_KEYS_PER_REQUEST,
    MAX_SCAN_LIMIT,
    MAX_TTL_MS,
    STREAM_ID_BYTES,
)
from protocol.replication import COND_ABSENT, COND_NONE, COND_VERSION, Manifest


class Refused(Exception):
    """A request the broker answers with an error reply (code and message) and nothing else."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class Invalid(Refused):
    """The request itself is wrong (the client's fault): retrying it cannot help. ``rid`` is the
    request id to answer (None when it could not be read), ``service`` the service to answer on."""

    def __init__(self, code: ErrorCode, message: str, rid: int | None = None, service: bytes = SERVICE) -> None:
        super().__init__(code, message)
        self.rid = rid
        self.service = service


class Unavailable(Refused):
    """The request is fine; the cluster cannot serve it now (UNAVAILABLE, NOT_ENOUGH_REPLICAS,
    TIMEOUT): the client may retry."""


SINGLE_KEY_OPS = frozenset({"get", "exists", "delete", "put", "ttl", "expire", "put_chunk", "put_commit",
                            "put_abort", "get_chunks"})
MULTI_KEY_OPS = frozenset({"mget", "mset"})
WRITE_OPS = frozenset({"put", "delete", "mset", "expire", "put_chunk", "put_commit", "put_abort"})
STREAM_OPS = frozenset({"put_chunk", "put_commit", "put_abort", "get_chunks"})


MAX_MANIFEST_CHUNKS = 2**32 - 1  # a Manifest holds the chunk count in 32 bits


def is_int(v: Any) -> bool:
    """A msgpack integer (Python's bool is an int, and is not one here)."""
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True, slots=True)
class Limits:
    """The configured limits a request is checked against."""

    max_key: int
    max_value: int
    max_stream: int


@dataclass(slots=True)
class KvRequest:
    """A data request of service ``kv``: a read, a write, or a part of a streamed value."""

    rid: int
    op: str
    keys: list[bytes]
    values: list[bytes]
    ttl: int | None = None
    cond: int = COND_NONE
    expected: int = 0  # COND_VERSION: the version the key must have
    cid: bytes = b""
    maybe_retry: bool = True  # false when the client says this is its first attempt
    stream: bytes = b""  # put_chunk / put_commit / put_abort / get_chunks
    index: int = 0  # put_chunk: the chunk's index; get_chunks: the first chunk asked for
    manifest: bytes = b""  # put_commit: the encoded Manifest
    count: Any = None  # get_chunks: how many chunks (checked by the stream part, with its message)
    packed: bool = False  # mget: the client asked for the reply's values packed (docs/protocol.md §1.2)


@dataclass(slots=True)
class ScanRequest:
    rid: int
    prefix: bytes
    start_after: bytes | None
    limit: int
    values: bool
    group: int | None = None  # active brokers: the slot group scanned (each group's leader scans its own)


@dataclass(slots=True)
class DumpRequest:
    """One part of a slot's backup dump (docs/protocol.md §1.11): part 0 opens it; later parts
    name the dump and the worker holding it, as the previous part's answer gave them."""

    rid: int
    slot: int
    part: int
    dump: bytes = b""
    worker: str = ""


@dataclass(slots=True)
class WatchRequest:
    rid: int
    cancel: bool = False
    keepalive: bool = False
    prefix: bytes = b""
    since: dict[str, Any] | None = None
    group: int | None = None  # active brokers: the slot group watched (each group's leader watches its own)


@dataclass(slots=True)
class MmiRequest:
    """A Majordomo management request (``mmi.service``, ``mmi.status``, ``mmi.admin``, ...)."""

    service: bytes
    body: bytes = b""


ClientMessage = KvRequest | ScanRequest | WatchRequest | DumpRequest | MmiRequest


def decode_client(frames: list[bytes], limits: Limits) -> ClientMessage:
    """Decode and check one client message; raises ``Invalid`` if it is malformed."""
    if len(frames) < 3 or frames[0] != MDPC or frames[1] != C_REQUEST:
        raise Invalid(ErrorCode.BAD_REQUEST, "expected frames [MDPC02, 0x01, service, header, *values]",
                      service=frames[2] if len(frames) >= 3 and len(frames[2]) <= 64 else SERVICE)
    service = frames[2]
    if service.startswith(b"mmi."):
        return MmiRequest(service, frames[3] if len(frames) > 3 else b"")
    if service != SERVICE:
        raise Invalid(ErrorCode.BAD_REQUEST, f"unknown service {service[:64]!r}", service=service[:64])
    rid: int | None = None
    try:
        if len(frames) < 4:
            raise Invalid(ErrorCode.BAD_REQUEST, "missing header frame")
        try:
            header = unpack(frames[3])
        except Exception as e:
            raise Invalid(ErrorCode.BAD_REQUEST, f"header is not msgpack: {e}") from None
        if not isinstance(header, dict):
            raise Invalid(ErrorCode.BAD_REQUEST, "header must be a msgpack map")
        if not is_int(header.get("id")):
            raise Invalid(ErrorCode.BAD_REQUEST, "header field 'id' must be an integer")
        rid = header["id"]
        try:
            return _decode_header(rid, header, frames[4:], limits)
        except Invalid:
            raise
        except Exception as e:  # a field of a type no check foresaw (found by tests/integration/test_fuzz.py)
            raise Invalid(ErrorCode.BAD_REQUEST, f"malformed header: {type(e).__name__}: {e}") from None
    except Invalid as e:
        e.rid = rid
        raise


def _decode_header(rid: int, header: dict[str, Any], values: list[bytes], limits: Limits) -> ClientMessage:
    op = header.get("op")
    if not isinstance(op, str):  # (a list or a map is not even hashable: it went unanswered)
        raise Invalid(ErrorCode.UNKNOWN_COMMAND, f"unknown op {repr(op)[:64]} (op must be a string)")
    if op == "scan":
        return _scan(rid, header, limits)
    if op == "watch":
        return _watch(rid, header, limits)
    if op == "dump":
        return _dump(rid, header)
    if op in SINGLE_KEY_OPS:
        keys = [_key(header.get("key"), limits)]
    elif op in MULTI_KEY_OPS:
        keys = _keys(header, limits)
    else:
        raise Invalid(ErrorCode.UNKNOWN_COMMAND, f"unknown op {op!r}")
    packed = header.get("packed", False)
    if packed is not True and packed is not False:
        raise Invalid(ErrorCode.BAD_REQUEST, "packed must be a boolean")
    if packed and op == "mset":
        try:
            values = unpack_values(values)
        except ValueError as e:
            raise Invalid(ErrorCode.BAD_REQUEST, f"mset with packed: true: {e}") from None
    if op in ("put", "mset"):
        _check_values(op, keys, values, limits)
    req = KvRequest(rid, op, keys, values, packed=packed and op == "mget")
    if op in STREAM_OPS:
        _stream_fields(req, header, limits)
    ttl = header.get("ttl")
    if ttl is not None and (not is_int(ttl) or not 0 < ttl <= MAX_TTL_MS):
        raise Invalid(ErrorCode.BAD_REQUEST, f"ttl must be an integer from 1 to {MAX_TTL_MS} (milliseconds)")
    req.ttl = ttl
    req.cond, req.expected = _condition(op, header)
    cid = header.get("cid", b"")
    if not isinstance(cid, bytes) or len(cid) > 64:
        raise Invalid(ErrorCode.BAD_REQUEST, "cid must be bytes of at most 64")
    req.cid = cid
    req.maybe_retry = header.get("retry") is not False
    return req


def _key(k: Any, limits: Limits) -> bytes:
    if isinstance(k, str):
        k = k.encode()
    if not isinstance(k, bytes):
        raise Invalid(ErrorCode.BAD_REQUEST, "keys must be bytes (msgpack bin) or strings")
    if not k:
        raise Invalid(ErrorCode.BAD_REQUEST, "empty key")
    if len(k) > limits.max_key:
        raise Invalid(ErrorCode.KEY_TOO_LARGE, f"key of {len(k)} bytes; the limit is {limits.max_key}")
    return k


def _keys(header: dict[str, Any], limits: Limits) -> list[bytes]:
    keys = header.get("keys")
    if not isinstance(keys, list) or not keys:
        raise Invalid(ErrorCode.BAD_REQUEST, "field 'keys' must be a non-empty list")
    if len(keys) > MAX_KEYS_PER_REQUEST:
        raise Invalid(ErrorCode.BAD_REQUEST, f"more than {MAX_KEYS_PER_REQUEST} keys")
    return [_key(k, limits) for k in keys]


def _check_values(op: str, keys: list[bytes], values: list[bytes], limits: Limits) -> None:
    if len(values) != len(keys):
        raise Invalid(ErrorCode.BAD_REQUEST, f"{op} needs one value frame per key ({len(keys)}), got {len(values)}")
    total = 0
    for v in values:
        if len(v) > limits.max_value:
            raise Invalid(ErrorCode.VALUE_TOO_LARGE, f"value of {len(v)} bytes; the limit is {limits.max_value}")
        total += len(v)
    if total > limits.max_value:
        raise Invalid(ErrorCode.VALUE_TOO_LARGE,
                      f"values of {total} bytes in one request; the limit is {limits.max_value}")


def int_field(header: dict[str, Any], name: str, low: int, high: int) -> int:
    v = header.get(name)
    if not is_int(v) or not low <= v <= high:
        raise Invalid(ErrorCode.BAD_REQUEST, f"field '{name}' must be an integer from {low} to {high}")
    return v


def _stream_fields(req: KvRequest, header: dict[str, Any], limits: Limits) -> None:
    """The fields of the streamed-value ops (docs/protocol.md §1.8)."""
    stream = header.get("stream")
    if not isinstance(stream, bytes) or len(stream) != STREAM_ID_BYTES:
        raise Invalid(ErrorCode.BAD_REQUEST, f"field 'stream' must be {STREAM_ID_BYTES} bytes (bin)")
    req.stream = stream
    max_chunks = limits.max_stream  # a chunk holds at least one byte
    if req.op == "put_chunk":
        req.index = int_field(header, "index", 0, max_chunks - 1)
        if len(req.values) != 1:
            raise Invalid(ErrorCode.BAD_REQUEST, f"put_chunk needs one value frame, got {len(req.values)}")
        size = len(req.values[0])
        if not 0 < size <= MAX_CHUNK_BYTES:
            raise Invalid(ErrorCode.VALUE_TOO_LARGE if size else ErrorCode.BAD_REQUEST,
                          f"a chunk must hold 1 to {MAX_CHUNK_BYTES} bytes, not {size}")
    elif req.op == "put_commit":
        size = header.get("size")
        if is_int(size) and size > limits.max_stream:
            raise Invalid(ErrorCode.VALUE_TOO_LARGE,
                          f"streamed value of {size} bytes; the limit is {limits.max_stream} (--max-stream)")
        size = int_field(header, "size", 1, limits.max_stream)
        chunks = int_field(header, "chunks", 1, min(max_chunks, MAX_MANIFEST_CHUNKS))
        req.manifest = Manifest(stream, chunks, size).encode()
    elif req.op == "get_chunks":
        req.index = int_field(header, "first", 0, max_chunks)
        req.count = header.get("count", 0)
        if not is_int(req.count) or not 0 < req.count <= MAX_CHUNKS_PER_READ:
            raise Invalid(ErrorCode.BAD_REQUEST, f"field 'count' must be an integer from 1 to {MAX_CHUNKS_PER_READ}")


def _condition(op: str, header: dict[str, Any]) -> tuple[int, int]:
    """The compare-and-set condition of a put or delete: if_absent, or if_version=N."""
    if_version, if_absent = header.get("if_version"), header.get("if_absent")
    if if_absent is None:  # absent, or nil
        if_absent = False
    if if_version is None and if_absent is False:  # (0 or {} is not False: refused below)
        return COND_NONE, 0
    if op not in ("put", "delete", "put_commit"):
        raise Invalid(ErrorCode.BAD_REQUEST, f"{op} takes no condition")
    if if_absent is not False and if_absent is not True:
        raise Invalid(ErrorCode.BAD_REQUEST, "if_absent must be a boolean")
    if if_absent:
        if if_version is not None or op not in ("put", "put_commit"):
            raise Invalid(ErrorCode.BAD_REQUEST, "if_absent goes with put alone, without if_version")
        return COND_ABSENT, 0
    if not is_int(if_version) or if_version < 1:
        raise Invalid(ErrorCode.BAD_REQUEST, "if_version must be a positive integer (a version)")
    return COND_VERSION, if_version


def _bytes_field(header: dict[str, Any], name: str, default: bytes | None, limits: Limits) -> bytes | None:
    """A bin/str field of at most the key size (prefix, start_after); may be empty."""
    v = header.get(name, default)
    if v is None:
        return None
    if isinstance(v, str):
        v = v.encode()
    if not isinstance(v, bytes):
        raise Invalid(ErrorCode.BAD_REQUEST, f"{name} must be bytes (msgpack bin) or a string")
    if len(v) > limits.max_key:
        raise Invalid(ErrorCode.KEY_TOO_LARGE, f"{name} of {len(v)} bytes; the limit is {limits.max_key}")
    return v


def _prefix(header: dict[str, Any], limits: Limits) -> bytes:
    """``prefix`` of a scan or watch: bin/str, empty if absent; nil is not a prefix."""
    prefix = _bytes_field(header, "prefix", b"", limits)
    if prefix is None:
        raise Invalid(ErrorCode.BAD_REQUEST, "prefix must be bytes (msgpack bin) or a string, not nil")
    return prefix


def _scan(rid: int, header: dict[str, Any], limits: Limits) -> ScanRequest:
    prefix = _prefix(header, limits)
    start_after = _bytes_field(header, "start_after", None, limits)
    limit = header.get("limit", DEFAULT_SCAN_LIMIT)
    if not is_int(limit) or not 1 <= limit <= MAX_SCAN_LIMIT:
        raise Invalid(ErrorCode.BAD_REQUEST, f"limit must be an integer from 1 to {MAX_SCAN_LIMIT}")
    values = header.get("values", True)
    if values is not True and values is not False:
        raise Invalid(ErrorCode.BAD_REQUEST, "values must be a boolean")
    return ScanRequest(rid, prefix, start_after, limit, values, _group(header))


def _watch(rid: int, header: dict[str, Any], limits: Limits) -> WatchRequest:
    group = _group(header)
    if header.get("cancel") is True:
        return WatchRequest(rid, cancel=True, group=group)
    if header.get("keepalive") is True:
        return WatchRequest(rid, keepalive=True, group=group)
    prefix = _prefix(header, limits)
    since = header.get("since")
    if since is not None:
        seqs = since.get("s") if isinstance(since, dict) else None
        if not (isinstance(since, dict) and isinstance(since.get("c"), bytes) and isinstance(seqs, list)
                and all(is_int(q) and q >= 0 for q in seqs)):
            raise Invalid(ErrorCode.BAD_REQUEST, "since must be a cursor {c: bin, s: [int, ...]} from a watch")
    return WatchRequest(rid, prefix=prefix, since=since, group=group)


def _group(header: dict[str, Any]) -> int | None:
    """``group`` of a scan or watch: which slot group it is for (active brokers); absent: all."""
    return None if header.get("group") is None else int_field(header, "group", 0, 0xFFFF)


def _dump(rid: int, header: dict[str, Any]) -> DumpRequest:
    slot = int_field(header, "slot", 0, 0xFFFF)  # below the cluster's slot count: checked by the part
    part = int_field(header, "part", 0, 2**32)
    if part == 0:
        return DumpRequest(rid, slot, 0)
    dump, worker = header.get("dump"), header.get("worker")
    if not isinstance(dump, bytes) or not 0 < len(dump) <= 64 or not isinstance(worker, str) or not worker:
        raise Invalid(ErrorCode.BAD_REQUEST, "a dump's part after the first needs 'dump' (bin) and 'worker' "
                                             "(str) from the previous part's answer")
    return DumpRequest(rid, slot, part, dump, worker)
