"""What the ``zkv`` client commands share: the broker URL and timeout options, the client they
open, and how a ``ZkvError`` becomes an exit code."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from client.client import Client
from client.retry import DEFAULT_ATTEMPT_TIMEOUT, DEFAULT_TIMEOUT
from protocol.errors import ErrorCode, ZkvError
from protocol.limits import DEFAULT_FRONTEND

# Exit codes: 1 generic failure, 2 usage (click), 3 not found, 4 not enough replicas,
# 5 timeout or unavailable, 6 a compare-and-set whose condition did not hold, 130 interrupted.
EXIT_NOT_FOUND = 3
EXIT_CODES = {ErrorCode.NOT_ENOUGH_REPLICAS: 4, ErrorCode.TIMEOUT: 5, ErrorCode.UNAVAILABLE: 5,
              ErrorCode.CONDITION_FAILED: 6}


class ZkvCommandError(click.ClickException):
    def __init__(self, err: ZkvError) -> None:
        super().__init__(f"{err.code.value}: {err}")
        self.exit_code = EXIT_CODES.get(err.code, 1)


def connect(url: str, timeout: float) -> Client:
    return Client(url, timeout=timeout, attempt_timeout=min(timeout, DEFAULT_ATTEMPT_TIMEOUT))


url_option: Callable[[Any], Any] = click.option(
    "--url", default=DEFAULT_FRONTEND, show_default=True, envvar="ZKV_URL", help="Broker frontend.")
timeout_option: Callable[[Any], Any] = click.option(
    "--timeout", default=DEFAULT_TIMEOUT, show_default=True, help="Seconds, retries included.")

