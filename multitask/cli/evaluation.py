"""`multitask evaluate` (the one protocol, any agent) and `multitask report` (tables of runs)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from multitask import __version__
from multitask.cli.common import add_no_progress
from multitask.errors import UserError
from multitask.files import check_writable


def cmd_evaluate(args: argparse.Namespace) -> None:
    from multitask.agents.checkpoints import check_agent_game, load_agent
    from multitask.envs import get_game
    from multitask.evaluation.protocol import EVAL_EPSILON, evaluate_games
    from multitask.files import atomic_write_text

    agent = load_agent(args.checkpoint)
    games = args.games or list(agent.net.games)
    for g in games:
        check_agent_game(agent, get_game(g))
    if args.out:
        check_writable(args.out)
    results = evaluate_games(agent.net, games, args.episodes, args.seed,
                             epsilon=EVAL_EPSILON if args.epsilon is None else args.epsilon,
                             workers=args.workers, show_progress=not args.no_progress)
    report = {
        "agent": {"checkpoint": str(agent.path), "sha256": agent.sha256, "kind": agent.kind,
                  "games": list(agent.net.games)},
        "package_version": __version__, "seed": args.seed, "episodes": args.episodes,
        "games": {g: r.to_dict() for g, r in results.items()},
    }
    if args.out:
        atomic_write_text(args.out, json.dumps(report, indent=2) + "\n")
    for g, r in results.items():
        print(f"{g:28s} {r.mean:10.2f} +/- {np.std(r.returns):.2f}  ({len(r.returns)} episodes, "
              f"mean length {np.mean(r.lengths):.0f})")
    print(f"evaluated {agent.kind} {agent.path} on {len(results)} game(s)"
          + (f" -> {args.out}" if args.out else ""))


def cmd_report(args: argparse.Namespace) -> None:
    from multitask.evaluation.report import load_summary, run_table

    for path in args.summaries:
        if not Path(path).is_file():
            raise UserError(f"{path} does not exist; pass a run's summary.json")
        try:
            summary = load_summary(path)
            print(f"{summary['run']}:\n{run_table(summary)}\n")
        except (ValueError, KeyError):
            raise UserError(f"{path} is not a student run summary (summary.json)") from None


def add_commands(sub) -> None:
    e = sub.add_parser("evaluate", help="score any agent checkpoint with the one evaluation protocol")
    e.add_argument("checkpoint", type=Path)
    e.add_argument("--games", nargs="+", help="games to evaluate (default: every game the agent plays)")
    e.add_argument("--episodes", type=int, default=20, help="whole games per game (default 20)")
    e.add_argument("--seed", type=int, default=12345, help="env i uses seed + i; actions use their own stream")
    e.add_argument("--epsilon", type=float, help="epsilon-greedy evaluation (default: the protocol's, 0.05)")
    e.add_argument("--workers", type=int, default=2, help="processes evaluating games in parallel")
    e.add_argument("--out", type=Path, help="write per-episode returns, lengths, protocol and seeds as JSON")
    add_no_progress(e)
    e.set_defaults(func=cmd_evaluate)

    r = sub.add_parser("report", help="per-game table (teacher, student, %% of teacher, geometric mean) of student runs")
    r.add_argument("summaries", nargs="+", type=Path, help="runs/student/<run>/summary.json")
    r.set_defaults(func=cmd_report)
