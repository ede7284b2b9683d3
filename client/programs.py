"""The client commands that take more than one request, written once as *programs*.

A program is a generator: it yields steps, and the client that runs it sends back each step's
result (or throws in its error). ``Client`` runs the steps blocking, ``AsyncClient`` awaits them;
neither knows anything about the commands themselves. The steps:

- a ``Call`` (client/commands.py): run it, with retries; the answer is its parsed reply;
- ``Window(calls, size)``: run the calls with up to ``size`` in flight; the answer is None;
- ``Mmi(service, body, wait)``: one management round trip (docs/protocol.md §1.5); the answer is
  the reply frames, or None when nothing came back within ``wait`` seconds;
- ``Reopen()``: replace the client's socket (after a missing reply);
- ``Out(item)``: only in programs run as iterators (scan): hand ``item`` to the caller.

Nothing here touches a socket or a clock.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO, TypeVar

from client import commands
from client.commands import Call, Key, ScanItem, StreamInfo
from client.retry import no_reply
from client.streams import StreamPut, chunk_reads
from protocol.errors import ValueChanged, ZkvError, error_from_reply
from protocol.frames import MMI_ADMIN, MMI_SERVICE, MMI_STATUS, SERVICE, pack, unpack

T = TypeVar("T")


@dataclass(frozen=True)
class Window:
    calls: Iterator[Call]
    size: int


@dataclass(frozen=True)
class Mmi:
    service: bytes
    body: list[bytes]
    wait: float


@dataclass(frozen=True)
class Reopen:
    pass


@dataclass(frozen=True)
class Out:
    item: Any


Step = Call | Window | Mmi | Reopen | Out
Program = Generator[Step, Any, T]

WHOLE_CREDIT = 4  # chunks asked for at a time when a streamed value is fetched whole (get, mget, scan)


def advance(program: Program[Any], answer: Any, error: BaseException | None) -> tuple[bool, Any]:
    """Give ``program`` the answer to its last step (or throw ``error`` into it): (False, its next
    step), or (True, its result) once it has returned. Its own exceptions propagate."""
    try:
        step = program.send(answer) if error is None else program.throw(error)
    except StopIteration as stop:
        return True, stop.value
    return False, step


def whole(key: Key, value: Any) -> Program[Any]:
    """A value as bytes: a streamed one (StreamInfo) is fetched in chunks and joined."""
    if not isinstance(value, StreamInfo):
        return value
    parts: list[bytes] = []
    for call in chunk_reads(key, value, WHOLE_CREDIT):
        parts.extend((yield call))
    return b"".join(parts)


def get(key: Key) -> Program[bytes | None]:
    return (yield from whole(key, (yield commands.get(key))))


def get_versioned(key: Key) -> Program[tuple[bytes, int] | None]:
    found = yield commands.get_versioned(key)
    if found is None:
        return None
    return (yield from whole(key, found[0])), found[1]


def mget(keys: Iterable[Key]) -> Program[list[bytes | None]]:
    keys = list(keys)
    values = yield commands.mget(keys)
    out: list[bytes | None] = []
    for k, v in zip(keys, values, strict=True):
        out.append((yield from whole(k, v)))
    return out


def put_stream(key: Key, fileobj: BinaryIO, ttl: int | None, if_version: int | None, if_absent: bool,
               chunk_size: int, window: int, progress: Callable[[int], None] | None) -> Program[int]:
    """Chunks with ``window`` in flight, then one commit; a failure (or an interrupt) aborts the
    stream before it propagates. A value of one chunk is a plain put."""
    up = StreamPut(key, fileobj, chunk_size, ttl, if_version, if_absent, progress)
    if up.single is not None:
        version = yield up.single
        if progress is not None:
            progress(len(up.single.values[0]))
        return version
    try:
        yield Window(up.chunk_calls(), max(1, window))
        return (yield up.commit())
    except BaseException:
        try:
            yield up.abort()
        except ZkvError:
            pass  # the broker aborts it when the stream has been idle long enough
        raise


def get_stream(key: Key, credit: int, open_stream: Callable[[StreamInfo, Program[None]], T]) -> Program[T | None]:
    """``open_stream(info, chunks)`` (the client's stream type over the program ``chunks``), or
    None if the key does not exist."""
    info = yield commands.stream_info(key)
    if info is None:
        return None
    return open_stream(info, chunks(key, info, credit))


def chunks(key: Key, info: StreamInfo, credit: int) -> Program[None]:
    """The chunks of a value as ``Out``s, ``credit`` asked for at a time."""
    if info.inline is not None:
        yield Out(info.inline)
        return
    for call in chunk_reads(key, info, credit):
        for chunk in (yield call):
            yield Out(chunk)


def scan(prefix: Key, start_after: Key | None, limit: int, values: bool, keys_only: bool = False) -> Program[None]:
    """Every live key starting with ``prefix`` above ``start_after`` as ``Out(ScanItem)`` (or
    ``Out(key)``), page by page; a streamed value is fetched whole, as get does."""
    start = None if start_after is None else commands.key_bytes(start_after)

    def out(item: ScanItem) -> Out:
        return Out(item.key if keys_only else item)

    while True:
        page = yield commands.scan_page(prefix, start, limit, values)
        for item in page.items:
            if not values or not isinstance(item.value, StreamInfo):
                yield out(item)
                continue
            try:
                value = yield from whole(item.key, item.value)
            except ValueChanged:  # replaced or deleted since the page: read it as it is now
                now = yield from get_versioned(item.key)
                if now is not None:
                    yield out(item._replace(value=now[0], version=now[1]))
            else:
                yield out(item._replace(value=value))
        start = commands.next_start(page)
        if start is None:
            return


def dump_slot(slot: int) -> Program[None]:
    """A slot's cut as ``Out``s: its ``SlotCut``, then its ``DumpEntry``s, each streamed value's
    chunks (``bytes``) right after its entry. Raises if the dump breaks off (its worker was lost,
    the cut did not commit): the caller dumps the slot again from the start."""
    page = yield commands.dump_part(slot)
    yield Out(page.cut)
    part = 0
    while True:
        for item in page.items:
            yield Out(item)
        if page.last:
            return
        part += 1
        page = yield commands.dump_part(slot, part, page.dump, page.worker)


# -- management (MMI) ---------------------------------------------------------------------------


def status(url: str, timeout: float) -> Program[dict[str, Any]]:
    reply = yield Mmi(MMI_STATUS, [], timeout)
    if reply is None:
        raise no_reply(url, timeout)
    return _mmi_answer(reply[0])


def admin(url: str, timeout: float, cmd: str, worker: str | None, fields: dict[str, Any]) -> Program[dict[str, Any]]:
    if "from_" in fields:
        fields["from"] = fields.pop("from_")
    reply = yield Mmi(MMI_ADMIN, [pack({"cmd": cmd, "worker": worker, **fields})], timeout)
    if reply is None:
        raise no_reply(url, timeout)
    return _mmi_answer(reply[0])


def _mmi_answer(body: bytes) -> dict[str, Any]:
    """An MMI map; one with an error ``code`` (FORBIDDEN) is raised as that error."""
    answer = unpack(body)
    if isinstance(answer, dict) and "code" in answer and not answer.get("ok", True):
        raise error_from_reply(str(answer["code"]), str(answer.get("message", "")))
    return answer


def service_available(wait: float) -> Program[bool]:
    reply = yield Mmi(MMI_SERVICE, [SERVICE], wait)
    if reply is None:
        yield Reopen()
        return False
    return reply[0] == b"200"
