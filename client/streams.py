"""Streamed values (docs/protocol.md §1.8): written as chunks under a stream id, then committed;
read in batches of chunks, each batch a request answered by PARTIALs and a FINAL.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO

from client.commands import Call, Key, StreamInfo, get_chunks, key_bytes, put
from protocol.errors import InvalidRequest, ValueChanged
from protocol.limits import DEFAULT_CHUNK_BYTES, MAX_CHUNK_BYTES, MAX_CHUNKS_PER_READ


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



def chunk_reads(key: Key, info: StreamInfo, credit: int) -> Iterator[Call]:
    """The get_chunks requests that read a streamed value, ``credit`` chunks each at most (1 to
    MAX_CHUNKS_PER_READ); the answer of each is its batch's chunks, in order."""
    for batch in batches(info, max(1, min(credit, MAX_CHUNKS_PER_READ))):
        call = get_chunks(key, info, batch.first, batch.count)
        yield Call(call.op, call.header, lambda _rh, _v, batch=batch: batch.take(), on_partial=batch.on_partial)

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

