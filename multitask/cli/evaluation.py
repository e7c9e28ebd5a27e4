"""`multitask evaluate` (the one protocol, any agent) and `multitask report` (result tables:
show, export, docs)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from multitask import __version__
from multitask.cli.common import add_device, add_executor, add_no_progress
from multitask.errors import UserError
from multitask.files import check_writable


def check_protocol_flags(episodes: int, seed: int, epsilon: float | None = None, workers: int = 1) -> None:
    """Refuse, before any work, evaluation flags the protocol cannot play."""
    if episodes < 1:
        raise UserError(f"--episodes {episodes} plays nothing; pass 1 or more")
    if seed < 0:
        raise UserError(f"--seed {seed} is negative; env seeds must be 0 or more")
    if epsilon is not None and not 0.0 <= epsilon <= 1.0:
        raise UserError(f"--epsilon {epsilon} is not a probability; pass a value in [0, 1]")
    if workers < 1:
        raise UserError(f"--workers {workers} runs nothing; pass 1 or more")


def cmd_evaluate(args: argparse.Namespace) -> None:
    from multitask.agents.checkpoints import check_agent_game
    from multitask.devices import pick_device
    from multitask.envs import get_game
    from multitask.evaluation.entrants import load_input
    from multitask.evaluation.protocol import EVAL_EPSILON, evaluate_games
    from multitask.evaluation.report import scores_table
    from multitask.config import command_line
    from multitask.files import atomic_write_text

    check_protocol_flags(args.episodes, args.seed, args.epsilon, args.workers)
    device = pick_device(args.device)
    agent, _ = load_input(args.checkpoint)  # a checkpoint, or a run folder's best.pt (as compare takes)
    games = args.games or list(agent.net.games)
    for g in games:
        check_agent_game(agent, get_game(g))
    if args.out:
        check_writable(args.out)
    results = evaluate_games(agent.net, games, args.episodes, args.seed,
                             epsilon=EVAL_EPSILON if args.epsilon is None else args.epsilon,
                             workers=args.workers, show_progress=not args.no_progress, executor=args.executor,
                             jobs_folder=args.jobs_dir, device=device)
    report = {
        "format": "multitask-scores",  # `report show` prints it
        "agent": {"checkpoint": str(agent.path), "sha256": agent.sha256, "kind": agent.kind,
                  "games": list(agent.net.games)},
        "command": command_line(), "package_version": __version__, "seed": args.seed, "episodes": args.episodes,
        "device": device.type,
        "games": {g: r.to_dict() for g, r in results.items()},
    }
    if args.out:
        atomic_write_text(args.out, json.dumps(report, indent=2) + "\n")
    print(scores_table(report))
    print(f"evaluated {agent.kind} {agent.path} on {len(results)} game(s)"
          + (f" -> {args.out}" if args.out else ""))


def cmd_report_show(args: argparse.Namespace) -> None:
    from multitask.evaluation.report import load_results, results_table

    for path in args.results:
        results = load_results(path)
        if isinstance(results, list):
            name = f"sweep of {len(results)} runs"
        else:  # a run's summary, a comparison report or a grid-world study
            name = (results.get("run") or results.get("study") or (results.get("agent") or {}).get("checkpoint")
                    or results.get("format", "results"))
        print(f"{name} ({path}):\n{results_table(results)}\n")


def cmd_report_export(args: argparse.Namespace) -> None:
    from multitask.evaluation.report import export_results

    data = export_results(args.results, args.out)
    runs = len(data) if isinstance(data, list) else 1
    print(f"exported {runs} run(s) without per-episode arrays -> {args.out} "
          f"({args.out.stat().st_size / 1024:.1f} KiB)")


def cmd_report_online(args: argparse.Namespace) -> None:
    from multitask.evaluation.online import online_report

    report = online_report(args.student, args.teacher, args.out)
    st, t = report["student"], report["teacher"]
    print(f"online distillation {report['game']}: student {len(st['scores'])} evaluations, teacher "
          f"{len(t['scores'])} -> {args.out}/{report['plot']}")


def cmd_report_docs(args: argparse.Namespace) -> None:
    from multitask.evaluation.report import update_docs

    status = update_docs(args.files, check=args.check)
    stale = [f"{f} ({', '.join(changed)})" for f, (_, changed) in status.items() if changed]
    if args.check and stale:
        print(f"multitask: error: stale result tables in {'; '.join(stale)}; "
              f"run `multitask report docs {' '.join(map(str, args.files))}` to rewrite them", file=sys.stderr)
        raise SystemExit(1)
    for f, (tables, changed) in status.items():
        what = "up to date" if not changed else ("rewritten: " + ", ".join(changed))
        print(f"{f}: {tables} table(s), {what}")


def add_commands(sub) -> None:
    e = sub.add_parser("evaluate", help="score any agent checkpoint with the one evaluation protocol")
    e.add_argument("checkpoint", type=Path)
    e.add_argument("--games", nargs="+", help="games to evaluate (default: every game the agent plays)")
    e.add_argument("--episodes", type=int, default=20, help="whole games per game (default 20)")
    e.add_argument("--seed", type=int, default=12345, help="env i uses seed + i; actions use their own stream")
    e.add_argument("--epsilon", type=float, help="epsilon-greedy evaluation (default: the protocol's; docs/evaluation.md)")
    e.add_argument("--workers", type=int, default=2, help="processes evaluating games in parallel")
    add_device(e)
    add_executor(e, "runs/jobs/evaluations")
    e.add_argument("--out", type=Path, help="write per-episode returns, lengths, protocol and seeds as JSON")
    add_no_progress(e)
    e.set_defaults(func=cmd_evaluate)

    r = sub.add_parser("report", help="result tables (teacher, student, %% of teacher, geometric mean): "
                       "print them, export slim JSON, rewrite the docs' tables")
    rs = r.add_subparsers(dest="action", required=True)
    show = rs.add_parser("show", help="print the per-game table of runs or sweeps")
    show.add_argument("results", nargs="+", type=Path,
                      help="runs/student/<run>/summary.json, results/<sweep>.json or an export of either")
    show.set_defaults(func=cmd_report_show)
    ex = rs.add_parser("export", help="write a result file without its per-episode arrays, for docs/results/")
    ex.add_argument("results", nargs="+", type=Path,
                    help="runs/student/<run>/summary.json or results/<sweep>.json; several become one list (a sweep)")
    ex.add_argument("--out", type=Path, required=True, help="the slim JSON to write, e.g. docs/results/<name>.json")
    ex.set_defaults(func=cmd_report_export)
    on = rs.add_parser("online", help="a student following a training teacher, beside it: JSON and PNG")
    on.add_argument("student", type=Path, help="the `student drive follow=true` run folder (runs/driven/<run>)")
    on.add_argument("teacher", type=Path, help="the teacher's run folder (runs/teacher/<run>)")
    on.add_argument("--out", type=Path, default=Path("results"), help="folder for online-<suite>-<Game>.json and .png")
    on.set_defaults(func=cmd_report_online)
    docs = rs.add_parser("docs", help="rewrite every marked result table of Markdown files from the JSON it names")
    docs.add_argument("files", nargs="*", type=Path, default=[Path("README.md"), Path("docs/results.md"), Path("docs/gridworld.md")],
                      help="Markdown files (default: README.md docs/results.md docs/gridworld.md)")
    docs.add_argument("--check", action="store_true",
                      help="change nothing; exit 1 naming every table that differs from its JSON")
    docs.set_defaults(func=cmd_report_docs)
