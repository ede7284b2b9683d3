"""Settings of the long-running zkv processes (broker, workers)."""

from __future__ import annotations

import faulthandler
import gc
import signal

# The broker keeps ~100,000 recent requests for de-duplication and turns them over constantly;
# with CPython's default thresholds (700, 10, 10) the cyclic collector ran often enough over
# that live set to take ~10% of the broker's CPU under load (py-spy, bench/profiles). Nothing
# zkv keeps forms reference cycles in the hot path; collect far less often.
GC_THRESHOLDS = (50_000, 20, 20)


def tune_gc() -> None:
    """Call once after start-up: what exists then is never collected again (gc.freeze)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def dump_stacks_on_sigusr1() -> None:
    """``kill -USR1 PID`` writes every thread's stack to the process's stderr (its log): what a
    process that stopped answering is doing, without stopping it (docs/operations.md)."""
    faulthandler.register(signal.SIGUSR1, all_threads=True)
