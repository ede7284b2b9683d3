"""Is a broker there? Answers within about a second, where a request would wait for its timeout.

ZeroMQ's ``connect`` never fails: with nothing listening, a request just waits for its reply. A
socket monitor sees what the connection does: ``listening`` is False when no TCP connection to
the address is made within ``wait`` (refused, or nothing answers), True when one is (a broker
under load still accepts at once: the kernel and ZeroMQ's I/O thread do it, not its Python loop).
``mmi_service`` is one timed management round trip (docs/protocol.md §1.5), for ``zkv ping``.
"""

from __future__ import annotations

import time

import zmq
from zmq.utils.monitor import recv_monitor_message

from protocol.frames import C_FINAL, C_REQUEST, MDPC, MMI_SERVICE, SERVICE

PROBE_WAIT = 1.0  # s without a TCP connection before "no broker"
HANDSHAKE_WAIT = 1.0  # s after connecting for the ZeroMQ handshake (a failed one: not a ZeroMQ peer)


def listening(url: str, wait: float = PROBE_WAIT, context: zmq.Context | None = None) -> bool:
    """True if something that speaks ZeroMQ (or at least accepts TCP and has not failed the
    ZeroMQ handshake yet) listens at ``url``; False within ``wait`` s if nothing does."""
    ctx = context or zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    monitor = sock.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED
                                      | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_DISCONNECTED)
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
            event = recv_monitor_message(monitor)["event"]
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                return True
            if event == zmq.EVENT_CONNECTED and not connected:
                connected = True
                deadline = time.monotonic() + HANDSHAKE_WAIT
            elif event in (zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.EVENT_DISCONNECTED) and connected:
                return False  # something listens, but it is not a ZeroMQ peer
    finally:
        sock.disable_monitor()
        monitor.close(linger=0)
        sock.close(linger=0)


def mmi_service(url: str, wait: float, context: zmq.Context | None = None) -> tuple[float, bool] | None:
    """One ``mmi.service kv`` round trip on a fresh socket: (seconds it took, whether the broker
    serves kv requests now), or None without a reply within ``wait`` s."""
    ctx = context or zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
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
