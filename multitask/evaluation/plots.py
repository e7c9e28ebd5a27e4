"""The comparison's plots (the only module that imports matplotlib), made from report.json's content.

Agg backend: files only, no display needed. Each function writes one PNG and returns its path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
from matplotlib.ticker import EngFormatter, PercentFormatter  # noqa: E402
import numpy as np  # noqa: E402

from multitask.files import atomic_write_bytes  # noqa: E402
from multitask.evaluation.entrants import TEACHER_LABEL  # noqa: E402  (the teachers' column; an input may be a teacher too)
from multitask.evaluation.statistics import t_multiplier  # noqa: E402

DPI = 120


def _colour(report: dict[str, Any], label: str) -> str:
    """An agent's colour, the same in every plot: C<its column's index in report.json>."""
    return f"C{[a['label'] for a in report['agents']].index(label) % 10}"


def _short(game: str) -> str:
    return game.split("/", 1)[1]


def _save(fig, path: Path, legend: dict[str, Any] | None = None) -> str:
    """Lay out, write and close `fig`; `legend` (label -> handle): one legend below all panels."""
    fig.tight_layout()
    if legend:
        fig.legend(legend.values(), legend.keys(), loc="upper center", bbox_to_anchor=(0.5, 0.0),
                   ncol=min(3, len(legend)), fontsize=8, frameon=False)
    bbox = "tight" if legend else None  # the figure grows to hold the legend below it
    atomic_write_bytes(path, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI, bbox_inches=bbox))
    plt.close(fig)
    return path.name


def pct_of_teacher(report: dict[str, Any], path: Path) -> str | None:
    """Grouped bars: per game, each agent's % of teacher with its 95% bootstrap interval."""
    agents = [a for a in report["agents"] if a["label"] != TEACHER_LABEL]
    games = report["games"]
    if not any(e.get("pct_teacher") is not None for a in agents for e in a["games"].values()):
        return None  # no teacher to divide by: an empty chart says nothing
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(games) * max(1, len(agents)) / 2 + 3), 4))
    width = 0.8 / len(agents)
    x = np.arange(len(games))
    for i, a in enumerate(agents):
        values, low, high = [], [], []
        for g in games:
            e = a["games"].get(g) or {}
            p, ci = e.get("pct_teacher"), e.get("pct_teacher_ci95")
            values.append(np.nan if p is None else p)
            low.append(0 if p is None or ci is None else max(p - ci[0], 0))
            high.append(0 if p is None or ci is None else max(ci[1] - p, 0))
        ax.bar(x + (i - (len(agents) - 1) / 2) * width, values, width, yerr=[low, high], capsize=3, label=a["label"],
               color=_colour(report, a["label"]))
    ax.axhline(100, color="black", linewidth=0.8, linestyle="--", label="teacher")
    ax.set_xticks(x, [_short(g) for g in games])
    ax.set_ylabel("% of teacher (95% CI)")
    ax.set_title(f"% of teacher, {report['episodes']} episodes per game")
    ax.legend(fontsize=8)
    return _save(fig, path)


def raw_scores(report: dict[str, Any], path: Path) -> str:
    """One panel per game: the random policy's, the teacher's and each agent's mean raw score,
    error bars a 95% Student-t interval over the runs (episodes, or seeds where pooled)."""
    games = report["games"]
    cols = min(len(games), 3)
    rows = -(-len(games) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
    for ax, g in zip(axes.flat, games):
        playing = [a for a in report["agents"] if g in a["games"]]
        labels = ["random"] + [a["label"] for a in playing]
        entries = [report["random"][g]] + [a["games"][g] for a in playing]
        runs = [report["episodes"]] + [e["seeds"] if e["seeds"] > 1 else e["episodes"] for e in entries[1:]]
        yerr = [t_multiplier(n) * e["stderr"] for n, e in zip(runs, entries)]
        ax.bar(range(len(labels)), [e["mean"] for e in entries], yerr=yerr,
               capsize=3, color=["grey"] + [_colour(report, a["label"]) for a in playing])  # an agent keeps its colour
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
        ax.set_title(_short(g))
        ax.set_ylabel("raw score (mean, 95% CI)")
    for ax in list(axes.flat)[len(games):]:
        ax.axis("off")
    return _save(fig, path)


def _curve_label(label: str, game: str) -> str:
    """An agent's label in one game's panel: a single-game run's name without the game
    (`minatar-Seaquest-on-policy-distill-100pct` -> `on-policy-distill-100pct` under Seaquest), so
    that one legend serves every panel."""
    suite, name = game.split("/", 1)
    return label.replace(f"{suite}-{name}-", "", 1)


def learning_curves(report: dict[str, Any], path: Path) -> str | None:
    """One panel per game: each run's periodic-evaluation score against its step metric (pooled
    seeds: their mean, shaded between the lowest and highest seed), the teacher's and the random
    policy's scores as horizontal lines; one legend below the panels, a label one colour in every
    panel. None when no run has a curve."""
    runs = [a for a in report["agents"] if a.get("learning_curves")]
    if not runs:
        return None
    games = report["games"]
    cols = min(len(games), 3)
    rows = -(-len(games) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
    teacher = next((a for a in report["agents"] if a["kind"] == "teacher"), {"games": {}})
    colours: dict[str, str] = {}
    handles: dict[str, Any] = {}
    metrics = {c["step_metric"] for a in runs for c in a["learning_curves"].values()}
    # runs counted in different units (a student's updates, a DQN's env steps) share an axis as the
    # share of each run's own training, so that neither is squeezed against zero
    shared = len(metrics) > 1
    for ax, g in zip(axes.flat, games):
        for a in runs:
            c = a["learning_curves"].get(g)
            if c:
                label = _curve_label(a["label"], g) + (f" (mean of {c['runs']} seeds)" if "runs" in c else "")
                colour = colours.setdefault(label, _colour(report, a["label"]))  # as in the other plots
                x = np.asarray(c["steps"], dtype=float)
                x = x / x.max() if shared and x.size and x.max() > 0 else x
                handles[label], = ax.plot(x, c["scores"], marker=".", color=colour, label=label)
                if "low" in c:  # pooled seeds: the band between the lowest and the highest seed
                    ax.fill_between(x, c["low"], c["high"], color=colour, alpha=0.2)
        if g in teacher["games"]:
            handles["teacher"] = ax.axhline(teacher["games"][g]["mean"], color="black", linestyle="--",
                                            linewidth=0.8, label="teacher")
        handles["random"] = ax.axhline(report["random"][g]["mean"], color="grey", linestyle=":", linewidth=0.8,
                                       label="random")
        ax.set_title(_short(g))
        if shared:
            ax.set_xlabel(f"share of each run's training ({' or '.join(sorted(metrics))})")
            ax.xaxis.set_major_formatter(PercentFormatter(1.0))
        else:
            ax.set_xlabel(" / ".join(sorted(metrics)) or "step")
            ax.xaxis.set_major_formatter(EngFormatter(sep=""))  # 50k, 1.5M: step counts without overlap
        ax.set_ylabel("evaluation score")
    for ax in list(axes.flat)[len(games):]:
        ax.axis("off")
    return _save(fig, path, legend=handles)


def gridworld_curves(report: dict[str, Any], path: Path) -> str:
    """A grid-world study's mean exact return against updates, one panel per teacher temperature
    (control), action-space size (actions) or fork reward (counter: three single students per
    variant and the expected update's trajectory, dashed), the teachers' mean return dashed."""
    groups: dict[str, list[tuple[str, dict]]] = {}
    for key, c in report["curves"].items():
        variant, group = key.rsplit("@", 1)
        groups.setdefault(group, []).append((variant, c))
    fig, axes = plt.subplots(1, len(groups), figsize=(4.5 * len(groups), 3.4), squeeze=False)
    what = {"control": "teacher temperature", "actions": "|A|", "counter": "fork reward"}[report["study"]]
    for ax, (group, items) in zip(axes.flat, groups.items()):
        for i, (variant, c) in enumerate(items):
            if report["study"] == "counter":  # single students: a mean over students would average the cycle away
                for j, returns in enumerate(c["student_returns"]):
                    ax.plot(c["updates"], returns, color=f"C{i}", linewidth=0.8, alpha=1 if j == 0 else 0.35,
                            label=f"{variant} (students)" if j == 0 else None)
                ax.plot(c["updates"], c["exact_returns"], color="black" if i == 0 else "grey", linewidth=1,
                        linestyle="--", label=f"{variant}, expected update")
            else:
                ax.plot(c["updates"], c["mean_return"], label=variant)
        if report["study"] != "counter":  # the fork's teacher is a sibling task's: it earns 0 there
            ax.axhline(items[0][1]["teacher"], color="black", linestyle="--", linewidth=0.8, label="teacher")
        ax.set_title(f"{what} {group}")
        ax.set_xlabel("updates")
        ax.set_ylabel("exact return" if report["study"] == "counter" else "mean exact return")
        ax.legend(fontsize=7)
    return _save(fig, path)


def online_distillation(report: dict[str, Any], path: Path) -> str:
    """The student's and the training teacher's evaluation returns over the teacher's env steps."""
    fig, ax = plt.subplots(figsize=(6, 3.6))
    t, st = report["teacher"], report["student"]
    ax.plot(t["env_steps"], t["scores"], marker=".", color="black", label="DQN teacher (training)")
    ax.plot(st["env_steps"], st["scores"], marker=".", color="C1", label="student following its best so far")
    ax.set_xlabel("teacher env steps")
    ax.set_ylabel("evaluation return")
    ax.set_title(f"online distillation, {_short(report['game'])}")
    ax.legend(fontsize=8)
    return _save(fig, path)


def write_plots(report: dict[str, Any], out: Path) -> list[str]:
    """Every plot there is data for, under `out`; their file names relative to `out`."""
    out = Path(out)
    made = [pct_of_teacher(report, out / "pct_of_teacher.png"), raw_scores(report, out / "raw_scores.png"),
            learning_curves(report, out / "learning_curves.png")]
    return [m for m in made if m is not None]
