"""``zkv scan`` and ``zkv watch``: keys of a prefix, and their changes as they commit."""

from __future__ import annotations

import base64
import json
import signal
from typing import Any

import click

from client.cli.common import ZkvCommandError, connect, timeout_option, url_option
from client.cli.keyargs import Keys, echo_json, errors, hex_option, interrupt, json_option
from client.cli.text import escape
from protocol.errors import ZkvError
from protocol.frames import pack, unpack
from protocol.limits import DEFAULT_SCAN_LIMIT, MAX_SCAN_LIMIT

# -- scan and watch ------------------------------------------------------------------------------


@click.command()
@url_option
@timeout_option
@click.argument("prefix", default="")
@click.option("--limit", type=int, default=None,
              help="Print at most this many keys in all (default: all). Not Client.scan's limit=, a page size.")
@click.option("--keys-only", is_flag=True, help="Print the keys alone; values are not fetched.")
@click.option("--page-size", default=DEFAULT_SCAN_LIMIT, show_default=True,
              help=f"Keys per request (1 to {MAX_SCAN_LIMIT:,}): Client.scan's limit=.")
@hex_option
@json_option
def scan(url: str, timeout: float, prefix: str, limit: int | None, keys_only: bool, page_size: int,
         hex_: bool, as_json: bool) -> None:
    """Print the keys starting with PREFIX in key order, one per line: KEY<TAB>VALUE (escaped)."""
    if limit is not None and limit < 1:
        raise click.BadParameter("must be at least 1", param_hint="--limit")
    codec = Keys(hex_)
    start = codec.parse(prefix, "PREFIX")
    printed = 0
    with connect(url, timeout) as c, errors():
        for item in c.scan(start, limit=min(page_size, limit or page_size), values=not keys_only):
            if as_json:
                obj: dict[str, Any] = {"key": codec.show(item.key), "version": item.version}
                if not keys_only:
                    obj["value"] = escape(item.value or b"")
                echo_json(obj)
            else:
                shown = codec.show(item.key)
                click.echo(shown if keys_only else f"{shown}\t{escape(item.value or b'')}")
            printed += 1
            if limit is not None and printed >= limit:
                break


def cursor_text(cursor: dict[str, Any]) -> str:
    """A watch cursor as one word to pass to --since (base64 of its msgpack form)."""
    return base64.urlsafe_b64encode(pack(cursor)).decode().rstrip("=")


def parse_cursor(text: str) -> dict[str, Any]:
    try:
        cursor = unpack(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
    except Exception:
        cursor = None
    if not isinstance(cursor, dict) or "s" not in cursor:
        raise click.BadParameter("not a cursor printed by zkv watch", param_hint="--since")
    return cursor


@click.command()
@url_option
@timeout_option
@click.argument("prefix", default="")
@click.option("--since", default=None, metavar="CURSOR",
              help="Resume from the cursor an earlier `zkv watch` printed when it ended.")
@hex_option
@json_option
def watch(url: str, timeout: float, prefix: str, since: str | None, hex_: bool, as_json: bool) -> None:
    """Print each committed change of keys starting with PREFIX until interrupted, one per line:
    KIND<TAB>KEY<TAB>VERSION[<TAB>VALUE]. KIND is put, delete, ttl, expired, or resync (changes
    were missed: re-read with `zkv scan`). Reconnects and resumes by itself; Ctrl-C ends it and
    prints, on stderr, the cursor to resume from with --since."""
    codec = Keys(hex_)
    start = codec.parse(prefix, "PREFIX")
    since_cursor = parse_cursor(since) if since is not None else None
    signal.signal(signal.SIGTERM, interrupt)
    stream = None
    try:
        with connect(url, timeout) as c:
            stream = c.watch(start, since=since_cursor)
            for ev in stream:
                click.echo(_event_json(ev, codec) if as_json else _event_text(ev, codec))
    except KeyboardInterrupt:
        pass  # the end the user asked for (Ctrl-C, SIGTERM): exit 0
    except ZkvError as e:
        raise ZkvCommandError(e) from None
    finally:
        if stream is not None:
            # A second signal while closing must not turn a clean stop into an error exit.
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            try:
                stream.close()
            except ZkvError:
                pass
            if stream.cursor is not None:
                click.echo(f"cursor: {cursor_text(stream.cursor)}", err=True)


def _event_text(ev: Any, codec: Keys) -> str:
    line = f"{ev.kind}\t{codec.show(ev.key)}\t{ev.version}"
    if ev.kind == "put" and ev.stream is not None:
        line += f"\t(streamed value, {ev.stream.size} bytes)"
    elif ev.kind == "put":
        line += f"\t{escape(ev.value or b'')}"
    elif ev.kind == "ttl":
        line += f"\texpire_at={ev.expire_at}"
    return line


def _event_json(ev: Any, codec: Keys) -> str:
    obj: dict[str, Any] = {"kind": ev.kind, "key": codec.show(ev.key), "version": ev.version}
    if ev.kind == "put" and ev.stream is not None:
        obj["stream_size"] = ev.stream.size
    elif ev.kind == "put":
        obj["value"] = escape(ev.value or b"")
    if ev.kind in ("put", "ttl"):
        obj["expire_at"] = ev.expire_at
    return json.dumps(obj, ensure_ascii=False)
