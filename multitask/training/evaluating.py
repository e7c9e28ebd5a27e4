"""Evaluations of an online learner (the multi-task DQN, the student-driven student) during and
after training, counted in env steps per game.

A learner exposes: `cfg` (seed, run_name, eval_episodes, final_eval_episodes, eval_workers),
`net`, `device`, `spec`, `games`, `teacher_scores` (from the teachers' cards), `history`, `best`
({"score", "env_steps"}), `env_steps`, `updates`, `counts` and `card(run, scores)`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from multitask.agents.checkpoints import load_agent
from multitask.evaluation.report import run_table
from multitask.training.run import Run
from multitask.training.scoring import (FINAL_EVAL_SEED, PERIODIC_EVAL_SEED, measured_teacher_scores, score_games,
                                        teacher_files)
from multitask.training.teacher import EVAL_SEED_STRIDE  # periodic evaluation j: seeds from seed + 10,000 + 100 j


def periodic_evaluation(learner: Any, run: Run, kind: str) -> None:
    """A periodic evaluation (the last at the final step): logged, printed, added to the learning
    curve; best.pt (agent kind `kind`) if its selection score is the best so far."""
    cfg = learner.cfg
    seed = cfg.seed + PERIODIC_EVAL_SEED + EVAL_SEED_STRIDE * len(learner.history)
    scores = score_games(learner.net, learner.spec.games, cfg.eval_episodes, seed, cfg.eval_workers,
                         learner.teacher_scores, learner.device)
    extra = learner.curve_extra() if hasattr(learner, "curve_extra") else {}
    learner.history.append({"env_steps": learner.env_steps, **scores.curve_point(), **extra})
    run.report_evaluation(scores.metrics(), scores.line(), learner.env_steps)
    if scores.selection_score >= learner.best["score"]:
        learner.best = {"score": scores.selection_score, "env_steps": learner.env_steps}
        run.save_agent("best", learner.net, kind, learner.card(run, scores))


def final_evaluation(learner: Any, run: Run, teachers: list[Path], kind: str, summary_kind: str, label: str) -> dict:
    """last.pt; best.pt scored on the students' fresh final seeds with more episodes, beside the
    teachers on the same seeds; summary.json (a student summary's shape), table.md, one line."""
    cfg = learner.cfg
    run.save_agent("last", learner.net, kind, learner.card(run, None))
    teacher_scores = measured_teacher_scores(teachers, learner.games, cfg.final_eval_episodes, FINAL_EVAL_SEED,
                                             cfg.eval_workers, run.folder.parent / ".teacher_scores", learner.device)
    best = load_agent(run.folder / "best.pt").net
    final = score_games(best, learner.spec.games, cfg.final_eval_episodes, FINAL_EVAL_SEED, cfg.eval_workers,
                        teacher_scores, learner.device)
    summary = {
        "run": cfg.run_name, "run_dir": str(run.folder), "kind": summary_kind, "config": run.config_dict,
        "parameters": learner.counts, "env_steps": learner.env_steps, "updates": learner.updates,
        "best_env_steps": learner.best["env_steps"], "teachers": teacher_files(teachers, learner.games),
        "teacher_scores": teacher_scores,
        "teacher_card_scores": learner.teacher_scores, "scores": final.means, "pct_teacher": final.pct_teacher,
        "geomean_pct_teacher": final.geomean_pct_teacher, "episodes": final.games, "history": learner.history,
        "wall_time_s": round(run.clock.wall(), 1), "cpu_time_s": round(run.clock.cpu(), 1), "resumes": run.resumes,
    }
    run.write_text("summary.json", json.dumps(summary, indent=2) + "\n")
    run.write_text("table.md", run_table(summary) + "\n")
    run.log({f"final/{k}": v for k, v in final.metrics().items()}, learner.env_steps)
    run.finish({"geomean_pct_teacher": final.geomean_pct_teacher, "best_env_steps": learner.best["env_steps"]})
    print(f"{label} {cfg.run_name}: {final.line()}; best at env step {learner.best['env_steps']:,} per game, "
          f"{run.clock.wall() / 60:.1f} min -> {run.folder} (table.md, summary.json)")
    return summary
