"""``zkv gateway``: the HTTP gateway as a process (docs/http.md)."""

from __future__ import annotations

import click
import structlog
from aiohttp import web
from prometheus_client import start_http_server

from client.aio import AsyncClient
from client.client import Client
from client.gateway.routes import Gateway
from protocol.limits import URL_ENV
from protocol.metrics import host_port

log = structlog.get_logger("zkv.gateway")


def parse_listen(text: str, option: str) -> tuple[str, int]:
    try:
        return host_port(text)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint=option) from None


@click.command()
@click.option("--listen", default="127.0.0.1:8080", show_default=True, envvar="ZKV_GATEWAY_LISTEN",
              help="HOST:PORT the HTTP server binds")
@click.option("--url", envvar=URL_ENV, default=None,
              help="the broker frontend(s), comma-separated (default $ZKV_URL, else tcp://127.0.0.1:5555)")
@click.option("--credentials", default=None, envvar="ZKV_CREDENTIALS",
              help="client credentials file for a cluster with keys (zkv keys add-client)")
@click.option("--timeout", default=10.0, show_default=True, help="s one zkv call may take, retries included")
@click.option("--metrics", default="", metavar="HOST:PORT",
              help="Also serve the Prometheus metrics here (they are always at /metrics of --listen).")
def gateway(listen: str, url: str | None, credentials: str | None, timeout: float, metrics: str) -> None:
    """Serve the cluster over HTTP/1.1: PUT/GET/HEAD/DELETE /v1/kv/{key}, scans, watches, health, metrics."""
    host, port = parse_listen(listen, "--listen")
    if metrics:
        parse_listen(metrics, "--metrics")

    async def make() -> web.Application:
        client = AsyncClient(url, timeout=timeout, credentials=credentials)
        gw = Gateway(client, lambda: Client(url, timeout=timeout, credentials=credentials))
        app = gw.app()
        if metrics:
            m_host, m_port = host_port(metrics)
            start_http_server(m_port, addr=m_host, registry=gw.metrics.registry)

        async def close(_: web.Application) -> None:
            await client.close()

        app.on_cleanup.append(close)
        log.info("gateway_listening", listen=f"{host}:{port}", url=client.url)
        return app

    # aiohttp handles SIGINT and SIGTERM: it stops accepting, finishes what runs, and cleans up.
    web.run_app(make(), host=host, port=port, access_log=None, print=None, handle_signals=True)
    log.info("gateway_stopped")
