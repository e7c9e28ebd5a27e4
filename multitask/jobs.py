"""One job per game, on this machine or a cluster: the only module that imports submitit.

`processes` (the default) runs the jobs in local processes, `workers` at a time. `local` and
`slurm` hand each job to submitit (Facebook Research's job launcher, the norm for RL research on
Slurm clusters): `local` runs them as subprocesses through submitit's local executor (what the tests
use), `slurm` submits one Slurm job each, with the resources of `JobResources`. Logs of submitit
jobs go to <folder>/<job id>_*.{out,err}. A job's UserError comes back as the job's error; `run_jobs`
raises once every job has finished, naming each job that failed.
"""

from __future__ import annotations

import multiprocessing
import shutil
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

from multitask.errors import UserError

Executor = Literal["processes", "local", "slurm"]
EXECUTORS = ("processes", "local", "slurm")


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
    """fn(job) for every job, in order of `jobs`; raises a UserError naming every failed job."""
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
    results, errors = [], []
    with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=ctx) as pool:
        futures = [(name, pool.submit(fn, job)) for name, job in zip(names, jobs)]
        for name, fut in futures:
            try:
                results.append(fut.result())
            except UserError as e:
                errors.append(f"{name}: {e}")
    if errors:
        raise UserError("; ".join(errors))
    return results


def _last_line(error: Exception) -> str:
    """The job's own error message: submitit re-raises a job's exception with its traceback as text."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    last = lines[-1] if lines else type(error).__name__
    return last.split("UserError: ", 1)[-1]
