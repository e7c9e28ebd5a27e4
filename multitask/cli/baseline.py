"""`multitask baseline train`: the jointly trained multi-task DQN."""

from __future__ import annotations

import argparse
from pathlib import Path

from multitask.cli.common import add_run_options
from multitask.errors import UserError


def cmd_baseline_train(args: argparse.Namespace) -> None:
    from multitask.training.baseline import load_config, train_baseline

    if args.config is None and not args.overrides:
        raise UserError("give a config (--config configs/baseline/<name>.toml) or at least games=...")
    cfg = load_config(args.config, args.overrides)
    train_baseline(cfg, run_dir=args.run_dir, wandb_mode=args.wandb, restart=args.restart,
                   show_progress=not args.no_progress)


def add_commands(sub) -> None:
    b = sub.add_parser("baseline", help="the multi-task DQN baseline, trained jointly online on all games").add_subparsers(dest="action", required=True)
    bt = b.add_parser("train", help="train one multi-task DQN on every game at once (resumes when run again)")
    bt.add_argument("overrides", nargs="*", help="config overrides key=value (e.g. batch_mode=mixed seed=1 dqn.lr=1e-4)")
    bt.add_argument("--config", type=Path, help="TOML config, e.g. configs/baseline/minatar.toml")
    add_run_options(bt, "runs/baseline/<run name>")
    bt.set_defaults(func=cmd_baseline_train)
