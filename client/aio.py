"""``AsyncClient``: the asyncio twin of ``Client``, same methods (awaitable), same exceptions,
same retry rules; the commands themselves are written once in client/commands.py."""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from typing import Any, BinaryIO

import zmq
import zmq.asyncio

from client import commands
from client.commands import Key
from protocol.errors import ValueChanged, ZkvError, ZkvTimeout
from protocol.frames import C_FINAL, C_PARTIAL, C_REQUEST, MDPC, MMI_STATUS, SERVICE, unpack
from protocol.limits import DEFAULT_CHUNK_BYTES

OnPartial = Callable[[dict[str, Any], list[bytes]], None]


class AsyncClient:
    """One DEALER socket; many requests may be in flight at once (``asyncio.gather``): replies
    are matched to requests by their id."""

    def __init__(self, url: str = "tcp://127.0.0.1:5555", timeout: float = 10.0, attempt_timeout: float = 6.0,
                 context: zmq.asyncio.Context | None = None) -> None:
        self.url = url
        self.timeout = timeout
        self.attempt_timeout = attempt_timeout
        self.client_id = uuid.uuid4().bytes
        self._ids = itertools.count(1)
        self._ctx = context or zmq.asyncio.Context.instance()
        self._sock: zmq.asyncio.Socket | None = None
        self._waiting: dict[Any, asyncio.Future[list[bytes]]] = {}
        self._partials: dict[Any, OnPartial] = {}
        self._reader: asyncio.Task[None] | None = None
        self._open()

    def _open(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.connect(self.url)
        if self._reader is not None:
            self._reader.cancel()
        self._reader = None

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            self._reader = None
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- transport ------------------------------------------------------------------------------

    async def _read_replies(self) -> None:
        """Route each reply to the request waiting for its (service, id)."""
        assert self._sock is not None
        sock = self._sock
        while True:
            frames = await sock.recv_multipart()
            if len(frames) < 4 or frames[0] != MDPC or frames[1] not in (C_FINAL, C_PARTIAL):
                continue
            service = frames[2]
            hdr = unpack(frames[3]) if service == SERVICE else {}
            rid = hdr.get("id")
            if frames[1] == C_PARTIAL:
                on_partial = self._partials.get((service, rid))
                if on_partial is not None:
                    on_partial(hdr, frames[4:])
                continue
            fut = self._waiting.get((service, rid))
            if fut is not None and not fut.done():
                fut.set_result(frames[3:])

    async def _roundtrip(self, service: bytes, body: list[bytes], rid: Any, wait: float,
                         on_partial: OnPartial | None = None) -> list[bytes] | None:
        if self._sock is None:
            raise ZkvError("client is closed")
        if self._reader is None or self._reader.done():
            self._reader = asyncio.ensure_future(self._read_replies())
        fut: asyncio.Future[list[bytes]] = asyncio.get_running_loop().create_future()
        self._waiting[(service, rid)] = fut
        if on_partial is not None:
            self._partials[(service, rid)] = on_partial
        try:
            await self._sock.send_multipart([MDPC, C_REQUEST, service, *body], copy=len(body) < 2)
            return await asyncio.wait_for(fut, wait)
        except TimeoutError:
            return None
        finally:
            self._waiting.pop((service, rid), None)
            self._partials.pop((service, rid), None)

    async def request(self, op: str, header: dict[str, Any], values: list[bytes] | None = None,
                      on_partial: OnPartial | None = None) -> commands.Reply:
        """Send one kv request with retries; returns (reply header, value frames) or raises."""
        attempts = commands.Attempts(self.url, op, next(self._ids), self.client_id, header, values or [],
                                     self.timeout, self.attempt_timeout)
        while True:
            body, wait = attempts.next()
            reply = await self._roundtrip(SERVICE, body, attempts.rid, wait, on_partial)
            if reply is None:
                attempts.no_reply()
                continue
            answer = attempts.answer(reply)
            if isinstance(answer, tuple):
                return answer
            await asyncio.sleep(answer)

    async def _run(self, call: commands.Call) -> Any:
        if not call.op:
            return call.parse({}, [])
        if call.values and sum(len(v) for v in call.values) > commands.CHECK_SIZE_ABOVE:
            # Asked for each large request: the broker may have restarted with another limit.
            err = commands.oversize(call, (await self.status()).get("max_value"))
            if err is not None:
                raise err
        return call.parse(*await self.request(call.op, call.header, call.values))

    # -- commands (the same as Client's) --------------------------------------------------------

    async def put(self, key: Key, value: bytes, ttl: int | None = None, if_version: int | None = None,
                  if_absent: bool = False) -> int:
        return await self._run(commands.put(key, value, ttl, if_version, if_absent))

    async def _whole(self, key: Key, value: Any) -> Any:
        if isinstance(value, commands.StreamInfo):
            return b"".join([c async for c in self._chunks(key, value, 4)])
        return value

    async def get(self, key: Key) -> bytes | None:
        return await self._whole(key, await self._run(commands.get(key)))

    async def get_versioned(self, key: Key) -> tuple[bytes, int] | None:
        found = await self._run(commands.get_versioned(key))
        return None if found is None else (await self._whole(key, found[0]), found[1])

    async def put_stream(self, key: Key, fileobj: BinaryIO, ttl: int | None = None, if_version: int | None = None,
                         if_absent: bool = False, chunk_size: int = DEFAULT_CHUNK_BYTES, window: int = 4,
                         progress: Callable[[int], None] | None = None) -> int:
        """As ``Client.put_stream``: chunks with ``window`` in flight, then one commit."""
        up = commands.StreamPut(key, fileobj, chunk_size, ttl, if_version, if_absent, progress)
        if up.single is not None:
            version = await self._run(up.single)
            if progress is not None:
                progress(len(up.single.values[0]))
            return version
        try:
            calls = up.chunk_calls()

            async def lane() -> None:  # each lane keeps one chunk in flight
                for call in calls:
                    await self._run(call)

            lanes = [asyncio.ensure_future(lane()) for _ in range(max(1, window))]
            try:
                await asyncio.gather(*lanes)
            finally:
                for t in lanes:  # one lane failed: the others must not go on sending chunks
                    t.cancel()
            return await self._run(up.commit())
        except BaseException:
            try:
                await self._run(up.abort())
            except ZkvError:
                pass  # the broker aborts it when the stream has been idle long enough
            raise

    async def get_stream(self, key: Key, credit: int = 4) -> AsyncValueStream | None:
        """As ``Client.get_stream``: an ``AsyncValueStream`` (``async for chunk in ...``)."""
        info = await self._run(commands.stream_info(key))
        if info is None:
            return None
        return AsyncValueStream(info, self._chunks(key, info, credit))

    async def _chunks(self, key: Key, info: commands.StreamInfo, credit: int) -> AsyncIterator[bytes]:
        if info.inline is not None:
            yield info.inline
            return
        for batch in commands.batches(info, max(1, min(credit, 16))):
            call = commands.get_chunks(key, info, batch.first, batch.count)
            await self.request(call.op, call.header, on_partial=batch.on_partial)
            for chunk in batch.take():
                yield chunk

    async def delete(self, key: Key, if_version: int | None = None) -> bool | None:
        return await self._run(commands.delete(key, if_version))

    async def ttl(self, key: Key) -> int | None:
        return await self._run(commands.ttl(key))

    async def expire(self, key: Key, ttl: int | None) -> bool:
        return await self._run(commands.expire(key, ttl))

    async def exists(self, key: Key) -> bool:
        return await self._run(commands.exists(key))

    async def mget(self, keys: Iterable[Key]) -> list[bytes | None]:
        keys = list(keys)
        return [await self._whole(k, v) for k, v in zip(keys, await self._run(commands.mget(keys)), strict=True)]

    async def mset(self, items: Mapping[Key, bytes] | Iterable[tuple[Key, bytes]]) -> None:
        await self._run(commands.mset(items))

    async def scan(self, prefix: Key = b"", start_after: Key | None = None, limit: int = 1000,
                   values: bool = True) -> AsyncIterator[commands.ScanItem]:
        start = None if start_after is None else commands.key_bytes(start_after)
        while True:
            page = await self.scan_page(prefix, start, limit, values)
            for item in page.items:  # a streamed value is fetched whole, as get does
                if not values or not isinstance(item.value, commands.StreamInfo):
                    yield item
                    continue
                try:
                    yield item._replace(value=await self._whole(item.key, item.value))
                except ValueChanged:  # replaced or deleted since the page: read it as it is now
                    now = await self.get_versioned(item.key)
                    if now is not None:
                        yield item._replace(value=now[0], version=now[1])
            start = commands.next_start(page)
            if start is None:
                return

    async def scan_page(self, prefix: Key = b"", start_after: Key | None = None, limit: int = 1000,
                        values: bool = True) -> commands.ScanPage:
        return await self._run(commands.scan_page(prefix, start_after, limit, values))

    async def scan_keys(self, prefix: Key = b"", start_after: Key | None = None,
                        limit: int = 1000) -> AsyncIterator[bytes]:
        async for item in self.scan(prefix, start_after, limit, values=False):
            yield item.key

    def watch(self, prefix: Key = b"", since: dict[str, Any] | None = None) -> AsyncWatchStream:
        """As ``Client.watch``: ``async for event in kv.watch(prefix)``."""
        return AsyncWatchStream(self, commands.WatchSession(prefix, since))

    async def status(self) -> dict[str, Any]:
        reply = await self._roundtrip(MMI_STATUS, [], None, self.timeout)
        if reply is None:
            raise ZkvTimeout(f"no reply from {self.url} within {self.timeout}s")
        return unpack(reply[0])


class AsyncWatchStream:
    """An open watch (see ``AsyncClient.watch``); ``async for`` it, ``await close()`` when done."""

    def __init__(self, client: AsyncClient, session: commands.WatchSession) -> None:
        self._client = client
        self.session = session
        self._sock: zmq.asyncio.Socket | None = None
        self._events: deque[commands.WatchEvent] = deque()

    @property
    def cursor(self) -> dict[str, Any] | None:
        return self.session.cursor

    def __aiter__(self) -> AsyncWatchStream:
        return self

    async def __anext__(self) -> commands.WatchEvent:
        while not self._events:
            if self.session.ended:
                await self.close()
                raise StopAsyncIteration
            await self._pump()
        return self._events.popleft()

    async def _pump(self) -> None:
        now = time.monotonic()
        act = self.session.due(now, lambda: next(self._client._ids))
        if act is not None:
            if act[0] == "open" or self._sock is None:
                self._reopen()
            assert self._sock is not None
            await self._sock.send_multipart([MDPC, C_REQUEST, SERVICE, *act[1]])
            return
        assert self._sock is not None
        if await self._sock.poll(int(self.session.wait(now) * 1000) + 1):
            frames = await self._sock.recv_multipart()
            if len(frames) >= 4 and frames[0] == MDPC and frames[1] in (C_PARTIAL, C_FINAL) and frames[2] == SERVICE:
                self._events.extend(self.session.received(frames[1], frames[3:], time.monotonic()))

    def _reopen(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
        self._sock = self._client._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.connect(self._client.url)

    async def close(self) -> None:
        if self._sock is not None:
            if not self.session.ended:
                try:
                    await self._sock.send_multipart([MDPC, C_REQUEST, SERVICE, *self.session.cancel()], zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass
            self._sock.close(linger=100)
            self._sock = None
        self.session.ended = True

    async def __aenter__(self) -> AsyncWatchStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class AsyncValueStream:
    """A value being read: ``async for chunk in stream``, or ``await stream.read()``."""

    def __init__(self, info: commands.StreamInfo, chunks: AsyncIterator[bytes]) -> None:
        self.version, self.size = info.version, info.size
        self._chunks = chunks

    def __aiter__(self) -> AsyncValueStream:
        return self

    async def __anext__(self) -> bytes:
        return await self._chunks.__anext__()

    async def read(self) -> bytes:
        return b"".join([c async for c in self])
