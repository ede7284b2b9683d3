"""The retry rules of a kv request, shared by ``Client`` and ``AsyncClient``.

Every attempt of a request carries the same client id (``cid``) and request number (``id``), so
the broker applies a retried write once (docs/protocol.md §1.6). Which error replies are resent is
``protocol.errors.RETRIED``; the rest are raised at once.
"""

from __future__ import annotations

import time
from typing import Any

from client.commands import Reply, error_for
from protocol.errors import ErrorCode, InternalError, NoReply, ZkvError
from protocol.frames import pack, pack_request_values, unpack, unpack_values
from protocol.limits import DEDUP_RETENTION_MS, READ_OPS, split_urls

BACKOFF_FIRST, BACKOFF_MAX = 0.05, 1.0  # s before resending after a retried error, doubling
DEFAULT_TIMEOUT = 10.0  # s one call may take, retries included
DEFAULT_ATTEMPT_TIMEOUT = 6.0  # s one attempt waits for its reply before the request is sent again
# A write is not resent later than this after its first attempt: replicas remember the request a
# write came from for DEDUP_RETENTION_MS by the broker's clock; half of it leaves room for the
# clocks of two brokers (before and after a failover) to differ by up to a minute.
RESEND_WRITES_FOR = DEDUP_RETENTION_MS / 1000 / 2


# The brokers (by a client's url) that refused an MSET's packed values: older than ``packed``
# (docs/protocol.md §1.2), they count one value frame per key. MSETs to them go as frames.
UNPACKED_URLS: set[str] = set()
OLD_BROKER_REFUSAL = "one value frame per key"  # what such a broker's BAD_REQUEST says


def no_reply(url: str, timeout: float) -> NoReply:
    """The error of a request that got no reply within the client's ``timeout`` (``url``: the
    client's broker, or its comma-separated brokers)."""
    if "," in url:
        return NoReply(f"no reply from any of {', '.join(split_urls(url))} within {timeout}s")
    return NoReply(f"no reply from {url} within {timeout}s")


class Attempts:
    """The retry rules of one kv request, shared by both clients (they only move the frames):
    every attempt sends the same id and client id, marked as a retry after the first; a missing
    reply (the client then reopens its socket), or an error in ``protocol.errors.RETRIED``
    (TIMEOUT, UNAVAILABLE, NOT_LEADER), means try again after a backoff until ``timeout`` runs
    out. Which broker the next attempt goes to is client/brokers.py's ``BrokerList``."""

    def __init__(self, url: str, op: str, rid: int, cid: bytes, header: dict[str, Any], values: list[bytes],
                 timeout: float, attempt_timeout: float) -> None:
        self.url, self.rid, self.timeout, self.attempt_timeout = url, rid, timeout, attempt_timeout
        # "retry": false on the first attempt spares the broker a look-up of earlier attempts.
        self.header = {"op": op, "id": rid, "cid": cid, "retry": False, **header}
        # Many values go packed in one frame (and an MGET's come back so): a frame costs a
        # Python-level send and receive at both ends (docs/protocol.md §1.2).
        self.values = values
        frames = pack_request_values(values) if op == "mset" and url not in UNPACKED_URLS else None
        if frames is not None or op == "mget":
            self.header["packed"] = True
        self.body = [pack(self.header), *(values if frames is None else frames)]
        self.deadline = time.monotonic() + timeout
        self.resend_until = time.monotonic() + (float("inf") if op in READ_OPS else RESEND_WRITES_FOR)
        self.backoff = BACKOFF_FIRST
        self.sent = 0
        self.last_wait = 0.0  # of the latest attempt
        self.last_error: ZkvError | None = None

    def next(self) -> tuple[list[bytes], float]:
        """The frames of the next attempt and how long it may wait; raises when time is up."""
        left = self.deadline - time.monotonic()
        if left <= 0 or (self.sent and time.monotonic() > self.resend_until):
            raise self.last_error or no_reply(self.url, self.timeout)
        if self.sent:
            self.header["retry"] = True
            self.body[0] = pack(self.header)
        self.sent += 1
        self.last_wait = min(left, self.attempt_timeout)
        return self.body, self.last_wait

    def no_reply(self) -> None:
        """An attempt got no reply in its time (the caller reopens its socket before the next).
        An attempt cut short by the deadline proves nothing: the broker's last answer (a TIMEOUT,
        say) is kept as the error, not replaced by "no reply"."""
        if self.last_error is not None and self.last_wait < self.attempt_timeout:
            return
        self.last_error = no_reply(self.url, self.timeout)

    def answer(self, reply: list[bytes]) -> Reply | float:
        """The reply if it is final; raises a final error; else seconds to wait before resending."""
        rh = unpack(reply[0])
        if rh.get("ok"):
            if not rh.get("packed"):
                return rh, reply[1:]
            try:
                return rh, unpack_values(reply[1:])
            except ValueError as e:
                raise InternalError(f"the broker's packed values: {e}") from None
        if (self.header["op"] == "mset" and self.header.get("packed") and rh.get("code") == ErrorCode.BAD_REQUEST
                and OLD_BROKER_REFUSAL in str(rh.get("message", ""))):
            # A broker from before ``packed`` (nothing was written): again at once, as frames.
            UNPACKED_URLS.add(self.url)
            del self.header["packed"]
            self.body = [pack(self.header), *self.values]
            return 0.0
        err = error_for(rh)
        if not err.retried:
            raise err
        self.last_error = err
        wait = min(self.backoff, max(0.0, self.deadline - time.monotonic()))
        self.backoff = min(self.backoff * 2, BACKOFF_MAX)
        return wait

