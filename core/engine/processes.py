"""Worker processes that die with the run: parent-death signal, pool teardown, worker count.

A ``kill -9`` of the ``fedcore run`` process cannot run any clean-up code, so every
process it starts asks the kernel to kill it when its parent dies
(``PR_SET_PDEATHSIG`` on Linux) and, in case the parent died before that request,
checks that its parent is still the one that started it. Nothing a worker would
write after the main process died (rounds, checkpoints, ledger entries) is written.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
from concurrent.futures import ProcessPoolExecutor
from typing import Any

_PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int | None = None) -> None:
    """Make the kernel SIGKILL this process when its parent exits (Linux; elsewhere a no-op).

    :param parent_pid: the pid that started this process; when the current parent is
        another one, the starter already died and this process exits at once.
    """
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except OSError:  # no libc to call: fall back on the parent check alone
            pass
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(1)


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity where the OS has one, else every CPU)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def stop_pool(pool: ProcessPoolExecutor) -> None:
    """Kill a pool's workers now (an interrupted or failed run must not go on training)."""
    processes: dict[int, Any] = dict(getattr(pool, "_processes", None) or {})  # shutdown forgets them
    pool.shutdown(wait=False, cancel_futures=True)
    for process in list(processes.values()):
        try:
            process.kill()
        except (OSError, ValueError, AttributeError):
            pass
    for process in list(processes.values()):
        try:
            process.join(timeout=5)
        except (OSError, ValueError, AttributeError, AssertionError):
            pass


#: rough seconds of one process start (spawn, import torch and fedcore) on a laptop core
_START_COST_UNITS = 40_000_000


def default_workers(n_units: int, work: float, cpus: int | None = None) -> int:
    """Worker processes for ``n_units`` independent trainings totalling ``work`` row-epochs.

    A worker costs a process start (spawning and importing torch: a few seconds), so
    extra workers only pay off when each gets enough work to hide that cost: one
    worker per :data:`_START_COST_UNITS` row-epochs of work, at most one per CPU core
    and per unit, at least one. ``work`` counts training rows × epochs (× 2 under DP).
    """
    cpus = cpus or os.cpu_count() or 1
    by_work = int(work // _START_COST_UNITS)
    return max(1, min(n_units, cpus, by_work))
