"""Online distillation (paper A's fourth experiment): a student following a teacher that is still
training (`student drive follow=true`), beside that teacher, over the teacher's env steps.

`online_report` reads the two runs' files only: the student's summary.json (its periodic
evaluations, each with the teacher's env steps when it was taken) and the teacher run's
metrics.jsonl (its periodic evaluations), and writes online-<suite>-<Game>.json and .png.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from multitask.errors import UserError
from multitask.files import atomic_write_text


def teacher_curve(teacher_run: Path, game: str) -> dict[str, list]:
    """eval/<game>/score against env_steps from a teacher run's metrics.jsonl: its periodic
    evaluations (torn lines skipped; a second score at one step, the check of the last weights
    before the teacher is saved, is left out)."""
    path = Path(teacher_run) / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{teacher_run} has no metrics.jsonl; pass the teacher's run folder (runs/teacher/<run>)")
    steps, scores = [], []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if f"eval/{game}/score" in row and (not steps or row["env_steps"] != steps[-1]):
            steps.append(row["env_steps"])
            scores.append(row[f"eval/{game}/score"])
    return {"env_steps": steps, "scores": scores}


def student_curve(student_run: Path, game: str) -> dict[str, list]:
    """The student's periodic scores against the followed teacher run's env steps at the time
    (`teacher_run_steps`: what the teacher run had logged), with the env steps of the snapshot it
    was distilling from (`teacher_env_steps`: its best so far, which stays put while the teacher
    does not improve). A run that did not record the former but kept pace 1 is placed at its own
    labels, which trail the teacher's steps by at most follow_every plus the teacher's log_every
    once the student has caught up (training/following.py)."""
    path = Path(student_run) / "summary.json"
    if not path.is_file():
        raise UserError(f"{student_run} has no summary.json; pass a finished `student drive follow=true` run folder")
    summary = json.loads(path.read_text())
    config = summary.get("config", {})
    if not config.get("follow"):
        raise UserError(f"{student_run} did not follow a training teacher (follow = false)")
    points = [h for h in summary["history"] if (h.get("teacher_env_steps") or {}).get(game) is not None]
    if all(game in (h.get("teacher_run_steps") or {}) for h in points):
        x, axis = [h["teacher_run_steps"][game] for h in points], "teacher run's env steps at each evaluation"
    elif config.get("follow_pace") == 1:
        x, axis = [h["env_steps"] for h in points], "student's labels, paced at one per teacher env step"
    else:
        raise UserError(f"{student_run} recorded no teacher progress and did not keep pace 1 (follow_pace); "
                        f"rerun it to plot it against the teacher's training")
    return {"env_steps": x, "x_axis": axis, "teacher_env_steps": [h["teacher_env_steps"][game] for h in points],
            "student_env_steps": [h["env_steps"] for h in points], "scores": [h["scores"][game] for h in points]}


def online_report(student_run: Path, teacher_run: Path, out: Path) -> dict[str, Any]:
    from multitask.evaluation import plots

    summary = json.loads((Path(student_run) / "summary.json").read_text()) if (Path(student_run) / "summary.json").is_file() else {}
    games = summary.get("config", {}).get("games") or []
    if len(games) != 1:
        raise UserError(f"{student_run} is not a finished single-game student-driven run")
    game = games[0]
    report = {"format": "multitask-online", "game": game, "student_run": str(student_run),
              "teacher_run": str(teacher_run), "student": student_curve(student_run, game),
              "teacher": teacher_curve(teacher_run, game)}
    out = Path(out)
    name = f"online-{game.replace('/', '-')}"
    report["plot"] = plots.online_distillation(report, out / f"{name}.png")
    atomic_write_text(out / f"{name}.json", json.dumps(report, indent=2) + "\n")
    return report
