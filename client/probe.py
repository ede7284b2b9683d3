"""Is a broker there? Answers within about a second, where a request would wait for its timeout.

ZeroMQ's ``connect`` never fails: with nothing listening, a request just waits for its reply. A
socket monitor sees what the connection does: ``listening`` is False when no TCP connection to
the address is made within ``wait`` (refused, or nothing answers), True when one is (a broker
under load still accepts at once: the kernel and ZeroMQ's I/O thread do it, not its Python loop).
``first_listening`` does it for a comma-separated list of brokers (etcd mode), in order.
``mmi_service`` is one timed management round trip (docs/protocol.md §1.5), for ``zkv ping``.
With CURVE credentials the probe's socket uses them; a broker that refuses them (ZAP) or expects
them (a CURVE server met without) raises ``CredentialsRefused``.
"""

from __future__ import annotations

import time

import zmq
from zmq.utils.monitor import recv_monitor_message

from protocol.curve import Credentials
from protocol.frames import C_FINAL, C_REQUEST, MDPC, MMI_SERVICE, SERVICE
from protocol.limits import split_urls

PROBE_WAIT = 1.0  # s without a TCP connection before "no broker"
HANDSHAKE_WAIT = 1.0  # s after connecting for the ZeroMQ handshake (a failed one: not a ZeroMQ peer)


class CredentialsRefused(Exception):
    """The broker's CURVE handshake failed: it refused the key, or it needs one."""


def listening(url: str, wait: float = PROBE_WAIT, context: zmq.Context | None = None,
              credentials: Credentials | None = None) -> bool:
    """True if something that speaks ZeroMQ (or at least accepts TCP and has not failed the
    ZeroMQ handshake yet) listens at ``url``; False within ``wait`` s if nothing does."""
    ctx = context or zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if credentials is not None:
        credentials.apply(sock)
    monitor = sock.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED
                                      | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_DISCONNECTED
                                      | zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
    try:
        sock.connect(url)
        deadline = time.monotonic() + wait
        connected = False
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return connected  # connected, handshake still under way: someone is there
            if not monitor.poll(int(left * 1000) + 1):
                continue
            message = recv_monitor_message(monitor)
            event = message["event"]
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                return True
            if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                raise CredentialsRefused(f"unknown key: ZAP status {message['value']}")
            if event == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
                # The peer hung up mid-handshake: a CURVE broker meeting a client without keys (as
                # often as a mechanism mismatch, depending on timing), or one that cannot decrypt
                # our hello (the file names another broker's key).
                raise CredentialsRefused("the handshake failed: it probably uses CURVE" if credentials is None else
                                         "the handshake failed: do the credentials name this broker's key?")
            if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL and _mechanism_mismatch(message["value"]):
                raise CredentialsRefused("it uses CURVE" if credentials is None else "it does not use CURVE")
            if event == zmq.EVENT_CONNECTED and not connected:
                connected = True
                deadline = time.monotonic() + HANDSHAKE_WAIT
            elif event in (zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.EVENT_DISCONNECTED) and connected:
                return False  # something listens, but it is not a ZeroMQ peer
    finally:
        sock.disable_monitor()
        monitor.close(linger=0)
        sock.close(linger=0)


def first_listening(urls: str | list[str], wait: float = PROBE_WAIT, context: zmq.Context | None = None,
                    credentials: Credentials | None = None) -> str | None:
    """The first of ``urls`` (a list, or comma-separated) where ``listening`` finds a broker, or
    None if none does (each given up to ``wait`` s). A standby counts: it answers, and a client
    at it follows the leader it names."""
    for url in split_urls(urls) if isinstance(urls, str) else urls:
        if listening(url, wait, context, credentials):
            return url
    return None


def _mechanism_mismatch(value: int) -> bool:
    return value == getattr(zmq, "PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH", 0x11000002)


def mmi_service(url: str, wait: float, context: zmq.Context | None = None,
                credentials: Credentials | None = None) -> tuple[float, bool] | None:
    """One ``mmi.service kv`` round trip on a fresh socket: (seconds it took, whether the broker
    serves kv requests now), or None without a reply within ``wait`` s."""
    ctx = context or zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if credentials is not None:
        credentials.apply(sock)
    try:
        sock.connect(url)
        t0 = time.perf_counter()
        sock.send_multipart([MDPC, C_REQUEST, MMI_SERVICE, SERVICE])
        deadline = time.monotonic() + wait
        while (left := deadline - time.monotonic()) > 0:
            if not sock.poll(int(left * 1000) + 1):
                continue
            frames = sock.recv_multipart()
            if len(frames) >= 4 and frames[:3] == [MDPC, C_FINAL, MMI_SERVICE]:
                return time.perf_counter() - t0, frames[3] == b"200"
        return None
    finally:
        sock.close(linger=0)
