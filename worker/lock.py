"""One worker per data directory: an exclusive ``flock`` on ``worker.lock`` inside it.

Two workers on one LMDB directory would each register with the broker under the same id and
displace each other every few seconds. The lock is taken before the store is opened and held
for the life of the process (the kernel drops it when the process dies, however it dies). The
file says who holds it: the pid of the serving process on its first line (what to ``kill`` for
a crash demo), and ``supervisor PID`` when ``zkv worker --supervise`` runs it.
"""

from __future__ import annotations

import fcntl
import os

LOCK_NAME = "worker.lock"


class DataDirInUse(Exception):
    def __init__(self, path: str, holder: str) -> None:
        super().__init__(f"data directory {path} is in use by {holder}: stop it first, or give another --data")
        self.path, self.holder = path, holder


class DataLock:
    """The lock of one data directory, held while this object lives (and its fd stays open: a
    forked child shares it, so a supervised worker keeps the directory locked across restarts)."""

    def __init__(self, data_dir: str) -> None:
        os.makedirs(data_dir, exist_ok=True)
        self.path = os.path.join(data_dir, LOCK_NAME)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(fd)
            os.close(fd)
            raise DataDirInUse(data_dir, holder) from None
        self.fd = fd

    def record(self, pid: int, supervisor: int | None = None) -> None:
        """Write who serves from this directory. The new text is written over the old, then the
        file cut to its length: a reader (``head -1 worker.lock``) always finds a whole first
        line. Truncating first left the file empty for a moment, and a reader then found no pid
        (the honcho test read it so, once, while the supervisor restarted a crashed worker)."""
        data = (f"{pid}\n" + (f"supervisor {supervisor}\n" if supervisor is not None else "")).encode()
        os.pwrite(self.fd, data, 0)
        os.ftruncate(self.fd, len(data))

    def release(self) -> None:
        os.close(self.fd)


def _describe(fd: int) -> str:
    lines = os.pread(fd, 256, 0).decode(errors="replace").split()
    if not lines or not lines[0].isdigit():
        return "another process"
    holder = f"zkv worker pid {lines[0]}"
    if len(lines) >= 3 and lines[1] == "supervisor":
        holder += f" (supervised by pid {lines[2]})"
    return holder
