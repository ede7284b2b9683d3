"""A fake broker for tests of clients given several brokers (issue 11): a real ZeroMQ ROUTER on a
free loopback port, served by a thread of the test process."""

from __future__ import annotations

import threading
from typing import Any

import zmq

from protocol.frames import C_FINAL, C_REQUEST, MDPC, MMI_SERVICE, MMI_STATUS, SERVICE, pack, unpack
from tests.support.cluster import free_port


class FakeBroker:
    """A ROUTER on a free loopback port, served by a thread: a standby naming ``leader`` (every
    kv request answered NOT_LEADER, mmi.status {role: standby, leader}, mmi.service 404), or with
    ``leader=False`` a leader that answers every kv request ok. Records the kv headers it got."""

    def __init__(self, leader: str | None | bool, ignore_first_connection: bool = False) -> None:
        """``ignore_first_connection``: answer nothing that arrives on the first connection (a
        connection that is up but goes nowhere, as one made just after a broker woke up was)."""
        self.url = f"tcp://127.0.0.1:{free_port()}"
        self.leader = leader
        self.ignored: bytes | None = None if ignore_first_connection else b""
        self.asked = 0
        self.got: list[dict[str, Any]] = []
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.bind(self.url)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            if not self._sock.poll(50):
                continue
            ident, *frames = self._sock.recv_multipart()
            if len(frames) < 3 or frames[:2] != [MDPC, C_REQUEST]:
                continue
            self.asked += 1
            if self.ignored is None:
                self.ignored = ident
            if ident == self.ignored:
                continue
            service = frames[2]
            if service == MMI_STATUS:
                body = pack({"role": "standby", "leader": self.leader} if self.leader is not False
                            else {"role": "leader"})
            elif service == MMI_SERVICE:
                body = b"404" if self.leader is not False else b"200"
            elif service == SERVICE:
                hdr = unpack(frames[3])
                self.got.append(hdr)
                if self.leader is False:
                    body = pack({"id": hdr.get("id"), "ok": True, "version": 1})
                else:
                    body = pack({"id": hdr.get("id"), "ok": False, "code": "NOT_LEADER",
                                 "message": "this broker is a standby", "leader": self.leader})
            else:
                body = b"501"
            self._sock.send_multipart([ident, MDPC, C_FINAL, service, body])

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close(linger=0)
        self._ctx.term()
