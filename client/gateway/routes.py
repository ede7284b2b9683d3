"""HTTP to zkv: the routes of the gateway (docs/http.md).

- ``PUT /v1/kv/{key}``: the body is the value (``?ttl=`` as ``60s``, ``5m``, ``1h`` or ms);
  ``If-Match: "N"`` writes only over version N, ``If-None-Match: *`` only if the key is absent
  (412 otherwise). A body over one chunk goes through ``put_stream`` (uploads.py), never whole.
- ``GET`` / ``HEAD /v1/kv/{key}``: the value, streamed from ``get_stream``; the version is the
  ``ETag``; ``If-None-Match: "N"`` answers 304 while the version is N.
- ``DELETE /v1/kv/{key}``: 200 ``{"deleted": true}``, 404 if there was no such key; ``If-Match``.
- ``GET /v1/kv?prefix=&after=&limit=&keys_only=``: one page of keys in order (keys and values
  base64), ``next`` the ``after`` of the following page (``b64:...``) or null.
- ``/healthz`` (this process), ``/readyz`` (the cluster formed and every slot serving).
- ``/`` the live cluster page (static/index.html), fed by ``/v1/cluster/events`` (SSE, one
  ``cluster`` event a second) and ``/v1/cluster`` (one view as JSON): cluster_view.py.

Keys are the path after ``/v1/kv/``, percent-decoded to bytes, so any byte string is a key.
"""

from __future__ import annotations

import asyncio
import base64
import importlib.resources
import json
import re
import time
import urllib.parse
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from client.aio import AsyncClient
from client.client import Client
from client.gateway.cluster_view import ClusterFeed
from client.gateway.errors import bad_request, from_error, problem
from client.gateway.metrics import GatewayMetrics
from client.gateway.uploads import BodyReader, stream_body
from client.watch import WatchEvent
from protocol.errors import ErrorCode, ZkvError
from protocol.frames import pack, unpack
from protocol.limits import DEFAULT_CHUNK_BYTES, DEFAULT_SCAN_LIMIT, MAX_SCAN_LIMIT, MAX_TTL_MS

KV_PREFIX = "/v1/kv/"
TTL = re.compile(r"^(\d+)(ms|s|m|h)?$")
TTL_UNITS = {None: 1, "ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000}
ETAG = re.compile(r'^\s*(?:W/)?"(\d+)"\s*$')
SSE_KEEPALIVE_S = 15.0  # a comment line this often: proxies and browsers keep an idle stream open
WATCH_QUEUE = 256  # events read ahead of a slow HTTP client (then the watch waits)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
PAGE = importlib.resources.files("client.gateway").joinpath("static/index.html").read_bytes()


class Refused(Exception):
    """A request the gateway refuses before asking the cluster (400)."""


@dataclass
class Gateway:
    """The routes, given the cluster's client (one AsyncClient shared by every request) and how
    to make a sync Client for a streamed upload's thread."""

    client: AsyncClient
    new_sync_client: Callable[[], Client]
    metrics: GatewayMetrics = field(default_factory=GatewayMetrics)
    feed: ClusterFeed = field(init=False)
    # The handlers of open event streams (watches, live pages): a SIGTERM ends them at once, or
    # aiohttp would wait for them (its shutdown timeout) before the process could exit.
    event_streams: set[asyncio.Task[Any]] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.feed = ClusterFeed(self.client.status, time.monotonic)

    def app(self) -> web.Application:
        # The body is read as a stream: aiohttp's client_max_size limits only request.read().
        app = web.Application(client_max_size=DEFAULT_CHUNK_BYTES + 1,
                              middlewares=[self.metrics.middleware, self.answer_errors])
        app.router.add_route("PUT", "/v1/kv/{key:.+}", self.put)
        app.router.add_get("/v1/kv/{key:.+}", self.get)  # and HEAD
        app.router.add_route("DELETE", "/v1/kv/{key:.+}", self.delete)
        app.router.add_route("GET", "/v1/kv", self.scan)
        app.router.add_route("GET", "/v1/watch", self.watch)
        app.router.add_route("GET", "/healthz", self.healthz)
        app.router.add_route("GET", "/readyz", self.readyz)
        app.router.add_route("GET", "/metrics", self.metrics.handler)
        app.router.add_route("GET", "/", self.page)
        app.router.add_route("GET", "/v1/cluster", self.cluster)
        app.router.add_route("GET", "/v1/cluster/events", self.cluster_events)

        async def end_event_streams(_: web.Application) -> None:
            for task in list(self.event_streams):
                task.cancel()
            await self.feed.close()

        app.on_shutdown.append(end_event_streams)
        return app

    @web.middleware
    async def answer_errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except Refused as e:
            return bad_request(str(e))
        except ZkvError as e:
            return from_error(e)

    # -- keys ---------------------------------------------------------------------------------

    async def put(self, request: web.Request) -> web.StreamResponse:
        key = key_of(request)
        ttl = ttl_of(request)
        if_version, if_absent = conditions(request)
        expected = request.content_length
        first = await request.content.read(DEFAULT_CHUNK_BYTES)
        if request.content.at_eof():
            if expected is not None and len(first) != expected:
                raise Refused(f"the body ended after {len(first)} of its {expected} bytes")
            version = await self.client.put(key, first, ttl=ttl, if_version=if_version, if_absent=if_absent)
        else:
            def upload(body: BodyReader) -> int:
                with self.new_sync_client() as c:
                    return int(c.put_stream(key, body, ttl=ttl, if_version=if_version, if_absent=if_absent))

            version = await stream_body(first, request.content, expected, upload)
        return web.json_response({"version": version}, headers={"ETag": etag(version)})

    async def get(self, request: web.Request) -> web.StreamResponse:
        key = key_of(request)
        stream = await self.client.get_stream(key)
        if stream is None:
            return problem(404, ErrorCode.NOT_FOUND.value, "no such key")
        tag = etag(stream.version)
        if matches(request.headers.get("If-None-Match"), stream.version):
            return web.Response(status=304, headers={"ETag": tag})
        if stream.inline is not None:  # headers and body in one write (most values are small)
            return web.Response(body=stream.inline, headers={"ETag": tag, "Content-Type": "application/octet-stream"})
        response = web.StreamResponse(headers={"ETag": tag, "Content-Type": "application/octet-stream"})
        response.content_length = stream.size
        await response.prepare(request)
        if request.method != "HEAD":
            async for chunk in stream:  # a value replaced meanwhile raises: the connection is cut
                await response.write(chunk)
        await response.write_eof()
        return response

    async def delete(self, request: web.Request) -> web.StreamResponse:
        key = key_of(request)
        if_version, if_absent = conditions(request)
        if if_absent:
            raise Refused("If-None-Match does not apply to DELETE")
        deleted = await self.client.delete(key, if_version=if_version)
        if deleted is False:
            return problem(404, ErrorCode.NOT_FOUND.value, "no such key")
        return web.json_response({"deleted": True if deleted else None})

    async def scan(self, request: web.Request) -> web.StreamResponse:
        q = request.rel_url.query
        prefix = _b64_or_text(q.get("prefix", ""))
        after = _b64_or_text(q["after"]) if q.get("after") else None
        keys_only = q.get("keys_only", "") in ("1", "true", "yes")
        try:
            limit = int(q.get("limit", DEFAULT_SCAN_LIMIT))
        except ValueError:
            raise Refused("limit must be an integer") from None
        if not 1 <= limit <= MAX_SCAN_LIMIT:
            raise Refused(f"limit must be 1 to {MAX_SCAN_LIMIT}")
        page = await self.client.scan_page(prefix, start_after=after, limit=limit, values=not keys_only)
        items: list[dict[str, Any]] = []
        for it in page.items:
            item: dict[str, Any] = {"key": _b64(it.key), "version": it.version}
            if not keys_only:
                item["value"] = _b64(it.value) if isinstance(it.value, bytes) else None
            items.append(item)
        nxt = "b64:" + _b64(page.items[-1].key) if page.more and page.items else None
        return web.json_response({"items": items, "next": nxt})

    async def watch(self, request: web.Request) -> web.StreamResponse:
        """Server-Sent Events: one event per committed change (``event:`` its kind, ``data:`` JSON
        with the key and value in base64), each with ``id:`` the cursor just past it, so a client
        that reconnects with ``Last-Event-ID`` (browsers do it by themselves) resumes exactly there,
        through any gateway. ``resync`` events say the cursor was too old: re-read with a scan."""
        q = request.rel_url.query
        prefix = _b64_or_text(q.get("prefix", ""))
        since_text = request.headers.get("Last-Event-ID") or q.get("since")
        since = decode_cursor(since_text) if since_text else None
        stream = self.client.watch(prefix, since=since)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                               "X-Accel-Buffering": "no"})
        await response.prepare(request)
        events: asyncio.Queue[tuple[WatchEvent, bytes] | BaseException] = asyncio.Queue(maxsize=WATCH_QUEUE)

        async def pump() -> None:  # never cancelled mid-receive: the queue decouples the keepalives
            try:
                async for ev in stream:  # the stream's cursor is then exactly past ev
                    await events.put((ev, sse_event(ev, stream.cursor)))
            except BaseException as e:  # noqa: BLE001 - handed to the writer, which ends the response
                await events.put(e)

        task: asyncio.Future[None] | None = None
        self.metrics.watches.inc()
        handler = self._event_stream_opened()
        try:
            # ": watching" promises that every change from here on is an event: only once the
            # broker holds the watch (under load a change made right after it was once missed).
            await stream.opened()
            task = asyncio.ensure_future(pump())
            await response.write(b": watching\n\n")
            while True:
                try:
                    ev = await asyncio.wait_for(events.get(), SSE_KEEPALIVE_S)
                except TimeoutError:
                    await response.write(b": keepalive\n\n")
                    continue
                if isinstance(ev, BaseException):
                    raise ev
                await response.write(ev[1])
        except (ConnectionResetError, asyncio.CancelledError):
            pass  # the HTTP client went away
        finally:
            self.event_streams.discard(handler)
            self.metrics.watches.dec()
            if task is not None:
                task.cancel()
            await stream.close()
        return response

    # -- the live cluster page -----------------------------------------------------------------

    async def page(self, request: web.Request) -> web.StreamResponse:
        return web.Response(body=PAGE, content_type="text/html", charset="utf-8",
                            headers={"Cache-Control": "no-cache"})

    async def cluster(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(await self.feed.current())

    async def cluster_events(self, request: web.Request) -> web.StreamResponse:
        """SSE: one ``cluster`` event a second, the whole view each time (a page that missed one
        loses nothing); the browser's EventSource reconnects by itself after a gateway restart."""
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                               "X-Accel-Buffering": "no"})
        await response.prepare(request)
        views = self.feed.subscribe()
        handler = self._event_stream_opened()
        try:
            await response.write(b"retry: 1000\n\n")
            while True:
                view = await views.get()
                await response.write(f"event: cluster\ndata: {json.dumps(view)}\n\n".encode())
        except (ConnectionResetError, asyncio.CancelledError):
            pass  # the page was closed
        finally:
            self.event_streams.discard(handler)
            self.feed.unsubscribe(views)
        return response

    def _event_stream_opened(self) -> asyncio.Task[Any]:
        handler = asyncio.current_task()
        assert handler is not None
        self.event_streams.add(handler)
        return handler

    # -- health -------------------------------------------------------------------------------

    async def healthz(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"ok": True})

    async def readyz(self, request: web.Request) -> web.StreamResponse:
        try:
            st = await self.client.status()
        except ZkvError as e:
            return problem(503, e.code.value, f"the cluster does not answer: {e}")
        ready = bool(st.get("formed")) and not st.get("recovering_slots")
        body = {"ready": ready, "formed": bool(st.get("formed")), "recovering_slots": st.get("recovering_slots", 0)}
        return web.json_response(body, status=200 if ready else 503,
                                 headers=None if ready else {"Retry-After": "1"})


# -- request fields ---------------------------------------------------------------------------------


def key_of(request: web.Request) -> bytes:
    """The key: the raw path after /v1/kv/, percent-decoded to bytes (not as UTF-8 text)."""
    raw = request.rel_url.raw_path
    if not raw.startswith(KV_PREFIX) or len(raw) == len(KV_PREFIX):
        raise Refused("the key is missing: /v1/kv/{key}")
    return urllib.parse.unquote_to_bytes(raw[len(KV_PREFIX):])


def ttl_of(request: web.Request) -> int | None:
    text = request.rel_url.query.get("ttl")
    if text is None:
        return None
    m = TTL.match(text.strip())
    if m is None:
        raise Refused(f"ttl must be a whole number of ms, or with a unit (ms, s, m, h), not {text!r}")
    ttl = int(m.group(1)) * TTL_UNITS[m.group(2)]
    if not 1 <= ttl <= MAX_TTL_MS:
        raise Refused(f"ttl must be 1 ms to {MAX_TTL_MS} ms")
    return ttl


def conditions(request: web.Request) -> tuple[int | None, bool]:
    """(if_version, if_absent) from If-Match: "N" and If-None-Match: *."""
    if_match, if_none = request.headers.get("If-Match"), request.headers.get("If-None-Match")
    if if_match is not None and if_none is not None:
        raise Refused("give If-Match or If-None-Match, not both")
    if if_none is not None:
        if if_none.strip() != "*":
            raise Refused('on a write If-None-Match must be *: write only if the key does not exist')
        return None, True
    if if_match is not None:
        m = ETAG.match(if_match)
        if m is None:
            raise Refused('If-Match must be one version as an ETag: "N" (zkv has no If-Match: *)')
        return int(m.group(1)), False
    return None, False


def matches(header: str | None, version: int) -> bool:
    """Does an If-None-Match header on a GET name this version (or *)?"""
    if header is None:
        return False
    tags = [t.strip() for t in header.split(",")]
    return "*" in tags or any((m := ETAG.match(t)) is not None and int(m.group(1)) == version for t in tags)


def etag(version: int) -> str:
    return f'"{version}"'


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _b64_or_text(text: str) -> bytes:
    """A scan parameter: plain text (UTF-8) unless given as ``b64:...``."""
    if text.startswith("b64:"):
        try:
            return base64.b64decode(text[4:], validate=True)
        except ValueError:
            raise Refused("a b64: parameter must be base64") from None
    return text.encode()


# -- watch cursors as SSE ids -----------------------------------------------------------------------

def encode_cursor(cursor: dict[str, Any] | None) -> str:
    """A watch cursor as an SSE id: packed, deflated, URL-safe base64 (one line, no spaces)."""
    return base64.urlsafe_b64encode(zlib.compress(pack(cursor or {}), 9)).decode()


def decode_cursor(text: str) -> dict[str, Any]:
    try:
        cursor = unpack(zlib.decompress(base64.urlsafe_b64decode(text.strip())))
    except Exception:  # noqa: BLE001 - any malformed id is the client's error
        raise Refused("Last-Event-ID (or since) is not a cursor this gateway gave") from None
    if not isinstance(cursor, dict) or not isinstance(cursor.get("s"), list):
        raise Refused("Last-Event-ID (or since) is not a cursor this gateway gave")
    return cursor


def sse_event(ev: WatchEvent, cursor: dict[str, Any] | None) -> bytes:
    """One change as an SSE event: ``id:`` the cursor past it, ``event:`` its kind, ``data:`` JSON."""
    if ev.kind == "resync":
        data: dict[str, Any] = {"message": "the cursor was older than the broker keeps: re-read with a scan; "
                                           "the changes after this event follow"}
        return (f"id: {encode_cursor(cursor)}\nevent: resync\ndata: {json.dumps(data)}\n\n").encode()
    data = {"key": _b64(ev.key), "version": ev.version, "slot": ev.slot}
    if ev.kind == "put":
        data["value"] = _b64(ev.value) if ev.value is not None else None
        data["streamed"] = ev.stream is not None
    if ev.expire_at:
        data["expire_at"] = ev.expire_at
    return (f"id: {encode_cursor(cursor)}\nevent: {ev.kind}\ndata: {json.dumps(data)}\n\n").encode()
