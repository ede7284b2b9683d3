"""The broker's three endpoints: what they are, how they are bound (a clear error when a port is
taken), how they are advertised to clients and workers, and who sent a message on them (CURVE)."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import zmq

from protocol.limits import DEFAULT_BACKEND, DEFAULT_FRONTEND, DEFAULT_REPLICATION


@dataclass
class BrokerEndpoints:
    frontend: str = DEFAULT_FRONTEND
    backend: str = DEFAULT_BACKEND
    replication: str = DEFAULT_REPLICATION


class BindError(Exception):
    """A broker endpoint could not be bound (its port is in use, say); nothing was changed on disk."""

    def __init__(self, role: str, endpoint: str, reason: str) -> None:
        super().__init__(f"cannot listen on {endpoint} ({role}): {reason}")
        self.role, self.endpoint, self.reason = role, endpoint, reason


def advertised(endpoints: BrokerEndpoints) -> BrokerEndpoints:
    """The endpoints with a wildcard host (``*``, ``0.0.0.0``) replaced by this machine's name."""
    def fix(url: str) -> str:
        for wildcard in ("://*:", "://0.0.0.0:"):
            url = url.replace(wildcard, f"://{socket.gethostname()}:")
        return url
    return BrokerEndpoints(fix(endpoints.frontend), fix(endpoints.backend), fix(endpoints.replication))


def recv_with_user_id(sock: zmq.Socket) -> tuple[list[bytes], bytes]:
    """One message and the User-Id ZAP gave its connection (the peer's public key). Only the
    first frame is taken as a zmq.Frame, to read the property; the rest as bytes."""
    first = sock.recv(zmq.NOBLOCK, copy=False)
    user = first.get("User-Id").encode()
    rest = sock.recv_multipart() if first.more else []
    return [first.bytes, *rest], user


def bind_endpoint(sock: zmq.Socket, role: str, endpoint: str) -> None:
    try:
        sock.bind(endpoint)
    except zmq.ZMQError as e:
        raise BindError(role, endpoint, os.strerror(e.errno)) from None
