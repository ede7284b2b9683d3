"""The data commands of one key: ``zkv put``, ``get`` and ``del`` (client/cli/multi.py has the
commands over several keys and TTLs, client/cli/listing.py ``scan`` and ``watch``).

Keys (and prefixes) are read and printed in one escaping scheme (client/cli/text.py), or in hex
with ``--hex``; ``--json`` prints one JSON object per result line instead of text, its keys and
values in the same scheme. Exit codes are those of client/cli/common.py (3: not found).
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

import click

from client.cli.common import EXIT_NOT_FOUND, connect, timeout_option, url_option
from client.cli.keyargs import Keys, echo_json, errors, hex_option, interrupt, json_option, ttl_option
from client.cli.progress import Progress, file_size
from client.cli.text import escape
from protocol.limits import MAX_SCAN_LIMIT

EXIT_INTERRUPTED = 130  # the shell's code for a command ended by SIGINT


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
    with connect(url, timeout) as c, errors():
        if file_ is None:
            version = c.put(k, value.encode("utf-8", errors="surrogateescape"),  # type: ignore[union-attr]
                            ttl=ttl, if_version=if_version, if_absent=if_absent)
        else:
            with Progress(file_size(file_), "put") as bar:
                version = c.put_stream(k, file_, ttl=ttl, if_version=if_version, if_absent=if_absent,
                                       progress=bar.update)
    if as_json:
        echo_json({"key": keys.show(k), "version": version})
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
        with connect(url, timeout) as c, errors():
            stream = c.get_stream(k)
            if stream is None:
                if as_json:
                    echo_json({"key": keys.show(k), "found": False})
                else:
                    click.echo(f"(not found) {keys.show(k)}", err=True)
                sys.exit(EXIT_NOT_FOUND)
            if version_only:
                if as_json:
                    echo_json({"key": keys.show(k), "found": True, "version": stream.version})
                else:
                    click.echo(str(stream.version))
            elif output is not None:
                _download(stream, output)
                if as_json:
                    echo_json({"key": keys.show(k), "found": True, "version": stream.version,
                                "size": stream.size, "file": str(output)})
            elif as_json:
                echo_json({"key": keys.show(k), "found": True, "version": stream.version,
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
    previous = signal.signal(signal.SIGTERM, interrupt)
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
    with connect(url, timeout) as c, errors():
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
                echo_json({"key": codec.show(k), "deleted": existed})
            elif len(keys) == 1 and not prefix:
                if existed is None:
                    click.echo("deleted (an earlier attempt did it; whether the key existed is unknown)")
                else:
                    click.echo("deleted" if existed else "(not found)")
    if not as_json and (prefix or len(keys) > 1):
        click.echo(f"deleted {sum(found)} keys")
    if not any(found):
        sys.exit(EXIT_NOT_FOUND)
