"""`multitask compare`: agents side by side on every game, one protocol, the same seeds."""

from __future__ import annotations

import argparse
from pathlib import Path

from multitask.cli.common import add_device, add_executor, add_no_progress, add_wandb


def cmd_compare(args: argparse.Namespace) -> None:
    from multitask.evaluation.compare import compare

    report = compare(args.agents, args.out, games=args.games, episodes=args.episodes, seed=args.seed,
                     teachers=args.teachers, workers=args.workers, cache_dir=args.cache, reps=args.bootstrap_reps,
                     wandb=args.wandb, show_progress=not args.no_progress,
                     pool_seeds=not args.separate_seeds, device=args.device, executor=args.executor,
                     jobs_folder=args.jobs_dir)
    for a in report["agents"]:
        ag = a["aggregates"]
        geo = ag["geomean_pct_teacher"]
        iqm = ag["iqm_normalised"]
        seeds = "" if len(a["seeds"]) == 1 else f" ({len(a['seeds'])} seeds)"
        print(f"{a['label'] + seeds:24s} {len(a['games'])} game(s)  geometric mean "
              + ("-" if geo is None else f"{geo:.0f}%") + " of teacher  IQM normalised "
              + ("-" if iqm is None else f"{iqm['value']:.2f} [{iqm['ci95'][0]:.2f}, {iqm['ci95'][1]:.2f}]"))
    for note in report["notes"]:  # e.g. games without a teacher (teachers/<suite>/ is looked up from here)
        print(f"note: {note}")
    ev = report["evaluations"]
    print(f"compared {len(report['agents']) - 1} agent(s) ({len(report['inputs'])} checkpoint(s)) with the teachers on {len(report['games'])} game(s) "
          f"({ev['evaluated']} evaluation(s) run, {ev['reused']} reused) -> {args.out}/report.md")


def add_commands(sub) -> None:
    c = sub.add_parser("compare", help="evaluate agents, teachers and a random policy on every game with the one "
                       "protocol and the same seeds; write report.md, report.json and plots")
    c.add_argument("agents", nargs="+", type=Path, metavar="run-or-checkpoint",
                   help="agent checkpoints (*.pt) or run folders (their best.pt; metrics.jsonl gives learning curves)")
    c.add_argument("--out", type=Path, required=True, help="folder for report.md, report.json, the PNG plots, W&B")
    c.add_argument("--games", nargs="+", help="games to compare (default: every game any agent plays); "
                   "each agent plays those it has heads for")
    c.add_argument("--episodes", type=int, default=100, help="whole games per agent and game (default 100)")
    c.add_argument("--seed", type=int, default=777_777,
                   help="env i uses seed + i, the same for every agent (default 777777, the final evaluations' seed)")
    c.add_argument("--teachers", nargs="+", type=Path,
                   help="teacher checkpoints, one per game (default: teachers/<suite>/<Game>.pt)")
    c.add_argument("--separate-seeds", action="store_true",
                   help="one column per run; by default runs whose configs differ only in seed (and name, and "
                   "execution settings) are pooled into one column, the seeds as rliable's runs")
    c.add_argument("--workers", type=int, default=2, help="processes evaluating an agent's games in parallel")
    add_device(c)
    add_executor(c, "runs/jobs/evaluations")
    c.add_argument("--cache", type=Path, help="folder of cached evaluations (default: <out>/evaluations)")
    c.add_argument("--bootstrap-reps", type=int, default=10_000,
                   help="bootstrap resamples for the 95%% intervals (default 10000)")
    add_no_progress(c)
    add_wandb(c)
    c.set_defaults(func=cmd_compare)
