"""One job per game, on this machine or a cluster: the only module that imports submitit.

`processes` (the default) runs the jobs in local processes, `workers` at a time. `local` and
`slurm` hand each job to submitit (Facebook Research's job launcher, the norm for RL research on
Slurm clusters): `local` runs them as subprocesses through submitit's local executor (what the tests
use), `slurm` submits one Slurm job each, with the resources of `JobResources`. Logs of submitit
jobs go to <folder>/<job id>_*.{out,err}. A job's UserError comes back as the job's error; `run_jobs`
raises once every job has finished, naming each job that failed.

An interrupt stops every job of `processes`: Ctrl-C (the caller's KeyboardInterrupt) or a SIGTERM
sends each worker one SIGTERM, which the running job takes as a KeyboardInterrupt (a dataset build
stops as after Ctrl-C: its writer ends its flush in flight, `--resume` continues the file), and a
worker still alive STOP_SECONDS later is killed (a build killed anywhere leaves a valid file too).
The workers ignore Ctrl-C themselves (the parent decides, so no job is interrupted twice), run no
queued job once stopped, and die with the parent (Linux PR_SET_PDEATHSIG): none is ever left behind.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

from multitask.errors import UserError

Executor = Literal["processes", "local", "slurm"]
EXECUTORS = ("processes", "local", "slurm")
STOP_SECONDS = 5.0  # an interrupted job's time to stop at a durable point before its worker is killed
_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


@dataclass(frozen=True)
class JobResources:
    """What one job asks a Slurm cluster for (ignored by `processes`)."""
    timeout_min: int = 240
    cpus_per_task: int = 2
    gpus_per_node: int = 0
    mem_gb: int = 16
    partition: str = ""


def check_executor(executor: str) -> None:
    """Refuse an executor this machine cannot run, in one sentence, before any work: submitit's Slurm
    executor raises 'Could not detect "srun"' off a cluster, and it submits with sbatch."""
    if executor not in EXECUTORS:
        raise UserError(f"unknown executor {executor!r}; use one of {', '.join(EXECUTORS)}")
    if executor == "slurm":
        missing = [tool for tool in ("sbatch", "srun") if shutil.which(tool) is None]
        if missing:
            raise UserError(f"the slurm executor needs a Slurm cluster ({' and '.join(missing)} not on "
                            f"PATH); use --executor processes or local on this machine")


def run_jobs(fn: Callable[[Any], Any], jobs: Sequence[Any], names: Sequence[str], executor: Executor = "processes",
             workers: int = 2, folder: Path = Path("runs/jobs"), resources: JobResources = JobResources()) -> list[Any]:
    """fn(job) for every job, in order of `jobs`; raises a UserError naming every failed job (a job's
    own bug is raised as it is, with a note naming its job). Call it from the main thread: Ctrl-C
    stops `processes` jobs only there (their workers leave Ctrl-C to the caller)."""
    check_executor(executor)
    if executor == "processes":
        return _in_processes(fn, jobs, names, workers)
    try:
        import submitit
    except ImportError:
        raise UserError(f"--executor {executor} needs submitit: pip install submitit") from None
    if executor == "local":
        ex = submitit.LocalExecutor(folder=str(folder))
        ex.update_parameters(timeout_min=resources.timeout_min)
    else:
        ex = submitit.AutoExecutor(folder=str(folder), cluster="slurm")
        params = {"timeout_min": resources.timeout_min, "cpus_per_task": resources.cpus_per_task,
                  "gpus_per_node": resources.gpus_per_node, "mem_gb": resources.mem_gb}
        if resources.partition:
            params["slurm_partition"] = resources.partition
        ex.update_parameters(**params)
    submitted = [ex.submit(fn, job) for job in jobs]
    results, errors = [], []
    for name, job in zip(names, submitted):
        try:
            results.append(job.result())
        except Exception as e:  # a job's failure, with the job's own message: submitit wraps it
            errors.append(f"{name}: {_last_line(e)} (log: {job.paths.stderr})")
    if errors:
        raise UserError("; ".join(errors))
    return results


def _in_processes(fn: Callable[[Any], Any], jobs: Sequence[Any], names: Sequence[str], workers: int) -> list[Any]:
    if len(jobs) == 1:
        return [fn(jobs[0])]
    ctx = multiprocessing.get_context("spawn")
    results, errors, failure = [], [], None
    with sigterm_raises():
        pool = ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=ctx,
                                   initializer=_worker_started, initargs=(os.getpid(),))
        try:
            # The workers are spawned here, and start with Ctrl-C and SIGTERM blocked (the mask is
            # inherited): one that comes before their initializer handles them waits for it. (The mask
            # is this thread's: in the parent, an interrupt taken by another thread still raises here;
            # a worker started meanwhile is then not signalled by _stop_pool but dies with the parent.)
            with _signals_blocked():
                futures = [(name, pool.submit(_run_job, fn, job)) for name, job in zip(names, jobs)]
            for name, fut in futures:
                try:
                    results.append(fut.result())
                except UserError as e:
                    errors.append(f"{name}: {e}")
                except BrokenProcessPool as e:  # a worker died (killed, out of memory, a crash)
                    failure = failure or e
                    errors.append(f"{name}: not finished, a job process died (killed, out of memory or crashed)")
                except Exception as e:  # a bug: raised, naming its job, once the other jobs have finished
                    _note(e, f"in the job for {name}")
                    failure = failure or e
            pool.shutdown()
        except BaseException:  # Ctrl-C, SIGTERM (Terminated), a job's own interrupt
            _stop_pool(pool)
            raise
    if failure is not None and not isinstance(failure, BrokenProcessPool):
        if errors:
            _note(failure, "other jobs failed too: " + "; ".join(errors))
        raise failure
    if errors:
        raise UserError("; ".join(errors))
    return results


def _note(error: BaseException, text: str) -> None:
    """Add `text` to the error's traceback (Python 3.11's add_note; 3.10 goes without)."""
    if hasattr(error, "add_note"):
        error.add_note(text)


class Terminated(BaseException):
    """SIGTERM, under `sigterm_raises`: stops what the process started as Ctrl-C does."""


@contextmanager
def sigterm_raises():
    """Within, SIGTERM raises Terminated, once, so that the process stops what it started (a pool's
    workers, the pipeline's stage) and then exits with 143, as SIGTERM's default would, instead of
    dying on the spot and leaving its children to die mid-write or to run on. Only where SIGTERM
    has its default handler, in the main thread."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL):
        yield
        return

    def terminated(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: the stop that follows is bounded
        raise Terminated

    signal.signal(signal.SIGTERM, terminated)
    try:
        yield
    except Terminated:
        print("multitask: terminated", file=sys.stderr)
        raise SystemExit(128 + signal.SIGTERM) from None
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextmanager
def _signals_blocked():
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)  # one that came meanwhile is raised here


def _stop_pool(pool: ProcessPoolExecutor, timeout: float | None = None) -> None:
    """Cancel the queued jobs, ask each worker to stop its job (one SIGTERM), kill any still alive
    `timeout` seconds later. Interrupts that come meanwhile are ignored: the stop is bounded."""
    timeout = STOP_SECONDS if timeout is None else timeout
    procs = list((pool._processes or {}).values())  # noqa: SLF001 - the pool has no public handle on them
    main = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in _STOP_SIGNALS} if main else {}
    try:
        pool.shutdown(wait=False, cancel_futures=True)
        for p in procs:
            _signal(p, signal.SIGTERM)
        # A worker's sentinel says that it ended: the pool's own thread reaps the workers too, so
        # join() and exitcode may not see an end it saw first.
        running = {p.sentinel: p for p in procs}
        deadline = time.monotonic() + timeout
        while running and time.monotonic() < deadline:
            for ended in multiprocessing.connection.wait(list(running), max(0.0, deadline - time.monotonic())):
                del running[ended]
        if running:
            for p in running.values():
                _signal(p, signal.SIGKILL)
            multiprocessing.connection.wait(list(running), 10.0)
            print(f"multitask: killed {len(running)} job process(es) that had not stopped {timeout:g} s after the "
                  f"interrupt", file=sys.stderr)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _signal(proc, signum: int) -> None:
    try:
        os.kill(proc.pid, signum)
    except ProcessLookupError:  # ended and reaped
        pass


# ---- in a worker ---------------------------------------------------------------------------------
_worker_pid = 0
_job_running = False
_stop_asked = False


def _worker_started(parent: int) -> None:
    """The pool's initializer: ignore Ctrl-C (the parent decides), take SIGTERM as 'stop the job',
    die with the parent; then let the signals blocked since the spawn in."""
    from multitask.data.processes import become_helper  # light: no torch

    global _worker_pid
    _worker_pid = os.getpid()
    signal.signal(signal.SIGTERM, _stop_job)
    alive = become_helper(parent)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    if not alive:
        os._exit(1)


def _stop_job(signum, frame) -> None:
    global _stop_asked
    if os.getpid() != _worker_pid:  # a helper the job forked (it inherits handlers): SIGTERM's default
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
        return
    if _stop_asked:
        return
    _stop_asked = True
    if _job_running:
        raise KeyboardInterrupt  # the job stops as after Ctrl-C


def _run_job(fn: Callable[[Any], Any], job: Any) -> Any:
    global _job_running
    _job_running = True
    try:
        if _stop_asked:  # a job queued before the stop: not started
            raise KeyboardInterrupt
        return fn(job)
    finally:
        _job_running = False


def _last_line(error: Exception) -> str:
    """The job's own error message: submitit re-raises a job's exception with its traceback as text."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    last = lines[-1] if lines else type(error).__name__
    return last.split("UserError: ", 1)[-1]
