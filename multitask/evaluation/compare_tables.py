"""The comparison's report.md tables and its W&B table, both made from report.json's content alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from multitask.training.tracking import Tracker


def _num(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f}%"


def _interval(ci: list[float] | None, fmt=_pct) -> str:
    return "" if ci is None else f" [{fmt(ci[0])}, {fmt(ci[1])}]"


def _cells(report: dict, cell) -> list[str]:
    """One row per game, one column per agent (teacher first); '-' where an agent does not play."""
    agents = report["agents"]
    lines = ["| game | " + " | ".join(a["label"] for a in agents) + " |", "|---|" + "---:|" * len(agents)]
    for g in report["games"]:
        lines.append(f"| {g} | " + " | ".join(cell(a["games"][g]) if g in a["games"] else "-" for a in agents) + " |")
    return lines


def raw_table(report: dict) -> list[str]:
    """Raw scores: mean ± standard error over runs, with the random policy's column first."""
    agents = report["agents"]
    lines = ["| game | random | " + " | ".join(a["label"] for a in agents) + " |",
             "|---|---:|" + "---:|" * len(agents)]
    for g in report["games"]:
        r = report["random"][g]
        row = [f"{a['games'][g]['mean']:.2f} ± {a['games'][g]['stderr']:.2f}" if g in a["games"] else "-" for a in agents]
        lines.append(f"| {g} | {r['mean']:.2f} ± {r['stderr']:.2f} | " + " | ".join(row) + " |")
    return lines


def aggregate_table(report: dict) -> list[str]:
    human = report.get("human_reference") is not None
    head = ("| agent | games | runs | geometric mean % of teacher | mean % of teacher | "
            "IQM teacher-normalised [95% CI] |")
    lines = [head + (" IQM human-normalised [95% CI] |" if human else ""),
             "|---|---:|---|---:|---:|---:|" + ("---:|" if human else "")]
    for a in report["agents"]:
        ag = a["aggregates"]
        row = [a["label"], str(len(a["games"])), _runs(a, report["episodes"]), _pct(ag["geomean_pct_teacher"]),
               _pct(ag["mean_pct_teacher"]), _iqm(ag["iqm_normalised"])]
        if human:
            row.append(_iqm(ag["iqm_human_normalised"]))
        lines.append("| " + " | ".join(row) + " |")
    return lines


def _runs(agent: dict, episodes: int) -> str:
    n = len(agent["seeds"])
    return f"{episodes} episodes" if n == 1 else f"{n} seeds ({', '.join(str(s) for s in agent['seeds'])})"


def _iqm(x: dict | None) -> str:
    if x is None:
        return "-"
    return f"{x['value']:.2f} [{x['ci95'][0]:.2f}, {x['ci95'][1]:.2f}] ({len(x['games'])} game{'s' if len(x['games']) > 1 else ''})"


def docs_table(report: dict) -> str:
    """The comparison as the docs show it (`report docs`): % of teacher per game and agent with
    95% intervals, then the aggregates."""
    return "\n".join([*_cells(report, lambda e: _pct(e["pct_teacher"]) + _interval(e["pct_teacher_ci95"])), "",
                      *aggregate_table(report)])


def markdown(report: dict) -> str:
    """report.md: raw scores, % of teacher with 95% intervals, normalised scores, aggregates, rules."""
    n, seed = report["episodes"], report["seed"]
    out = [f"# Comparison on {len(report['games'])} {report['suite']} games",
           "", f"Every agent played the same {n} episodes per game (env seeds {seed} + i, action noise seed "
           f"{report['seeds']['action_seed']}) under the one protocol (epsilon {next(iter(report['protocol'].values()))['epsilon']}, "
           "whole games, raw scores; docs/evaluation.md). The random policy is the same protocol at epsilon 1.0.",
           "", "## Raw scores (mean ± standard error over runs: episodes, or seeds where pooled)", "", *raw_table(report),
           "", "## % of teacher [95% bootstrap interval]", "",
           *_cells(report, lambda e: _pct(e["pct_teacher"]) + _interval(e["pct_teacher_ci95"])),
           "", "## Teacher-normalised score (agent - random) / (teacher - random)", "",
           *_cells(report, lambda e: _num(e["normalised"]))]
    if report.get("human_reference"):
        out += ["", "## Human-normalised score (agent - random) / (human - random)", "",
                f"Reference: {report['human_reference_source']}.", "",
                *_cells(report, lambda e: _num(e["human_normalised"]))]
    out += ["", "## Aggregates", "", *aggregate_table(report), "", "## Rules", "",
            *[f"- {r}" for r in report["rules"]]]
    if report["notes"]:
        out += ["", "## Notes", "", *[f"- {x}" for x in report["notes"]]]
    out += ["", "## Inputs", "", "| agent | seed | checkpoint | sha256 |", "|---|---:|---|---|"]
    out += [f"| teacher | - | {t['path']} | `{t['sha256'][:16]}` |" for t in report["teachers"].values()]
    out += [f"| {i['label']} | {'-' if i['seed'] is None else i['seed']} | {i['path']} | `{i['sha256'][:16]}` |"
            for i in report["inputs"]]
    if report.get("plots"):
        out += ["", "## Plots", "", *[f"![{Path(p).stem}]({p})" for p in report["plots"]]]
    return "\n".join(out)


TABLE_COLUMNS = ["agent", "game", "label", "score", "stderr", "pct_teacher", "pct_teacher_low", "pct_teacher_high",
                 "normalised", "human_normalised"]


def table_rows(report: dict) -> list[list[Any]]:
    """One row per agent and game; `label` ("agent · Game") names a bar of the chart."""
    rows = []
    for a in report["agents"]:
        for g, e in a["games"].items():
            ci = e["pct_teacher_ci95"] or [None, None]
            rows.append([a["label"], g, f"{a['label']} · {g.split('/', 1)[1]}", e["mean"], e["stderr"],
                         e["pct_teacher"], ci[0], ci[1], e["normalised"], e["human_normalised"]])
    return rows


def summary_values(report: dict) -> dict[str, float]:
    """compare/<agent>/<aggregate> for every aggregate that exists."""
    values = {}
    for a in report["agents"]:
        for name, v in a["aggregates"].items():
            value = v["value"] if isinstance(v, dict) else v
            if value is not None:
                values[f"compare/{a['label']}/{name}"] = value
    return values


def to_wandb(report: dict, out: Path, mode: str) -> None:
    """The table (`compare/table`), a bar chart of % of teacher and the aggregates as summary values."""
    if mode == "off":
        return
    tracker = Tracker(mode, Path(out), name=f"compare-{Path(out).name}", job_type="compare",
                      config={k: report[k] for k in ("suite", "games", "episodes", "seed", "inputs", "teachers")})
    try:
        tracker.table("compare/table", TABLE_COLUMNS, table_rows(report), bar=("label", "pct_teacher"),
                      title="% of teacher per agent and game")
        tracker.summary(summary_values(report))
    finally:
        tracker.finish()
