"""``zkv backup FILE`` and ``zkv restore FILE``: an online backup of every slot, each a consistent
cut (``Client.dump_slot``), and its restore into an empty cluster through the ordinary writes.

The file (docs/operations.md, "Backup and restore"): MAGIC, then records ``tag (1 byte), length
(4 bytes, big endian), body``, then the SHA-256 of everything before it (32 bytes):

- ``H`` header (msgpack map): format, the broker's clock when the backup began, cluster facts;
- per slot ``S`` [slot, epoch, seq] (the cut), its keys, ``E`` [slot, keys, value bytes];
- a key: ``V`` [key, version, expire_at, value], or a streamed value ``B`` [key, version,
  expire_at, size, chunks] followed by that many ``C`` records (raw chunk bytes);
- ``T`` trailer (msgpack map): slots, keys, streamed values, value bytes.

Both sides stream: the backup writes each part as it arrives; the restore checks the checksum in
one pass, then loads in a second, a streamed value straight from the file into ``put_stream``.
"""

from __future__ import annotations

import hashlib
import io
import os
import struct
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import click

from client.cli.common import ZkvCommandError, connect, timeout_option, url_option
from client.client import Client
from client.commands import DumpEntry, SlotCut
from protocol.errors import ZkvError
from protocol.frames import pack, unpack
from protocol.limits import MAX_KEYS_PER_REQUEST

MAGIC = b"ZKV-BACKUP\n"
FORMAT = 1
RECORD = struct.Struct(">cI")  # tag, body length
DIGEST = 32  # SHA-256
SLOT_ATTEMPTS = 5  # a slot whose dump breaks off (its replica was lost, a move) is dumped again
MSET_BYTES = 1 << 20  # restore: keys without a TTL go in msets of about this many value bytes


# -- writing -----------------------------------------------------------------------------------


@dataclass
class Counts:
    slots: int = 0
    keys: int = 0
    streamed: int = 0
    bytes: int = 0


class BackupWriter:
    """Records appended to ``f`` with a running SHA-256; ``mark``/``rewind`` undo a slot whose
    dump broke off (the file is truncated back, the hash restored)."""

    def __init__(self, f: BinaryIO, header: dict[str, Any]) -> None:
        self.f, self.sha, self.counts = f, hashlib.sha256(), Counts()
        self._write(MAGIC)
        self.record(b"H", pack(header))

    def _write(self, data: bytes) -> None:
        self.f.write(data)
        self.sha.update(data)

    def record(self, tag: bytes, body: bytes) -> None:
        self._write(RECORD.pack(tag, len(body)))
        self._write(body)

    def mark(self) -> tuple[int, Any, Counts]:
        return self.f.tell(), self.sha.copy(), Counts(**vars(self.counts))

    def rewind(self, mark: tuple[int, Any, Counts]) -> None:
        offset, self.sha, self.counts = mark
        self.f.seek(offset)
        self.f.truncate()

    def slot(self, items: Iterator[SlotCut | DumpEntry | bytes]) -> None:
        """One slot's dump, as ``Client.dump_slot`` yields it."""
        keys = size = 0
        cut: SlotCut | None = None
        for item in items:
            if isinstance(item, SlotCut):
                cut = item
                self.record(b"S", pack([item.slot, item.epoch, item.seq]))
            elif isinstance(item, DumpEntry):
                keys += 1
                if item.chunks:
                    self.counts.streamed += 1
                    size += item.size
                    self.record(b"B", pack([item.key, item.version, item.expire_at, item.size, item.chunks]))
                else:
                    size += len(item.value)
                    self.record(b"V", pack([item.key, item.version, item.expire_at, item.value]))
            else:
                self.record(b"C", item)
        assert cut is not None
        self.record(b"E", pack([cut.slot, keys, size]))
        self.counts.slots += 1
        self.counts.keys += keys
        self.counts.bytes += size

    def finish(self) -> bytes:
        self.record(b"T", pack(vars(self.counts)))
        digest = self.sha.digest()
        self.f.write(digest)
        return digest


@contextmanager
def progress(length: int, label: str) -> Iterator[Callable[[int], None]]:
    """``update(n)``: a progress bar on stderr when it is a terminal, else nothing."""
    if not sys.stderr.isatty():
        yield lambda n: None
        return
    with click.progressbar(length=length, label=label, file=sys.stderr, show_pos=True) as bar:
        yield bar.update


@click.command()
@url_option
@timeout_option
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
def backup(url: str, timeout: float, file: Path) -> None:
    """Write an online backup of the whole cluster to FILE while it serves: every slot is a
    consistent cut (its state at one committed position; slots are cut at different moments).
    The file ends with its SHA-256, which restore checks."""
    started = time.monotonic()
    partial = file.with_name(file.name + ".partial")
    with connect(url, timeout) as c:
        try:
            st = c.status()
            if not st["formed"]:
                raise click.ClickException("the cluster is not formed yet")
            header = {"format": FORMAT, "created_ms": st["now_ms"], "url": url, "slots": st["slots"],
                      "rf": st["rf"], "w": st["w"], "epoch": st["epoch"]}
            with partial.open("wb") as f, progress(st["slots"], "backup") as update:
                w = BackupWriter(f, header)
                for s in range(st["slots"]):
                    _dump_slot(c, w, s)
                    update(1)
                digest = w.finish()
        except ZkvError as e:
            partial.unlink(missing_ok=True)
            raise ZkvCommandError(e) from None
    os.replace(partial, file)
    n = w.counts
    click.echo(f"backup {file}: {n.slots} slots, {n.keys} keys ({n.streamed} streamed), {n.bytes} value bytes, "
               f"{file.stat().st_size} bytes in {time.monotonic() - started:.1f} s; sha256 {digest.hex()}")


def _dump_slot(c: Client, w: BackupWriter, slot: int) -> None:
    for attempt in range(SLOT_ATTEMPTS):
        mark = w.mark()
        try:
            w.slot(c.dump_slot(slot))
            return
        except ZkvError:
            w.rewind(mark)
            if attempt == SLOT_ATTEMPTS - 1:
                raise
            time.sleep(0.2 * (attempt + 1))


# -- reading -----------------------------------------------------------------------------------


class CorruptBackup(click.ClickException):
    pass


def check_file(path: Path) -> bytes:
    """The file's SHA-256, checked against its last 32 bytes (one streamed pass)."""
    size = path.stat().st_size
    if size < len(MAGIC) + DIGEST:
        raise CorruptBackup(f"{path}: too short to be a zkv backup")
    sha = hashlib.sha256()
    with path.open("rb") as f, progress(size, "checking") as update:
        if f.read(len(MAGIC)) != MAGIC:
            raise CorruptBackup(f"{path}: not a zkv backup")
        sha.update(MAGIC)
        left = size - len(MAGIC) - DIGEST
        while left:
            data = f.read(min(left, 1 << 20))
            sha.update(data)
            left -= len(data)
            update(len(data))
        stored = f.read(DIGEST)
    if sha.digest() != stored:
        raise CorruptBackup(f"{path}: checksum mismatch (SHA-256 {sha.hexdigest()}, the file says {stored.hex()}): "
                            "the file is damaged; nothing was restored")
    return stored


class Reader:
    def __init__(self, f: BinaryIO) -> None:
        self.f = f

    def record(self) -> tuple[bytes, bytes]:
        head = self.f.read(RECORD.size)
        if len(head) != RECORD.size:
            raise CorruptBackup("the backup ends in the middle of a record")
        tag, n = RECORD.unpack(head)
        body = self.f.read(n)
        if len(body) != n:
            raise CorruptBackup("the backup ends in the middle of a record")
        return tag, body


class Chunks:
    """A streamed value's ``C`` records as a binary file object for ``put_stream``."""

    def __init__(self, reader: Reader, chunks: int) -> None:
        self.reader, self.left, self.buf = reader, chunks, b""

    def _next(self) -> bytes:
        tag, body = self.reader.record()
        self.left -= 1
        if tag != b"C":
            raise CorruptBackup(f"expected a chunk record, found {tag!r}")
        return body

    def read(self, n: int = -1) -> bytes:
        while not self.buf and self.left:
            self.buf = self._next()
        out, self.buf = (self.buf, b"") if n < 0 else (self.buf[:n], self.buf[n:])
        return out

    def drain(self) -> None:
        """Skip what was not read (a value not restored), so the next record is read next."""
        self.buf = b""
        while self.left:
            self._next()


@dataclass
class Restored:
    keys: int = 0
    streamed: int = 0
    bytes: int = 0
    expired: int = 0
    pending: list[tuple[bytes, bytes]] = field(default_factory=list)  # keys without TTL for the next mset
    pending_bytes: int = 0


@click.command()
@url_option
@timeout_option
@click.option("--force", is_flag=True, help="Restore into a cluster that already holds keys (they are kept or "
                                            "overwritten).")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def restore(url: str, timeout: float, force: bool, file: Path) -> None:
    """Load a backup made by ``zkv backup`` into an empty cluster: values, TTLs (absolute, on the
    broker's clock: keys whose TTL has run out are skipped) and streamed values. The checksum is
    checked first; a damaged file restores nothing."""
    started = time.monotonic()
    check_file(file)
    with connect(url, timeout) as c:
        try:
            st = c.status()
            if not st["formed"]:
                raise click.ClickException("the cluster is not formed yet")
            if not force and c.scan_page(limit=1, values=False).items:
                raise click.ClickException("the cluster is not empty: restore into an empty cluster, or pass --force")
            clock = (st["now_ms"], time.monotonic())  # the broker's clock, moved on by our own
            done = _load(c, file, lambda: clock[0] + int((time.monotonic() - clock[1]) * 1000), st["max_value"])
        except ZkvError as e:
            raise ZkvCommandError(e) from None
    click.echo(f"restored {file}: {done.keys} keys ({done.streamed} streamed), {done.bytes} value bytes in "
               f"{time.monotonic() - started:.1f} s; {done.expired} keys skipped (their TTL had run out)")


def _load(c: Client, path: Path, now_ms: Callable[[], int], max_value: int) -> Restored:
    done = Restored()
    mset_bytes = min(MSET_BYTES, max_value)
    with path.open("rb") as f, progress(path.stat().st_size, "restore") as update:
        f.read(len(MAGIC))
        r = Reader(f)
        tag, body = r.record()
        if tag != b"H" or unpack(body).get("format") != FORMAT:
            raise CorruptBackup(f"{path}: not a format {FORMAT} zkv backup")
        at = f.tell()
        while True:
            tag, body = r.record()
            if tag == b"T":
                break
            if tag in (b"S", b"E"):
                continue
            if tag == b"V":
                key, _version, expire_at, value = unpack(body)
                ttl = _ttl(expire_at, now_ms())
                if ttl == 0:
                    done.expired += 1
                elif ttl is None and len(value) <= mset_bytes:
                    done.pending.append((key, value))
                    done.pending_bytes += len(value)
                    if len(done.pending) >= MAX_KEYS_PER_REQUEST or done.pending_bytes >= mset_bytes:
                        _flush(c, done)
                elif len(value) <= max_value:
                    c.put(key, value, ttl=ttl)
                else:  # this cluster's --max-value is smaller than the source's
                    c.put_stream(key, io.BytesIO(value), ttl=ttl)
                if ttl != 0:
                    done.keys += 1
                    done.bytes += len(value)
            elif tag == b"B":
                key, _version, expire_at, size, chunks = unpack(body)
                ttl = _ttl(expire_at, now_ms())
                reader = Chunks(r, chunks)
                if ttl == 0:
                    reader.drain()
                    done.expired += 1
                else:
                    c.put_stream(key, reader, ttl=ttl)  # type: ignore[arg-type]
                    reader.drain()
                    done.keys += 1
                    done.streamed += 1
                    done.bytes += size
            else:
                raise CorruptBackup(f"unexpected record {tag!r}")
            update(f.tell() - at)
            at = f.tell()
        _flush(c, done)
    return done


def _ttl(expire_at: int, now: int) -> int | None:
    """The TTL to write (ms), None for no TTL, 0 when it has run out."""
    if not expire_at:
        return None
    return max(0, expire_at - now)


def _flush(c: Client, done: Restored) -> None:
    if done.pending:
        c.mset(done.pending)
        done.pending, done.pending_bytes = [], 0
