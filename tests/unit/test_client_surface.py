"""Client and AsyncClient: one public surface (names, parameters, defaults), the same retry and
reopen behaviour, and errors typed by fault. No cluster needed."""

from __future__ import annotations

import asyncio
import inspect
import time
from typing import Any

import pytest

from client import (
    RETRIED,
    RETRYABLE,
    AsyncClient,
    AsyncValueStream,
    AsyncWatchStream,
    BrokerTimeout,
    Client,
    ClientClosed,
    ErrorCode,
    NoReply,
    NotEnoughReplicas,
    ResponseError,
    TransportError,
    Unavailable,
    ValueStream,
    WatchStream,
    ZkvTimeout,
)
from client.commands import error_for
from client.retry import Attempts
from protocol.frames import pack

# Where the sync and the async protocol differ only in spelling.
SYNC_TO_ASYNC = {"__enter__": "__aenter__", "__exit__": "__aexit__", "__iter__": "__aiter__",
                 "__next__": "__anext__"}


def surface(cls: type, protocol: dict[str, str] | None = None) -> dict[str, inspect.Signature]:
    """Public methods and properties of ``cls`` by name (sync protocol names spelt as async ones)."""
    out: dict[str, Any] = {}
    for name, member in inspect.getmembers(cls):
        if name.startswith("_") and name not in SYNC_TO_ASYNC and name not in SYNC_TO_ASYNC.values():
            continue
        name = (protocol or {}).get(name, name)
        out[name] = "property" if isinstance(member, property) else inspect.signature(member)
    return out


def without_annotation(sig: inspect.Signature, param: str) -> inspect.Signature:
    return sig.replace(parameters=[p.replace(annotation=inspect.Parameter.empty) if p.name == param else p
                                   for p in sig.parameters.values()])


def test_client_and_async_client_have_one_surface() -> None:
    sync, aio = surface(Client, SYNC_TO_ASYNC), surface(AsyncClient)
    sync.pop("__aenter__"), aio.pop("__aenter__")  # each returns its own class
    assert "__aexit__" in sync and "__aexit__" in aio
    assert sorted(sync) == sorted(aio), "a method only one client has"
    drift = {n: (str(sync[n]), str(aio[n])) for n in sync if sync[n] != aio[n]}
    assert not drift, f"parameters or defaults differ: {drift}"
    for name in ("admin", "service_available", "status", "watch", "scan", "get_stream", "put_stream"):
        assert name in aio


def test_constructors_take_the_same_parameters() -> None:
    sync = without_annotation(inspect.signature(Client.__init__), "context")
    aio = without_annotation(inspect.signature(AsyncClient.__init__), "context")
    assert sync == aio


def test_async_client_methods_are_awaitable_where_the_sync_ones_return() -> None:
    """Every method returns an awaitable, except those whose result is iterated (scan, scan_keys)
    or is a stream object (watch)."""
    c = AsyncClient("tcp://127.0.0.1:1", timeout=0.05, attempt_timeout=0.05)

    async def main() -> None:
        assert inspect.isasyncgen(c.scan()) and inspect.isasyncgen(c.scan_keys())
        assert isinstance(c.watch(), AsyncWatchStream)
        for call in (c.get(b"k"), c.status(), c.admin("rebalance"), c.service_available(0.05),
                     c.get_stream(b"k"), c.close()):
            assert inspect.isawaitable(call)
            try:
                await call
            except ZkvTimeout:
                pass

    asyncio.run(main())


def test_streams_have_one_surface() -> None:
    assert surface(WatchStream, SYNC_TO_ASYNC).keys() == surface(AsyncWatchStream).keys()
    sync, aio = surface(ValueStream, SYNC_TO_ASYNC), surface(AsyncValueStream)
    assert sync.keys() == aio.keys() and sync["read"] == aio["read"]


def test_both_clients_reopen_their_socket_after_a_missing_reply() -> None:
    c = Client("tcp://127.0.0.1:1", timeout=0.3, attempt_timeout=0.1)
    first = c._sock
    with pytest.raises(NoReply):
        c.get(b"k")
    assert c._sock is not first
    c.close()

    async def main() -> None:
        a = AsyncClient("tcp://127.0.0.1:1", timeout=0.3, attempt_timeout=0.1)
        first = a._conns[a.brokers.current].sock
        with pytest.raises(NoReply):
            await a.get(b"k")
        assert first.closed  # each silence drops the socket: the next attempt gets a fresh one
        await a.close()
        with pytest.raises(ClientClosed):
            await a.get(b"k")

    asyncio.run(main())
    with pytest.raises(ClientClosed):
        c.get(b"k")


def _attempts() -> Attempts:
    return Attempts("tcp://x", "put", 1, b"cid", {"key": b"k"}, [b"v"], timeout=5.0, attempt_timeout=1.0)


def test_the_client_resends_what_retried_holds_and_raises_the_rest() -> None:
    assert RETRIED == RETRYABLE - {ErrorCode.NOT_ENOUGH_REPLICAS}
    for code in ErrorCode:
        reply = [pack({"id": 1, "ok": False, "code": code.value, "message": "m"})]
        a = _attempts()
        a.next()
        if code in RETRIED:
            assert isinstance(a.answer(reply), float), code
        else:
            with pytest.raises(ResponseError) as e:
                a.answer(reply)
            assert e.value.code == code and not e.value.retried
            assert e.value.retryable == (code in RETRYABLE)


def test_a_last_attempt_cut_short_keeps_the_brokers_error() -> None:
    """A broker that answers TIMEOUT each time: the last attempt, shorter than the others (the
    deadline cuts it), gets no reply; the error raised is the broker's TIMEOUT, not "no reply"."""
    a = Attempts("tcp://x", "get", 1, b"cid", {"key": b"k"}, [], timeout=2.5, attempt_timeout=1.0)
    a.next()
    a.answer([pack({"id": 1, "ok": False, "code": "TIMEOUT", "message": "the broker's request timeout"})])
    a.deadline = time.monotonic() + 0.5  # the time left is less than one attempt
    _, wait = a.next()
    assert wait < 1.0
    a.no_reply()
    a.deadline = time.monotonic()  # the time is up
    with pytest.raises(BrokerTimeout):
        a.next()
    b = _attempts()  # a whole attempt with no reply is a silence
    b.next()
    b.no_reply()
    b.deadline = time.monotonic()
    with pytest.raises(NoReply):
        b.next()


def test_errors_are_typed_by_fault() -> None:
    broker_said = error_for({"ok": False, "code": "TIMEOUT", "message": "m"})
    assert isinstance(broker_said, BrokerTimeout) and isinstance(broker_said, ZkvTimeout)
    assert isinstance(broker_said, ResponseError) and not isinstance(broker_said, TransportError)
    a = _attempts()
    a.next()
    a.no_reply()
    silence = a.last_error
    assert isinstance(silence, NoReply) and isinstance(silence, ZkvTimeout)
    assert isinstance(silence, TransportError) and not isinstance(silence, ResponseError)
    assert silence.retryable and silence.retried
    nor = error_for({"ok": False, "code": "NOT_ENOUGH_REPLICAS", "message": "m"})
    assert isinstance(nor, NotEnoughReplicas) and nor.retryable and not nor.retried
    assert isinstance(error_for({"ok": False, "code": "UNAVAILABLE"}), Unavailable)
    assert isinstance(error_for({"ok": False, "code": "FROM_THE_FUTURE"}), ResponseError)
