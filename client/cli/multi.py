"""``zkv exists``, ``mget``, ``mset``, ``ttl`` and ``expire``: commands over several keys, and TTLs."""

from __future__ import annotations

import sys

import click

from client.cli.common import EXIT_NOT_FOUND, TTL, connect, timeout_option, url_option
from client.cli.keyargs import Keys, echo_json, errors, hex_option, json_option
from client.cli.text import escape
from protocol.errors import KeyNotFound

# -- exists, mget, mset, ttl, expire --------------------------------------------------------------


@click.command()
@url_option
@timeout_option
@hex_option
@json_option
@click.argument("keys", nargs=-1, required=True)
def exists(url: str, timeout: float, hex_: bool, as_json: bool, keys: tuple[str, ...]) -> None:
    """Print how many of the KEYs exist (exit code 3 unless all do)."""
    codec = Keys(hex_)
    names = [codec.parse(k) for k in keys]
    with connect(url, timeout) as c, errors():
        found = [c.exists(k) for k in names]
    if as_json:
        for k, f in zip(names, found, strict=True):
            echo_json({"key": codec.show(k), "exists": f})
    else:
        click.echo(str(sum(found)))
    if not all(found):
        sys.exit(EXIT_NOT_FOUND)


@click.command()
@url_option
@timeout_option
@hex_option
@json_option
@click.argument("keys", nargs=-1, required=True)
def mget(url: str, timeout: float, hex_: bool, as_json: bool, keys: tuple[str, ...]) -> None:
    """Print the values of the KEYs in one request, one line per key in order: KEY<TAB>VALUE
    (escaped), or KEY alone if it does not exist."""
    codec = Keys(hex_)
    names = [codec.parse(k) for k in keys]
    with connect(url, timeout) as c, errors():
        values = c.mget(names)
    for k, v in zip(names, values, strict=True):
        if as_json:
            echo_json({"key": codec.show(k), "found": v is not None, "value": None if v is None else escape(v)})
        else:
            click.echo(codec.show(k) if v is None else f"{codec.show(k)}\t{escape(v)}")


@click.command()
@url_option
@timeout_option
@hex_option
@json_option
@click.argument("pairs", nargs=-1, required=True, metavar="KEY VALUE [KEY VALUE]...")
def mset(url: str, timeout: float, hex_: bool, as_json: bool, pairs: tuple[str, ...]) -> None:
    """Store each VALUE under its KEY in one request (all slots' shares or none are sent)."""
    if len(pairs) % 2:
        raise click.UsageError("give KEY VALUE pairs")
    codec = Keys(hex_)
    items = [(codec.parse(pairs[i]), pairs[i + 1].encode("utf-8", errors="surrogateescape"))
             for i in range(0, len(pairs), 2)]
    with connect(url, timeout) as c, errors():
        c.mset(items)
    if as_json:
        echo_json({"ok": True, "keys": len(items)})
    else:
        click.echo("OK")


@click.command()
@url_option
@timeout_option
@hex_option
@json_option
@click.argument("key")
def ttl(url: str, timeout: float, hex_: bool, as_json: bool, key: str) -> None:
    """Print the remaining time to live of KEY in milliseconds, -1 if it never expires (exit code
    3 if it does not exist)."""
    codec = Keys(hex_)
    k = codec.parse(key)
    with connect(url, timeout) as c, errors():
        try:
            left = c.ttl(k)
        except KeyNotFound:
            if as_json:
                echo_json({"key": codec.show(k), "found": False})
            else:
                click.echo(f"(not found) {codec.show(k)}", err=True)
            sys.exit(EXIT_NOT_FOUND)
    if as_json:
        echo_json({"key": codec.show(k), "found": True, "ttl_ms": left})
    else:
        click.echo(str(-1 if left is None else left))


@click.command()
@url_option
@timeout_option
@click.option("--persist", is_flag=True, help="Remove the key's time to live instead.")
@hex_option
@json_option
@click.argument("key")
@click.argument("ttl_ms", metavar="TTL", type=TTL, required=False)
def expire(url: str, timeout: float, persist: bool, hex_: bool, as_json: bool, key: str, ttl_ms: int | None) -> None:
    """Set the time to live of KEY to TTL from now (250ms, 60s, 5m, 1h, 1d, or milliseconds), or
    remove it (--persist), without rewriting its value (exit code 3 if it does not exist)."""
    if (ttl_ms is None) != persist:
        raise click.UsageError("give TTL or --persist")
    codec = Keys(hex_)
    k = codec.parse(key)
    with connect(url, timeout) as c, errors():
        updated = c.expire(k, ttl_ms)
    if as_json:
        echo_json({"key": codec.show(k), "found": updated})
    else:
        click.echo("OK" if updated else "(not found)")
    if not updated:
        sys.exit(EXIT_NOT_FOUND)
