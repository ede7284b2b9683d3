"""``zkv put``, ``get``, ``del``, ``scan`` and ``watch``: keys and values from the command line."""

from __future__ import annotations

import os
import sys
from typing import Any

import click

from client.cli.common import EXIT_NOT_FOUND, TTL, TTL_HELP, ZkvCommandError, connect, timeout_option, url_option
from protocol.errors import ZkvError
from protocol.limits import DEFAULT_SCAN_LIMIT, MAX_SCAN_LIMIT


@click.command()
@url_option
@timeout_option
@click.option("--ttl", type=TTL, default=None, help=TTL_HELP)
@click.argument("key")
@click.argument("value", required=False)
@click.option("--file", "file_", type=click.File("rb"), help="Read the value from a file ('-' = stdin).")
def put(url: str, timeout: float, ttl: int | None, key: str, value: str | None, file_: Any) -> None:
    """Store VALUE (or --file) under KEY. A file is streamed in chunks (any size up to the
    broker's --max-stream), with a progress bar on a terminal for large ones."""
    if (value is None) == (file_ is None):
        raise click.UsageError("give either VALUE or --file")
    with connect(url, timeout) as c:
        try:
            if file_ is None:
                version = c.put(key, value.encode(), ttl=ttl)  # type: ignore[union-attr]
            else:
                with _progress(_file_size(file_), "put") as bar:
                    version = c.put_stream(key, file_, ttl=ttl, progress=bar.update)
        except ZkvError as e:
            raise ZkvCommandError(e) from None
    click.echo(f"OK version={version}")


PROGRESS_MIN_BYTES = 8 << 20  # smaller transfers show no progress bar


def _file_size(f: Any) -> int | None:
    try:
        return os.fstat(f.fileno()).st_size or None
    except (OSError, AttributeError, ValueError):
        return None


class _NoProgress:
    def update(self, n: int) -> None:
        pass

    def __enter__(self) -> _NoProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def _progress(total: int | None, label: str) -> Any:
    """A progress bar on stderr for a large transfer to or from a terminal user."""
    if total is None or total < PROGRESS_MIN_BYTES or not sys.stderr.isatty():
        return _NoProgress()
    return click.progressbar(length=total, label=label, file=sys.stderr, show_pos=False, show_percent=True,
                             show_eta=True)


@click.command()
@url_option
@timeout_option
@click.argument("key")
@click.option("-o", "--output", type=click.File("wb"), help="Write the value to a file.")
def get(url: str, timeout: float, key: str, output: Any) -> None:
    """Print the value of KEY, or write it to a file with -o (exit code 3 if it does not exist).
    Large values are streamed in chunks, never held whole in memory."""
    out = output or click.get_binary_stream("stdout")
    with connect(url, timeout) as c:
        try:
            stream = c.get_stream(key)
            if stream is None:
                click.echo(f"(not found) {key}", err=True)
                sys.exit(EXIT_NOT_FOUND)
            with _progress(stream.size if output is not None else None, "get") as bar:
                for chunk in stream:
                    out.write(chunk)
                    bar.update(len(chunk))
        except ZkvError as e:
            raise ZkvCommandError(e) from None
    if output is None and sys.stdout.isatty():
        out.write(b"\n")


@click.command(name="del")
@url_option
@timeout_option
@click.argument("key")
def delete(url: str, timeout: float, key: str) -> None:
    """Delete KEY (exit code 3 if it did not exist)."""
    with connect(url, timeout) as c:
        try:
            existed = c.delete(key)
        except ZkvError as e:
            raise ZkvCommandError(e) from None
    if existed is None:
        click.echo("deleted (an earlier attempt did it; whether the key existed is unknown)")
        return
    click.echo("deleted" if existed else "(not found)")
    if not existed:
        sys.exit(EXIT_NOT_FOUND)



# -- scan and watch ------------------------------------------------------------------------------


def _text(b: bytes) -> str:
    """Bytes as one printable field: UTF-8, with other bytes and tabs or line breaks escaped."""
    return b.decode("utf-8", errors="backslashreplace").translate(_ESCAPES)


_ESCAPES = str.maketrans({"\n": "\\n", "\t": "\\t", "\r": "\\r"})


@click.command()
@url_option
@timeout_option
@click.argument("prefix", default="")
@click.option("--limit", type=int, default=None,
              help="Print at most this many keys in all (default: all). Not Client.scan's limit=, a page size.")
@click.option("--keys-only", is_flag=True, help="Print the keys alone; values are not fetched.")
@click.option("--page-size", default=DEFAULT_SCAN_LIMIT, show_default=True,
              help=f"Keys per request (1 to {MAX_SCAN_LIMIT:,}): Client.scan's limit=.")
def scan(url: str, timeout: float, prefix: str, limit: int | None, keys_only: bool, page_size: int) -> None:
    """Print the keys starting with PREFIX in key order, one per line: KEY<TAB>VALUE (escaped)."""
    if limit is not None and limit < 1:
        raise click.BadParameter("must be at least 1", param_hint="--limit")
    printed = 0
    with connect(url, timeout) as c:
        try:
            for item in c.scan(prefix, limit=min(page_size, limit or page_size), values=not keys_only):
                click.echo(_text(item.key) if keys_only else f"{_text(item.key)}\t{_text(item.value or b'')}")
                printed += 1
                if limit is not None and printed >= limit:
                    break
        except ZkvError as e:
            raise ZkvCommandError(e) from None


@click.command()
@url_option
@timeout_option
@click.argument("prefix", default="")
def watch(url: str, timeout: float, prefix: str) -> None:
    """Print each committed change of keys starting with PREFIX until interrupted, one per line:
    KIND<TAB>KEY<TAB>VERSION[<TAB>VALUE]. KIND is put, delete, ttl, expired, or resync (changes
    were missed: re-read with `zkv scan`). Reconnects and resumes by itself; Ctrl-C ends it."""
    import signal

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    stream = None
    try:
        with connect(url, timeout) as c:
            stream = c.watch(prefix)
            for ev in stream:
                line = f"{ev.kind}\t{_text(ev.key)}\t{ev.version}"
                if ev.kind == "put" and ev.stream is not None:
                    line += f"\t(streamed value, {ev.stream.size} bytes)"
                elif ev.kind == "put":
                    line += f"\t{_text(ev.value or b'')}"
                elif ev.kind == "ttl":
                    line += f"\texpire_at={ev.expire_at}"
                click.echo(line)
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
