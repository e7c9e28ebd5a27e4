"""Online distillation (paper A's fourth experiment): a student that follows a teacher still training.

A teacher run publishes its best evaluation so far as runs/teacher/<run>/best.pt; `student drive
follow=true` waits for that file, reloads it whenever it changes (`Driven.follow_teachers`) and,
with `follow_pace`, keeps its own label count in step with the env steps the teacher run has
logged, so that the student's learning curve spans the teacher's training rather than racing ahead
of it (measured on one core: a MinAtar student labels 200,000 steps in 110-150 s, runs/driven/*;
its teacher trains at ~800 env steps/s, teachers/minatar/MANIFEST.md)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from multitask import config as configlib
from multitask.errors import UserError

FOLLOW_WAIT_SECONDS = 3600  # how long a following student waits for a teacher run's first best.pt or progress
PACE_POLL_SECONDS = 2.0  # a MinAtar teacher logs every 10,000 env steps, ~10 s apart on one core


def wait_for_teachers(paths: list[Path]) -> None:
    """Following a teacher still training: wait until every teacher has published a checkpoint."""
    deadline = time.monotonic() + FOLLOW_WAIT_SECONDS
    missing = [p for p in paths if not p.is_file()]
    if missing:
        print(f"waiting for {', '.join(map(str, missing))} (a teacher run writes best.pt at its first evaluation)",
              file=sys.stderr)
    while missing and time.monotonic() < deadline:
        time.sleep(5)
        missing = [p for p in paths if not p.is_file()]
    if missing:
        raise UserError(f"no teacher at {', '.join(map(str, missing))} after {FOLLOW_WAIT_SECONDS // 60} minutes")


def teacher_run_progress(run_folder: Path) -> tuple[int, int | None]:
    """(env steps a teacher run has logged, its total_steps): the last line of its metrics.jsonl that
    parses and its config.toml; (0, None) before it has written them."""
    steps, total = 0, None
    try:
        total = int(configlib.read_toml(run_folder / "config.toml")["total_steps"])
    except (UserError, ValueError, KeyError):  # not written yet, or being written
        pass
    try:
        lines = (run_folder / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return steps, total
    for line in reversed(lines):
        try:
            steps = int(json.loads(line)["env_steps"])
            break
        except (ValueError, KeyError, TypeError):
            continue  # a line being written, or one without env steps
    return steps, total


def keep_pace(learner: Any) -> None:
    """Following with follow_pace > 0: wait until every teacher run has logged at least
    env_steps / follow_pace env steps, or has finished. Refused with one sentence when a teacher
    run makes no progress for FOLLOW_WAIT_SECONDS (stopped: rerun both to continue)."""
    cfg = learner.cfg
    if not (cfg.follow and cfg.follow_pace):
        return
    needed = learner.env_steps / cfg.follow_pace
    for path in learner.teacher_paths:
        last, since = None, time.monotonic()
        while True:
            steps, total = teacher_run_progress(path.parent)
            if steps >= needed or (total is not None and steps >= total):
                break
            if steps != last:
                last, since = steps, time.monotonic()
            elif time.monotonic() - since > FOLLOW_WAIT_SECONDS:
                raise UserError(f"the teacher run {path.parent} logged no progress for {FOLLOW_WAIT_SECONDS // 60} "
                                f"minutes (at {steps:,} env steps); start it again, then this command, to continue")
            time.sleep(PACE_POLL_SECONDS)
