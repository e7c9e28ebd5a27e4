"""`multitask gridworld <study>`: paper B's grid-world findings, each over many sampled MDPs.

- control: teacher-driven vs student-driven (vs uniform) control with the same per-step loss
  (cross-entropy to the teacher), at teacher temperatures 0 / 0.01 / 0.1: updates until each MDP's
  student is within `reach` of its teacher's return, and the ratio teacher-driven / student-driven.
- actions: entropy regularised vs expected entropy regularised vs on-policy distill at |A| = 4 and
  |A| = 4000 (action a makes move a mod 4): final exact return, mean and 95% interval over MDPs.
- counter: on-policy distill +R vs n-distill +R on the aliased cyclic fork (envs/gridworld.cyclic_fork):
  how far each student's exact return still swings over the last quarter of training (a cycle) and
  where it ends, over students and fork rewards; the same for the expected update itself (plain
  gradient steps on its closed form, training/tabular.train_expected), free of sampling noise.

Every study writes results/gridworld/<study>.json (every number and the config) and .md (the table)
and a PNG plot; tables are made from the JSON only. Returns are exact (policy evaluation), so the
spread in the tables is over MDPs and seeds, not evaluation noise.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, ClassVar

import numpy as np
import torch

from multitask import __version__
from multitask import config as configlib
from multitask.config import option
from multitask.envs.gridworld import GridConfig, cyclic_fork, optimal_q, policy_values, sample_grids
from multitask.evaluation.statistics import seed_interval
from multitask.files import atomic_write_text
from multitask.progress import Progress
from multitask.training.tabular import TabularConfig, make_teacher, train, train_expected

STUDIES = ("control", "actions", "counter")


@dataclass(frozen=True)
class StudyConfig:
    mdps: int = option(32, "sampled MDPs (paper B averaged over 1,000; --mdps 1000 for the documented figures)")
    seed: int = option(0, "seeds the MDPs and every student's episodes")
    temperatures: tuple[float, ...] = option((0.0, 0.01, 0.1), "teacher softmax temperatures (paper B: 0, 0.01, 0.1)")
    reach: float = option(0.05, "control study: reached = within this share of the (teacher - uniform policy) "
                                "return gap of the teacher")
    actions: tuple[int, ...] = option((4, 4000), "actions study: action-space sizes (paper B: 4 to 4000)")
    actions_mdps: int = option(8, "actions study: MDPs (|A| = 4000 tables are 8x400x4000 logits each)")
    actions_temperature: float = option(0.1, "actions study: teacher temperature")
    actions_updates: int = option(100, "actions study: updates, in place of train.updates (an update at |A| = 4000 "
                                       "costs ~0.6 s for 8 MDPs)")
    counter_rewards: tuple[float, ...] = option((3.0, 4.0, 5.0), "counter study: the fork's rewards (measured with "
                                                "exact updates: 3 settles at the centre, 4 cycles, 5 settles near "
                                                "a corner; docs/gridworld.md)")
    counter_temperature: float = option(0.1, "counter study: teacher temperature (the cycle holds for 0.05-0.2)")
    counter_students: int = option(8, "counter study: students (seeds) per variant and reward")
    grid: GridConfig = option(GridConfig(), "the sampled grid worlds")
    train: TabularConfig = option(TabularConfig(), "the tabular students' training")
    COUNTER_TRAIN: ClassVar[TabularConfig] = TabularConfig(updates=8000, optimizer="sgd", lr=0.1, gamma=1.0, episodes=32)
    counter_train: TabularConfig = option(
        COUNTER_TRAIN,
        "counter study's training: plain SGD (the claim is about the expected update's vector field, which Adam's "
        "per-parameter scaling would change), gamma 1 (two-step episodes; n-distill +R is then the exact gradient "
        "of E[return] - E[cross-entropies]), 32 episodes per update (noise small against the cycle), lr 0.1 (the "
        "cycle's period is ~510 updates there: docs/results/gridworld/counter.json)")

    def __post_init__(self):
        if min(self.mdps, self.actions_mdps, self.actions_updates, self.counter_students, *self.actions) < 1:
            raise ValueError("mdps, actions_mdps, actions_updates, counter_students and actions must be positive")
        if self.seed < 0:
            raise ValueError("seed must not be negative")
        if not (self.temperatures and self.actions and self.counter_rewards):
            raise ValueError("temperatures, actions and counter_rewards each need at least one value")
        if not all(math.isfinite(t) and t >= 0 for t in (*self.temperatures, self.actions_temperature,
                                                         self.counter_temperature)):
            raise ValueError("temperatures, actions_temperature and counter_temperature must not be negative "
                             "(0: a greedy teacher)")
        if not 0.0 <= self.reach < 1.0:
            raise ValueError("reach is a share of the teacher - uniform policy gap, in [0, 1)")
        for table, default in (("train", TabularConfig()), ("counter_train", StudyConfig.COUNTER_TRAIN)):
            if getattr(self, table).variant != default.variant:
                raise ValueError(f"{table}.variant is not read: each study trains its own variants (control: "
                                 f"teacher_distill, on_policy_distill, uniform_distill; actions: on_policy_distill, "
                                 f"entropy_regularised, expected_entropy_regularised; counter: on_policy_distill+R, "
                                 f"n_distill+R); leave it out")


def _reached_at(steps: np.ndarray, returns: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Per MDP, `steps` (E, B) at the first evaluation whose return is >= target (inf if never)."""
    hit = returns >= target[None, :]
    first = hit.argmax(0)
    at = np.take_along_axis(np.asarray(steps, dtype=float), first[None, :], 0)[0]
    return np.where(hit.any(0), at, np.inf)


def mean_interval(x: np.ndarray) -> dict[str, float]:
    """Mean over MDPs (or students) and its 95% Student-t interval (8 MDPs: t = 2.36, not the
    normal 1.96); a single one has a zero-width interval."""
    mean, low, high = seed_interval(x)
    return {"mean": mean, "low": mean if low is None else low, "high": mean if high is None else high}


def control_study(cfg: StudyConfig, say: Callable[[str], None], tick: Callable[[int], None]) -> dict[str, Any]:
    mdps = sample_grids(cfg.grid, cfg.mdps, cfg.seed)
    q = optimal_q(mdps)
    uniform = policy_values(mdps, torch.full((mdps.batch, mdps.num_states, mdps.num_actions), 1.0 / mdps.num_actions,
                                             dtype=torch.float64))[:, mdps.start].numpy()
    rows, curves = [], {}
    for tau in cfg.temperatures:
        teacher = make_teacher(mdps, q, tau)
        t_ret = teacher.values[:, mdps.start].numpy()
        target = t_ret - cfg.reach * (t_ret - uniform)
        reached, labels = {}, {}
        for variant in ("teacher_distill", "on_policy_distill", "uniform_distill"):
            t0 = time.perf_counter()
            _, curve = train(mdps, teacher, replace(cfg.train, variant=variant), cfg.seed, tick)
            updates = np.repeat(np.asarray(curve.updates, dtype=float)[:, None], mdps.batch, 1)
            reached[variant] = _reached_at(updates, curve.returns, target)
            labels[variant] = _reached_at(curve.labels, curve.returns, target)
            curves[f"{variant}@{tau}"] = {"updates": curve.updates,
                                          "mean_return": curve.returns.mean(1).tolist(), "teacher": float(t_ret.mean())}
            rows.append({"temperature": tau, "variant": variant, "final_return": mean_interval(curve.returns[-1]),
                         "teacher_return": float(t_ret.mean()), "uniform_return": float(uniform.mean()),
                         "reached": int(np.isfinite(reached[variant]).sum()), "mdps": mdps.batch,
                         "median_updates_to_reach": _median(reached[variant]),
                         "median_labels_to_reach": _median(labels[variant]), "seconds": time.perf_counter() - t0})
            say(f"control tau {tau}: {variant} final return {rows[-1]['final_return']['mean']:.2f} "
                f"(teacher {t_ret.mean():.2f}), {rows[-1]['reached']}/{mdps.batch} MDPs reached")
        # MDPs whose students start at the target (a teacher no better than the uniform policy, e.g. no
        # terminal reachable) are reached at update 0 by every control: they say nothing about speed, and
        # 0 / max(0, 1) would count as teacher-driven being infinitely faster
        both = (np.isfinite(reached["teacher_distill"]) & np.isfinite(reached["on_policy_distill"])
                & (reached["on_policy_distill"] > 0))
        ratio = reached["teacher_distill"][both] / np.maximum(reached["on_policy_distill"][both], 1)
        label_ratio = labels["teacher_distill"][both] / np.maximum(labels["on_policy_distill"][both], 1)
        rows.append({"temperature": tau, "variant": "ratio teacher-driven / student-driven",
                     "ratio_median": _median(ratio), "ratio_quartiles": _quartiles(ratio),
                     "label_ratio_median": _median(label_ratio), "label_ratio_quartiles": _quartiles(label_ratio),
                     "mdps_with_both": int(both.sum())})
    return {"rows": rows, "curves": curves}


def actions_study(cfg: StudyConfig, say: Callable[[str], None], tick: Callable[[int], None]) -> dict[str, Any]:
    rows, curves = [], {}
    for n in cfg.actions:
        mdps = sample_grids(replace(cfg.grid, num_actions=n), cfg.actions_mdps, cfg.seed)
        teacher = make_teacher(mdps, optimal_q(mdps), cfg.actions_temperature)
        t_ret = teacher.values[:, mdps.start].numpy()
        for variant in ("on_policy_distill", "entropy_regularised", "expected_entropy_regularised"):
            t0 = time.perf_counter()
            _, curve = train(mdps, teacher, replace(cfg.train, variant=variant, updates=cfg.actions_updates), cfg.seed,
                             tick)
            curves[f"{variant}@{n}"] = {"updates": curve.updates, "mean_return": curve.returns.mean(1).tolist(),
                                        "teacher": float(t_ret.mean())}
            rows.append({"actions": n, "variant": variant, "final_return": mean_interval(curve.returns[-1]),
                         "teacher_return": float(t_ret.mean()), "mdps": mdps.batch,
                         "seconds": time.perf_counter() - t0})
            say(f"actions |A| {n}: {variant} final return {rows[-1]['final_return']['mean']:.2f} "
                f"(teacher {t_ret.mean():.2f})")
    return {"rows": rows, "curves": curves}


def counter_study(cfg: StudyConfig, say: Callable[[str], None], tick: Callable[[int], None]) -> dict[str, Any]:
    rows, curves = [], {}
    for reward in cfg.counter_rewards:
        mdps, q = cyclic_fork(cfg.counter_students, reward)
        teacher = make_teacher(mdps, q, cfg.counter_temperature)
        for variant in ("on_policy_distill+R", "n_distill+R"):
            t0 = time.perf_counter()
            run = replace(cfg.counter_train, variant=variant)
            _, sampled = train(mdps, teacher, run, cfg.seed, tick)
            _, exact = train_expected(mdps, teacher, run, cfg.seed, tick=tick)
            curves[f"{variant}@{reward:g}"] = {"updates": sampled.updates,
                                               "mean_return": sampled.returns.mean(1).tolist(),
                                               "student_returns": sampled.returns[:, :3].T.tolist(),
                                               "exact_returns": exact.returns[:, 0].tolist(),
                                               "teacher": float(teacher.values[:, mdps.start].mean())}
            rows.append({"reward": reward, "variant": variant, "late_swing": mean_interval(_late_swing(sampled)),
                         "final_return": mean_interval(sampled.returns[-1]), "exact_swing": float(np.median(_late_swing(exact))),
                         "exact_final_return": float(exact.returns[-1].mean()), "best_return": reward,
                         "students": mdps.batch, "seconds": time.perf_counter() - t0})
            say(f"counter reward {reward:g}: {variant} swings {rows[-1]['late_swing']['mean']:.2f} over the last "
                f"quarter (exact update: {rows[-1]['exact_swing']:.2f}), ends at {rows[-1]['final_return']['mean']:.2f}")
    return {"rows": rows, "curves": curves}


def _late_swing(curve) -> np.ndarray:
    """Per student, the range of its exact return over the last quarter of the updates."""
    late = curve.returns[len(curve.updates) * 3 // 4:]
    return late.max(0) - late.min(0)


def _median(x: np.ndarray) -> float | None:
    return float(np.median(x)) if len(x) and np.isfinite(np.median(x)) else None


def _quartiles(x: np.ndarray) -> list[float] | None:
    return [float(np.percentile(x, 25)), float(np.percentile(x, 75))] if len(x) else None


RUNNERS = {"control": control_study, "actions": actions_study, "counter": counter_study}


def study_updates(study: str, cfg: StudyConfig) -> int:
    """The updates a study's students take in all (its progress bar's total): 3 variants per
    temperature or action count; 2 per fork reward, each trained sampled and by its expected update."""
    return {"control": 3 * len(cfg.temperatures) * cfg.train.updates,
            "actions": 3 * len(cfg.actions) * cfg.actions_updates,
            "counter": 2 * 2 * len(cfg.counter_rewards) * cfg.counter_train.updates}[study]


def run_study(study: str, cfg: StudyConfig, out_dir: Path, say: Callable[[str], None] = print,
              show_progress: bool = True) -> dict[str, Any]:
    """Run one study and write <out_dir>/<study>.json, .md and .png; a line per trained cell, and a
    progress bar over all its students' updates."""
    from multitask.evaluation import plots
    from multitask.evaluation.report import gridworld_table

    torch.set_num_threads(1)  # small tensors: one thread is fastest and leaves the other core free
    start = time.perf_counter()
    bar = Progress(study_updates(study, cfg), f"gridworld {study}", unit="updates", enabled=show_progress)
    try:
        result = RUNNERS[study](cfg, say, bar.update)
    finally:
        bar.close()
    report = {"format": "multitask-gridworld", "study": study, "package_version": __version__,
              "config": configlib.to_dict(cfg), "command": configlib.command_line(),
              "seconds": time.perf_counter() - start, **result}
    out_dir = Path(out_dir)
    report["plot"] = plots.gridworld_curves(report, out_dir / f"{study}.png")
    atomic_write_text(out_dir / f"{study}.json", json.dumps(report, indent=2, allow_nan=False) + "\n")
    atomic_write_text(out_dir / f"{study}.md", gridworld_table(report) + "\n")
    return report
