"""`multitask compare`: every agent on every game with the one protocol, side by side.

Inputs are agent checkpoints (`*.pt`) or run folders; runs of one config that differ only in seed
are pooled into one column (evaluation/entrants.py). Beside them: the teachers (teachers/<suite>/<Game>.pt
by default, one per game, together one column of the table) and a uniform random policy (the
protocol at epsilon 1.0), whose scores anchor the teacher-normalised score.

Every evaluation uses the same episodes and seed (so the same env seeds and action-noise stream)
and is cached as one JSON file per (checkpoint sha256, game, episodes, seed, protocol) under
<out>/evaluations/ (or --cache); the key is stored inside and checked on read, and any mismatch is
evaluated again. The report is assembled from those files only (`assemble`), so that every number
in report.json can be recomputed from them. Statistics: evaluation/statistics.py; tables:
evaluation/compare_tables.py; plots: evaluation/plots.py.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from multitask import __version__
from multitask import config as configlib
from multitask.agents.networks import MultiHeadNet
from multitask.devices import DeviceName, pick_device
from multitask.envs import get_game
from multitask.errors import UserError
from multitask.evaluation import statistics as st
from multitask.evaluation.entrants import (RANDOM_LABEL, TEACHER_LABEL, Entrant, choose_games, drop_teachers,
                                           random_network, resolve_entrants, resolve_teachers)
from multitask.evaluation.protocol import EVAL_EPSILON, GameScores, evaluate_games, protocol
from multitask.evaluation.report import geomean, pct_of_teacher
from multitask.evaluation.reference import SOURCE as HUMAN_SOURCE, human_reference
from multitask.files import atomic_write_text, check_writable
from multitask.progress import Progress

RANDOM_EPSILON = 1.0  # a uniform random policy: the protocol with every action explored
RANDOM_ID = "uniform-random-policy"  # stands for a checkpoint sha256 in the random policy's cache key


@dataclass
class Evaluations:
    """Evaluation files by (label, game), one per member (seed) of the column, and how many were
    run now or reused from the cache."""
    files: dict[tuple[str, str], list[Path]] = field(default_factory=dict)
    evaluated: int = 0
    reused: int = 0


# ---- cached evaluations -------------------------------------------------------------------------

def cache_key(sha256: str, game: str, episodes: int, seed: int, epsilon: float) -> dict[str, Any]:
    """What an evaluation depends on: the checkpoint, the game, episodes, seed and the protocol."""
    return {"sha256": sha256, "game": game, "episodes": episodes, "seed": seed,
            "protocol": protocol(get_game(game), epsilon)}


def cache_file(cache_dir: Path, key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    who = "random" if key["sha256"] == RANDOM_ID else key["sha256"][:16]
    return cache_dir / f"{key['game'].replace('/', '-')}-{who}-e{key['episodes']}-s{key['seed']}-{digest}.json"


def read_cached(path: Path, key: dict[str, Any]) -> dict | None:
    """The cached evaluation at `path` if it holds exactly `key`, else None."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) and data.get("key") == key and "scores" in data else None


def evaluate_cached(cache_dir: Path, who: dict[str, Any], net: MultiHeadNet, games: Sequence[str], episodes: int,
                    seed: int, epsilon: float, run: Execution, done: Evaluations, label: str,
                    tick: Callable[[int], None]) -> None:
    """Evaluate `net` on the games whose cache file is missing or stale; record every file (with the
    device that played: an execution setting, not part of the key)."""
    keys = {g: cache_key(who["sha256"], g, episodes, seed, epsilon) for g in games}
    todo = [g for g in games if read_cached(cache_file(cache_dir, keys[g]), keys[g]) is None]
    done.reused += len(games) - len(todo)
    tick(len(games) - len(todo))
    if todo:
        results: dict[str, GameScores] = evaluate_games(net, todo, episodes, seed, epsilon=epsilon, workers=run.workers,
                                                        executor=run.executor, jobs_folder=run.jobs_folder,
                                                        device=run.device)
        for g, r in results.items():
            atomic_write_text(cache_file(cache_dir, keys[g]), json.dumps(
                {"key": keys[g], **who, "package_version": __version__, "device": run.device.type,
                 "scores": r.to_dict()}, indent=1) + "\n")
        done.evaluated += len(todo)
        tick(len(todo))
    for g in games:
        done.files.setdefault((label, g), []).append(cache_file(cache_dir, keys[g]))


@dataclass(frozen=True)
class Execution:
    """Where evaluations run: the device they play on, and processes per agent's games (`workers`)
    here, or one submitit job per game (`executor` local or slurm, logs in `jobs_folder`)."""
    workers: int
    device: torch.device
    executor: str = "processes"
    jobs_folder: Path = Path("runs/jobs/evaluations")


def run_evaluations(entrants: Sequence[Entrant], teachers: Entrant, games: Sequence[str], episodes: int, seed: int,
                    run: Execution, cache_dir: Path, show_progress: bool) -> Evaluations:
    """The random policy, each teacher and each entrant's members (seeds) on their games, cached."""
    done = Evaluations()
    teacher_agents = teachers.members[0].agents
    total = len(games) + len(teacher_agents) + sum(len(m.agents) for e in entrants for m in e.members)
    bar = Progress(total, "compare", unit="evaluations", enabled=show_progress)
    tick = bar.update
    try:
        evaluate_cached(cache_dir, {"sha256": RANDOM_ID, "checkpoint": None}, random_network(games), games, episodes,
                        seed, RANDOM_EPSILON, run, done, RANDOM_LABEL, tick)
        for g, agent in teacher_agents.items():
            evaluate_cached(cache_dir, {"sha256": agent.sha256, "checkpoint": str(agent.path)}, agent.net, [g],
                            episodes, seed, EVAL_EPSILON, run, done, TEACHER_LABEL, tick)
        for e in entrants:
            for m in e.members:
                agent = next(iter(m.agents.values()))
                evaluate_cached(cache_dir, {"sha256": agent.sha256, "checkpoint": str(agent.path)}, agent.net,
                                list(m.agents), episodes, seed, EVAL_EPSILON, run, done, e.label, tick)
    finally:
        bar.close()
    return done


# ---- learning curves ----------------------------------------------------------------------------

def learning_curves(run_dir: Path | None, games: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per game, eval/<suite>/<Game>/score against the step metric (each line's first key) of a
    run's metrics.jsonl; lines that do not parse (a run killed mid-write) are skipped."""
    path = None if run_dir is None else Path(run_dir) / "metrics.jsonl"
    if path is None or not path.is_file():
        return {}
    curves: dict[str, dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if not isinstance(row, dict) or not row:
            continue
        step_metric = next(iter(row))
        for g in games:
            value = row.get(f"eval/{g}/score")
            if value is not None:
                c = curves.setdefault(g, {"step_metric": step_metric, "steps": [], "scores": []})
                c["steps"].append(row[step_metric])
                c["scores"].append(float(value))
    return curves


def pooled_curves(per_seed: Sequence[dict[str, dict[str, Any]]], games: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Seeds' learning curves as one: at the steps every seed has, the mean score with the lowest
    and highest seed's (`low`, `high`) and `runs` the number of seeds. One seed: its curve as is."""
    if len(per_seed) == 1:
        return per_seed[0]
    pooled = {}
    for g in games:
        curves = [c.get(g) for c in per_seed]
        if any(c is None for c in curves):
            continue
        steps = sorted(set.intersection(*(set(c["steps"]) for c in curves)))
        if not steps:
            continue
        table = np.array([[dict(zip(c["steps"], c["scores"]))[s] for s in steps] for c in curves])
        pooled[g] = {"step_metric": curves[0]["step_metric"], "steps": steps, "scores": table.mean(0).tolist(),
                     "low": table.min(0).tolist(), "high": table.max(0).tolist(), "runs": len(curves)}
    return pooled


# ---- the report ---------------------------------------------------------------------------------

def _relative(path: Path, out: Path) -> str:
    """An evaluation file's path relative to --out when it lies inside (the report moves with it)."""
    path = Path(path)
    return str(path.relative_to(out)) if path.is_relative_to(out) else str(path)


def _returns(path: Path) -> list[float]:
    return json.loads(Path(path).read_text())["scores"]["returns"]


def run_scores(per_seed: Sequence[Sequence[float]]) -> np.ndarray:
    """The runs of one agent on one game, as rliable counts them: with one seed its episodes'
    returns; with several seeds each seed's mean return (the seeds are the independent runs)."""
    if len(per_seed) == 1:
        return np.asarray(per_seed[0], dtype=np.float64)
    return np.array([np.mean(r) for r in per_seed], dtype=np.float64)


def game_entry(per_seed: Sequence[Sequence[float]], teacher: Sequence[float] | None, random_mean: float, game: str,
               evaluations: Sequence[Path], out: Path, reps: int, seed: int, is_teacher: bool) -> dict[str, Any]:
    """One agent on one game: mean and standard error over its runs (`run_scores`: episodes for one
    seed, seed means for several), % of teacher with its 95% interval, normalised scores."""
    runs = run_scores(per_seed)
    mean, stderr = st.mean_stderr(runs)
    teacher_mean = None if teacher is None else st.mean_stderr(teacher)[0]
    pct, _ = pct_of_teacher({game: mean}, {game: teacher_mean})  # the trainers' rule; a note flags a weak teacher
    interval = None
    if pct.get(game) is not None and not is_teacher:
        interval = st.ratio_interval(runs, teacher, reps, seed)
    ref = human_reference(game)
    return {"mean": mean, "stderr": stderr, "seeds": len(per_seed), "episodes": len(per_seed[0]),
            "seed_means": [float(np.mean(r)) for r in per_seed],
            "pct_teacher": pct.get(game), "pct_teacher_ci95": None if interval is None else list(interval),
            "normalised": st.normalised_score(mean, random_mean, teacher_mean),
            "human_normalised": None if ref is None else st.normalised_score(mean, *ref),
            "evaluations": [_relative(p, out) for p in evaluations]}


def aggregates(entry: dict[str, dict], per_run: dict[str, np.ndarray | None],
               human_runs: dict[str, np.ndarray | None], reps: int, seed: int) -> dict[str, Any]:
    """Geometric mean and mean of % of teacher, and IQMs of normalised run scores with intervals."""
    pcts = [e["pct_teacher"] for e in entry.values() if e["pct_teacher"] is not None]
    every = bool(pcts) and len(pcts) == len(entry)  # none for a column without games (no teacher at all)
    out = {"geomean_pct_teacher": geomean(pcts) if every else None,
           "mean_pct_teacher": float(np.mean(pcts)) if every else None}
    seeds = next(iter(entry.values()))["seeds"] if entry else 1
    runs_are = "evaluation episodes (one seed)" if seeds == 1 else "seeds (each the mean of its episodes)"
    for name, columns in (("iqm_normalised", per_run), ("iqm_human_normalised", human_runs)):
        matrix, games = st.score_matrix(columns)
        if matrix is None:
            out[name] = None
            continue
        iqm, lo, hi = st.iqm_interval(matrix, reps, seed)
        out[name] = {"value": iqm, "ci95": [lo, hi], "games": games, "runs": int(matrix.shape[0]), "runs_are": runs_are}
    return out


def _teacher_notes(games: Sequence[str], random_mean: dict[str, float], teacher_mean: dict[str, float],
                   gap_stderr: dict[str, float] | None = None) -> list[str]:
    """What a reader must know of each game's teacher: no % of teacher where it scored 0 or below, no
    teacher-normalised score where it is no better than random, and a warning where it is better than
    random by less than two standard errors of the difference (`gap_stderr`): dividing by that gap
    blows the normalised scores up."""
    notes = []
    for g in games:
        gap = teacher_mean.get(g, 0.0) - random_mean[g]
        if g in teacher_mean and gap > 0 and gap_stderr and gap < 2 * gap_stderr[g]:
            notes.append(f"{g}: the teacher ({teacher_mean[g]:.2f}) beats the random policy ({random_mean[g]:.2f}) "
                         f"by less than two standard errors: its teacher-normalised scores divide by a gap that is "
                         f"mostly noise")
        if g in teacher_mean and teacher_mean[g] <= 0:
            notes.append(f"{g}: the teacher scored {teacher_mean[g]:.2f}, 0 or below: no % of teacher for this game")
        if g in teacher_mean and st.normalised_score(0.0, random_mean[g], teacher_mean[g]) is None:
            notes.append(f"{g}: the teacher ({teacher_mean[g]:.2f}) is no better than the random policy "
                         f"({random_mean[g]:.2f}): no teacher-normalised score for this game, and its % of teacher "
                         f"divides by a teacher that plays no better than chance")
    return notes


def agent_report(e: Entrant, games: Sequence[str], done: Evaluations, teacher: dict[str, list[float]],
                 random_mean: dict[str, float], out: Path, reps: int, seed: int) -> dict[str, Any]:
    """One column of report.json: per game entries, aggregates, learning curves, its members."""
    teacher_mean = {g: st.mean_stderr(r)[0] for g, r in teacher.items()}
    entry, per_run, human = {}, {}, {}
    for g in [g for g in games if g in e.games]:
        files = done.files[(e.label, g)]
        per_seed = [_returns(f) for f in files]
        entry[g] = game_entry(per_seed, teacher.get(g), random_mean[g], g, files, out, reps, seed,
                             e.label == TEACHER_LABEL)  # the teacher column, not any input of kind teacher
        entry[g]["members"] = [{"checkpoint": str(m.agents[g].path), "sha256": m.agents[g].sha256, "seed": m.seed}
                               for m in e.members]
        runs = run_scores(per_seed)
        per_run[g] = st.normalised_episodes(runs, random_mean[g], teacher_mean.get(g))
        ref = human_reference(g)
        human[g] = None if ref is None else st.normalised_episodes(runs, *ref)
    return {"label": e.label, "kind": e.kind, "seeds": [m.seed for m in e.members],
            "inputs": [None if m.source is None else str(m.source) for m in e.members],
            "games": entry, "aggregates": aggregates(entry, per_run, human, reps, seed),
            "learning_curves": pooled_curves([learning_curves(m.run_dir, games) for m in e.members], games)}


def assemble(entrants: Sequence[Entrant], teachers: Entrant, games: Sequence[str], done: Evaluations,
             episodes: int, seed: int, reps: int, out: Path, notes: list[str]) -> dict[str, Any]:
    """report.json's content, computed from the evaluation files in `done` alone."""
    random = {g: _returns(done.files[(RANDOM_LABEL, g)][0]) for g in games}
    random_mean = {g: st.mean_stderr(r)[0] for g, r in random.items()}
    teacher = {g: _returns(done.files[(TEACHER_LABEL, g)][0]) for g in teachers.games}
    gap_stderr = {g: float(np.hypot(st.mean_stderr(random[g])[1], st.mean_stderr(teacher[g])[1])) for g in teacher}
    notes += _teacher_notes(games, random_mean, {g: st.mean_stderr(r)[0] for g, r in teacher.items()}, gap_stderr)
    notes += [f"{e.label}: {len(e.members)} seeds ({', '.join(str(m.seed) for m in e.members)}) pooled: scores are "
              f"means over seeds, intervals resample seeds" for e in entrants if e.pooled]
    if len({tuple(e.games) for e in entrants}) > 1:
        notes.append("the agents play different games (" + "; ".join(f"{e.label}: {len(e.games)}" for e in entrants)
                     + "): their aggregates are over different games and not directly comparable")
    agents = [agent_report(e, games, done, teacher, random_mean, out, reps, seed) for e in [teachers, *entrants]]
    return {
        "format": "multitask-compare", "format_version": 2, "package_version": __version__,
        "command": configlib.command_line(),
        "suite": get_game(games[0]).suite, "games": list(games), "episodes": episodes, "seed": seed,
        "seeds": {"env_seeds": f"env i of each game's vector env is seeded {seed} + i",
                  "action_seed": seed + 1_000_003, "bootstrap_seed": seed, "bootstrap_reps": reps},
        "protocol": {g: protocol(get_game(g)) for g in games},
        "random": {g: {"mean": random_mean[g], "stderr": st.mean_stderr(random[g])[1], "epsilon": RANDOM_EPSILON,
                       "evaluation": _relative(done.files[(RANDOM_LABEL, g)][0], out)}
                   for g in games},
        "human_reference": ({g: list(human_reference(g)) for g in games if human_reference(g)} or None),
        "human_reference_source": HUMAN_SOURCE if any(human_reference(g) for g in games) else None,
        "inputs": [{"label": e.label, "path": str(m.source), "seed": m.seed,
                    "sha256": next(iter(m.agents.values())).sha256, "kind": e.kind, "games": list(m.agents)}
                   for e in entrants for m in e.members],
        "teachers": {g: {"path": str(a.path), "sha256": a.sha256} for g, a in teachers.members[0].agents.items()},
        "agents": agents, "rules": RULES, "notes": notes,
        "evaluations": {"evaluated": done.evaluated, "reused": done.reused},
    }


RULES = [
    "% of teacher = 100 * agent / teacher per game (Rusu et al. 2016), none where the teacher scored 0 or below "
    "or is missing; an agent's score of 0 or below stays (0% or negative).",
    "Geometric mean of % of teacher over an agent's games, each percentage floored at 0.1% (report.GEOMEAN_FLOOR); "
    "none unless every one of its games has a % of teacher.",
    "Teacher-normalised score = (agent - random) / (teacher - random) with the random policy's and the teacher's "
    "means on the same episodes; none for a game whose teacher scores at or below random.",
    "Runs of an agent (rliable's runs axis): its evaluation episodes when it has one seed; its seeds, each the mean "
    "of its episodes, when runs of one config differing only in seed are pooled. Score = mean over runs, ± the "
    "standard error over runs.",
    "IQM: interquartile mean of the normalised run scores (runs x games matrix) with rliable's stratified-bootstrap "
    "95% interval (runs resampled within each game).",
    "95% interval of a game's % of teacher: bootstrap (rliable, percentile) resampling the agent's runs and the "
    "teacher's episodes independently.",
]


def compare(inputs: Sequence[Path], out: Path, games: Sequence[str] | None = None, episodes: int = 100,
            seed: int = 777_777, teachers: Sequence[Path] | None = None, workers: int = 2,
            cache_dir: Path | None = None, reps: int = 10_000, wandb: str = "offline",
            show_progress: bool = True, pool_seeds: bool = True, device: DeviceName = "auto",
            executor: str = "processes", jobs_folder: Path = Path("runs/jobs/evaluations")) -> dict[str, Any]:
    """Evaluate, assemble and write report.json, report.md, the plots and the W&B table."""
    from multitask.evaluation import compare_tables, plots

    if not inputs:
        raise UserError("compare needs at least one agent checkpoint (*.pt) or run folder")
    if episodes < 2:
        raise UserError(f"--episodes {episodes} is too few for intervals; pass 2 or more")
    if reps < 1:
        raise UserError(f"--bootstrap-reps {reps} gives no intervals; pass 1 or more (default 10000)")
    if seed < 0:
        raise UserError(f"--seed {seed} is negative; env seeds must be 0 or more")
    if workers < 1:
        raise UserError(f"--workers {workers} runs nothing; pass 1 or more")
    out = Path(out)
    entrants = resolve_entrants(inputs, pool_seeds)  # the inputs first: a bad one leaves no --out folder behind
    chosen = choose_games(entrants, games)
    teacher_column, notes = resolve_teachers(chosen, teachers)
    entrants, dropped = drop_teachers(entrants, teacher_column)
    notes += dropped
    run = Execution(workers, pick_device(device), executor, Path(jobs_folder))  # before any folder is made
    cache_dir = Path(cache_dir) if cache_dir else out / "evaluations"
    check_writable(cache_dir / "probe.json", "a writable --cache folder")  # first: a bad one leaves no --out folder
    check_writable(out / "report.json", "a writable --out folder")
    done = run_evaluations(entrants, teacher_column, chosen, episodes, seed, run, cache_dir, show_progress)
    report = assemble(entrants, teacher_column, chosen, done, episodes, seed, reps, out, notes)
    report["plots"] = plots.write_plots(report, out)
    atomic_write_text(out / "report.json", json.dumps(report, indent=2, allow_nan=False) + "\n")
    atomic_write_text(out / "report.md", compare_tables.markdown(report) + "\n")
    compare_tables.to_wandb(report, out, wandb)
    return report
