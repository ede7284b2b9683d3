"""A request body too large to hold, streamed into ``put_stream``.

``put_stream`` reads a file object in its caller's thread (client/programs.py). The body arrives
on the event loop; so the put runs in a thread with a sync ``Client`` of its own, reading a
``BodyReader`` that the event loop fills through a small bounded queue: the gateway holds at most
``QUEUE_CHUNKS`` pieces of the body plus the client's window of chunks in flight, whatever the
value's size. A body cut short (the HTTP client went away, fewer bytes than its Content-Length)
makes the reader raise, so ``put_stream`` aborts the stream and nothing becomes visible.
"""

from __future__ import annotations

import asyncio
import io
import queue
from collections.abc import Callable

from aiohttp import StreamReader

from protocol.limits import DEFAULT_CHUNK_BYTES

QUEUE_CHUNKS = 4


class BodyCut(Exception):
    """The request body ended before it was whole."""


_EOF = b""
Piece = bytes | BodyCut


class BodyReader(io.RawIOBase):
    """The reading end: ``read(n)`` returns n bytes until the body ends (then fewer, then b"")."""

    def __init__(self, pieces: queue.Queue[Piece]) -> None:
        super().__init__()
        self.pieces = pieces
        self.buf = bytearray()
        self.ended = False

    def readable(self) -> bool:
        return True

    def read(self, n: int | None = -1) -> bytes:
        want = -1 if n is None else n
        while not self.ended and (want < 0 or len(self.buf) < want):
            piece = self.pieces.get()
            if isinstance(piece, BodyCut):
                raise piece
            if piece == _EOF:
                self.ended = True
            else:
                self.buf += piece
        size = len(self.buf) if want < 0 else want
        out = bytes(self.buf[:size])
        del self.buf[:size]
        return out


async def stream_body(first: bytes, content: StreamReader, expected: int | None,
                      put: Callable[[BodyReader], int]) -> int:
    """Run ``put(reader)`` in a thread while feeding it ``first`` and then the rest of ``content``
    (``expected`` bytes in all, when the request said so); returns what ``put`` returns (the
    version) or raises what it raised. A put that ends early (it failed) stops the reading."""
    pieces: queue.Queue[Piece] = queue.Queue(maxsize=QUEUE_CHUNKS)
    done = asyncio.ensure_future(asyncio.to_thread(put, BodyReader(pieces)))

    async def give(piece: Piece) -> bool:
        while not done.done():
            try:
                pieces.put_nowait(piece)
                return True
            except queue.Full:
                await asyncio.sleep(0.002)
        return False

    total = len(first)
    try:
        if not await give(first):
            return await done
        while True:
            piece = await content.read(DEFAULT_CHUNK_BYTES)
            total += len(piece)
            if piece == _EOF and expected is not None and total != expected:
                raise BodyCut(f"the body ended after {total} of its {expected} bytes")
            if not await give(piece) or piece == _EOF:
                break
    except BaseException as e:
        cut = e if isinstance(e, BodyCut) else BodyCut(f"the body could not be read: {e!r}")
        await give(cut)  # the put aborts its stream and raises it
        try:
            await done
        except BodyCut:
            pass
        raise cut from e
    return await done
