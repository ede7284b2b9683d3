"""Progress of a large transfer on a terminal: bytes, rate and ETA on stderr."""

from __future__ import annotations

import os
import stat
import sys
import time
from collections.abc import Callable
from typing import Any

import click

from client.cli.cluster import _human_bytes

# -- progress ------------------------------------------------------------------------------------


PROGRESS_MIN_BYTES = 8 << 20  # smaller transfers of a known size show no progress


def file_size(f: Any) -> int | None:
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
