"""Helper processes that live and die with the process that started them.

The recorder runs its dataset writer and all but one of its lanes (`lanes`: envs played by the
teacher) in forked children, so that compression, HDF5 writes and the lanes' play use all the
cores. A child must never outlive its parent: a build killed with SIGKILL would otherwise leave a
writer that races the `--resume` that follows. Linux's
PR_SET_PDEATHSIG does exactly that; elsewhere `background_supported()` is false and callers stay
in-process. A child asked to stop is given a while to finish, then killed (`stop_process`).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys


def background_supported() -> bool:
    return sys.platform == "linux"


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
