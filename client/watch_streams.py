"""What ``watch`` returns: ``WatchStream`` (for ``Client``) and ``AsyncWatchStream`` (for
``AsyncClient``), each over one watch leg per socket (the whole watch, or one slot group's share
when the brokers are active). The bookkeeping both share, sans-I/O, is in client/watch.py."""

from __future__ import annotations

import time
from collections import deque
from typing import TYPE_CHECKING, Any

import zmq
import zmq.asyncio

from client.brokers import LINK_CHECK, Link
from client.dealers import close_linked, linked_dealer
from client.watch import CursorMark, WatchEvent, WatchSession, follow_leader, merged_cursor, next_url
from protocol.frames import C_FINAL, C_PARTIAL, C_REQUEST, MDPC, MMI_SLOTS, SERVICE

if TYPE_CHECKING:
    from client.aio import AsyncClient
    from client.client import Client


class _WatchLeg:
    """One watch session on a socket of its own: the whole watch, or one slot group's share."""

    def __init__(self, session: WatchSession) -> None:
        self.session = session
        self.sock: zmq.Socket | None = None
        self.link: Link | None = None
        self.url: str | None = None

    def send_due(self, client: Client) -> float | None:
        """Send what the session says is due (None: something was sent), else how long to wait."""
        now = time.monotonic()
        if self.link is not None and self.session.open_at is None and self.link.dead(now):
            self.session.lost(now)  # several brokers: this one is gone, resume at the next
        act = self.session.due(now, lambda: next(client._ids))
        if act is not None:
            if act[0] == "open" or self.sock is None:
                self.reopen(client)  # a fresh socket: nothing of an earlier subscription reaches it
            assert self.sock is not None
            try:
                self.sock.send_multipart([MDPC, C_REQUEST, SERVICE, *act[1]])
            except zmq.Again:  # no connection to queue it on (SEND_TIMEOUT_MS): a silence, resumed at once
                self.session.lost(time.monotonic())
            return None
        wait = self.session.wait(now)
        return min(wait, LINK_CHECK) if self.link is not None else wait

    def read(self, client: Client, out: deque[tuple[WatchSession, WatchEvent | CursorMark]]) -> None:
        assert self.sock is not None
        frames = self.sock.recv_multipart()
        if len(frames) >= 4 and frames[0] == MDPC and frames[1] in (C_PARTIAL, C_FINAL) and frames[2] == SERVICE:
            out.extend((self.session, item) for item in self.session.received(frames[1], frames[3:], time.monotonic()))
            follow_leader(self.session, client.brokers, client.router)

    def reopen(self, client: Client) -> None:
        self.url = next_url(self.session, self.url, client.brokers, client.router)
        close_linked(self.sock, self.link)
        self.sock, self.link = linked_dealer(client._ctx, self.url, client.credentials, client._watched())

    def ask_map(self, client: Client) -> list[bytes] | None:
        """``mmi.slots`` on this leg's own socket (the stream may run on another thread than
        the client's requests); None without an answer within the attempt timeout."""
        if self.sock is None:
            return None
        try:
            self.sock.send_multipart([MDPC, C_REQUEST, MMI_SLOTS, b""])
        except zmq.Again:
            return None
        deadline = time.monotonic() + client.attempt_timeout
        while (left := deadline - time.monotonic()) > 0 and self.sock.poll(int(left * 1000) + 1):
            frames = self.sock.recv_multipart()
            if len(frames) >= 4 and frames[0] == MDPC and frames[1] == C_FINAL and frames[2] == MMI_SLOTS:
                return frames[3:]
        return None

    def drop(self) -> None:
        """Close the socket, the session left as it is (its watch is refused: nothing to cancel)."""
        close_linked(self.sock, self.link)
        self.sock, self.link = None, None

    def close(self) -> None:
        if self.sock is not None:
            if not self.session.ended:
                try:
                    self.sock.send_multipart([MDPC, C_REQUEST, SERVICE, *self.session.cancel()], zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass
            close_linked(self.sock, self.link, linger=100)
            self.sock, self.link = None, None
        self.session.ended = True


class WatchStream:
    """An open watch (see ``Client.watch``); iterate it, ``close()`` it when done. With active
    brokers it watches every slot group at its leader, one socket each, and merges the events
    (in commit order per key, as one broker's) and the cursors."""

    def __init__(self, client: Client, session: WatchSession) -> None:
        self._client = client
        self.session = session  # the whole watch; ``ended`` once it is closed
        self._legs: list[_WatchLeg] = []
        self._events: deque[tuple[WatchSession, WatchEvent | CursorMark]] = deque()

    @property
    def cursor(self) -> dict[str, Any] | None:
        """Where the events delivered so far end: pass it as ``since`` to resume later (events
        already received but not yet taken from the stream are not behind it)."""
        if len(self._legs) > 1:
            return merged_cursor([leg.session for leg in self._legs])
        return self.session.delivered

    def __iter__(self) -> WatchStream:
        return self

    def __next__(self) -> WatchEvent:
        while True:
            while not self._events:
                if self._ended():
                    self.close()
                    raise StopIteration
                self._pump()
            session, item = self._events.popleft()
            event = session.deliver(item)
            if event is not None:
                return event

    def opened(self) -> None:
        """Return once the broker holds the watch (as ``AsyncWatchStream.opened``)."""
        while not self._held() and not self._ended():
            self._pump()

    def _held(self) -> bool:
        """Every leg's broker holds its watch: a cursor of it has come."""
        return bool(self._legs) and all(leg.session.cursor is not None for leg in self._legs)

    def _ended(self) -> bool:
        return self.session.ended or any(leg.session.ended for leg in self._legs)

    def _start(self) -> None:
        """The legs: one per slot group with active brokers (the map known), else one: if a
        broker refuses it for naming no group, ``_fan_out`` splits it."""
        m = self._client.router.slot_map
        shares = [self.session.share(g) for g in range(m.groups)] if m is not None and m.groups > 1 else [self.session]
        self._legs = [_WatchLeg(s) for s in shares]

    def _fan_out(self) -> None:
        leg = self._legs[0]
        leg.session.spans_groups = False
        router = self._client.router
        if router.slot_map is None:
            router.install(leg.ask_map(self._client))
        if router.slot_map is not None and router.slot_map.groups > 1:
            leg.drop()
            self._start()  # else the refused session opens again after its backoff

    def _pump(self) -> None:
        if not self._legs:
            self._start()
        waits, sent = [], False
        for leg in self._legs:
            wait = leg.send_due(self._client)
            if wait is None:
                sent = True  # sent something: look again before waiting (every leg's turn first)
            else:
                waits.append(wait)
        if sent:
            return
        poller = zmq.Poller()
        for leg in self._legs:
            if leg.sock is not None:
                poller.register(leg.sock, zmq.POLLIN)
        ready = dict(poller.poll(int(min(waits) * 1000) + 1))
        for leg in self._legs:
            if leg.sock is not None and leg.sock in ready:
                leg.read(self._client, self._events)
        if len(self._legs) == 1 and self._legs[0].session.spans_groups:
            self._fan_out()

    def close(self) -> None:
        """Cancel the watch (best effort: the broker also drops it without keepalives)."""
        for leg in self._legs:
            leg.close()
        self.session.ended = True

    def __enter__(self) -> WatchStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _AsyncWatchLeg:
    """As ``_WatchLeg``: one watch session on a socket of its own."""

    def __init__(self, session: WatchSession) -> None:
        self.session = session
        self.sock: zmq.asyncio.Socket | None = None
        self.link: Link | None = None
        self.url: str | None = None

    async def send_due(self, client: AsyncClient) -> float | None:
        """Send what the session says is due (None: something was sent), else how long to wait."""
        now = time.monotonic()
        if self.link is not None and self.session.open_at is None and self.link.dead(now):
            self.session.lost(now)  # several brokers: this one is gone, resume at the next
        act = self.session.due(now, lambda: next(client._ids))
        if act is not None:
            if act[0] == "open" or self.sock is None:
                self.reopen(client)  # a fresh socket: nothing of an earlier subscription reaches it
            assert self.sock is not None
            try:
                await self.sock.send_multipart([MDPC, C_REQUEST, SERVICE, *act[1]])
            except zmq.Again:  # no connection to queue it on (SEND_TIMEOUT_MS): a silence, resumed at once
                self.session.lost(time.monotonic())
            return None
        wait = self.session.wait(now)
        return min(wait, LINK_CHECK) if self.link is not None else wait

    async def read(self, client: AsyncClient, out: deque[tuple[WatchSession, WatchEvent | CursorMark]]) -> None:
        assert self.sock is not None
        frames = await self.sock.recv_multipart()
        if len(frames) >= 4 and frames[0] == MDPC and frames[1] in (C_PARTIAL, C_FINAL) and frames[2] == SERVICE:
            out.extend((self.session, item) for item in self.session.received(frames[1], frames[3:], time.monotonic()))
            follow_leader(self.session, client.brokers, client.router)

    def reopen(self, client: AsyncClient) -> None:
        self.url = next_url(self.session, self.url, client.brokers, client.router)
        close_linked(self.sock, self.link)
        self.sock, self.link = linked_dealer(client._ctx, self.url, client.credentials, client._watched())

    def drop(self) -> None:
        """Close the socket, the session left as it is (its watch is refused: nothing to cancel)."""
        close_linked(self.sock, self.link)
        self.sock, self.link = None, None

    async def close(self) -> None:
        if self.sock is not None:
            if not self.session.ended:
                try:
                    await self.sock.send_multipart([MDPC, C_REQUEST, SERVICE, *self.session.cancel()], zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass
            close_linked(self.sock, self.link, linger=100)
            self.sock, self.link = None, None
        self.session.ended = True


class AsyncWatchStream:
    """An open watch (see ``AsyncClient.watch``); ``async for`` it, ``await close()`` when done.
    With active brokers it watches every slot group at its leader (as ``WatchStream``)."""

    def __init__(self, client: AsyncClient, session: WatchSession) -> None:
        self._client = client
        self.session = session  # the whole watch; ``ended`` once it is closed
        self._legs: list[_AsyncWatchLeg] = []
        self._events: deque[tuple[WatchSession, WatchEvent | CursorMark]] = deque()

    @property
    def cursor(self) -> dict[str, Any] | None:
        """Where the events delivered so far end: pass it as ``since`` to resume later (events
        already received but not yet taken from the stream are not behind it)."""
        if len(self._legs) > 1:
            return merged_cursor([leg.session for leg in self._legs])
        return self.session.delivered

    def __aiter__(self) -> AsyncWatchStream:
        return self

    async def __anext__(self) -> WatchEvent:
        while True:
            while not self._events:
                if self._ended():
                    await self.close()
                    raise StopAsyncIteration
                await self._pump()
            session, item = self._events.popleft()
            event = session.deliver(item)
            if event is not None:
                return event

    async def opened(self) -> None:
        """Return once the broker holds the watch: its first cursor has come, so every change
        committed from now on is delivered (a watch opened without ``since`` starts where the
        broker is when it registers it, not when ``watch()`` was called). At once with ``since``:
        everything after that cursor is replayed whenever the watch opens. Not while iterating.
        With active brokers: once every group's leader holds its share."""
        while not self._held() and not self._ended():
            await self._pump()

    def _held(self) -> bool:
        """Every leg's broker holds its watch: a cursor of it has come."""
        return bool(self._legs) and all(leg.session.cursor is not None for leg in self._legs)

    def _ended(self) -> bool:
        return self.session.ended or any(leg.session.ended for leg in self._legs)

    def _start(self) -> None:
        """The legs: one per slot group with active brokers (the map known), else one: if a
        broker refuses it for naming no group, ``_fan_out`` splits it."""
        m = self._client.router.slot_map
        shares = [self.session.share(g) for g in range(m.groups)] if m is not None and m.groups > 1 else [self.session]
        self._legs = [_AsyncWatchLeg(s) for s in shares]

    async def _fan_out(self) -> None:
        leg = self._legs[0]
        leg.session.spans_groups = False
        router = self._client.router
        if router.slot_map is None:
            await self._client._fetch_map()
        if router.slot_map is not None and router.slot_map.groups > 1:
            leg.drop()
            self._start()  # else the refused session opens again after its backoff

    async def _pump(self) -> None:
        if not self._legs:
            self._start()
        waits, sent = [], False
        for leg in self._legs:
            wait = await leg.send_due(self._client)
            if wait is None:
                sent = True  # sent something: look again before waiting (every leg's turn first)
            else:
                waits.append(wait)
        if sent:
            return
        poller = zmq.asyncio.Poller()
        for leg in self._legs:
            if leg.sock is not None:
                poller.register(leg.sock, zmq.POLLIN)
        ready = dict(await poller.poll(int(min(waits) * 1000) + 1))
        for leg in self._legs:
            if leg.sock is not None and leg.sock in ready:
                await leg.read(self._client, self._events)
        if len(self._legs) == 1 and self._legs[0].session.spans_groups:
            await self._fan_out()

    async def close(self) -> None:
        """Cancel the watch (best effort: the broker also drops it without keepalives)."""
        for leg in self._legs:
            await leg.close()
        self.session.ended = True

    async def __aenter__(self) -> AsyncWatchStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
