"""``AsyncClient``: the asyncio twin of ``Client``: the same methods (written once in
client/api.py; awaitable here), the same exceptions, the same retry rules. This module only
moves frames."""

from __future__ import annotations

import asyncio
import itertools
import os
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Iterator
from typing import Any

import structlog
import zmq
import zmq.asyncio

from client import programs
from client.api import Build, Commands
from client.brokers import LINK_CHECK, BrokerList, Link
from client.commands import Call, OnPartial, Reply, StreamInfo, needs_size_check, oversize
from client.dealers import broker_url, client_credentials, close_linked, dealer, linked_dealer
from client.leases import DIRECT_WAIT, MAP_WAIT, MMI_LEASES, NOT_LEASED, LeaseMap
from client.retry import DEFAULT_ATTEMPT_TIMEOUT, DEFAULT_TIMEOUT, Attempts
from client.routing import Router, merge_admin
from client.watch import WatchSession
from client.watch_streams import AsyncWatchStream
from protocol.curve import Credentials
from protocol.errors import ClientClosed
from protocol.frames import C_FINAL, C_PARTIAL, C_REQUEST, MDPC, MMI_ADMIN, MMI_SLOTS, SERVICE, unpack

log = structlog.get_logger("zkv.client")


class AsyncClient(Commands):
    """One DEALER socket; many requests may be in flight at once (``asyncio.gather``): replies
    are matched to requests by their id."""

    def __init__(
        self,
        url: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        attempt_timeout: float = DEFAULT_ATTEMPT_TIMEOUT,
        context: zmq.asyncio.Context | None = None,
        credentials: str | os.PathLike[str] | Credentials | None = None,
        direct_reads: bool = True,
    ) -> None:
        """``url``: the broker's frontend, or several brokers' (etcd mode) comma-separated: the
        client talks to one at a time and follows the leader (client/brokers.py); by default
        ``$ZKV_URL``, else tcp://127.0.0.1:5555.
        ``timeout``: the most one call may take, retries included (seconds).
        ``attempt_timeout``: how long one attempt waits for a reply before it is sent again.
        ``credentials``: a client credentials file (``zkv keys add-client``) for a broker with
        keys; by default ``$ZKV_CREDENTIALS``, else none.
        ``direct_reads``: send a GET to the worker holding its slot's read lease when the broker
        grants leases (client/leases.py; the broker's path when it cannot answer); False: never."""
        self.url = broker_url(url)
        self.brokers = BrokerList(self.url)
        self.credentials = client_credentials(credentials)
        self.timeout = timeout
        self.attempt_timeout = attempt_timeout
        self.client_id = uuid.uuid4().bytes
        self._ids = itertools.count(1)
        self._ctx = context or zmq.asyncio.Context.instance()
        # One socket per broker talked to: the current one, and with active brokers each group
        # leader's (client/routing.py). Replies are matched to requests by (service, id) whichever
        # socket they come on.
        self.router = Router()
        self._conns: dict[str, _Conn] = {}
        self._waiting: dict[Any, asyncio.Future[list[bytes]]] = {}
        self._partials: dict[Any, OnPartial] = {}
        self._closed = False
        self._map_fetch: asyncio.Future[list[bytes] | None] | None = None
        # Lease reads (client/leases.py): the map, one DEALER per worker reads endpoint, and the
        # direct reads awaiting an answer by id (apart from the broker's: a late answer of a
        # worker must not be taken for the broker's answer to the same id).
        self.direct_reads = direct_reads
        self.leases = LeaseMap()
        self.direct_reads_served = 0
        self._readers: dict[str, _Conn] = {}
        self._direct_waiting: dict[Any, asyncio.Future[Reply]] = {}
        self._lease_fetch: asyncio.Future[None] | None = None
        self._open()

    def _open(self) -> None:
        """A fresh socket to the current broker (the old one's queued replies are dropped)."""
        self._drop(self.brokers.current, wake=False)
        self._connect(self.brokers.current)

    def _connect(self, url: str) -> _Conn:
        if self._closed:
            raise ClientClosed("client is closed")
        if self.router.slot_map is None:
            # Not routing: one socket at a time. The requests waiting on a broker the client has
            # left resend at once (to the current one) instead of waiting out their attempt.
            for other in [u for u in self._conns if u != url]:
                self._drop(other, wake=True)
        conn = self._conns.get(url)
        if conn is None:
            # Watched with several brokers, or routing to group leaders: a dead one is left in a second.
            sock, link = linked_dealer(self._ctx, url, self.credentials, self._watched())
            conn = self._conns[url] = _Conn(url, sock, link)
        return conn

    def _watched(self) -> bool:
        return self.brokers.several or self.router.slot_map is not None

    def _drop(self, url: str, wake: bool) -> None:
        """Close the socket to ``url``; with ``wake``, the requests waiting on it resend at once
        (their reply is ``[]``: "moved")."""
        conn = self._conns.pop(url, None)
        if conn is None:
            return
        conn.close()
        if wake:
            waiting = [self._waiting.get(key) for key in conn.sent] + list(conn.mmi)
            for fut in waiting:
                if fut is not None and not fut.done():
                    fut.set_result([])

    async def close(self) -> None:
        self._closed = True
        for url in list(self._conns):
            self._drop(url, wake=False)
        for conn in self._readers.values():
            conn.close()
        self._readers.clear()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- transport ------------------------------------------------------------------------------

    async def _read_replies(self, conn: _Conn) -> None:
        """Route each reply to the request waiting for its (service, id); a management answer
        (it has no id) to the oldest management call on this connection: a broker answers them
        in order."""
        while True:
            frames = await conn.sock.recv_multipart()
            if len(frames) < 4 or frames[0] != MDPC or frames[1] not in (C_FINAL, C_PARTIAL):
                continue
            service = frames[2]
            if service != SERVICE:
                if conn.mmi:
                    waiter = conn.mmi.popleft()  # (done: its caller gave up; the answer is its own)
                    if not waiter.done():
                        waiter.set_result(frames[3:])
                continue
            hdr = unpack(frames[3])
            rid = hdr.get("id")
            if frames[1] == C_PARTIAL:
                on_partial = self._partials.get((service, rid))
                if on_partial is not None:
                    on_partial(hdr, frames[4:])
                continue
            fut = self._waiting.get((service, rid))
            if fut is not None and not fut.done():
                fut.set_result(frames[3:])

    async def _roundtrip(self, conn: _Conn, service: bytes, body: list[bytes], rid: Any, wait: float,
                         on_partial: OnPartial | None = None) -> list[bytes] | None:
        """Send once on ``conn``, wait up to ``wait`` s for the reply (None: none, or the client
        left that broker meanwhile)."""
        if conn.reader is None or conn.reader.done():  # started here: a running loop is needed
            conn.reader = asyncio.ensure_future(self._read_replies(conn))
        key = (service, rid)
        fut: asyncio.Future[list[bytes]] = asyncio.get_running_loop().create_future()
        if service == SERVICE:
            self._waiting[key] = fut
            if on_partial is not None:
                self._partials[key] = on_partial
            conn.sent.add(key)
        else:
            conn.mmi.append(fut)
        try:
            await conn.sock.send_multipart([MDPC, C_REQUEST, service, *body], copy=len(body) < 2)
            if conn.link is None:
                return (await asyncio.wait_for(fut, wait)) or None  # [] : moved to another broker
            # Several brokers: look at the connection meanwhile (client/brokers.py, FAILOVER_WAIT).
            deadline = time.monotonic() + wait
            while not fut.done():
                left = deadline - time.monotonic()
                if left <= 0 or (self._conns.get(conn.url) is conn and conn.link.dead()):
                    return None
                await asyncio.wait({fut}, timeout=min(left, LINK_CHECK))
            return fut.result() or None  # [] : the client moved to another broker meanwhile
        except (TimeoutError, zmq.Again):  # Again: no connection to queue it on (SEND_TIMEOUT_MS)
            return None
        finally:
            conn.sent.discard(key)
            self._waiting.pop(key, None)
            self._partials.pop(key, None)

    async def request(self, op: str, header: dict[str, Any], values: list[bytes] | None = None,
                      on_partial: OnPartial | None = None) -> Reply:
        """Send one kv request with retries; returns (reply header, value frames) or raises.
        With active brokers it goes to its keys' group leader, and a request spanning groups is
        split, its parts sent at once (docs/protocol.md §1.14)."""
        split = self.router.split(op, header, values)
        if split is not None:
            return split.merge(await asyncio.gather(*(self.request(op, part.header, part.values)
                                                      for part in split.parts)))
        attempts = Attempts(self.url, op, next(self._ids), self.client_id, header, values or [],
                            self.timeout, self.attempt_timeout)
        if op == "get" and self.direct_reads:
            direct = await self._direct(attempts, header)
            if direct is not None:
                return direct
        hops = 0  # group leaders followed in a row
        while True:
            body, wait = attempts.next()
            url = self.router.target(header) or self.brokers.current
            conn = self._connect(url)
            reply = await self._roundtrip(conn, SERVICE, body, attempts.rid, wait, on_partial)
            if reply is None:
                self.router.forget(header, url)
                if self._conns.get(url) is conn:  # once for the requests in flight that went unanswered with this one
                    if url == self.brokers.current:
                        self.brokers.silent()  # several brokers: try the next one
                    self._drop(url, wake=True)  # drop whatever the old socket still queues for a dead broker
                attempts.no_reply()
                continue
            if self.router.spans_groups(reply):
                await self._fetch_map()
                if self.router.slot_map is not None:
                    return await self.request(op, header, values, on_partial)  # split by the map now known
            answer = attempts.answer(reply)
            if isinstance(answer, tuple):
                self.brokers.settled()
                return answer
            hops += 1
            followed = await self._followed(reply, hops)
            if followed:
                continue  # a group's leader named: resent there at once
            hops = 0
            if followed is None and url == self.brokers.current:  # (from a broker left: nothing changes)
                answer = self.brokers.refused(attempts.last_error, answer)
            await asyncio.sleep(answer)

    # -- lease reads (client/leases.py): as Client's -------------------------------------------

    async def _direct(self, attempts: Attempts, header: dict[str, Any]) -> Reply | None:
        """As ``Client._direct``: the worker's answer to a GET sent to its lease holder, None:
        read through the broker."""
        key = header.get("key")
        if not isinstance(key, bytes):
            return None
        if self.leases.stale(time.monotonic()):
            await self._fetch_leases(attempts.deadline)
        url = self.leases.url_for(key)
        if url is None or self._closed:
            return None
        wait = min(DIRECT_WAIT, self.attempt_timeout, attempts.deadline - time.monotonic())
        if wait <= 0:
            return None
        conn = self._readers.get(url)
        if conn is None:
            conn = self._readers[url] = _Conn(url, dealer(self._ctx, url, self.credentials), None)
            conn.reader = asyncio.ensure_future(self._read_direct(conn))
        fut: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._direct_waiting[attempts.rid] = fut
        try:
            await conn.sock.send_multipart(attempts.body)  # the header alone: a reads endpoint has no envelope
            hdr, values = await asyncio.wait_for(fut, wait)
        except (TimeoutError, zmq.Again):
            self._direct_silent(url, conn)
            return None
        finally:
            self._direct_waiting.pop(attempts.rid, None)
        if hdr.get("ok"):
            self.direct_reads_served += 1
            return hdr, values
        if hdr.get("code") != NOT_LEASED:
            log.debug("direct_read_refused", url=url, code=hdr.get("code"), message=hdr.get("message"))
        self.leases.forget()
        return None

    async def _read_direct(self, conn: _Conn) -> None:
        """A reads endpoint's answers, to the direct reads waiting by id (the rest: late, dropped)."""
        while True:
            frames = await conn.sock.recv_multipart()  # [header, *values]
            try:
                hdr = unpack(frames[0])
            except ValueError:
                continue
            rid = hdr.get("id") if isinstance(hdr, dict) else None
            fut = self._direct_waiting.get(rid) if type(rid) is int else None
            if fut is not None and not fut.done():
                fut.set_result((hdr, frames[1:]))

    def _direct_silent(self, url: str, conn: _Conn) -> None:
        """As ``Client._direct_silent``: skip the endpoint a while, drop its socket (once: the
        other reads in flight on it fall back too, each on its own time)."""
        if self._readers.get(url) is conn:
            log.info("direct_read_unanswered", url=url, detail="reading through the broker")
            self.leases.silent(url, time.monotonic())
            del self._readers[url]
            conn.close()

    async def _fetch_leases(self, deadline: float) -> None:
        """One fetch at a time: the reads that find the map stale together wait for one answer."""
        if self._lease_fetch is None or self._lease_fetch.done():
            wait = min(MAP_WAIT, self.attempt_timeout, deadline - time.monotonic())

            async def fetch() -> None:
                reply = await self._mmi(MMI_LEASES, [b""], wait) if wait > 0 else None
                self.leases.install(reply, time.monotonic())

            self._lease_fetch = asyncio.ensure_future(fetch())
        await asyncio.shield(self._lease_fetch)

    async def _admin(self, step: programs.Mmi) -> list[bytes] | None:
        """As ``Client._admin``: with active brokers, to every group's leader, answers merged."""
        await self._fetch_map()
        plan = self.router.admin_plan(step.body[0])
        if plan is None:
            return await self._mmi(step.service, step.body, step.wait)
        replies = {}
        for url in plan.urls:
            self.brokers.route(url)
            replies[url] = await self._mmi(step.service, step.body, step.wait)
        return merge_admin(plan, replies)

    async def _fetch_map(self) -> None:
        """One fetch at a time: the requests that learn at once that they need the map (a burst
        of redirects) all wait for the same answer."""
        if self._map_fetch is None or self._map_fetch.done():
            self._map_fetch = asyncio.ensure_future(self._mmi(MMI_SLOTS, [b""], self.attempt_timeout))
        self.router.install(await asyncio.shield(self._map_fetch))

    async def _followed(self, reply: list[bytes], hops: int) -> bool | None:
        """As ``Client._followed``: True resend at once, False back off, None the broker list's rules."""
        redirect = self.router.redirect(reply)
        if redirect is None:
            return None
        if self.router.needs_map(redirect):
            await self._fetch_map()
        if self.router.follow(redirect, hops):
            return True
        return False if redirect.leader else None

    async def _mmi(self, service: bytes, body: list[bytes], wait: float) -> list[bytes] | None:
        """As ``Client._mmi``: a management call within ``wait``, attempts as ``BrokerList.mmi_again`` says."""
        deadline = time.monotonic() + wait
        while True:
            url = self.brokers.current
            conn = self._connect(url)
            left = max(deadline - time.monotonic(), 0.0)
            reply = await self._roundtrip(conn, service, body, None, min(left, self.attempt_timeout))
            moved = self.brokers.current != url or self._conns.get(url) is not conn
            if reply is None and self._conns.get(url) is conn:
                # A fresh connection, as a kv request's next attempt gets; and a late answer
                # must not be taken for the next management call's (they are matched in order).
                self._drop(url, wake=True)
            if not self.brokers.mmi_again(reply, service, moved, time.monotonic() >= deadline):
                return reply

    async def _run_window(self, calls: Iterator[Call], window: int) -> None:
        """Run ``calls`` with up to ``window`` in flight: ``window`` lanes, each one call at a time.
        When one lane fails the others are cancelled, so that no chunk is sent after it."""

        async def lane() -> None:
            for call in calls:
                await self._run(call)

        lanes = [asyncio.ensure_future(lane()) for _ in range(window)]
        try:
            await asyncio.gather(*lanes)
        finally:
            for t in lanes:
                t.cancel()

    # -- running commands (written once in client/api.py and client/programs.py) ---------------

    async def _run(self, call: Call) -> Any:
        if not call.op:
            return call.parse({}, [])
        if needs_size_check(call):
            # Asked for each large request: the broker may have restarted with another limit.
            err = oversize(call, (await self.status()).get("max_value"))
            if err is not None:
                raise err
        if call.on_partial is None:
            return call.parse(*await self.request(call.op, call.header, call.values))
        return call.parse(*await self.request(call.op, call.header, call.values, call.on_partial))

    async def _perform(self, step: programs.Step) -> Any:
        if isinstance(step, Call):
            return await self._run(step)
        if isinstance(step, programs.Window):
            return await self._run_window(step.calls, step.size)
        if isinstance(step, programs.Mmi):
            if step.service == MMI_ADMIN:
                return await self._admin(step)
            return await self._mmi(step.service, step.body, step.wait)
        if isinstance(step, programs.Reopen):
            return self._open()
        raise TypeError(f"not a step: {step!r}")

    async def _answer(self, step: programs.Step) -> tuple[Any, BaseException | None]:
        try:
            return await self._perform(step), None
        except BaseException as e:  # thrown into the program, which may clean up (put_stream aborts)
            return None, e

    async def _execute(self, build: Build, *args: Any) -> Any:
        todo = build(*args)
        if isinstance(todo, Call):
            return await self._run(todo)
        answer, error = None, None
        while True:
            done, step = programs.advance(todo, answer, error)
            if done:
                return step
            answer, error = await self._answer(step)

    async def _iterate(self, program: programs.Program[None]) -> AsyncIterator[Any]:
        answer, error = None, None
        try:
            while True:
                done, step = programs.advance(program, answer, error)
                if done:
                    return
                if isinstance(step, programs.Out):
                    answer, error = None, None
                    yield step.item
                else:
                    answer, error = await self._answer(step)
        finally:
            program.close()

    def _open_stream(self, info: StreamInfo, chunks: programs.Program[None]) -> AsyncValueStream:
        return AsyncValueStream(info, self._iterate(chunks))

    def _watch_stream(self, session: WatchSession) -> AsyncWatchStream:
        return AsyncWatchStream(self, session)


class _Conn:
    """One DEALER to one broker, the task reading its replies, and the requests sent on it that
    await a reply (woken when the client leaves that broker)."""

    def __init__(self, url: str, sock: zmq.asyncio.Socket, link: Link | None) -> None:
        self.url = url
        self.sock = sock
        self.link = link
        self.reader: asyncio.Task[None] | None = None
        self.sent: set[Any] = set()
        self.mmi: deque[asyncio.Future[list[bytes]]] = deque()  # management calls, in the order sent

    def close(self) -> None:
        if self.reader is not None:
            self.reader.cancel()
            self.reader = None
        close_linked(self.sock, self.link)


class AsyncValueStream:
    """A value being read: ``async for chunk in stream``, or ``await stream.read()`` (as
    ``ValueStream``: all of it, or up to ``n`` bytes)."""

    def __init__(self, info: StreamInfo, chunks: AsyncIterator[bytes]) -> None:
        self.version, self.size = info.version, info.size
        # The whole value when it came with the get (not streamed): no chunk to ask for.
        self.inline: bytes | None = info.inline
        self._chunks = chunks
        self._buf = b""

    def __aiter__(self) -> AsyncValueStream:
        return self

    async def __anext__(self) -> bytes:
        if self._buf:
            buf, self._buf = self._buf, b""
            return buf
        return await self._chunks.__anext__()

    async def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            return b"".join([c async for c in self])
        while len(self._buf) < n:
            try:
                nxt = await self._chunks.__anext__()
            except StopAsyncIteration:
                break
            self._buf += nxt
        out, self._buf = self._buf[:n], self._buf[n:]
        return out
