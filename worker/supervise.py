"""``zkv worker --supervise``: the worker restarts its own serving process after a crash.

A process manager such as honcho stops every process when one exits, so a crashed worker would
take the quickstart cluster down with it. The supervisor forks the serving process (which does
all the work; the supervisor opens no socket and no LMDB) and:

- restarts it when it dies of a crash (a signal such as SIGKILL, or a non-zero exit), after a
  backoff that grows while it keeps crashing at once;
- leaves it stopped, and stays up itself, when it exits cleanly (``kill PID`` of the serving
  process: the README's "drain, stop it, remove" while honcho keeps the other processes);
- stops it and exits when the supervisor itself gets SIGTERM or SIGINT.

The data directory's lock (worker/lock.py) is taken by the supervisor before the first fork and
shared by every serving process it forks, so no other worker can take the directory in between.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import time
from collections.abc import Callable

import structlog

from worker.lock import DataLock

log = structlog.get_logger("zkv.worker")

RESTART_FIRST, RESTART_MAX = 0.5, 10.0  # s before a restart, doubling while crashes come quickly
HEALTHY_AFTER = 30.0  # s: a serving process that ran this long resets the backoff
PR_SET_PDEATHSIG = 1


class Supervisor:
    def __init__(self, serve: Callable[[], None], lock: DataLock) -> None:
        self.serve = serve
        self.lock = lock
        self.child: int | None = None
        self.stopping = False

    def run(self) -> int:
        """Until SIGTERM/SIGINT; returns the exit code (the last serving process's, 0 if none ran)."""
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        delay, code = RESTART_FIRST, 0
        while not self.stopping:
            started = time.monotonic()
            self.child = self._fork()
            if self.stopping:  # the signal came before the child was known: forward it now
                os.kill(self.child, signal.SIGTERM)
            log.info("serving_process_started", pid=self.child, supervisor=os.getpid())
            status = _wait(self.child)  # interrupted by our signal handlers, then resumed (PEP 475)
            self.child = None
            code = os.waitstatus_to_exitcode(status)
            if self.stopping:
                break
            if code == 0:
                log.info("serving_process_stopped_not_restarting",
                         hint="it exited cleanly; SIGTERM the supervisor to end it")
                self._pause()
                break
            if time.monotonic() - started >= HEALTHY_AFTER:
                delay = RESTART_FIRST
            how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
            log.warning("serving_process_crashed_restarting", died_of=how, restart_in_s=delay)
            self._sleep(delay)
            delay = min(delay * 2, RESTART_MAX)
        log.info("supervisor_stopped", code=code)
        return max(code, 0)

    def _fork(self) -> int:
        sys.stdout.flush()
        sys.stderr.flush()
        parent = os.getpid()
        pid = os.fork()
        if pid:
            return pid
        code = 1
        try:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            _die_with_parent(parent)
            self.lock.record(os.getpid(), supervisor=parent)
            self.serve()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:
            log.exception("serving_process_failed")
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)  # never return into the supervisor's code (click, atexit handlers)

    def _on_signal(self, signum: int, frame: object) -> None:
        self.stopping = True
        if self.child is not None:
            try:
                os.kill(self.child, signum)
            except ProcessLookupError:
                pass

    def _sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self.stopping and time.monotonic() < deadline:
            time.sleep(0.05)

    def _pause(self) -> None:
        while not self.stopping:
            signal.pause()


def _wait(pid: int) -> int:
    return os.waitpid(pid, 0)[1]


def _die_with_parent(parent: int) -> None:
    """SIGTERM this process when the supervisor dies (even by SIGKILL), so that no serving
    process is left behind holding the data directory (Linux; elsewhere a no-op)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the supervisor died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)
