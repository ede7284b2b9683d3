"""What the data commands share: KEY arguments in and keys out (escaped text, client/cli/text.py,
or hex with ``--hex``), ``--json`` output, the ``--ttl`` option and the error a failed command shows."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import click

from client.cli.common import TTL, TTL_HELP, ZkvCommandError
from client.cli.text import escape, unescape
from protocol.errors import ConditionFailed, ZkvError

hex_option = click.option("--hex", "hex_", is_flag=True, help="Keys and prefixes in hex, read and printed.")
json_option = click.option("--json", "as_json", is_flag=True, help="One JSON object per result line.")
ttl_option = click.option("--ttl", type=TTL, default=None, help=TTL_HELP)


class Keys:
    """KEY arguments in, keys out: escaped text (client/cli/text.py) or, with --hex, hex."""

    def __init__(self, hex_: bool) -> None:
        self.hex = hex_

    def parse(self, text: str, what: str = "KEY") -> bytes:
        try:
            return bytes.fromhex(text) if self.hex else unescape(text)
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint=what) from None

    def show(self, key: bytes) -> str:
        return key.hex() if self.hex else escape(key)


def echo_json(obj: dict[str, Any]) -> None:
    click.echo(json.dumps(obj, ensure_ascii=False))


def command_error(e: ZkvError) -> ZkvCommandError:
    if isinstance(e, ConditionFailed):
        now = "does not exist" if e.version is None else f"has version {e.version}"
        err = ZkvCommandError(e)
        err.message = f"{e.code.value}: nothing written: the key {now}"
        return err
    return ZkvCommandError(e)


@contextmanager
def errors() -> Iterator[None]:
    try:
        yield
    except ZkvError as e:
        raise command_error(e) from None


def interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt
