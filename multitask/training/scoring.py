"""Evaluations as trainers use them: a network scored on each of its games by the one protocol,
as % of each game's teacher with their geometric mean, the metrics logged and the line printed;
and the teachers' own scores to divide by.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from multitask.agents.checkpoints import load_agent
from multitask.agents.networks import MultiHeadNet
from multitask.envs import GameSpec
from multitask.evaluation.protocol import evaluate_games
from multitask.errors import UserError
from multitask.evaluation.report import pct_of_teacher
from multitask.files import atomic_write_text, file_sha256

PERIODIC_EVAL_SEED = 10_000  # periodic evaluations play env seeds from here on, apart from training's
FINAL_EVAL_SEED = 777_777  # students and teachers meet the same env seeds in the final evaluation


@dataclass(frozen=True)
class Scores:
    """One evaluation of every game of a network."""
    games: dict[str, dict]  # game -> GameScores.to_dict(): returns, mean, protocol, seeds
    pct_teacher: dict[str, float]  # games with a teacher score only
    geomean_pct_teacher: float | None  # None unless every game has a teacher score

    @property
    def means(self) -> dict[str, float]:
        return {g: r["mean"] for g, r in self.games.items()}

    @property
    def selection_score(self) -> float:
        """What the best checkpoint is chosen by: the geometric mean of % of teacher, or the mean
        score over games when a teacher score is missing."""
        if self.geomean_pct_teacher is not None:
            return self.geomean_pct_teacher
        return float(np.mean(list(self.means.values())))

    def curve_point(self) -> dict:
        """What a learning curve (a run's `history`) keeps of this evaluation, beside its step."""
        return {"scores": self.means, "pct_teacher": self.pct_teacher, "geomean_pct_teacher": self.geomean_pct_teacher}

    def metrics(self) -> dict[str, float]:
        """eval/<suite>/<Game>/{score,pct_teacher}, and the aggregates when every game has a teacher."""
        m = {f"eval/{g}/score": s for g, s in self.means.items()}
        m.update({f"eval/{g}/pct_teacher": p for g, p in self.pct_teacher.items()})
        if self.geomean_pct_teacher is not None:
            m["eval/geomean_pct_teacher"] = self.geomean_pct_teacher
            m["eval/mean_pct_teacher"] = float(np.mean(list(self.pct_teacher.values())))
        return m

    def line(self) -> str:
        """`Breakout 3.10 (82%), Freeway 21.00 (95%); geometric mean 88% of teachers`."""
        pct = {g: f" ({p:.0f}%)" for g, p in self.pct_teacher.items()}
        games = ", ".join(f"{g.split('/')[1]} {s:.2f}{pct.get(g, '')}" for g, s in self.means.items())
        if self.geomean_pct_teacher is None:
            return games
        return f"{games}; geometric mean {self.geomean_pct_teacher:.0f}% of teachers"


def score_games(net: MultiHeadNet, games: Sequence[str], episodes: int, seed: int, workers: int,
                teacher_scores: dict[str, float | None], device: torch.device) -> Scores:
    """`episodes` whole games of each game (one process per game with workers > 1) on `device`,
    the trainer's: a GPU run evaluates on the GPU, its students and its teachers alike."""
    results = evaluate_games(net, list(games), episodes, seed, workers=workers, device=device)
    pct, geomean = pct_of_teacher({g: r.mean for g, r in results.items()}, teacher_scores)
    return Scores({g: r.to_dict() for g, r in results.items()}, pct, geomean)


def teacher_paths(listed: Sequence[str], games: Sequence[GameSpec], listed_exist: bool = True) -> list[Path]:
    """Each game's teacher: the paths a config lists in `teachers`, which must exist (unless
    `listed_exist` is False: a run following teachers still training waits for them), or else
    teachers/<suite>/<Game>.pt, which may be missing (its game then goes without % of teacher)."""
    if not listed:
        return [Path("teachers") / g.suite / f"{g.game}.pt" for g in games]
    paths = [Path(p) for p in listed]
    for g, path in zip(games, paths):
        if listed_exist and not path.is_file():
            raise UserError(f"no teacher for {g.name} at {path}, which `teachers` lists; fix the path, or leave "
                            f"`teachers` out to use teachers/<suite>/<Game>.pt")
    return paths


def teacher_files(teachers: Sequence[Path], games: Sequence[GameSpec]) -> dict[str, dict]:
    """What a summary records of each game's teacher: its path and the sha256 of the file there at
    the end (None: no file, so no % of teacher)."""
    return {g.name: {"path": str(p), "sha256": file_sha256(p) if Path(p).is_file() else None}
            for g, p in zip(games, teachers)}


def teacher_card_scores(teachers: Sequence[Path], games: Sequence[GameSpec]) -> dict[str, float | None]:
    """Each teacher's evaluation score from its card (None: no teacher file or no score on it).
    Every trainer calls this before its first update, so a teacher listed for the wrong game is
    refused here, not when the final evaluation divides by it."""
    scores: dict[str, float | None] = {}
    for g, path in zip(games, teachers):
        if not Path(path).exists():
            scores[g.name] = None
            continue
        agent = load_agent(path)
        if g.name not in agent.net.games:
            raise UserError(f"teacher {path} plays {', '.join(agent.net.games)}, not {g.name}; list one teacher "
                            f"per game in `teachers`, in the order of `games`")
        scores[g.name] = (agent.card.get("eval") or {}).get("mean")
    return scores


def measured_teacher_scores(teachers: Sequence[Path], games: Sequence[GameSpec], episodes: int, seed: int,
                            workers: int, cache_dir: Path, device: torch.device) -> dict[str, float | None]:
    """Each teacher scored by the same protocol, episodes and seed as a final evaluation.

    Card scores come from 20 episodes, which is too few to divide by (Seaquest: 15.8 on its card,
    11.9 over 100 episodes). Results are cached by teacher sha256, episodes and seed.
    """
    scores: dict[str, float | None] = {}
    for g, path in zip(games, teachers):
        if not Path(path).exists():
            scores[g.name] = None
            continue
        agent = load_agent(path)
        cached = cache_dir / f"{agent.sha256[:16]}-{g.game}-{episodes}-{seed}.json"
        if cached.exists():
            scores[g.name] = json.loads(cached.read_text())["mean"]
            continue
        result = evaluate_games(agent.net, [g.name], episodes, seed, workers=workers, device=device)[g.name].to_dict()
        atomic_write_text(cached, json.dumps({**result, "teacher": str(path), "sha256": agent.sha256}) + "\n")
        scores[g.name] = result["mean"]
    return scores
