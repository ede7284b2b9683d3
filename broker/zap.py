"""The broker's CURVE authentication: its ZAP handler (ZeroMQ RFC 27) and who sent each message.

With ``--keys DIR`` every broker socket is a CURVE server and every connection's key is checked
here before ZeroMQ accepts it: client keys on the frontend, worker keys on the backend and the
replication PUB (a socket's ZAP domain says which). A refused handshake never reaches the broker's
loop. An accepted one gets the peer's public key as its User-Id, which ZeroMQ attaches to every
message the connection carries: the loop reads it (``sender``) and looks it up in the key
directory *at that message*, so a key revoked and reloaded (SIGHUP, ``reload_keys``) stops
working at its next message, though ZeroMQ gives no way to close that one connection. A key
unknown at its handshake rereads the directory (at most once a second), so a key just added
works at once; a revocation needs the reload.

The handler is a REP socket on the context's inproc ZAP endpoint, answered in the broker's own
loop (no thread): bound before any CURVE socket, or those would accept everyone.
"""

from __future__ import annotations

import time
from pathlib import Path

import structlog
import zmq
from zmq.utils import z85

from protocol.curve import KeyDirectory, Peer, load_directory

log = structlog.get_logger("zkv.broker")

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
FRONTEND, BACKEND, REPLICATION = b"frontend", b"backend", b"replication"  # ZAP domains
REFUSAL_LOG_INTERVAL = 60.0  # s: a refused peer reconnects every 0.1 s; log it once a minute
RELOAD_ON_MISS_INTERVAL = 1.0  # s: an unknown key rereads the directory at most this often


class Zap:
    def __init__(self, ctx: zmq.Context, directory: str) -> None:
        self.directory = Path(directory)
        self.keys: KeyDirectory = load_directory(self.directory)
        self.sock = ctx.socket(zmq.REP)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(ZAP_ENDPOINT)
        self.refused_logged: dict[tuple[bytes, bytes], float] = {}
        self.refused = 0
        self.last_miss_reload = 0.0

    def describe(self) -> dict[str, object]:
        """For the broker's start-up line (logged once it listens: a broker that cannot bind says
        only that)."""
        return {"keys": str(self.directory), "workers": len(self.keys.workers), "clients": len(self.keys.clients)}

    def secure(self, sock: zmq.Socket, domain: bytes) -> None:
        """Make ``sock`` (before it binds) a CURVE server authenticated here in ``domain``."""
        sock.curve_server = True
        sock.curve_secretkey = self.keys.secret
        sock.curve_publickey = self.keys.public
        sock.zap_domain = domain

    def close(self) -> None:
        self.sock.close(linger=0)

    def reload(self) -> dict[str, object]:
        """Reread the key directory; a directory that cannot be read leaves the keys as they were."""
        try:
            keys = load_directory(self.directory)
        except Exception as e:
            log.error("keys_reload_failed", keys=str(self.directory), error=str(e))
            return {"ok": False, "message": f"keys not reloaded: {e}"}
        if keys.public != self.keys.public:
            log.error("keys_reload_failed", keys=str(self.directory), error="the broker key changed")
            return {"ok": False, "message": "keys not reloaded: the broker's own key changed (restart the broker)"}
        changed = (keys.workers, keys.clients) != (self.keys.workers, self.keys.clients)
        self.keys = keys
        if changed:
            log.info("keys_reloaded", workers=len(keys.workers), clients=len(keys.clients))
        return {"ok": True, "message": f"keys reloaded: {len(keys.workers)} workers, {len(keys.clients)} clients"}

    # -- the handshakes ------------------------------------------------------------------------

    def drain(self) -> None:
        while True:
            try:
                request = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self.sock.send_multipart(self.answer(request))

    def answer(self, request: list[bytes]) -> list[bytes]:
        """The ZAP reply to one request: 200 with the key as User-Id, or 400."""
        if len(request) < 6:
            return [b"1.0", b"", b"500", b"malformed ZAP request", b"", b""]
        version, rid, domain, address, _routing_id, mechanism, *creds = request
        peer = None
        if mechanism == b"CURVE" and len(creds) == 1 and len(creds[0]) == 32:
            key = z85.encode(creds[0])
            peer = self._peer(domain, key)
            now = time.monotonic()
            if peer is None and now - self.last_miss_reload >= RELOAD_ON_MISS_INTERVAL:
                # A key added since the last reload works at once (zkv keys add-*, then connect).
                self.last_miss_reload = now
                self.reload()
                peer = self._peer(domain, key)
        if peer is None:
            self._log_refusal(domain, address, creds[0] if creds else b"")
            return [version, rid, b"400", b"unknown key", b"", b""]
        return [version, rid, b"200", b"OK", peer.public, b""]

    def _peer(self, domain: bytes, key: bytes) -> Peer | None:
        return (self.keys.clients if domain == FRONTEND else self.keys.workers).get(key)

    def _log_refusal(self, domain: bytes, address: bytes, key: bytes) -> None:
        self.refused += 1
        now = time.monotonic()
        if now - self.refused_logged.get((domain, key), -REFUSAL_LOG_INTERVAL) >= REFUSAL_LOG_INTERVAL:
            self.refused_logged[(domain, key)] = now
            if len(self.refused_logged) > 10_000:
                self.refused_logged.clear()
            shown = z85.encode(key).decode() if len(key) == 32 else ""
            log.warning("connection_refused_unknown_key", socket=domain.decode(),
                        address=address.decode(errors="replace"), key=shown)

    # -- who sent a message --------------------------------------------------------------------

    def client(self, user_id: bytes) -> Peer | None:
        """The client whose key sent a message (None: its key is no longer registered)."""
        return self.keys.clients.get(user_id)

    def worker(self, user_id: bytes) -> Peer | None:
        return self.keys.workers.get(user_id)
