"""The data commands: ``zkv put``, ``get``, ``del``, ``exists``, ``mget``, ``mset``, ``ttl``,
``expire``, ``scan`` and ``watch``: keys and values from the command line.

Keys (and prefixes) are read and printed in one escaping scheme (client/cli/text.py), or in hex
with ``--hex``; ``--json`` prints one JSON object per result line instead of text, its keys and
values in the same scheme. Exit codes are those of client/cli/common.py (3: not found).
"""

from __future__ import annotations

import base64
import json
import os
import signal
import stat
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from client.cli.cluster import _human_bytes
from client.cli.common import EXIT_NOT_FOUND, TTL, TTL_HELP, ZkvCommandError, connect, timeout_option, url_option
from client.cli.text import escape, unescape
from protocol.errors import ConditionFailed, KeyNotFound, ZkvError
from protocol.frames import pack, unpack
from protocol.limits import DEFAULT_SCAN_LIMIT, MAX_SCAN_LIMIT

EXIT_INTERRUPTED = 130  # the shell's code for a command ended by SIGINT

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


def _echo_json(obj: dict[str, Any]) -> None:
    click.echo(json.dumps(obj, ensure_ascii=False))


def _fail(e: ZkvError) -> ZkvCommandError:
    if isinstance(e, ConditionFailed):
        now = "does not exist" if e.version is None else f"has version {e.version}"
        err = ZkvCommandError(e)
        err.message = f"{e.code.value}: nothing written: the key {now}"
        return err
    return ZkvCommandError(e)


@contextmanager
def _errors() -> Iterator[None]:
    try:
        yield
    except ZkvError as e:
        raise _fail(e) from None


# -- put, get, del -------------------------------------------------------------------------------


@click.command()
@url_option
@timeout_option
@ttl_option
@click.option("--if-absent", is_flag=True, help="Write only if KEY does not exist (compare-and-set).")
@click.option("--if-version", type=click.IntRange(min=1), default=None,
              help="Write only if KEY has this version (compare-and-set).")
@click.option("--file", "file_", type=click.File("rb"), help="Read the value from a file ('-' = stdin).")
@hex_option
@json_option
@click.argument("key")
@click.argument("value", required=False)
def put(url: str, timeout: float, ttl: int | None, if_absent: bool, if_version: int | None, file_: Any,
        hex_: bool, as_json: bool, key: str, value: str | None) -> None:
    """Store VALUE under KEY; without VALUE, the value is read from --file or stdin and streamed
    in chunks (any size up to the broker's --max-stream), with progress on a terminal. A failed
    --if-absent / --if-version writes nothing (exit code 6)."""
    keys = Keys(hex_)
    k = keys.parse(key)
    if value is not None and file_ is not None:
        raise click.UsageError("give VALUE or --file, not both")
    if if_absent and if_version is not None:
        raise click.UsageError("--if-absent and --if-version exclude each other")
    if value is None and file_ is None:
        file_ = click.get_binary_stream("stdin")
        if file_.isatty():
            raise click.UsageError("give VALUE, --file, or the value on stdin")
    with connect(url, timeout) as c, _errors():
        if file_ is None:
            version = c.put(k, value.encode("utf-8", errors="surrogateescape"),  # type: ignore[union-attr]
                            ttl=ttl, if_version=if_version, if_absent=if_absent)
        else:
            with Progress(_file_size(file_), "put") as bar:
                version = c.put_stream(k, file_, ttl=ttl, if_version=if_version, if_absent=if_absent,
                                       progress=bar.update)
    if as_json:
        _echo_json({"key": keys.show(k), "version": version})
    else:
        click.echo(f"OK version={version}")


@click.command()
@url_option
@timeout_option
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the value to a file (under a temporary name until it is complete).")
@click.option("--version", "version_only", is_flag=True, help="Print the key's version, not its value.")
@hex_option
@json_option
@click.argument("key")
def get(url: str, timeout: float, output: Path | None, version_only: bool, hex_: bool, as_json: bool,
        key: str) -> None:
    """Print the value of KEY, or write it to a file with -o (exit code 3 if it does not exist).
    Large values are streamed in chunks, never held whole in memory. Ctrl-C leaves no partial
    file (exit code 130)."""
    keys = Keys(hex_)
    k = keys.parse(key)
    try:
        with connect(url, timeout) as c, _errors():
            stream = c.get_stream(k)
            if stream is None:
                if as_json:
                    _echo_json({"key": keys.show(k), "found": False})
                else:
                    click.echo(f"(not found) {keys.show(k)}", err=True)
                sys.exit(EXIT_NOT_FOUND)
            if version_only:
                if as_json:
                    _echo_json({"key": keys.show(k), "found": True, "version": stream.version})
                else:
                    click.echo(str(stream.version))
            elif output is not None:
                _download(stream, output)
                if as_json:
                    _echo_json({"key": keys.show(k), "found": True, "version": stream.version,
                                "size": stream.size, "file": str(output)})
            elif as_json:
                _echo_json({"key": keys.show(k), "found": True, "version": stream.version,
                            "value": escape(stream.read())})
            else:
                out = click.get_binary_stream("stdout")
                for chunk in stream:
                    out.write(chunk)
                if sys.stdout.isatty():
                    out.write(b"\n")
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)


def _download(stream: Any, output: Path) -> None:
    """Write the value to a temporary file beside ``output`` and rename it when complete, so
    that ``output`` never holds part of a value (an interrupt or an error removes the rest)."""
    fd, tmp = tempfile.mkstemp(dir=output.parent or ".", prefix=f".{output.name}.", suffix=".part")
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)  # as open() would have made it, not mkstemp's 0600
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        with os.fdopen(fd, "wb") as f, Progress(stream.size, "get") as bar:
            for chunk in stream:
                f.write(chunk)
                bar.update(len(chunk))
        os.replace(tmp, output)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


@click.command(name="del")
@url_option
@timeout_option
@click.option("--if-version", type=click.IntRange(min=1), default=None,
              help="Delete only if the key has this version (one KEY).")
@click.option("--prefix", is_flag=True, help="Delete every key starting with the one PREFIX given.")
@click.option("-y", "--yes", is_flag=True, help="Do not ask before deleting by --prefix.")
@hex_option
@json_option
@click.argument("keys", nargs=-1, required=True)
def delete(url: str, timeout: float, if_version: int | None, prefix: bool, yes: bool, hex_: bool,
           as_json: bool, keys: tuple[str, ...]) -> None:
    """Delete each KEY (exit code 3 if none existed), or with --prefix every key starting with
    PREFIX (after a confirmation, or --yes; keys written meanwhile may remain)."""
    codec = Keys(hex_)
    names = [codec.parse(k) for k in keys]
    if (if_version is not None or prefix) and len(names) != 1:
        raise click.UsageError("--if-version and --prefix take exactly one KEY")
    with connect(url, timeout) as c, _errors():
        if prefix:
            names = list(c.scan_keys(names[0], limit=MAX_SCAN_LIMIT))
            if not names:
                click.echo(f"(not found) no key starts with {keys[0]}", err=True)
                sys.exit(EXIT_NOT_FOUND)
            if not yes:
                click.confirm(f"delete {len(names)} keys starting with {keys[0]!r}?", abort=True, err=True)
        found = []
        for k in names:
            existed = c.delete(k, if_version=if_version)
            found.append(existed is not False)
            if as_json:
                _echo_json({"key": codec.show(k), "deleted": existed})
            elif len(keys) == 1 and not prefix:
                if existed is None:
                    click.echo("deleted (an earlier attempt did it; whether the key existed is unknown)")
                else:
                    click.echo("deleted" if existed else "(not found)")
    if not as_json and (prefix or len(keys) > 1):
        click.echo(f"deleted {sum(found)} keys")
    if not any(found):
        sys.exit(EXIT_NOT_FOUND)


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
    with connect(url, timeout) as c, _errors():
        found = [c.exists(k) for k in names]
    if as_json:
        for k, f in zip(names, found, strict=True):
            _echo_json({"key": codec.show(k), "exists": f})
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
    with connect(url, timeout) as c, _errors():
        values = c.mget(names)
    for k, v in zip(names, values, strict=True):
        if as_json:
            _echo_json({"key": codec.show(k), "found": v is not None, "value": None if v is None else escape(v)})
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
    with connect(url, timeout) as c, _errors():
        c.mset(items)
    if as_json:
        _echo_json({"ok": True, "keys": len(items)})
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
    with connect(url, timeout) as c, _errors():
        try:
            left = c.ttl(k)
        except KeyNotFound:
            if as_json:
                _echo_json({"key": codec.show(k), "found": False})
            else:
                click.echo(f"(not found) {codec.show(k)}", err=True)
            sys.exit(EXIT_NOT_FOUND)
    if as_json:
        _echo_json({"key": codec.show(k), "found": True, "ttl_ms": left})
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
    """Set the time to live of KEY to TTL milliseconds from now (or remove it: --persist)
    without rewriting its value (exit code 3 if it does not exist)."""
    if (ttl_ms is None) != persist:
        raise click.UsageError("give TTL or --persist")
    codec = Keys(hex_)
    k = codec.parse(key)
    with connect(url, timeout) as c, _errors():
        updated = c.expire(k, ttl_ms)
    if as_json:
        _echo_json({"key": codec.show(k), "found": updated})
    else:
        click.echo("OK" if updated else "(not found)")
    if not updated:
        sys.exit(EXIT_NOT_FOUND)


# -- progress ------------------------------------------------------------------------------------


PROGRESS_MIN_BYTES = 8 << 20  # smaller transfers of a known size show no progress


def _file_size(f: Any) -> int | None:
    """The size of a regular file; None for a pipe or a terminal (stdin), whose size is unknown."""
    try:
        st = os.fstat(f.fileno())
    except (OSError, AttributeError, ValueError):
        return None
    return st.st_size if stat.S_ISREG(st.st_mode) else None


def progress_line(label: str, done: int, total: int | None, elapsed: float) -> str:
    """``put 12.0 MiB/100.0 MiB 12% 5.2 MiB/s ETA 17s``; without a total (stdin): bytes and rate."""
    rate = done / elapsed if elapsed > 0 else 0.0
    line = f"{label} {_human_bytes(done)}"
    if total:
        line += f"/{_human_bytes(total)} {100 * done // total}%"
    line += f" {_human_bytes(round(rate))}/s"
    if total and rate > 0:
        line += f" ETA {max(total - done, 0) / rate:.0f}s"
    return line


class Progress:
    """Bytes, rate and ETA of a transfer on stderr, redrawn in place, for a terminal user only
    (and for a known size only from PROGRESS_MIN_BYTES)."""

    REDRAW = 0.2  # s between redraws

    def __init__(self, total: int | None, label: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.total, self.label, self.clock = total, label, clock
        self.shown = sys.stderr.isatty() and (total is None or total >= PROGRESS_MIN_BYTES)
        self.done = 0
        self.start = self.last = clock()

    def update(self, n: int) -> None:
        self.done += n
        now = self.clock()
        if self.shown and now - self.last >= self.REDRAW:
            self.last = now
            click.echo(f"\r{progress_line(self.label, self.done, self.total, now - self.start)}\x1b[K",
                       err=True, nl=False)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.shown and self.done:
            click.echo(f"\r{progress_line(self.label, self.done, self.total, self.clock() - self.start)}\x1b[K",
                       err=True)


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
    with connect(url, timeout) as c, _errors():
        for item in c.scan(start, limit=min(page_size, limit or page_size), values=not keys_only):
            if as_json:
                obj: dict[str, Any] = {"key": codec.show(item.key), "version": item.version}
                if not keys_only:
                    obj["value"] = escape(item.value or b"")
                _echo_json(obj)
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
    signal.signal(signal.SIGTERM, _interrupt)
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

