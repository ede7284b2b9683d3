"""The committed values of recently read keys, in the leader's memory: a read of one is answered
by the broker alone, one Python process and two socket hops instead of two and four.

Why an entry is always the key's latest committed value (docs/architecture.md, "Reads from the
leader's cache"):

- The leader sequences every write of its slots (broker/sequencer.py ``sequence``), and each one
  drops its keys' entries and bumps its slot's generation before it is published.
- An entry is filled only from a replica's answer to a read sent while the slot had no write
  pending (every sequenced write committed) and only if the slot's generation is unchanged when
  the answer comes back: no write was sequenced in between. The replica was caught up to the
  committed seq when it was asked (``BrokerState.choose_replica``), so it answered with every
  write of the key there is.
- The cache belongs to one core, that is one term of one group's leadership: a new term starts
  empty (a standby that takes over has seen none of the old leader's writes), and a cache hit is
  sent, like every answer, only while the term's lease deadline holds (broker/server.py).

So a hit shows every write acknowledged before the read arrived, and none that could be lost.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

from protocol.replication import WriteOp

# Bytes an entry costs beyond its key's and value's bytes: the OrderedDict's node and slot, the
# tuple, its ints and the two bytes objects' headers (about 270 with tracemalloc, small entries).
ENTRY_OVERHEAD = 270
MAX_CACHED_VALUE = 16 * 1024  # larger values are read from a replica every time
NOT_FILLABLE = -1

Cached = tuple[int, bytes, int]  # (version, value, expire_at ms or 0)


class ReadCache:
    """Least recently used committed values within ``budget`` bytes (0: no cache)."""

    __slots__ = ("budget", "entries", "size", "count", "last_written", "cleared")

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.entries: OrderedDict[bytes, Cached] = OrderedDict()
        self.size = 0
        # A count of writes sequenced (and of clears): a read takes it when sent, and fills only
        # if no write of its slot, and no clear, came after.
        self.count = 0
        self.last_written: dict[int, int] = {}  # slot -> count at its latest write
        self.cleared = 0  # count at the latest clear

    def lookup(self, key: bytes, now_ms: int) -> Cached | None:
        entry = self.entries.get(key)
        if entry is None:
            return None
        if entry[2] and entry[2] <= now_ms:
            self._drop(key)  # expired: a replica answers (and its reaping drops it anyway)
            return None
        self.entries.move_to_end(key)
        return entry

    def written(self, slot: int, ops: Iterable[WriteOp]) -> None:
        """A write of ``slot`` is sequenced: its keys' entries go, and no read sent before it fills."""
        self.count += 1
        self.last_written[slot] = self.count
        if self.entries:
            for op in ops:
                if op.key in self.entries:
                    self._drop(op.key)

    def generation(self, pending: bool) -> int:
        """Taken by a read when it is sent, to fill with its answer (NOT_FILLABLE while writes of
        its slot are pending: the replica may show them or not)."""
        return NOT_FILLABLE if pending or not self.budget else self.count

    def fill(self, slot: int, generation: int, found: Iterable[tuple[bytes, int, bytes, int]]) -> None:
        """Keep what a replica answered for keys of ``slot`` (key, version, value, expire_at), if
        the read took ``generation`` and no write of the slot, nor a clear, came after it."""
        if (generation == NOT_FILLABLE or generation < self.cleared
                or self.last_written.get(slot, 0) > generation):
            return
        entries, size = self.entries, self.size
        for key, version, value, expire_at in found:
            if len(value) > MAX_CACHED_VALUE:
                continue
            old = entries.get(key)
            if old is not None:
                size -= len(old[1])
                entries.move_to_end(key)
            else:
                size += len(key) + ENTRY_OVERHEAD
            entries[key] = (version, value, expire_at)
            size += len(value)
        while size > self.budget and entries:
            k, (_, v, _) = entries.popitem(last=False)
            size -= len(k) + len(v) + ENTRY_OVERHEAD
        self.size = size

    def clear(self) -> None:
        """Forget everything (committed writes were lost: no entry is known to be right any more)."""
        self.entries.clear()
        self.size = 0
        self.count += 1
        self.cleared = self.count

    def _drop(self, key: bytes) -> None:
        _, value, _ = self.entries.pop(key)
        self.size -= len(key) + len(value) + ENTRY_OVERHEAD
