"""`multitask compare`: every agent on every game with the one protocol, side by side.

Inputs are agent checkpoints (`*.pt`) or run folders (their best.pt; their metrics.jsonl gives the
learning curve). Beside them: the teachers (teachers/<suite>/<Game>.pt by default, one per game,
together one column of the table) and a uniform random policy (the protocol at epsilon 1.0), whose
scores anchor the teacher-normalised score. An agent is evaluated on the games it has heads for
among the compared games (default: every game any input plays); an agent with no head for any
compared game, or of another suite, is a user error.

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

from multitask import __version__
from multitask.agents.checkpoints import Agent, check_agent_game, load_agent
from multitask.agents.networks import MultiHeadNet, NetworkSpec, TrunkSpec, teacher_network_spec
from multitask.envs import get_game
from multitask.errors import UserError
from multitask.evaluation import statistics as st
from multitask.evaluation.protocol import EVAL_EPSILON, GameScores, evaluate_games, protocol
from multitask.evaluation.report import geomean
from multitask.evaluation.reference import SOURCE as HUMAN_SOURCE, human_reference
from multitask.files import atomic_write_text, check_writable
from multitask.progress import Progress

RANDOM_EPSILON = 1.0  # a uniform random policy: the protocol with every action explored
RANDOM_ID = "uniform-random-policy"  # stands for a checkpoint sha256 in the random policy's cache key
TEACHER_LABEL = "teacher"
RANDOM_LABEL = "random"


@dataclass
class Entrant:
    """One column of the comparison: an input agent, or the teachers (one checkpoint per game)."""
    label: str
    kind: str
    agents: dict[str, Agent]  # game -> the checkpoint that plays it
    source: Path | None = None  # the input as given (checkpoint or run folder)
    run_dir: Path | None = None


@dataclass
class Evaluations:
    """Evaluation files by (label, game), and how many were run now or reused from the cache."""
    files: dict[tuple[str, str], Path] = field(default_factory=dict)
    evaluated: int = 0
    reused: int = 0


# ---- inputs -------------------------------------------------------------------------------------

def load_input(path: Path) -> tuple[Agent, Path | None]:
    """A checkpoint, or a run folder's best.pt (returned with the folder)."""
    path = Path(path)
    if path.is_dir():
        if not (path / "best.pt").is_file():
            raise UserError(f"run folder {path} has no best.pt; pass a finished run's folder or a checkpoint (*.pt)")
        return load_agent(path / "best.pt"), path
    return load_agent(path), None


def _label(path: Path, run_dir: Path | None) -> str:
    if run_dir is not None:
        return run_dir.name
    return f"{path.parent.name}/{path.stem}" if path.stem in ("best", "last") else path.stem


def resolve_entrants(inputs: Sequence[Path]) -> list[Entrant]:
    entrants: list[Entrant] = []
    for path in inputs:
        agent, run_dir = load_input(path)
        label = base = _label(Path(path), run_dir)
        n = 2
        while label in {e.label for e in entrants} | {TEACHER_LABEL, RANDOM_LABEL}:
            label, n = f"{base}#{n}", n + 1
        entrants.append(Entrant(label, agent.kind, {g: agent for g in agent.net.games}, Path(path), run_dir))
    return entrants


def _suite(game: str) -> str:
    return game.split("/", 1)[0]


def choose_games(entrants: Sequence[Entrant], games: Sequence[str] | None) -> list[str]:
    """The compared games (validated, one suite); each entrant keeps the games it has heads for."""
    suites = {}
    for e in entrants:
        for g in e.agents:
            suites.setdefault(_suite(g), f"{e.source} ({g})")
    if len(suites) > 1:
        raise UserError(f"the agents mix suites ({'; '.join(suites.values())}); compare one suite at a time")
    chosen = list(games) if games else list(dict.fromkeys(g for e in entrants for g in e.agents))
    specs = [get_game(g) for g in chosen]  # unknown names are a UserError listing the known games
    if len({s.suite for s in specs}) > 1:
        raise UserError(f"--games mixes suites ({', '.join(chosen)}); compare one suite at a time")
    for e in entrants:
        playable = [g for g in e.agents if g in chosen]
        if not playable:
            raise UserError(f"{e.source} plays {', '.join(e.agents)}, none of the compared games "
                            f"({', '.join(chosen)}); drop it or name its games with --games")
        e.agents = {g: e.agents[g] for g in playable}
        for g in playable:
            check_agent_game(e.agents[g], get_game(g))
    return chosen


def resolve_teachers(games: Sequence[str], paths: Sequence[Path] | None) -> tuple[Entrant, list[str]]:
    """The teachers' column (given paths, else teachers/<suite>/<Game>.pt) and notes on missing ones."""
    agents: dict[str, Agent] = {}
    if paths:
        for p in paths:
            agent = load_agent(p)
            suite = _suite(games[0])
            if len(agent.net.games) != 1 or _suite(agent.net.games[0]) != suite:
                raise UserError(f"teacher {p} plays {', '.join(agent.net.games)}, it is not a {suite} teacher "
                                f"of one game; pass one single-game teacher per compared game")
            if agent.net.games[0] in games:  # teachers of games not compared are left out
                agents[agent.net.games[0]] = agent
    else:
        for g in games:
            p = Path("teachers") / _suite(g) / f"{g.split('/', 1)[1]}.pt"
            if p.is_file():
                agents[g] = load_agent(p)
    for g, a in agents.items():
        check_agent_game(a, get_game(g))
    notes = [f"{g} has no teacher (no --teachers file for it, no teachers/{g}.pt): no % of teacher "
             f"or teacher-normalised score for it" for g in games if g not in agents]
    return Entrant(TEACHER_LABEL, "teacher", agents), notes


def drop_teachers(entrants: Sequence[Entrant], teachers: Entrant) -> tuple[list[Entrant], list[str]]:
    """Inputs that are the very teacher checkpoint of their games (same sha256) are the teacher
    column already; they are left out, with a note."""
    shas = {g: a.sha256 for g, a in teachers.agents.items()}
    kept, notes = [], []
    for e in entrants:
        if all(shas.get(g) == a.sha256 for g, a in e.agents.items()):
            notes.append(f"{e.source} is the teacher of {', '.join(e.agents)} (same sha256): shown as the teacher")
        else:
            kept.append(e)
    if not kept:
        raise UserError("every input is a teacher of the compared games; pass a student or baseline run to compare")
    return kept, notes


def random_network(games: Sequence[str]) -> MultiHeadNet:
    """A network with a head per game; at epsilon 1.0 its outputs never choose an action."""
    specs = [get_game(g) for g in games]
    trunk = teacher_network_spec(specs[0]).trunk
    trunk = TrunkSpec(trunk.kind, max(s.obs_shape[0] for s in specs), trunk.in_size)
    return MultiHeadNet(NetworkSpec(trunk, tuple(games), tuple(s.num_actions for s in specs)))


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
                    seed: int, epsilon: float, workers: int, done: Evaluations, label: str,
                    tick: Callable[[int], None]) -> None:
    """Evaluate `net` on the games whose cache file is missing or stale; record every file."""
    keys = {g: cache_key(who["sha256"], g, episodes, seed, epsilon) for g in games}
    todo = [g for g in games if read_cached(cache_file(cache_dir, keys[g]), keys[g]) is None]
    done.reused += len(games) - len(todo)
    tick(len(games) - len(todo))
    if todo:
        results: dict[str, GameScores] = evaluate_games(net, todo, episodes, seed, epsilon=epsilon, workers=workers)
        for g, r in results.items():
            atomic_write_text(cache_file(cache_dir, keys[g]), json.dumps(
                {"key": keys[g], **who, "package_version": __version__, "scores": r.to_dict()}, indent=1) + "\n")
        done.evaluated += len(todo)
        tick(len(todo))
    for g in games:
        done.files[(label, g)] = cache_file(cache_dir, keys[g])


def run_evaluations(entrants: Sequence[Entrant], teachers: Entrant, games: Sequence[str], episodes: int, seed: int,
                    workers: int, cache_dir: Path, show_progress: bool) -> Evaluations:
    """The random policy, each teacher and each entrant on its games, cached."""
    done = Evaluations()
    total = len(games) + len(teachers.agents) + sum(len(e.agents) for e in entrants)
    bar = Progress(total, "compare", unit="evaluations", enabled=show_progress)
    tick = bar.update
    try:
        evaluate_cached(cache_dir, {"sha256": RANDOM_ID, "checkpoint": None}, random_network(games), games, episodes,
                        seed, RANDOM_EPSILON, workers, done, RANDOM_LABEL, tick)
        for g, agent in teachers.agents.items():
            evaluate_cached(cache_dir, {"sha256": agent.sha256, "checkpoint": str(agent.path)}, agent.net, [g],
                            episodes, seed, EVAL_EPSILON, workers, done, TEACHER_LABEL, tick)
        for e in entrants:
            agent = next(iter(e.agents.values()))
            evaluate_cached(cache_dir, {"sha256": agent.sha256, "checkpoint": str(agent.path)}, agent.net,
                            list(e.agents), episodes, seed, EVAL_EPSILON, workers, done, e.label, tick)
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


# ---- the report ---------------------------------------------------------------------------------

def _relative(path: Path, out: Path) -> str:
    """An evaluation file's path relative to --out when it lies inside (the report moves with it)."""
    path = Path(path)
    return str(path.relative_to(out)) if path.is_relative_to(out) else str(path)


def _returns(path: Path) -> list[float]:
    return json.loads(Path(path).read_text())["scores"]["returns"]


def game_entry(returns: Sequence[float], teacher: Sequence[float] | None, random_mean: float, game: str,
               evaluation: Path, out: Path, reps: int, seed: int, is_teacher: bool) -> dict[str, Any]:
    """One agent on one game: raw mean and stderr, % of teacher with its 95% interval, normalised scores."""
    mean, stderr = st.mean_stderr(returns)
    teacher_mean = None if teacher is None else st.mean_stderr(teacher)[0]
    pct, _ = st.percent_of_teacher({game: mean}, {game: teacher_mean})
    interval = None
    if pct.get(game) is not None and not is_teacher:
        interval = st.ratio_interval(returns, teacher, reps, seed)
    ref = human_reference(game)
    return {"mean": mean, "stderr": stderr, "episodes": len(returns),
            "pct_teacher": pct.get(game), "pct_teacher_ci95": None if interval is None else list(interval),
            "normalised": st.normalised_score(mean, random_mean, teacher_mean),
            "human_normalised": None if ref is None else st.normalised_score(mean, *ref),
            "evaluation": _relative(evaluation, out)}


def aggregates(entry: dict[str, dict], per_episode: dict[str, np.ndarray | None],
               human_episodes: dict[str, np.ndarray | None], reps: int, seed: int) -> dict[str, Any]:
    """Geometric mean and mean of % of teacher, and IQMs of normalised per-episode scores with intervals."""
    pcts = [e["pct_teacher"] for e in entry.values() if e["pct_teacher"] is not None]
    out = {"geomean_pct_teacher": geomean(pcts) if len(pcts) == len(entry) else None,
           "mean_pct_teacher": float(np.mean(pcts)) if len(pcts) == len(entry) else None}
    for name, columns in (("iqm_normalised", per_episode), ("iqm_human_normalised", human_episodes)):
        matrix, games = st.score_matrix(columns)
        if matrix is None:
            out[name] = None
            continue
        iqm, lo, hi = st.iqm_interval(matrix, reps, seed)
        out[name] = {"value": iqm, "ci95": [lo, hi], "games": games, "runs": int(matrix.shape[0]),
                     "runs_are": "evaluation episodes (one seed per agent)"}
    return out


def assemble(entrants: Sequence[Entrant], teachers: Entrant, games: Sequence[str], done: Evaluations,
             episodes: int, seed: int, reps: int, out: Path, notes: list[str]) -> dict[str, Any]:
    """report.json's content, computed from the evaluation files in `done` alone."""
    random = {g: _returns(done.files[(RANDOM_LABEL, g)]) for g in games}
    random_mean = {g: st.mean_stderr(r)[0] for g, r in random.items()}
    teacher = {g: _returns(done.files[(TEACHER_LABEL, g)]) for g in teachers.agents}
    teacher_mean = {g: st.mean_stderr(r)[0] for g, r in teacher.items()}
    for g in games:
        if g in teacher_mean and teacher_mean[g] <= 0:
            notes.append(f"{g}: the teacher scored {teacher_mean[g]:.2f}, 0 or below: no % of teacher for this game")
        if g in teacher_mean and st.normalised_score(0.0, random_mean[g], teacher_mean[g]) is None:
            notes.append(f"{g}: the teacher ({teacher_mean[g]:.2f}) is no better than the random policy "
                         f"({random_mean[g]:.2f}): no teacher-normalised score for this game")
    agents = []
    for e in [teachers, *entrants]:
        entry, per_episode, human = {}, {}, {}
        for g in [g for g in games if g in e.agents]:
            returns = _returns(done.files[(e.label, g)])
            entry[g] = game_entry(returns, teacher.get(g), random_mean[g], g, done.files[(e.label, g)], out,
                                  reps, seed, e is teachers)
            entry[g].update(checkpoint=str(e.agents[g].path), sha256=e.agents[g].sha256)
            per_episode[g] = st.normalised_episodes(returns, random_mean[g], teacher_mean.get(g))
            ref = human_reference(g)
            human[g] = None if ref is None else st.normalised_episodes(returns, *ref)
        agents.append({"label": e.label, "kind": e.kind, "input": None if e.source is None else str(e.source),
                       "games": entry, "aggregates": aggregates(entry, per_episode, human, reps, seed),
                       "learning_curves": learning_curves(e.run_dir, games)})
    return {
        "format": "multitask-compare", "format_version": 1, "package_version": __version__,
        "suite": _suite(games[0]), "games": list(games), "episodes": episodes, "seed": seed,
        "seeds": {"env_seeds": f"env i of each game's vector env is seeded {seed} + i",
                  "action_seed": seed + 1_000_003, "bootstrap_seed": seed, "bootstrap_reps": reps},
        "protocol": {g: protocol(get_game(g)) for g in games},
        "random": {g: {"mean": random_mean[g], "stderr": st.mean_stderr(random[g])[1], "epsilon": RANDOM_EPSILON,
                       "evaluation": _relative(done.files[(RANDOM_LABEL, g)], out)}
                   for g in games},
        "human_reference": ({g: list(human_reference(g)) for g in games if human_reference(g)} or None),
        "human_reference_source": HUMAN_SOURCE if any(human_reference(g) for g in games) else None,
        "inputs": [{"label": e.label, "path": str(e.source), "sha256": next(iter(e.agents.values())).sha256,
                    "kind": e.kind, "games": list(e.agents)} for e in entrants],
        "teachers": {g: {"path": str(a.path), "sha256": a.sha256} for g, a in teachers.agents.items()},
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
    "IQM: interquartile mean of per-episode normalised scores (episodes x games matrix; runs = evaluation episodes, "
    "one seed per agent) with rliable's stratified-bootstrap 95% interval (episodes resampled within each game).",
    "95% interval of a game's % of teacher: bootstrap (rliable, percentile) resampling the agent's and the "
    "teacher's episodes independently.",
]


def compare(inputs: Sequence[Path], out: Path, games: Sequence[str] | None = None, episodes: int = 100,
            seed: int = 777_777, teachers: Sequence[Path] | None = None, workers: int = 2,
            cache_dir: Path | None = None, reps: int = 10_000, wandb: str = "offline",
            show_progress: bool = True) -> dict[str, Any]:
    """Evaluate, assemble and write report.json, report.md, the plots and the W&B table."""
    from multitask.evaluation import compare_tables, plots

    if not inputs:
        raise UserError("compare needs at least one agent checkpoint (*.pt) or run folder")
    if episodes < 2:
        raise UserError(f"--episodes {episodes} is too few for intervals; pass 2 or more")
    out = Path(out)
    check_writable(out / "report.json", "a writable --out folder")
    cache_dir = Path(cache_dir) if cache_dir else out / "evaluations"
    check_writable(cache_dir / "probe.json", "a writable --cache folder")
    entrants = resolve_entrants(inputs)
    chosen = choose_games(entrants, games)
    teacher_column, notes = resolve_teachers(chosen, teachers)
    entrants, dropped = drop_teachers(entrants, teacher_column)
    notes += dropped
    done = run_evaluations(entrants, teacher_column, chosen, episodes, seed, workers, cache_dir, show_progress)
    report = assemble(entrants, teacher_column, chosen, done, episodes, seed, reps, out, notes)
    report["plots"] = plots.write_plots(report, out)
    atomic_write_text(out / "report.json", json.dumps(report, indent=2, allow_nan=False) + "\n")
    atomic_write_text(out / "report.md", compare_tables.markdown(report) + "\n")
    compare_tables.to_wandb(report, out, wandb)
    return report
