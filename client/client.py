"""``Client``: a synchronous zkv client over one DEALER socket (MDP/0.2 client framing).

Every request carries the client's id and a request number; a retry reuses both, so the broker
applies a retried write once. Retries happen on a missing reply (the broker restarted, the
network dropped: the socket is reopened first), on TIMEOUT and on UNAVAILABLE, with backoff,
until ``timeout`` runs out. A Client is not thread-safe (neither are ZeroMQ sockets): use one per
thread. Its methods are written once in client/api.py; this module only moves frames.
"""

from __future__ import annotations

import itertools
import os
import time
import uuid
from collections.abc import Iterator
from typing import Any

import structlog
import zmq

from client import programs
from client.api import Build, Commands
from client.brokers import LINK_CHECK, BrokerList, Link
from client.commands import Call, OnPartial, Reply, StreamInfo, needs_size_check, oversize
from client.dealers import broker_url, client_credentials, close_linked, dealer, linked_dealer
from client.leases import DIRECT_WAIT, MAP_WAIT, MMI_LEASES, NOT_LEASED, LeaseMap
from client.retry import DEFAULT_ATTEMPT_TIMEOUT, DEFAULT_TIMEOUT, Attempts
from client.routing import Router, merge_admin
from client.streams import ValueStream
from client.watch import WatchSession
from client.watch_streams import WatchStream
from protocol.curve import Credentials
from protocol.errors import ClientClosed
from protocol.frames import C_FINAL, C_PARTIAL, C_REQUEST, MDPC, MMI_ADMIN, MMI_SLOTS, SERVICE, unpack

log = structlog.get_logger("zkv.client")


class Client(Commands):
    def __init__(
        self,
        url: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        attempt_timeout: float = DEFAULT_ATTEMPT_TIMEOUT,
        context: zmq.Context | None = None,
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
        self._ctx = context or zmq.Context.instance()
        self._sock: zmq.Socket | None = None
        self._link: Link | None = None
        self._at = ""  # the URL the socket is connected to
        # Active brokers: the slot map once a broker's NOT_LEADER named a slot group, and the
        # sockets to the other group leaders (one per URL, kept while the client routes).
        self.router = Router()
        self._idle: dict[str, tuple[zmq.Socket, Link | None]] = {}
        # Lease reads: the broker's lease map and one DEALER per worker reads endpoint, kept.
        self.direct_reads = direct_reads
        self.leases = LeaseMap()
        self.direct_reads_served = 0  # GETs a worker answered (tests and benchmarks look)
        self._readers: dict[str, zmq.Socket] = {}
        self._open()

    def _open(self) -> None:
        """A fresh socket to the current broker (the old one's queued replies are dropped)."""
        close_linked(self._sock, self._link)
        self._at = self.brokers.current
        self._sock, self._link = linked_dealer(self._ctx, self._at, self.credentials, self._watched())

    def _watched(self) -> bool:
        """Whether a socket watches its connection (several brokers, or routing to group leaders:
        a dead one is left within about a second, client/brokers.py)."""
        return self.brokers.several or self.router.slot_map is not None

    def _ensure(self) -> zmq.Socket:
        """The socket, reopened first if the client has moved to another broker (with a slot
        map, the socket to another group's leader is kept for the next request there)."""
        if self._sock is None:
            raise ClientClosed("client is closed")
        if self._at != self.brokers.current:
            if self.router.slot_map is not None:
                self._idle[self._at] = (self._sock, self._link)
                kept = self._idle.pop(self.brokers.current, None)
                if kept is not None:
                    self._at = self.brokers.current
                    self._sock, self._link = kept
                    return self._sock
                self._sock = self._link = None
            self._open()
        assert self._sock is not None
        return self._sock

    def _gone(self) -> bool:
        """With several brokers: the current one's connection has been down for FAILOVER_WAIT."""
        return self._link is not None and self._link.dead()

    def close(self) -> None:
        close_linked(self._sock, self._link)
        self._sock, self._link = None, None
        for sock, link in self._idle.values():
            close_linked(sock, link)
        self._idle.clear()
        for reader in self._readers.values():
            reader.close(linger=0)
        self._readers.clear()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transport ------------------------------------------------------------------------------

    def _roundtrip(self, service: bytes, body: list[bytes], match: Any, wait: float,
                   on_partial: OnPartial | None = None) -> list[bytes] | None:
        """Send once, wait up to ``wait`` s for the reply whose header id is ``match``
        (PARTIALs for it go to ``on_partial``)."""
        sock = self._ensure()
        try:
            sock.send_multipart([MDPC, C_REQUEST, service, *body], copy=len(body) < 2)
        except zmq.Again:
            return None  # no connection to queue it on (SEND_TIMEOUT_MS): as no reply
        deadline = time.monotonic() + wait
        while True:
            left = deadline - time.monotonic()
            if self._link is not None:
                left = min(left, LINK_CHECK)
            if left <= 0 or not sock.poll(int(left * 1000) + 1):
                if time.monotonic() >= deadline or self._gone():
                    return None
                continue
            frames = sock.recv_multipart(copy=True)
            if len(frames) < 4 or frames[0] != MDPC or frames[2] != service:
                continue
            if frames[1] == C_PARTIAL:
                hdr = unpack(frames[3])
                if on_partial is not None and hdr.get("id") == match:
                    on_partial(hdr, frames[4:])
                continue
            if frames[1] != C_FINAL:
                continue
            if service != SERVICE:
                return frames[3:]
            hdr = unpack(frames[3])
            if hdr.get("id") == match or (hdr.get("id") is None and not hdr.get("ok")):
                return frames[3:]
            # A late reply to an earlier attempt or request: not ours, drop it.

    def _mmi(self, service: bytes, body: list[bytes], wait: float) -> list[bytes] | None:
        """A management call (mmi.status, mmi.service, mmi.admin: answered by whichever broker the
        client is at, a standby too) within ``wait``, each attempt up to ``attempt_timeout``; what
        follows an attempt is ``BrokerList.mmi_again``'s rule."""
        deadline = time.monotonic() + wait
        while True:
            sock = self._ensure()
            left = max(deadline - time.monotonic(), 0.0)
            reply = self._roundtrip(service, body, None, min(left, self.attempt_timeout))
            if not self.brokers.mmi_again(reply, service, self._sock is not sock, time.monotonic() >= deadline):
                return reply
            if reply is None and self._sock is sock:
                self._open()  # a fresh connection, as a kv request's next attempt gets

    def request(self, op: str, header: dict[str, Any], values: list[bytes] | None = None,
                on_partial: OnPartial | None = None) -> Reply:
        """Send one kv request with retries; returns (reply header, value frames) or raises.
        With active brokers it goes to its keys' group leader, and a multi-key request is split
        by group (docs/protocol.md §1.14)."""
        split = self.router.split(op, header, values)
        if split is not None:
            return split.merge([self.request(op, part.header, part.values) for part in split.parts])
        attempts = Attempts(self.url, op, next(self._ids), self.client_id, header, values or [],
                            self.timeout, self.attempt_timeout)
        if op == "get" and self.direct_reads:
            direct = self._direct(attempts, header)
            if direct is not None:
                return direct
        hops = 0  # group leaders followed in a row
        while True:
            body, wait = attempts.next()
            self._route(header)
            sock = self._ensure()
            reply = self._roundtrip(SERVICE, body, attempts.rid, wait, on_partial)
            if reply is None:
                self.router.forget(header, self._at)
                if self._sock is sock:  # (as AsyncClient, where another request may have reopened it)
                    self.brokers.silent()  # several brokers: try the next one
                    self._open()  # drop whatever the old socket still queues for a dead broker
                attempts.no_reply()
                continue
            if self.router.spans_groups(reply):
                self._fetch_map()
                if self.router.slot_map is not None:
                    return self.request(op, header, values, on_partial)  # split by the map now known
            answer = attempts.answer(reply)
            if isinstance(answer, tuple):
                self.brokers.settled()
                return answer
            hops += 1
            followed = self._followed(reply, hops)
            if followed:
                continue  # a group's leader named: resent there at once
            hops = 0
            if followed is None:  # (False: a group's leader named, but too many hops in a row: back off)
                answer = self.brokers.refused(attempts.last_error, answer)  # NOT_LEADER: go to the leader
            time.sleep(answer)

    # -- lease reads: a GET answered by the worker holding its slot's lease (client/leases.py) ----

    def _direct(self, attempts: Attempts, header: dict[str, Any]) -> Reply | None:
        """A GET sent to its slot's lease holder, the frames the broker would get (same id: reads
        are not de-duplicated); its answer if the worker gave one, None: read through the broker
        (no lease known, a refusal, no reply within DIRECT_WAIT)."""
        key = header.get("key")
        if not isinstance(key, bytes) or self._sock is None:  # (closed: the broker path raises)
            return None
        leases = self.leases
        if leases.stale(time.monotonic()):
            self._fetch_leases(attempts.deadline)
        url = leases.url_for(key)
        if url is None:
            return None
        wait = min(DIRECT_WAIT, self.attempt_timeout, attempts.deadline - time.monotonic())
        if wait <= 0:
            return None
        sock = self._readers.get(url)
        if sock is None:
            sock = self._readers[url] = dealer(self._ctx, url, self.credentials)
        try:
            sock.send_multipart(attempts.body)  # the header alone: a reads endpoint has no envelope
        except zmq.Again:
            return self._direct_silent(url)
        deadline = time.monotonic() + wait
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not sock.poll(int(left * 1000) + 1):
                if time.monotonic() >= deadline:
                    return self._direct_silent(url)
                continue
            frames = sock.recv_multipart()  # [header, *values]
            try:
                hdr = unpack(frames[0])
            except ValueError:
                continue
            if not isinstance(hdr, dict) or hdr.get("id") != attempts.rid:
                continue  # a late answer to an earlier direct read: that read went to the broker
            if hdr.get("ok"):
                self.direct_reads_served += 1
                return hdr, frames[1:]
            # NOT_LEASED (the lease moved, lapsed, or the key has a TTL), or anything else: the
            # broker answers; the map may be out of date.
            if hdr.get("code") != NOT_LEASED:
                log.debug("direct_read_refused", url=url, code=hdr.get("code"), message=hdr.get("message"))
            leases.forget()
            return None

    def _direct_silent(self, url: str) -> None:
        """A reads endpoint did not answer: skip it a while, and drop its socket (what it queues
        for a dead worker would be sent on reconnection, and answered to nobody)."""
        log.info("direct_read_unanswered", url=url, detail="reading through the broker")
        self.leases.silent(url, time.monotonic())
        sock = self._readers.pop(url, None)
        if sock is not None:
            sock.close(linger=0)
        return None

    def _fetch_leases(self, deadline: float) -> None:
        """The broker's lease map, asked within the read's time (its own silence keeps the map)."""
        wait = min(MAP_WAIT, self.attempt_timeout, deadline - time.monotonic())
        self.leases.install(self._mmi(MMI_LEASES, [b""], wait) if wait > 0 else None, time.monotonic())

    # -- active brokers: routing by slot group (client/routing.py) -------------------------------

    def _route(self, header: dict[str, Any]) -> None:
        """With a slot map: send to the leader of the request's group, when the map knows it."""
        url = self.router.target(header)
        if url:
            self.brokers.route(url)

    def _admin(self, step: programs.Mmi) -> list[bytes] | None:
        """An operator command: with active brokers, to every group's leader (by a map fetched
        now: a command is rare, a stale map would miss a group), answers merged."""
        self._fetch_map()
        plan = self.router.admin_plan(step.body[0])
        if plan is None:
            return self._mmi(step.service, step.body, step.wait)
        replies = {}
        for url in plan.urls:
            self.brokers.route(url)
            replies[url] = self._mmi(step.service, step.body, step.wait)
        return merge_admin(plan, replies)

    def _fetch_map(self) -> None:
        self.router.install(self._mmi(MMI_SLOTS, [b""], self.attempt_timeout))

    def _followed(self, reply: list[bytes], hops: int) -> bool | None:
        """A NOT_LEADER naming a slot group: follow it (the whole map first when it is newer than
        ours). True: resend at once, to the leader it names; False: back off (it names a leader,
        but leaders have named each other too often in a row); None: the broker list's rules
        apply (not a group's redirect, or no leader named)."""
        redirect = self.router.redirect(reply)
        if redirect is None:
            return None
        if self.router.needs_map(redirect):
            self._fetch_map()
        if self.router.follow(redirect, hops):
            return True
        return False if redirect.leader else None

    def _run_window(self, calls: Iterator[Call], window: int) -> None:
        """Run ``calls`` with up to ``window`` requests in flight (each with the retry rules of
        ``request``); raises the first error. The credit of a streamed put: a chunk is read from
        the file and sent only when an earlier one is acknowledged. With several brokers, a move
        to another (a silence, NOT_LEADER) reopens the socket and resends everything in flight."""
        self._ensure()
        # rid -> (attempts, call, when to resend, whether that is after a backoff or a silence)
        flight: dict[int, tuple[Attempts, Call, float, bool]] = {}
        calls = iter(calls)
        more = True

        def send(a: Attempts, call: Call) -> None:
            body, wait = a.next()
            try:
                self._ensure().send_multipart([MDPC, C_REQUEST, SERVICE, *body], copy=False)
            except zmq.Again:  # no connection to queue it on (SEND_TIMEOUT_MS): a silence, at once
                self._open()
                wait = 0.0
            flight[a.rid] = (a, call, time.monotonic() + wait, False)

        def switch(wait: float) -> None:
            """The client moved to another broker: every request in flight goes there (after
            ``wait``); their answers on the old socket are gone with it."""
            self._open()
            for rid, (a, call, _, _) in list(flight.items()):
                flight[rid] = (a, call, time.monotonic() + wait, True)

        while more or flight:
            while more and len(flight) < window:
                call = next(calls, None)
                if call is None:
                    more = False
                    break
                send(Attempts(self.url, call.op, next(self._ids), self.client_id, call.header,
                              call.values, self.timeout, self.attempt_timeout), call)
            now = time.monotonic()
            if self.brokers.several and flight and (self._gone() or any(
                    now >= f[2] and not f[3] for f in flight.values())):
                for a, _, _, backoff in flight.values():
                    if not backoff:
                        a.no_reply()
                self.brokers.silent()
                switch(0.0)
                now = time.monotonic()
            for a, call, resend_at, backoff in list(flight.values()):
                if now >= resend_at:
                    if not backoff:
                        a.no_reply()
                    send(a, call)
            if not flight:
                continue
            next_due = min(f[2] for f in flight.values())
            left = next_due - time.monotonic()
            if self._link is not None:
                left = min(left, LINK_CHECK)
            sock = self._ensure()
            if not sock.poll(max(1, int(left * 1000) + 1)):
                continue
            frames = sock.recv_multipart()
            if len(frames) < 4 or frames[0] != MDPC or frames[1] != C_FINAL or frames[2] != SERVICE:
                continue
            rid = unpack(frames[3]).get("id")
            if rid not in flight:
                continue
            a, call, _, _ = flight[rid]
            answer = a.answer(frames[3:])
            if isinstance(answer, tuple):
                self.brokers.settled()
                del flight[rid]
                call.parse(*answer)
                continue
            at = self.brokers.current
            wait = self.brokers.refused(a.last_error, answer)
            if self.brokers.current != at:
                switch(wait)
            else:
                flight[rid] = (a, call, time.monotonic() + wait, True)

    # -- running commands (written once in client/api.py and client/programs.py) ---------------

    def _run(self, call: Call) -> Any:
        if not call.op:
            return call.parse({}, [])
        if needs_size_check(call):
            err = oversize(call, self._max_value())
            if err is not None:
                raise err
        if call.on_partial is None:
            return call.parse(*self.request(call.op, call.header, call.values))
        return call.parse(*self.request(call.op, call.header, call.values, call.on_partial))

    def _max_value(self) -> int | None:
        """The broker's --max-value, asked for each large request (it may have restarted with
        another limit; one status round trip is nothing beside 8 MiB of values)."""
        return self.status().get("max_value")

    def _perform(self, step: programs.Step) -> Any:
        if isinstance(step, Call):
            return self._run(step)
        if isinstance(step, programs.Window):
            return self._run_window(step.calls, step.size)
        if isinstance(step, programs.Mmi):
            return self._admin(step) if step.service == MMI_ADMIN else self._mmi(step.service, step.body, step.wait)
        if isinstance(step, programs.Reopen):
            return self._open()
        raise TypeError(f"not a step: {step!r}")

    def _answer(self, step: programs.Step) -> tuple[Any, BaseException | None]:
        try:
            return self._perform(step), None
        except BaseException as e:  # thrown into the program, which may clean up (put_stream aborts)
            return None, e

    def _execute(self, build: Build, *args: Any) -> Any:
        todo = build(*args)
        if isinstance(todo, Call):
            return self._run(todo)
        answer, error = None, None
        while True:
            done, step = programs.advance(todo, answer, error)
            if done:
                return step
            answer, error = self._answer(step)

    def _iterate(self, program: programs.Program[None]) -> Iterator[Any]:
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
                    answer, error = self._answer(step)
        finally:
            program.close()

    def _open_stream(self, info: StreamInfo, chunks: programs.Program[None]) -> ValueStream:
        return ValueStream(info, self._iterate(chunks))

    def _watch_stream(self, session: WatchSession) -> WatchStream:
        return WatchStream(self, session)
