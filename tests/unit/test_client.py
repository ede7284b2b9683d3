"""The Client and the AsyncClient without a broker (requests stubbed): the size check asks the
broker's current limit, and put_stream stops sending chunks once a lane has failed."""

from __future__ import annotations

import pytest

from client import commands
from client.client import Client


def _offline_client(limits: list[int]) -> tuple[Client, list[str]]:
    c = Client("tcp://127.0.0.1:1")
    sent: list[str] = []
    c.status = lambda: {"max_value": limits[0]}  # type: ignore[method-assign]

    def request(op, header, values):  # type: ignore[no-untyped-def]
        sent.append(op)
        return {"id": 1, "ok": True, "version": 7}, []

    c.request = request  # type: ignore[method-assign]
    return c, sent


def test_the_client_asks_the_current_limit_after_a_broker_restart() -> None:
    """The broker's --max-value was asked once per Client and never again: after the broker was
    restarted with a larger limit, the client still refused requests the broker would take."""
    limits = [16 << 20]
    c, sent = _offline_client(limits)
    try:
        big = b"x" * (20 << 20)
        with pytest.raises(commands.ValueTooLarge):
            c.put(b"k", big)
        limits[0] = 64 << 20  # broker restarted with --max-value 64 MiB
        assert c.put(b"k", big) == 7
        assert sent == ["put"]
    finally:
        c.close()


@pytest.mark.timeout(60)
def test_async_put_stream_stops_sending_chunks_after_an_error() -> None:
    """AsyncClient.put_stream runs its lanes with asyncio.gather, which does not cancel the other
    lanes when one fails: put_stream sends put_abort and raises, but the surviving lanes go on
    reading the whole file and sending its chunks, after the abort (they re-open the stream on
    the broker: staged garbage until the idle abort, and traffic/fsyncs for nothing)."""
    import asyncio
    import io

    from client.aio import AsyncClient
    from protocol.errors import ZkvError

    sent: list[tuple[str, int]] = []

    async def fake_run(call):  # noqa: ANN001, ANN202
        sent.append((call.op, call.header.get("index", -1)))
        await asyncio.sleep(0.001)
        if call.op == "put_chunk" and call.header["index"] == 1:
            raise ZkvError("VALUE_TOO_LARGE")
        return None

    client = object.__new__(AsyncClient)
    client._run = fake_run  # type: ignore[method-assign]

    async def main() -> None:
        with pytest.raises(ZkvError):
            await client.put_stream(b"k", io.BytesIO(b"x" * 100), chunk_size=1, window=4)
        await asyncio.sleep(0.5)  # the other lanes, still running

    asyncio.run(main())
    after_abort = sent[sent.index(("put_abort", -1)) + 1:]
    assert after_abort == [], f"{len(after_abort)} chunks sent after the abort, e.g. {after_abort[:3]}"
