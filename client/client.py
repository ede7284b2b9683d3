"""``Client``: a synchronous zkv client over one DEALER socket (MDP/0.2 client framing).

Every request carries the client's id and a request number; a retry reuses both, so the broker
applies a retried write once. Retries happen on a missing reply (the broker restarted, the
network dropped), on TIMEOUT and on UNAVAILABLE, with backoff, until ``timeout`` runs out.
A Client is not thread-safe (neither are ZeroMQ sockets): use one per thread.
"""

from __future__ import annotations

import itertools
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, BinaryIO

import zmq

from client import commands
from client.commands import Key
from protocol.errors import ValueChanged, ZkvError, ZkvTimeout
from protocol.frames import (
    C_FINAL,
    C_PARTIAL,
    C_REQUEST,
    MDPC,
    MMI_ADMIN,
    MMI_SERVICE,
    MMI_STATUS,
    SERVICE,
    pack,
    unpack,
)
from protocol.limits import DEFAULT_CHUNK_BYTES

OnPartial = Callable[[dict[str, Any], list[bytes]], None]


class Client:
    def __init__(
        self,
        url: str = "tcp://127.0.0.1:5555",
        timeout: float = 10.0,
        attempt_timeout: float = 6.0,
        context: zmq.Context | None = None,
    ) -> None:
        """``timeout``: the most one call may take, retries included (seconds).
        ``attempt_timeout``: how long one attempt waits for a reply before it is sent again."""
        self.url = url
        self.timeout = timeout
        self.attempt_timeout = attempt_timeout
        self.client_id = uuid.uuid4().bytes
        self._ids = itertools.count(1)
        self._ctx = context or zmq.Context.instance()
        self._sock: zmq.Socket | None = None
        self._open()

    def _open(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.connect(self.url)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transport ------------------------------------------------------------------------------

    def _roundtrip(self, service: bytes, body: list[bytes], match: Any, wait: float,
                   on_partial: OnPartial | None = None) -> list[bytes] | None:
        """Send once, wait up to ``wait`` s for the reply whose header id is ``match``
        (PARTIALs for it go to ``on_partial``)."""
        if self._sock is None:
            raise ZkvError("client is closed")
        self._sock.send_multipart([MDPC, C_REQUEST, service, *body], copy=len(body) < 2)
        deadline = time.monotonic() + wait
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self._sock.poll(int(left * 1000) + 1):
                if time.monotonic() >= deadline:
                    return None
                continue
            frames = self._sock.recv_multipart(copy=True)
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

    def request(self, op: str, header: dict[str, Any], values: list[bytes] | None = None,
                on_partial: OnPartial | None = None) -> commands.Reply:
        """Send one kv request with retries; returns (reply header, value frames) or raises."""
        attempts = commands.Attempts(self.url, op, next(self._ids), self.client_id, header, values or [],
                                     self.timeout, self.attempt_timeout)
        while True:
            body, wait = attempts.next()
            reply = self._roundtrip(SERVICE, body, attempts.rid, wait, on_partial)
            if reply is None:
                self._open()  # drop whatever the old socket still queues for a dead broker
                attempts.no_reply()
                continue
            answer = attempts.answer(reply)
            if isinstance(answer, tuple):
                return answer
            time.sleep(answer)

    def _run_window(self, calls: Iterator[commands.Call], window: int) -> None:
        """Run ``calls`` with up to ``window`` requests in flight (each with the retry rules of
        ``request``); raises the first error. The credit of a streamed put: a chunk is read from
        the file and sent only when an earlier one is acknowledged."""
        if self._sock is None:
            raise ZkvError("client is closed")
        # rid -> (attempts, call, when to resend, whether that is after a backoff or a silence)
        flight: dict[int, tuple[commands.Attempts, commands.Call, float, bool]] = {}
        calls = iter(calls)
        more = True

        def send(a: commands.Attempts, call: commands.Call) -> None:
            body, wait = a.next()
            assert self._sock is not None
            self._sock.send_multipart([MDPC, C_REQUEST, SERVICE, *body], copy=False)
            flight[a.rid] = (a, call, time.monotonic() + wait, False)

        while more or flight:
            while more and len(flight) < window:
                call = next(calls, None)
                if call is None:
                    more = False
                    break
                send(commands.Attempts(self.url, call.op, next(self._ids), self.client_id, call.header,
                                       call.values, self.timeout, self.attempt_timeout), call)
            now = time.monotonic()
            for a, call, resend_at, backoff in list(flight.values()):
                if now >= resend_at:
                    if not backoff:
                        a.no_reply()
                    send(a, call)
            if not flight:
                continue
            next_due = min(f[2] for f in flight.values())
            if not self._sock.poll(max(1, int((next_due - time.monotonic()) * 1000) + 1)):
                continue
            frames = self._sock.recv_multipart()
            if len(frames) < 4 or frames[0] != MDPC or frames[1] != C_FINAL or frames[2] != SERVICE:
                continue
            rid = unpack(frames[3]).get("id")
            if rid not in flight:
                continue
            a, call, _, _ = flight[rid]
            answer = a.answer(frames[3:])
            if isinstance(answer, tuple):
                del flight[rid]
                call.parse(*answer)
            else:
                flight[rid] = (a, call, time.monotonic() + answer, True)

    # -- commands (written once in client/commands.py) -----------------------------------------

    def _run(self, call: commands.Call) -> Any:
        if not call.op:
            return call.parse({}, [])
        if call.values and sum(len(v) for v in call.values) > commands.CHECK_SIZE_ABOVE:
            err = commands.oversize(call, self._max_value())
            if err is not None:
                raise err
        return call.parse(*self.request(call.op, call.header, call.values))

    def _max_value(self) -> int | None:
        """The broker's --max-value, asked for each large request (it may have restarted with
        another limit; one status round trip is nothing beside 8 MiB of values)."""
        return self.status().get("max_value")

    def _whole(self, key: Key, value: Any) -> Any:
        """A value as bytes: a streamed one (StreamInfo) is fetched in chunks and joined."""
        if isinstance(value, commands.StreamInfo):
            return b"".join(self._chunks(key, value, 4))
        return value

    def put(self, key: Key, value: bytes, ttl: int | None = None, if_version: int | None = None,
            if_absent: bool = False) -> int:
        """Store ``value`` under ``key``; ``ttl`` in milliseconds. Returns the new version.

        Compare-and-set: ``if_version=N`` writes only if the key exists with version N;
        ``if_absent=True`` only if it does not exist. Otherwise ``ConditionFailed`` is raised
        (with the current version) and nothing is written, on every replica alike."""
        return self._run(commands.put(key, value, ttl, if_version, if_absent))

    def get(self, key: Key) -> bytes | None:
        """The value, or None. A streamed value is fetched whole: prefer ``get_stream`` for those."""
        return self._whole(key, self._run(commands.get(key)))

    def get_versioned(self, key: Key) -> tuple[bytes, int] | None:
        """(value, version), or None if the key does not exist."""
        found = self._run(commands.get_versioned(key))
        return None if found is None else (self._whole(key, found[0]), found[1])

    def put_stream(self, key: Key, fileobj: BinaryIO, ttl: int | None = None, if_version: int | None = None,
                   if_absent: bool = False, chunk_size: int = DEFAULT_CHUNK_BYTES, window: int = 4,
                   progress: Callable[[int], None] | None = None) -> int:
        """Store what ``fileobj`` (binary) holds under ``key`` without holding it in memory: it
        is sent in chunks of ``chunk_size`` bytes, ``window`` of them in flight, each acknowledged
        once W replicas have it on disk; then one commit makes it the key's value on every
        replica at once (conditions as for ``put``). Returns the version. ``progress(n)`` is
        called as each chunk of n bytes is acknowledged. If this fails or the client dies, no
        part of the value becomes visible; the chunks are freed (at once, or by the broker after
        the stream is idle for ``--stream-idle`` seconds)."""
        up = commands.StreamPut(key, fileobj, chunk_size, ttl, if_version, if_absent, progress)
        if up.single is not None:
            version = self._run(up.single)
            if progress is not None:
                progress(len(up.single.values[0]))
            return version
        try:
            self._run_window(up.chunk_calls(), max(1, window))
            return self._run(up.commit())
        except BaseException:
            try:
                self._run(up.abort())
            except ZkvError:
                pass  # the broker aborts it when the stream has been idle long enough
            raise

    def get_stream(self, key: Key, credit: int = 4) -> commands.ValueStream | None:
        """The value of ``key`` as a ``ValueStream`` (iterate it for chunks, or ``read()`` it),
        None if the key does not exist. At most ``credit`` chunks are asked for at a time.
        Raises ``ValueChanged`` while iterating if the value is replaced meanwhile."""
        info = self._run(commands.stream_info(key))
        if info is None:
            return None
        return commands.ValueStream(info, self._chunks(key, info, credit))

    def _chunks(self, key: Key, info: commands.StreamInfo, credit: int) -> Iterator[bytes]:
        if info.inline is not None:
            yield info.inline
            return
        for batch in commands.batches(info, max(1, min(credit, 16))):
            call = commands.get_chunks(key, info, batch.first, batch.count)
            self.request(call.op, call.header, on_partial=batch.on_partial)
            yield from batch.take()

    def delete(self, key: Key, if_version: int | None = None) -> bool | None:
        """Delete ``key``; True if it existed, False if not. None in one rare case: the delete was
        applied, but the broker restarted before it could record the answer for this retry.
        ``if_version=N`` deletes only if the key has version N, else raises ``ConditionFailed``."""
        return self._run(commands.delete(key, if_version))

    def ttl(self, key: Key) -> int | None:
        """Remaining time to live of ``key`` in milliseconds, None if it never expires; raises
        ``KeyNotFound`` if it does not exist."""
        return self._run(commands.ttl(key))

    def expire(self, key: Key, ttl: int | None) -> bool:
        """Set the time to live of an existing key to ``ttl`` ms from now, or remove it (None),
        without sending or rewriting its value. False if the key does not exist."""
        return self._run(commands.expire(key, ttl))

    def exists(self, key: Key) -> bool:
        return self._run(commands.exists(key))

    def mget(self, keys: Iterable[Key]) -> list[bytes | None]:
        keys = list(keys)
        return [self._whole(k, v) for k, v in zip(keys, self._run(commands.mget(keys)), strict=True)]

    def mset(self, items: Mapping[Key, bytes] | Iterable[tuple[Key, bytes]]) -> None:
        self._run(commands.mset(items))

    def scan(self, prefix: Key = b"", start_after: Key | None = None, limit: int = 1000,
             values: bool = True) -> Iterator[commands.ScanItem]:
        """Every live key starting with ``prefix`` (and above ``start_after``), in key order, as
        ``ScanItem(key, value, version)``; fetched in pages of ``limit`` keys (1 to 10,000). Each
        page is linearizable on its own; a scan is not a snapshot of the whole key space."""
        start = None if start_after is None else commands.key_bytes(start_after)
        while True:
            page = self.scan_page(prefix, start, limit, values)
            for item in page.items:  # a streamed value is fetched whole, as get does
                if not values or not isinstance(item.value, commands.StreamInfo):
                    yield item
                    continue
                try:
                    yield item._replace(value=self._whole(item.key, item.value))
                except ValueChanged:  # replaced or deleted since the page: read it as it is now
                    now = self.get_versioned(item.key)
                    if now is not None:
                        yield item._replace(value=now[0], version=now[1])
            start = commands.next_start(page)
            if start is None:
                return

    def scan_page(self, prefix: Key = b"", start_after: Key | None = None, limit: int = 1000,
                  values: bool = True) -> commands.ScanPage:
        """One page: ``ScanPage(items, more)``."""
        return self._run(commands.scan_page(prefix, start_after, limit, values))

    def scan_keys(self, prefix: Key = b"", start_after: Key | None = None, limit: int = 1000) -> Iterator[bytes]:
        """The keys alone (no values travel)."""
        for item in self.scan(prefix, start_after, limit, values=False):
            yield item.key

    def watch(self, prefix: Key = b"", since: dict[str, Any] | None = None) -> WatchStream:
        """Committed changes of keys starting with ``prefix``, as they commit: an iterator of
        ``WatchEvent``s, in commit order per key, resumed transparently (from its ``cursor``) after
        a disconnect; ``since``: a cursor saved from an earlier watch. Uses a socket of its own."""
        return WatchStream(self, commands.WatchSession(prefix, since))

    # -- management -----------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        reply = self._roundtrip(MMI_STATUS, [], None, self.timeout)
        if reply is None:
            raise ZkvTimeout(f"no reply from {self.url} within {self.timeout}s")
        return unpack(reply[0])

    def admin(self, cmd: str, worker: str | None = None, **fields: Any) -> dict[str, Any]:
        """Operator command (mmi.admin): drain, undrain, remove, rebalance, or move (with slot=,
        from_=, to=). Returns {ok, message}."""
        if "from_" in fields:
            fields["from"] = fields.pop("from_")
        reply = self._roundtrip(MMI_ADMIN, [pack({"cmd": cmd, "worker": worker, **fields})], None, self.timeout)
        if reply is None:
            raise ZkvTimeout(f"no reply from {self.url} within {self.timeout}s")
        return unpack(reply[0])

    def service_available(self, wait: float = 1.0) -> bool:
        """MMI: does the broker answer and have the ``kv`` service ready? (200 / 404)"""
        reply = self._roundtrip(MMI_SERVICE, [SERVICE], None, wait)
        if reply is None:
            self._open()
            return False
        return reply[0] == b"200"


class WatchStream:
    """An open watch (see ``Client.watch``); iterate it, ``close()`` it when done."""

    def __init__(self, client: Client, session: commands.WatchSession) -> None:
        self._client = client
        self.session = session
        self._sock: zmq.Socket | None = None
        self._events: deque[commands.WatchEvent] = deque()

    @property
    def cursor(self) -> dict[str, Any] | None:
        """Where the events delivered so far end: pass it as ``since`` to resume later."""
        return self.session.cursor

    def __iter__(self) -> WatchStream:
        return self

    def __next__(self) -> commands.WatchEvent:
        while not self._events:
            if self.session.ended:
                self.close()
                raise StopIteration
            self._pump()
        return self._events.popleft()

    def _pump(self) -> None:
        now = time.monotonic()
        act = self.session.due(now, lambda: next(self._client._ids))
        if act is not None:
            if act[0] == "open" or self._sock is None:
                self._reopen()  # a fresh socket: nothing of an earlier subscription reaches it
            assert self._sock is not None
            self._sock.send_multipart([MDPC, C_REQUEST, SERVICE, *act[1]])
            return
        assert self._sock is not None
        if self._sock.poll(int(self.session.wait(now) * 1000) + 1):
            frames = self._sock.recv_multipart()
            if len(frames) >= 4 and frames[0] == MDPC and frames[1] in (C_PARTIAL, C_FINAL) and frames[2] == SERVICE:
                self._events.extend(self.session.received(frames[1], frames[3:], time.monotonic()))

    def _reopen(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
        self._sock = self._client._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.connect(self._client.url)

    def close(self) -> None:
        """Cancel the watch (best effort: the broker also drops it without keepalives)."""
        if self._sock is not None:
            if not self.session.ended:
                try:
                    self._sock.send_multipart([MDPC, C_REQUEST, SERVICE, *self.session.cancel()], zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass
            self._sock.close(linger=100)
            self._sock = None
        self.session.ended = True

    def __enter__(self) -> WatchStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
