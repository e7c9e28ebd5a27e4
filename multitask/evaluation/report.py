"""Tables from run summaries, and the documentation's result tables made from them.

Scores are means over the final evaluation's episodes (best.pt, fresh seeds, the one protocol);
percentages are 100 * student / teacher (Rusu et al. 2016); the geometric mean floors each
percentage at 0.1% so that one zero score does not hide the others.

Result tables in the docs are never typed: each sits between markers naming a committed JSON,
    <!-- table: results/minatar-multitask.json -->
    ...
    <!-- end table -->
(the path is relative to the Markdown file), and `update_docs` rewrites every marked table from its
JSON. A JSON is a run's summary.json slimmed by `slim` (no per-episode arrays), or a list of them
(a sweep).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from multitask.agents.networks import shape_tag
from multitask.config import as_typed

from multitask.errors import UserError
from multitask.files import atomic_write_text, check_writable

# Goals for the committed MinAtar teachers (mean of 20 evaluation episodes), set by the project
# when it asked for teachers trained in ~30 CPU-minutes each; roughly the MinAtar paper's DQN
# after 1-2M frames.
MINATAR_TEACHER_TARGETS = {"minatar/Asterix": 10, "minatar/Breakout": 10, "minatar/Freeway": 40,
                           "minatar/Seaquest": 8, "minatar/SpaceInvaders": 50}
GEOMEAN_FLOOR = 0.1  # percent: one zero score would zero the geometric mean; floor it and say so
SUMMARY_KEYS = ("config", "scores", "teacher_scores", "pct_teacher", "parameters")  # what a summary must hold
PER_EPISODE_KEYS = ("returns", "lengths", "truncated", "env_index")  # dropped by `slim`
TABLE_START = "<!-- table: "  # a marker is a line of its own: the start line, the table, the end line
TABLE_STARTS = re.compile(r"^<!-- table: ", re.M)
TABLE_MARKER = re.compile(r"^<!-- table: (?P<src>[^\s>]+) -->\n(?P<body>.*?)^<!-- end table -->$", re.S | re.M)

Results = dict[str, Any] | list[dict[str, Any]]  # one run's summary, or a sweep's list of them


def pct_of_teacher(scores: dict[str, float], teacher: dict[str, float | None]) -> tuple[dict[str, float], float | None]:
    """100 * agent / teacher per game and their geometric mean.

    Rule for scores of zero or below: a game whose teacher scored 0 or less (or has no teacher)
    has no % of teacher (a zero denominator is undefined, a negative one flips the sign: -10 against
    a teacher's -20 would read 50%; Atari's Pong, Tennis or Skiing teachers can score below 0). An
    agent's score of 0 or below against a positive teacher is kept (0% or negative), and the
    geometric mean floors each percentage at GEOMEAN_FLOOR (0.1%). The geometric mean is None
    unless every game has a percentage.
    """
    pct = {g: 100.0 * s / teacher[g] for g, s in scores.items()
           if teacher.get(g) is not None and teacher[g] > 0}
    if len(pct) < len(scores):
        return pct, None
    return pct, geomean(list(pct.values()))


def load_summary(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def geomean(values: Sequence[float]) -> float:
    return float(np.exp(np.mean(np.log(np.maximum(values, GEOMEAN_FLOOR)))))


# ---- tables -------------------------------------------------------------------------------------

def run_table(summary: dict) -> str:
    """One run (an offline student; a multi-task DQN, summary kind "multitask-dqn"; a student-driven
    student, kind "student-driven"): a row per game plus the geometric mean, and a line on the
    network, its training and the episodes."""
    kind = summary.get("kind")
    agent = "multi-task DQN" if kind == "multitask-dqn" else "student"
    episodes = summary.get("episodes") or {}
    lines = [f"| game | teacher | {agent} (± s.e.) | % of teacher |", "|---|---:|---:|---:|"]
    for g, s in summary["scores"].items():
        t = summary["teacher_scores"].get(g)
        pct = summary["pct_teacher"].get(g)
        err = (episodes.get(g) or {}).get("stderr")
        lines.append(f"| {g} | {_num(t)} | {s:.2f}{'' if err is None else f' ± {err:.2f}'} | {_pct(pct)} |")
    lines.append(f"| **geometric mean** | | | **{_pct(summary.get('geomean_pct_teacher'))}** |")
    p = summary["parameters"]
    n = (summary.get("config") or {}).get("final_eval_episodes")
    if kind == "student-driven":
        training = (f"Student-driven student ({summary['config']['variant']}): {p['student']:,} parameters "
                    f"({p['fraction_of_mean_teacher']:.2f}x a mean teacher); {summary['env_steps']:,} teacher-labelled "
                    f"env steps per game, {summary['updates']:,} updates, best at env step {summary['best_env_steps']:,}")
    elif kind == "multitask-dqn":
        training = (f"Multi-task DQN: {p['network']:,} parameters ({p['fraction_of_mean_teacher']:.2f}x a mean "
                    f"teacher); {summary['env_steps']:,} env steps per game, {summary['updates']:,} updates, best at "
                    f"env step {summary['best_env_steps']:,}")
    else:
        training = (f"Student: {p['student']:,} parameters ({p['fraction_of_mean_teacher']:.2f}x a mean teacher); "
                    f"{summary['updates']:,} updates, best at {summary['best_update']:,}")
    lines.append("")
    lines.append(f"{training}; {summary['wall_time_s'] / 60:.1f} min."
                 + (f" Scores: mean of {n} episodes per game, teacher and {agent} on the same seeds." if n else ""))
    return "\n".join(lines)


def sweep_table(summaries: Sequence[dict], column_key: str, columns: Sequence[str]) -> str:
    """Runs side by side: rows are games (a multi-task run fills every row of its games), columns
    one value of `column_key` (loss, size, method, ...); the cells are student score (% of
    teacher), averaged over seeds, with a 95% interval over seeds where there are several."""
    games = sorted({g for s in summaries for g in s["config"]["games"]})
    cell: dict[tuple[str, str], list[dict]] = {}
    for s in summaries:  # a multi-task run fills a cell in every game's row
        for g in s["config"]["games"]:
            cell.setdefault((g, column_value(s, column_key)), []).append(s)
    from multitask.evaluation.statistics import seed_interval  # statistics imports this module

    header = "| game | teacher | " + " | ".join(f"{c}: score (% of teacher)" for c in columns) + " |"
    lines = [header, "|---|---:|" + "---:|" * len(columns)]
    per_column: dict[str, list[float]] = {c: [] for c in columns}
    per_seed: dict[str, dict[int, list[float]]] = {c: {} for c in columns}  # column -> seed -> % per game
    for g in games:
        teacher = next(s["teacher_scores"][g] for s in summaries if g in s["config"]["games"])
        row = [g, _num(teacher)]
        for c in columns:
            runs = cell.get((g, c), [])
            if not runs:
                row.append("-")
                continue
            score = float(np.mean([r["scores"][g] for r in runs]))
            pct = [r["pct_teacher"].get(g) for r in runs]
            if any(p is None for p in pct):
                row.append(f"{score:.2f} ({_pct(None)})")
                continue
            per_column[c].append(float(np.mean(pct)))
            for r, p in zip(runs, pct):
                per_seed[c].setdefault(r["config"].get("seed", 0), []).append(p)  # runs before seeds: 0
            row.append(f"{score:.2f} ({_pct_interval(*seed_interval(pct))})" + (f" [{len(runs)} seeds]" if len(runs) > 1 else ""))
        lines.append("| " + " | ".join(row) + " |")
    aggregate = []
    for c, v in per_column.items():
        if len(v) != len(games):
            aggregate.append("-")
            continue
        whole = [geomean(p) for p in per_seed[c].values() if len(p) == len(games)]  # seeds that ran every game
        aggregate.append(f"**{_pct_interval(*seed_interval(whole))}**" if len(whole) > 1 else f"**{_pct(geomean(v))}**")
    lines.append("| **geometric mean** | | " + " | ".join(aggregate) + " |")
    if any(len(per_seed[c]) > 1 for c in columns):
        lines += ["", "With several seeds: mean over seeds [95% Student-t interval over seeds]; the geometric mean is "
                      "each seed's geometric mean over games, then the same."]
    params = {}
    for s in summaries:
        params.setdefault(column_value(s, column_key), s["parameters"]["fraction_of_teacher"])
    if "size" in column_key.split("+"):
        lines.append("")
        lines.append("Parameters relative to the teacher: " + ", ".join(
            f"{c}: {100 * params[c]:.1f}% " + (f"(1/{1 / params[c]:.1f})" if params[c] <= 1 else f"({params[c]:.1f}x)")
            for c in columns if c in params))
    return "\n".join(lines)


def _pct_interval(mean: float, low: float | None, high: float | None) -> str:
    return _pct(mean) if low is None or high is None else f"{_pct(mean)} [{low:.0f}, {high:.0f}]"


def column_value(summary: dict, key: str) -> str:
    """A run's value of what a sweep varied (`a+b`: both values, space-separated); `method`: a
    student-driven run's variant, else `offline <loss>` (offline and student-driven students side by
    side); `datasets`: their folders (`default` when the run took datasets/<suite>/)."""
    config = summary["config"]
    if "+" in key:
        return " ".join(column_value(summary, k) for k in key.split("+"))
    if key == "method":
        return str(config.get("variant") or f"offline {config.get('loss')}")
    if key == "datasets":
        folders = sorted({str(Path(d).parent) for d in config.get("datasets") or ()})
        return ",".join(folders) or "default"
    if key == "tau":
        return "tau -" if config.get("tau") is None else f"tau {config['tau']:g}"
    if key == "loss_norm":
        return "loss norm" if config.get("loss_norm") else "plain loss"
    if key == "shape":  # as run names write it; runs from before shapes were uniform
        return shape_tag(config.get("shape", "uniform"), config.get("conv_width") or 0)
    return str(config.get(key))


# Config keys a table of single-game runs may vary, in the order their values are named in a
# column: seeds are averaged, never columns; games are the rows.
COLUMN_KEYS = ("loss", "size", "shape", "tau", "loss_norm", "updates", "datasets")


def sweep_columns(summaries: Sequence[dict]) -> tuple[str, list[str]]:
    """What a sweep varied and its values in the order the runs list them: `method` where
    student-driven runs are among them, else every key of COLUMN_KEYS whose values differ, joined
    with '+' (e.g. `size+shape`); `size` when none does."""
    if any("variant" in s["config"] for s in summaries):
        key = "method"
    else:
        varied = [k for k in COLUMN_KEYS if len({column_value(s, k) for s in summaries}) > 1]
        key = "+".join(varied) or "size"
    return key, list(dict.fromkeys(column_value(s, key) for s in summaries))


def scores_table(report: dict) -> str:
    """`multitask evaluate`'s scores (its --out JSON): a row per game, the mean with its standard
    error and the per-episode spread."""
    lines = ["| game | mean | standard error | per-episode std | min | max | episodes | mean length |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for g, r in report["games"].items():
        length = f"{np.mean(r['lengths']):.0f}" if r.get("lengths") else "-"
        lines.append(f"| {g} | {r['mean']:.2f} | {r['stderr']:.2f} | {r['std']:.2f} | {r['min']:g} | {r['max']:g} | "
                     f"{r['episodes']} | {length} |")
    return "\n".join(lines)


def results_table(results: Results) -> str:
    """The table of one run (a summary), of a sweep (a list of summaries), of an evaluation, a
    comparison or a grid-world study."""
    if isinstance(results, dict) and results.get("format") == "multitask-scores":
        return scores_table(results)
    if isinstance(results, dict) and results.get("format") == "multitask-gridworld":
        return gridworld_table(results)
    if isinstance(results, dict) and results.get("format") == "multitask-compare":
        from multitask.evaluation.compare_tables import docs_table
        return docs_table(results)
    if isinstance(results, dict):
        return run_table(results)
    return sweep_table(results, *sweep_columns(results))


def _num(x) -> str:
    return "-" if x is None else f"{x:.2f}"


def _pct(x) -> str:
    return "-" if x is None else f"{x:.0f}%"


# ---- result files -------------------------------------------------------------------------------

def load_results(path: Path) -> Results:
    """A run's summary.json, a sweep's results/<name>.json or a slim export of either."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist; pass a run's summary.json or a sweep's results/<name>.json")
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        data = None
    if isinstance(data, dict) and data.get("format") in ("multitask-scores", "multitask-gridworld", "multitask-compare"):
        return data
    runs = data if isinstance(data, list) else [data]
    if not runs or not all(isinstance(r, dict) and all(k in r for k in SUMMARY_KEYS) for r in runs):
        raise UserError(f"{path} is not a result file of this package; pass a run's summary.json, a sweep's "
                        "results/<sweep>.json, `evaluate --out`'s, `compare`'s report.json or a grid-world study's JSON")
    return data


def slim(results: Results) -> Results:
    """The same results without the per-episode arrays (means, std, stderr, min and max stay)."""
    if isinstance(results, list):
        return [slim(r) for r in results]
    out = dict(results)
    if isinstance(out.get("episodes"), dict):
        out["episodes"] = {g: {k: v for k, v in e.items() if k not in PER_EPISODE_KEYS}
                           for g, e in out["episodes"].items()}
    return out


def export_results(sources: Sequence[Path], out: Path) -> Results:
    """Write the slim JSON of one result file to `out`; several sources become one list (a sweep)."""
    loaded = [load_results(p) for p in sources]
    if len(loaded) == 1:
        data = slim(loaded[0])
    else:
        data = [slim(r) for item in loaded for r in (item if isinstance(item, list) else [item])]
    check_writable(out)
    atomic_write_text(out, json.dumps(data, indent=2) + "\n")
    return data


# ---- tables in Markdown files -------------------------------------------------------------------

def render_tables(text: str, base: Path, name: str = "the file") -> tuple[str, list[str]]:
    """`text` with every marked table rebuilt from its JSON (paths relative to `base`), and the
    JSON paths whose table changed."""
    if len(TABLE_STARTS.findall(text)) != len(TABLE_MARKER.findall(text)):
        raise UserError(f"{name} has a '{TABLE_START}...' marker without its '<!-- end table -->'; add the end marker")
    changed: list[str] = []

    def fill(m: re.Match) -> str:
        src = m.group("src")
        path = base / src
        if not path.is_file():
            raise UserError(f"{name} names {path}, which does not exist; write it with "
                            f"`multitask report export <summary.json> --out {path}`")
        table = results_table(load_results(path)) + "\n"
        if m.group("body") != table:
            changed.append(src)
        return f"{TABLE_START}{src} -->\n{table}<!-- end table -->"

    return TABLE_MARKER.sub(fill, text), changed


def update_docs(files: Sequence[Path], check: bool = False) -> dict[Path, tuple[int, list[str]]]:
    """Rewrite (or with `check`, only compare) every marked table of each file; per file the number
    of tables and the JSON paths whose table was out of date."""
    status = {}
    for f in map(Path, files):
        if not f.is_file():
            raise UserError(f"{f} does not exist; pass Markdown files with marked tables (README.md docs/results.md)")
        text = f.read_text()
        new, changed = render_tables(text, f.parent, str(f))
        if changed and not check:
            atomic_write_text(f, new)
        status[f] = (len(TABLE_MARKER.findall(text)), changed)
    return status


# ---- teacher manifest ---------------------------------------------------------------------------
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
                     f"{card.get('weights', card.get('source', '-'))} | `{card['sha256'][:12]}` | `{as_typed(card['command']) if card.get('command') else '-'}` |")
        curve = card.get("learning_curve") or []
        if curve:
            points = ", ".join(f"{p['env_steps'] // 1000}k: {p['mean']:.1f}" for p in curve)
            curves.append(f"- {game} (periodic evaluation, {card['config']['eval_episodes']} episodes each): {points}")
    return "\n".join(lines + ([""] + ["Learning curves (env steps: mean score):"] + curves if curves else []))


def gridworld_table(report: dict) -> str:
    """A grid-world study's Markdown table (training/gridworld_studies.py), from its JSON alone."""
    def ret(x: dict) -> str:
        return f"{x['mean']:.2f} [{x['low']:.2f}, {x['high']:.2f}]"

    lines = [f"<!-- made by: {report['command']} -->", ""]
    if report["study"] == "control":
        lines += ["| teacher temperature | control (loss: cross-entropy to the teacher) | final return [95% CI] | "
                  "teacher | MDPs reached | median updates to reach | median labels to reach |",
                  "|---:|---|---:|---:|---:|---:|---:|"]
        for r in report["rows"]:
            if "ratio_median" in r:
                lines.append(f"| {r['temperature']:g} | **teacher-driven / student-driven** (median over MDPs "
                             f"[quartiles]) | | | {r['mdps_with_both']} | {_ratio(r['ratio_median'], r['ratio_quartiles'])} | "
                             f"{_ratio(r['label_ratio_median'], r['label_ratio_quartiles'])} |")
            else:
                lines.append(f"| {r['temperature']:g} | {r['variant']} | {ret(r['final_return'])} | "
                             f"{r['teacher_return']:.2f} | {r['reached']}/{r['mdps']} | {_opt(r['median_updates_to_reach'])} | "
                             f"{_opt(r['median_labels_to_reach'])} |")
    elif report["study"] == "counter":
        lines += ["| fork reward | variant | return swing over the last quarter [95% CI] | final return [95% CI] | "
                  "swing, expected update (median) | final, expected update | best possible | students |",
                  "|---:|---|---:|---:|---:|---:|---:|---:|"]
        for r in report["rows"]:
            lines.append(f"| {r['reward']:g} | {r['variant']} | {ret(r['late_swing'])} | {ret(r['final_return'])} | "
                         f"{r['exact_swing']:.2f} | {r['exact_final_return']:.2f} | {r['best_return']:g} | "
                         f"{r['students']} |")
    else:
        lines += ["| actions | variant | final return [95% CI] | teacher | MDPs |", "|---:|---|---:|---:|---:|"]
        for r in report["rows"]:
            lines.append(f"| {r['actions']} | {r['variant']} | {ret(r['final_return'])} | {r['teacher_return']:.2f} | "
                         f"{r['mdps']} |")
    return "\n".join(lines)


def _ratio(median: float | None, quartiles: list[float] | None) -> str:
    if median is None or quartiles is None:
        return "-"
    return f"**{median:.2f}x** [{quartiles[0]:.2f}, {quartiles[1]:.2f}]"


def _opt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}" if x < 10 else f"{x:.0f}"
