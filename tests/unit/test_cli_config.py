"""The configuration a user sees (issue 13, defect 6): ZKV_URL for the library, --help naming each
variable and the value it sets, --log-level checked, TTLs as durations. No cluster needed."""

from __future__ import annotations

import asyncio

import click
import pytest
from click.testing import CliRunner

from client import AsyncClient, Client
from client.cli import main
from client.cli.common import TTL
from protocol.limits import DEFAULT_FRONTEND


def test_client_and_async_client_take_the_url_from_zkv_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ZKV_URL", raising=False)
    with Client(timeout=1) as c:
        assert c.url == DEFAULT_FRONTEND
    monkeypatch.setenv("ZKV_URL", "tcp://127.0.0.1:1")
    with Client(timeout=1) as c:
        assert c.url == "tcp://127.0.0.1:1"
    with Client("tcp://127.0.0.1:2", timeout=1) as c:  # an explicit url wins
        assert c.url == "tcp://127.0.0.1:2"

    async def aio() -> str:
        async with AsyncClient(timeout=1) as c:
            return c.url

    assert asyncio.run(aio()) == "tcp://127.0.0.1:1"


def _help(*args: str, env: dict[str, str] | None = None) -> str:
    r = CliRunner().invoke(main, [*args, "--help"], env=env, terminal_width=200)
    assert r.exit_code == 0, r.output
    return " ".join(r.output.split())


def test_help_names_each_variable_and_shows_the_value_it_sets() -> None:
    out = _help("get", env={"ZKV_URL": None, "ZKV_GET_TIMEOUT": None})  # type: ignore[dict-item]
    assert f"[env var: ZKV_URL; default: {DEFAULT_FRONTEND}]" in out
    assert "[env var: ZKV_GET_TIMEOUT; default: 10.0]" in out
    out = _help("get", env={"ZKV_URL": "tcp://10.0.0.9:7000", "ZKV_GET_TIMEOUT": "3"})
    assert "[env var: ZKV_URL; default: (tcp://10.0.0.9:7000 from ZKV_URL)]" in out
    assert "[env var: ZKV_GET_TIMEOUT; default: (3 from ZKV_GET_TIMEOUT)]" in out
    assert "env var: ZKV_BROKER_FRONTEND" in _help("broker")
    assert "env var: ZKV_WORKER_DATA" in _help("worker")
    assert "env var: ZKV_LOG_LEVEL" in _help()


def test_log_level_is_checked() -> None:
    r = CliRunner().invoke(main, ["--log-level", "bogus", "status", "--help"])
    assert r.exit_code == 2 and "'bogus' is not one of" in r.output


@pytest.mark.parametrize(("text", "ms"), [("250ms", 250), ("60s", 60_000), ("5m", 300_000), ("1h", 3_600_000),
                                          ("1d", 86_400_000), ("1.5s", 1500), ("60000", 60_000), (" 7 ", 7)])
def test_ttl_durations(text: str, ms: int) -> None:
    assert TTL.convert(text, None, None) == ms


@pytest.mark.parametrize("text", ["", "5 m", "5min", "-1s", "0", "0s", "1e3", "s", "200y", "999999d"])
def test_ttl_durations_refused(text: str) -> None:
    with pytest.raises(click.BadParameter):
        TTL.convert(text, None, None)
