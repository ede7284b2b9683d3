"""The public methods of ``Client`` and ``AsyncClient``, written once (as redis-py writes its
commands once in ``redis/commands/core.py``; only ``execute_command`` differs).

Each method names the request (``client/commands.py``) or the program (``client/programs.py``) it
runs and hands it to the driver: ``Client`` runs it and returns the result, ``AsyncClient``
returns an awaitable of the same result (or an async iterator where ``Client`` gives an
iterator). Names, parameters, defaults, results and exceptions are therefore the same in both;
tests/test_client_surface.py fails if one of them grows a method or a parameter of its own.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, BinaryIO, TypeVar, Union

from client import commands, programs
from client.commands import Call, Key, ScanPage, StreamInfo
from client.watch import WatchSession
from protocol.limits import DEFAULT_CHUNK_BYTES, DEFAULT_SCAN_LIMIT

T = TypeVar("T")
# What a method returns: the value (Client) or an awaitable of it (AsyncClient).
Result = Union[T, Awaitable[T]]  # noqa: UP007 (a generic alias: ``T | Awaitable[T]`` is not subscriptable)
Build = Callable[..., Call | programs.Program[Any]]


class Commands(ABC):
    """Mixin: every command of the zkv client. The driver provides ``url``, ``timeout`` and the
    four abstract methods below; everything else is here."""

    url: str
    timeout: float

    # -- what a driver provides --------------------------------------------------------------------

    @abstractmethod
    def _execute(self, build: Build, *args: Any) -> Any:
        """Run ``build(*args)`` (a Call or a program) and give its result (Client) or an awaitable of
        it (AsyncClient). ``build`` is called inside the run, so that AsyncClient raises bad input
        when the call is awaited, as an ``async def`` would."""

    @abstractmethod
    def _iterate(self, program: programs.Program[None]) -> Any:
        """An iterator (Client) or async iterator (AsyncClient) of the program's ``Out`` items."""

    @abstractmethod
    def _open_stream(self, info: StreamInfo, chunks: programs.Program[None]) -> Any:
        """The driver's value stream (ValueStream, AsyncValueStream) over a program of chunks."""

    @abstractmethod
    def _watch_stream(self, session: WatchSession) -> Any:
        """The driver's watch stream (WatchStream, AsyncWatchStream) running ``session``."""

    # -- keys ----------------------------------------------------------------------------------------

    def put(self, key: Key, value: bytes, ttl: int | None = None, if_version: int | None = None,
            if_absent: bool = False) -> Result[int]:
        """Store ``value`` under ``key``; ``ttl`` in milliseconds. Returns the new version.

        Compare-and-set: ``if_version=N`` writes only if the key exists with version N;
        ``if_absent=True`` only if it does not exist. Otherwise ``ConditionFailed`` is raised
        (with the current version) and nothing is written, on every replica alike."""
        return self._execute(commands.put, key, value, ttl, if_version, if_absent)

    def get(self, key: Key) -> Result[bytes | None]:
        """The value, or None. A streamed value is fetched whole: prefer ``get_stream`` for those."""
        return self._execute(programs.get, key)

    def get_versioned(self, key: Key) -> Result[tuple[bytes, int] | None]:
        """(value, version), or None if the key does not exist."""
        return self._execute(programs.get_versioned, key)

    def delete(self, key: Key, if_version: int | None = None) -> Result[bool | None]:
        """Delete ``key``; True if it existed, False if not. None in one rare case: the delete was
        applied, but the broker restarted before it could record the answer for this retry.
        ``if_version=N`` deletes only if the key has version N, else raises ``ConditionFailed``."""
        return self._execute(commands.delete, key, if_version)

    def ttl(self, key: Key) -> Result[int | None]:
        """Remaining time to live of ``key`` in milliseconds, None if it never expires; raises
        ``KeyNotFound`` if it does not exist."""
        return self._execute(commands.ttl, key)

    def expire(self, key: Key, ttl: int | None) -> Result[bool]:
        """Set the time to live of an existing key to ``ttl`` ms from now, or remove it (None),
        without sending or rewriting its value. False if the key does not exist."""
        return self._execute(commands.expire, key, ttl)

    def exists(self, key: Key) -> Result[bool]:
        return self._execute(commands.exists, key)

    def mget(self, keys: Iterable[Key]) -> Result[list[bytes | None]]:
        return self._execute(programs.mget, keys)

    def mset(self, items: Mapping[Key, bytes] | Iterable[tuple[Key, bytes]]) -> Result[None]:
        return self._execute(commands.mset, items)

    # -- streamed values -----------------------------------------------------------------------------

    def put_stream(self, key: Key, fileobj: BinaryIO, ttl: int | None = None, if_version: int | None = None,
                   if_absent: bool = False, chunk_size: int = DEFAULT_CHUNK_BYTES, window: int = 4,
                   progress: Callable[[int], None] | None = None) -> Result[int]:
        """Store what ``fileobj`` (binary) holds under ``key`` without holding it in memory: it
        is sent in chunks of ``chunk_size`` bytes, ``window`` of them in flight, each acknowledged
        once W replicas have it on disk; then one commit makes it the key's value on every
        replica at once (conditions as for ``put``). Returns the version. ``progress(n)`` is
        called as each chunk of n bytes is acknowledged. If this fails or the client dies, no
        part of the value becomes visible; the chunks are freed (at once, or by the broker after
        the stream is idle for ``--stream-idle`` seconds)."""
        return self._execute(programs.put_stream, key, fileobj, ttl, if_version, if_absent, chunk_size, window,
                             progress)

    def get_stream(self, key: Key, credit: int = 4) -> Result[Any]:
        """The value of ``key`` as a value stream (``ValueStream``: iterate it for chunks, or
        ``read()`` it; ``AsyncValueStream`` for AsyncClient), None if the key does not exist. At
        most ``credit`` chunks are asked for at a time. Raises ``ValueChanged`` while iterating
        if the value is replaced meanwhile."""
        return self._execute(programs.get_stream, key, credit, self._open_stream)

    # -- scan and watch ------------------------------------------------------------------------------

    def scan(self, prefix: Key = b"", start_after: Key | None = None, limit: int = DEFAULT_SCAN_LIMIT,
             values: bool = True) -> Any:
        """Every live key starting with ``prefix`` (and above ``start_after``), in key order, as
        ``ScanItem(key, value, version)``; fetched in pages of ``limit`` keys (1 to 10,000).
        ``limit`` is a page size, not a total (``zkv scan --page-size``; the CLI's ``--limit`` is a
        total): to take fewer keys, stop iterating. Each page is linearizable on its own; a scan
        is not a snapshot of the whole key space.
        An iterator (Client) or an async iterator (AsyncClient)."""
        return self._iterate(programs.scan(prefix, start_after, limit, values))

    def scan_page(self, prefix: Key = b"", start_after: Key | None = None, limit: int = DEFAULT_SCAN_LIMIT,
                  values: bool = True) -> Result[ScanPage]:
        """One page: ``ScanPage(items, more)``."""
        return self._execute(commands.scan_page, prefix, start_after, limit, values)

    def scan_keys(self, prefix: Key = b"", start_after: Key | None = None, limit: int = DEFAULT_SCAN_LIMIT) -> Any:
        """The keys alone (no values travel)."""
        return self._iterate(programs.scan(prefix, start_after, limit, values=False, keys_only=True))

    def watch(self, prefix: Key = b"", since: dict[str, Any] | None = None) -> Any:
        """Committed changes of keys starting with ``prefix``, as they commit: an iterator of
        ``WatchEvent``s (``async for`` with AsyncClient), in commit order per key, resumed
        transparently (from its ``cursor``) after a disconnect; ``since``: a cursor saved from an
        earlier watch. Uses a socket of its own."""
        return self._watch_stream(WatchSession(prefix, since))

    def dump_slot(self, slot: int) -> Any:
        """Every live key of one slot as it was at one committed position (a consistent cut, for
        backups: ``zkv backup``): a ``SlotCut``, then ``DumpEntry``s, the chunks (``bytes``) of a
        streamed value right after its entry. Iterate it to the end; if it raises, dump the slot
        again. An iterator (Client) or an async iterator (AsyncClient)."""
        return self._iterate(programs.dump_slot(slot))

    # -- management ----------------------------------------------------------------------------------

    def status(self) -> Result[dict[str, Any]]:
        """The broker's mmi.status map (docs/protocol.md §1.5)."""
        return self._execute(programs.status, self.url, self.timeout)

    def admin(self, cmd: str, worker: str | None = None, **fields: Any) -> Result[dict[str, Any]]:
        """Operator command (mmi.admin): drain, undrain, remove, rebalance, or move (with slot=,
        from_=, to=). Returns {ok, message}."""
        return self._execute(programs.admin, self.url, self.timeout, cmd, worker, fields)

    def service_available(self, wait: float = 1.0) -> Result[bool]:
        """MMI: does the broker answer and have the ``kv`` service ready? (200 / 404)"""
        return self._execute(programs.service_available, wait)

