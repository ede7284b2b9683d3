"""The client's DEALER sockets: where they connect (the broker URL), as which CURVE client, and
how a dead connection is noticed. Shared by ``Client``, ``AsyncClient`` and their watch streams."""

from __future__ import annotations

import os

import zmq

from client.brokers import HEARTBEAT_IVL_MS, HEARTBEAT_TIMEOUT_MS, SEND_TIMEOUT_MS, Link
from protocol.curve import CREDENTIALS_ENV, Credentials, load_credentials
from protocol.limits import DEFAULT_FRONTEND, URL_ENV


def broker_url(url: str | None) -> str:
    """``url``, else the ``ZKV_URL`` environment variable, else the default frontend."""
    return url or os.environ.get(URL_ENV) or DEFAULT_FRONTEND


def client_credentials(credentials: str | os.PathLike[str] | Credentials | None) -> Credentials | None:
    """``credentials`` (a credentials file made by ``zkv keys``, or loaded already), else the
    file ``ZKV_CREDENTIALS`` names, else None: no CURVE (a broker without --keys)."""
    if isinstance(credentials, Credentials):
        return credentials
    path = credentials or os.environ.get(CREDENTIALS_ENV)
    return load_credentials(path) if path else None


def dealer(ctx: zmq.Context, url: str, credentials: Credentials | None = None) -> zmq.Socket:
    """A fresh DEALER connected to ``url`` (nothing an earlier socket queued reaches it), a
    CURVE client of the broker with ``credentials``."""
    return linked_dealer(ctx, url, credentials, False)[0]


def linked_dealer(ctx: zmq.Context, url: str, credentials: Credentials | None,
                  watched: bool) -> tuple[zmq.Socket, Link | None]:
    """``dealer``, and with ``watched`` (several brokers) a ``Link`` that tells whether its
    connection is up (client/brokers.py: how a dead broker is left within about a second)."""
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    # A send never waits long: a connection refused at the CURVE handshake makes libzmq drop the
    # DEALER's queue, and a send would then block for ever. It raises zmq.Again instead, which
    # every sender here takes as a silence (a fresh socket, the next attempt).
    sock.setsockopt(zmq.SNDTIMEO, SEND_TIMEOUT_MS)
    if watched:
        sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
    if credentials is not None:
        credentials.apply(sock)
    link = Link(sock) if watched else None
    sock.connect(url)
    return sock, link


def close_linked(sock: zmq.Socket | None, link: Link | None, linger: int = 0) -> None:
    if link is not None:
        link.close()
    if sock is not None:
        sock.close(linger=linger)
