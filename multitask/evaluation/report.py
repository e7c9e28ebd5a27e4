"""Tables from run summaries: per game teacher score, student score, % of teacher, geometric mean.

Scores are means over the final evaluation's episodes (best.pt, fresh seeds, the one protocol);
percentages are 100 * student / teacher (Rusu et al. 2016); the geometric mean floors each
percentage at 0.1% so that one zero score does not hide the others.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

# Goals for the committed MinAtar teachers (mean of 20 evaluation episodes), set by the project
# when it asked for teachers trained in ~30 CPU-minutes each; roughly the MinAtar paper's DQN
# after 1-2M frames.
MINATAR_TEACHER_TARGETS = {"minatar/Asterix": 10, "minatar/Breakout": 10, "minatar/Freeway": 40,
                           "minatar/Seaquest": 8, "minatar/SpaceInvaders": 50}
GEOMEAN_FLOOR = 0.1  # percent: one zero score would zero the geometric mean; floor it and say so


def pct_of_teacher(scores: dict[str, float], teacher: dict[str, float | None]) -> tuple[dict, float | None]:
    """100 * student / teacher per game and their geometric mean (None unless every game has a teacher score)."""
    pct = {g: 100.0 * s / teacher[g] for g, s in scores.items() if teacher.get(g)}
    if len(pct) < len(scores):
        return pct, None
    return pct, geomean(list(pct.values()))


def load_summary(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def geomean(values: Sequence[float]) -> float:
    return float(np.exp(np.mean(np.log(np.maximum(values, GEOMEAN_FLOOR)))))


def run_table(summary: dict) -> str:
    """One run (e.g. the multi-task student): a row per game plus the geometric mean."""
    lines = ["| game | teacher | student | % of teacher |", "|---|---:|---:|---:|"]
    for g, s in summary["scores"].items():
        t = summary["teacher_scores"].get(g)
        pct = summary["pct_teacher"].get(g)
        lines.append(f"| {g} | {_num(t)} | {s:.2f} | {_pct(pct)} |")
    lines.append(f"| **geometric mean** | | | **{_pct(summary.get('geomean_pct_teacher'))}** |")
    p = summary["parameters"]
    lines.append("")
    lines.append(f"Student: {p['student']:,} parameters ({p['fraction_of_mean_teacher']:.2f}x a mean teacher); "
                 f"{summary['updates']:,} updates, best at {summary['best_update']:,}; "
                 f"{summary['wall_time_s'] / 60:.1f} min.")
    return "\n".join(lines)


def sweep_table(summaries: Sequence[dict], column_key: str, columns: Sequence[str]) -> str:
    """Single-game runs: rows are games, columns one value of `column_key` (loss or size); the
    cells are student score (% of teacher), averaged over seeds."""
    games = sorted({s["config"]["games"][0] for s in summaries})
    cell: dict[tuple[str, str], list[dict]] = {}
    for s in summaries:
        cell.setdefault((s["config"]["games"][0], str(s["config"][column_key])), []).append(s)
    header = "| game | teacher | " + " | ".join(f"{c}: score (% of teacher)" for c in columns) + " |"
    lines = [header, "|---|---:|" + "---:|" * len(columns)]
    per_column: dict[str, list[float]] = {c: [] for c in columns}
    for g in games:
        teacher = next(s["teacher_scores"][g] for s in summaries if s["config"]["games"][0] == g)
        row = [g, _num(teacher)]
        for c in columns:
            runs = cell.get((g, c), [])
            if not runs:
                row.append("-")
                continue
            score = float(np.mean([r["scores"][g] for r in runs]))
            pct = [r["pct_teacher"].get(g) for r in runs]
            pct_mean = float(np.mean(pct)) if all(p is not None for p in pct) else None
            if pct_mean is not None:
                per_column[c].append(pct_mean)
            seeds = f" [{len(runs)} seeds]" if len(runs) > 1 else ""
            row.append(f"{score:.2f} ({_pct(pct_mean)}){seeds}")
        lines.append("| " + " | ".join(row) + " |")
    lines.append("| **geometric mean** | | " + " | ".join(
        f"**{_pct(geomean(v))}**" if len(v) == len(games) else "-" for v in per_column.values()) + " |")
    params = {}
    for s in summaries:
        params.setdefault(str(s["config"][column_key]), s["parameters"]["fraction_of_teacher"])
    if column_key == "size":
        lines.append("")
        lines.append("Parameters relative to the teacher: " + ", ".join(
            f"{c}: {100 * params[c]:.1f}% (1/{1 / params[c]:.1f})" for c in columns if c in params))
    return "\n".join(lines)


def _num(x) -> str:
    return "-" if x is None else f"{x:.2f}"


def _pct(x) -> str:
    return "-" if x is None else f"{x:.0f}%"


def teacher_manifest(folder: Path, targets: dict[str, float] | None = None) -> str:
    """teachers/<suite>/MANIFEST.md: a row per teacher card, then each teacher's learning curve."""
    cards = sorted(Path(folder).glob("*.json"))
    lines = ["| game | score (mean ± std, episodes) | target | env steps | wall time | CPU time | weights | sha256 | command |",
             "|---|---|---:|---:|---:|---:|---|---|---|"]
    curves = []
    for path in cards:
        card = json.loads(path.read_text())
        if card.get("kind") != "teacher":
            continue
        game = card["game"]["name"]
        ev = card.get("eval") or {}
        target = (targets or {}).get(game)
        met = "" if target is None or not ev else (" ✓" if ev["mean"] >= target else " ✗ (missed)")
        score = f"{ev['mean']:.2f} ± {ev['std']:.2f} ({ev['episodes']})" if ev else "-"
        steps = f"{card['env_steps']:,}" if card.get("env_steps") else "-"
        wall = f"{card['wall_time_s'] / 60:.0f} min" if card.get("wall_time_s") else "-"
        cpu = f"{card['cpu_time_s'] / 60:.0f} min" if card.get("cpu_time_s") else "-"
        lines.append(f"| {game} | {score}{met} | {'-' if target is None else f'>= {target:g}'} | {steps} | {wall} | {cpu} | "
                     f"{card.get('weights', card.get('source', '-'))} | `{card['sha256'][:12]}` | `{card.get('command', '-')}` |")
        curve = card.get("learning_curve") or []
        if curve:
            points = ", ".join(f"{p['env_steps'] // 1000}k: {p['mean']:.1f}" for p in curve)
            curves.append(f"- {game} (periodic evaluation, {card['config']['eval_episodes']} episodes each): {points}")
    return "\n".join(lines + ([""] + ["Learning curves (env steps: mean score):"] + curves if curves else []))
