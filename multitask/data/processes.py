"""Helper processes that live and die with the process that started them.

The recorder runs its dataset writer and all but one of its lanes (`lanes`: envs played by the
teacher) in forked children, so that compression, HDF5 writes and the lanes' play use all the
cores. A child must never outlive its parent: a build killed with SIGKILL would otherwise leave a
writer that races the `--resume` that follows. Linux's
PR_SET_PDEATHSIG does exactly that; elsewhere `background_supported()` is false and callers stay
in-process. A child asked to stop is given a while to finish, then killed (`stop_process`).
Processes that hand work to each other through counters in shared memory wait for them with
`wait_until` (the lanes and the teacher's inference server; `lanes` says why no system call).
"""

from __future__ import annotations

import multiprocessing
import os
import platform
import signal
import sys
import time
from typing import Callable

SPIN_SECONDS = 200e-6  # yield-spin this long before napping: covers MinAtar's gaps between turns
NAP_SECONDS = 50e-6


def background_supported() -> bool:
    return sys.platform == "linux"


def shared_counters_supported() -> bool:
    """Whether processes may hand work over through plain stores in shared memory: x86-64 keeps
    stores in order (a slot's data is visible before its counter), and children die with the parent."""
    return background_supported() and platform.machine() in ("x86_64", "AMD64")


def fork_context():
    """Fork: the child starts in milliseconds with the parent's imports (spawn re-imports MinAtar's
    seaborn/scipy, several seconds)."""
    return multiprocessing.get_context("fork")


def become_helper(parent: int) -> bool:
    """Call first in a child: ignore Ctrl-C (the parent decides), die with the parent.

    Returns False if the parent is already gone.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    return os.getppid() == parent


def stop_process(proc, timeout: float) -> None:
    """Wait up to `timeout` seconds for a child asked to stop, then kill it: none is left behind."""
    proc.join(timeout=timeout)
    if proc.is_alive():
        proc.kill()
        proc.join()


def wait_until(ready: Callable[[], bool], alive: Callable[[], bool]) -> bool:
    """Poll `ready`: yield-spin for SPIN_SECONDS, then nap; False as soon as `alive` is not."""
    start, naps = time.perf_counter(), 0
    while not ready():
        if time.perf_counter() - start < SPIN_SECONDS:
            os.sched_yield()
            continue
        time.sleep(NAP_SECONDS)
        naps += 1
        if naps % 256 == 0 and not alive():
            return False
    return True
