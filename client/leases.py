"""Lease reads, the client's side (sans-I/O): which worker reads endpoint answers a key's GET
directly, from the broker's ``mmi.leases`` answer (docs/protocol.md §1.15).

A ``LeaseMap`` is what a client caches. It only ever says where a read *may* go: the worker
decides whether it can answer linearizably and refuses (NOT_LEASED) when it cannot, so a stale
map costs a round trip, never a wrong answer. The clients move the frames (client/client.py,
client/aio.py, client/cli/bench_load.py).
"""

from __future__ import annotations

from typing import Any

from protocol.errors import ErrorCode
from protocol.frames import MMI_LEASES, unpack
from protocol.replication import slot_for_key

__all__ = ["MMI_LEASES", "NOT_LEASED", "LeaseMap"]

NOT_LEASED = ErrorCode.NOT_LEASED.value  # a reads endpoint's refusal: read through the broker

DIRECT_WAIT = 0.5  # s a direct read waits for the worker before it goes to the broker
MAP_WAIT = 0.5  # s a lease map fetch may wait for the broker (it is a broker-loop answer: fast)
FRESH_ON = 1.0  # s a map is used with leases on (a lease moves when its holder dies or lags)
FRESH_OFF = 10.0  # s a "leases off" answer is believed: one round trip per 10 s is the cost of asking
REFETCH_MIN = 0.1  # s between fetches after failures (a GET of a key with a TTL is refused each time)
MUTE = 1.0  # s a reads endpoint that did not answer is skipped, whatever the maps fetched meanwhile say


class LeaseMap:
    """The lease map a client holds: per slot, the reads endpoint to send GETs to, or None."""

    def __init__(self) -> None:
        self.slots = 0
        self.lease = 0.0  # the broker's --read-lease; 0: leases are off
        self.urls: list[str] = []
        self.holders: list[int] = []  # per slot: an index into urls, -1: no lease
        self.fetched: float | None = None  # when the last answer (or silence) came; None: ask now
        self._by_slot: list[str | None] = []  # holders resolved to URLs, muted ones None: url_for's one look-up
        self._muted: dict[str, float] = {}  # URL -> until when it is skipped
        self._forgotten = False  # a direct read failed since the last fetch

    @property
    def on(self) -> bool:
        """Whether any slot is read directly now (False: every read goes to the broker)."""
        return bool(self._by_slot)

    def stale(self, now: float) -> bool:
        """Time to fetch the map again: never fetched, forgotten, or older than FRESH_ON (leases
        on at the broker) / FRESH_OFF (off, or a broker that does not know mmi.leases); after a
        failed direct read, once REFETCH_MIN has passed since the last fetch."""
        if self.fetched is None:
            return True
        age = now - self.fetched
        if self._forgotten:
            return age >= REFETCH_MIN
        return age >= (FRESH_ON if self.lease > 0 else FRESH_OFF)

    def install(self, reply: list[bytes] | None, now: float) -> None:
        """Take the broker's answer to ``mmi.leases``. No answer (None) keeps the map as it was
        (the workers still refuse what they cannot answer) and waits the usual time before
        asking again; ``b"501"`` (a broker without leases) or anything malformed is "leases off"."""
        self.fetched = now
        self._forgotten = False
        if reply is None:
            return
        decoded = _decode(reply)
        if decoded is None:
            self.slots, self.lease, self.urls, self.holders = 0, 0.0, [], []
        else:
            self.slots, self.lease, self.urls, self.holders = decoded
        self._muted = {u: t for u, t in self._muted.items() if t > now}
        self._resolve()

    def url_for(self, key: bytes) -> str | None:
        """The reads endpoint to send a GET of ``key`` to, or None: through the broker."""
        by_slot = self._by_slot
        return by_slot[slot_for_key(key, self.slots)] if by_slot else None

    def forget(self) -> None:
        """A direct read failed (NOT_LEASED, an error, no reply): fetch the map before the next
        read (at most once per REFETCH_MIN: failures of a burst of reads cost one fetch)."""
        self._forgotten = True

    def silent(self, url: str, now: float) -> None:
        """``url`` did not answer a direct read: skip it for MUTE s (the broker may go on naming a
        dead worker until its lease runs out; each read would wait DIRECT_WAIT for nothing)."""
        again = self._muted.get(url, 0.0) > now  # (a burst of reads in flight there: resolved once)
        self._muted[url] = now + MUTE
        self.forget()
        if not again:
            self._resolve()

    def _resolve(self) -> None:
        muted = self._muted
        urls = [None if u in muted else u for u in self.urls]
        self._by_slot = [urls[h] if h >= 0 else None for h in self.holders]
        # Nothing to read from (leases off, no lease granted, every holder muted): empty, so that
        # ``on`` says so and url_for answers without hashing the key.
        if all(u is None for u in self._by_slot):
            self._by_slot = []


def _decode(reply: list[bytes]) -> tuple[int, float, list[str], list[int]] | None:
    """(slots, lease, urls, holders) of an ``mmi.leases`` answer, None for "leases off" (b"501",
    a lease of 0, or an answer that does not hold together: a wrong index must not send reads astray)."""
    if len(reply) != 1 or reply[0] == b"501":
        return None
    try:
        m: Any = unpack(reply[0])
    except ValueError:
        return None
    if not isinstance(m, dict):
        return None
    slots, lease, urls, holders = m.get("slots"), m.get("lease"), m.get("urls"), m.get("holders")
    if type(slots) is not int or slots <= 0 or isinstance(lease, bool) or not isinstance(lease, int | float):
        return None
    if lease <= 0 or not isinstance(urls, list) or not isinstance(holders, list) or len(holders) != slots:
        return None
    if not all(isinstance(u, str) and u for u in urls):
        return None
    if not all(type(h) is int and -1 <= h < len(urls) for h in holders):
        return None
    return slots, float(lease), list(urls), list(holders)
