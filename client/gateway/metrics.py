"""The gateway's Prometheus metrics, at its own ``/metrics`` (and ``--metrics HOST:PORT`` if
given): requests by method, route and status, their latency, the bodies streamed, and the SSE
watches open."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("zkv_gateway_requests_total", "HTTP requests answered, by method, route and status",
                                ["method", "route", "status"], registry=self.registry)
        self.latency = Histogram("zkv_gateway_request_duration_seconds",
                                 "from the request's arrival to its answer's end (a watch: while it is open)",
                                 ["method", "route"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.watches = Gauge("zkv_gateway_watches", "Server-Sent Events watches open", registry=self.registry)

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        began = time.perf_counter()
        info = request.match_info.route.resource
        route = info.canonical if info is not None else "unmatched"
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as e:
            status = e.status
            raise
        finally:
            if route != "/metrics":
                self.requests.labels(request.method, route, str(status)).inc()
                self.latency.labels(request.method, route).observe(time.perf_counter() - began)

    async def handler(self, request: web.Request) -> web.StreamResponse:
        return web.Response(body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})
